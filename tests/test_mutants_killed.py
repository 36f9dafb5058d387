"""Tests written for the mutants that survived the suite (issue #20, item 6; bench/mutation.py).

Each test asserts a documented property of the code that the planted bug breaks, checked
against an independent computation (a brute-force greedy, a hand-computed threshold, the
exact statistics of the inputs), never against the implementation's own output:

* M03: global ranking normalises each group by its L2 norm (not by its size);
* M09: taylor scores have unit L2 norm per layer;
* M17: ``recalibrate_bn`` stores the exact average of the per-batch statistics;
* M20: ThiNet's greedy removal is the step-by-step greedy on the true error;
* M21: ``fit_bias="auto"`` leaves a bias-free consumer bias-free;
* M22: ThiNet's target is ``y - b`` for a consumer with a bias;
* M23: LASSO's penalty search ends on a penalty whose support has exactly ``keep`` channels;
* M26: MRTS eq. 11 at an exact tie ``delta * total == partial sum``;
* M30: a ratio budget keeps ``C - round(ratio * C)`` channels (rounded, not truncated).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from prunekit.criteria import score
from prunekit.data.dataset import ImageDataset
from prunekit.engine import analyse
from prunekit.engine.budget import widths_at_ratio
from prunekit.engine.ranking import global_widths
from prunekit.methods import lasso, thinet
from prunekit.methods.reconstruct import least_squares_weights, sample_group, scaled_weights
from prunekit.methods.slimming import layer_thresholds, threshold_widths
from prunekit.train.bn import recalibrate_bn

torch.set_num_threads(1)


class Net(nn.Module):
    """``conv1 -> bn1 -> relu -> conv2 (bias optional) -> bn2 -> relu -> pool -> fc``."""

    def __init__(self, c1: int = 6, c2: int = 5, bias2: bool = False, bn2: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=bias2)
        self.bn2 = nn.BatchNorm2d(c2) if bn2 else nn.Identity()
        self.fc = nn.Linear(c2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _data(n: int = 16, size: int = 8, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(n) % 10, mean=(0.5,), std=(0.25,), num_classes=10,
                        name="random")


def _net(seed: int = 0, **kw) -> Net:
    torch.manual_seed(seed)
    model = Net(**kw).eval()
    with torch.no_grad():  # non-trivial BatchNorms and a non-zero classifier bias
        for bn in (model.bn1, model.bn2):
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
        model.fc.bias.uniform_(-1.0, 1.0)
        if model.conv2.bias is not None:
            model.conv2.bias.uniform_(-1.0, 1.0)
    return model


# ------------------------------------------------------------------ M03: global normalisation
def test_global_ranking_divides_each_group_by_its_l2_norm() -> None:
    """Nine equal scores (L2 norm 3) and ``[2, 10]`` (norm 10.2): normalised, 1/3 against
    0.196 and 0.981, so removing one channel removes b[0]. Dividing by the group size instead
    (1/9 against 1 and 5) would remove a channel of ``a``."""
    scores = {"a": torch.ones(9, dtype=torch.float64), "b": torch.tensor([2.0, 10.0], dtype=torch.float64)}
    normed = {k: v / v.norm() for k, v in scores.items()}
    lowest = min((float(v), k) for k, s in normed.items() for v in s)
    assert lowest[1] == "b"                                  # the premise, by hand
    assert global_widths(scores, 1 / 11, "l2") == {"a": 9, "b": 1}
    assert global_widths(scores, 1 / 11) == {"a": 9, "b": 1}  # l2 is the default
    assert global_widths(scores, 1 / 11, "none") == {"a": 8, "b": 2}


# ------------------------------------------------------------------ M09: taylor normalisation
def test_taylor_scores_have_unit_l2_norm_per_layer() -> None:
    """The criterion's documented per-layer L2 normalisation (Molchanov et al., 2017): every
    single-layer group's taylor scores have norm 1, and they are proportional to the raw
    |mean(activation * gradient)| computed here with hooks."""
    model, data = _net(), _data()
    info = analyse(model, data.example_input(1))
    s = score(info, "taylor", data, samples=16, batch_size=16)
    assert set(s) == {"conv1", "conv2"}
    for name, v in s.items():
        assert float(v.double().norm()) == pytest.approx(1.0, abs=1e-9), name
    # the raw values of bn2's output (the group's slot): one batch of all 16 images
    acts = {}
    h = model.bn2.register_forward_hook(lambda m, i, o: acts.update(o=o) or o.retain_grad())
    x = torch.stack([data[i][0] for i in range(16)])
    y = torch.tensor([int(data[i][1]) for i in range(16)])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    h.remove()
    raw = (acts["o"].detach() * acts["o"].grad).mean(dim=(0, 2, 3)).abs().double()
    assert float(raw.norm()) != pytest.approx(1.0, rel=1e-3)  # the normalisation does something
    torch.testing.assert_close(s["conv2"].double(), raw / raw.norm(), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ M17: BN recalibration
def test_recalibrate_bn_stores_the_exact_average_of_the_batch_statistics() -> None:
    """Four batches of 8: the running mean is the mean of the BatchNorm's inputs over all 32
    samples and positions, the running variance the average of the four batches' unbiased
    variances (the cumulative average, momentum None), whatever the statistics were before."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
    model = nn.Sequential(conv, bn, nn.ReLU())
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(7.0)
    x = torch.randn(32, 2, 6, 6) * 3 + 1
    model.eval()
    assert recalibrate_bn(model, x, samples=32, batch_size=8) == 32
    with torch.no_grad():
        u = conv(x).double()  # [32, 3, 6, 6]: the BatchNorm's inputs
    mean = u.mean(dim=(0, 2, 3))
    var = torch.stack([u[i:i + 8].transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True)
                       for i in range(0, 32, 8)]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not bn.training and int(bn.num_batches_tracked) == 4


# ------------------------------------------------------------------ M20: ThiNet's greedy
def _greedy_reference(X: torch.Tensor, y: torch.Tensor, keep: int) -> list[int]:
    """ThiNet's greedy removal, recomputing ``||y - sum_{j kept} X_j||^2`` for each candidate
    (ties: the lowest index)."""
    C = X.shape[1]
    removed: list[int] = []
    for _ in range(C - keep):
        best, best_err = -1, float("inf")
        for c in range(C):
            if c in removed:
                continue
            kept = [j for j in range(C) if j not in removed and j != c]
            err = float((y - X[:, kept].sum(1)).pow(2).sum())
            if err < best_err:
                best, best_err = c, err
        removed.append(best)
    return sorted(set(range(C)) - set(removed))


@pytest.mark.parametrize("seed", range(4))
def test_thinet_greedy_equals_the_step_by_step_greedy_on_correlated_columns(seed: int) -> None:
    """Strongly correlated columns (a shared factor with mixed signs: the cross terms matter),
    with ``y = X 1`` and with a target the full set misses: every greedy step matches."""
    g = torch.Generator().manual_seed(seed)
    n, C = 300, 10
    f = torch.randn(n, 2, generator=g, dtype=torch.float64)
    load = torch.randn(2, C, generator=g, dtype=torch.float64) * 2
    X = f @ load + 0.3 * torch.randn(n, C, generator=g, dtype=torch.float64)
    for y in (X.sum(1), X[:, :4].sum(1) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)):
        for keep in (2, 5, 8):
            assert thinet.select_channels(X, y, keep) == _greedy_reference(X, y, keep), (seed, keep)


# ------------------------------------------------------------------ M21 / M22 / M19: reconstruction
def _samples(model: Net, group: str = "conv1"):
    data = _data()
    info = analyse(model, data.example_input(1))
    g = next(g for g in info.groups if g.name == group)
    return sample_group(model, model, g, data, torch.arange(16), samples_per_image=20)


def test_auto_fit_bias_leaves_bias_free_consumers_bias_free() -> None:
    """``fit_bias="auto"`` refits a bias only where the consumer has one."""
    keep = [0, 2, 3, 5]
    (free,) = _samples(_net(bias2=False))
    assert free.bias is None
    assert least_squares_weights([free], keep)["conv2"][1] is None
    assert least_squares_weights([free], keep, fit_bias="auto")["conv2"][1] is None
    assert least_squares_weights([free], keep, fit_bias=True)["conv2"][1] is not None
    (with_bias,) = _samples(_net(bias2=True))
    assert with_bias.bias is not None
    assert least_squares_weights([with_bias], keep)["conv2"][1] is not None
    assert least_squares_weights([with_bias], keep, fit_bias=False)["conv2"][1] is None


def test_lasso_pruning_adds_no_bias_to_a_bias_free_consumer() -> None:
    """End to end: LASSO pruning (default ``fit_bias="auto"``) keeps the architecture's bias
    flags: conv2 (followed by BatchNorm) stays bias-free."""
    model, data = _net(bias2=False), _data()
    res = prunekit.prune(model, data.example_input(1), method="lasso", ratio=0.5, data=data,
                         calib_images=16, evaluate=False)
    assert res.model.conv1.weight.shape[0] == 3
    assert res.model.conv2.bias is None and res.model.conv1.bias is None


def test_thinet_target_removes_the_consumer_bias() -> None:
    """On an unpruned network the per-channel contributions of a consumer WITH a bias sum to its
    output minus the bias (``y_hat = y - b``), for a conv consumer and the linear classifier."""
    for group in ("conv1", "conv2"):
        (cs,) = _samples(_net(bias2=True), group)
        assert cs.bias is not None and float(cs.bias.abs().min()) > 1e-3
        X, y = cs.contributions()
        scale = float(y.abs().max())
        assert float((X.sum(1) - y).abs().max()) <= 1e-5 * scale, group
        T = cs.T[cs.rows_s, cs.rows_o]  # the output with the bias in it
        assert float((X.sum(1) - T).abs().max()) > 1e-3, group


def test_thinet_scales_multiply_the_kept_columns() -> None:
    """``W[:, j] *= w_j`` (ThiNet, optimisation target 2): the new columns are the old ones times
    the least-squares scales of the kept channels."""
    (cs,) = _samples(_net(bias2=False))
    keep = [1, 2, 4]
    X, y = cs.contributions()
    w = thinet.scale(X, y, keep)
    assert float((w - 1).abs().max()) > 1e-3  # the premise: scales are not all 1
    W, b = scaled_weights([cs], keep, thinet.scale)["conv2"]
    old = cs.weight.detach().double()  # [out, in * 3 * 3]; column cols[i] carries channel chan[i]
    expected = torch.stack([old[:, int(col)] * float(w[keep.index(int(ch))])
                            for col, ch in zip(cs.cols, cs.chan, strict=True) if int(ch) in keep], 1)
    assert b is None and expected.shape == (5, 3 * 9)
    torch.testing.assert_close(W.double(), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ M23: LASSO penalty search
@pytest.mark.parametrize("keep", [2, 4, 6])
def test_lasso_search_finds_a_penalty_with_exactly_keep_nonzeros(keep: int) -> None:
    """Independent columns: the LASSO path passes every support size, so the bisection must end
    on a penalty with exactly ``keep`` non-zeros (``exact``), and an independent fit at that
    penalty has the chosen channels as its support. Along the search more penalty never gives
    more non-zeros."""
    from sklearn.linear_model import Lasso

    g = np.random.default_rng(keep)
    n, C = 400, 8
    X = g.standard_normal((n, C))
    beta = np.linspace(0.2, 1.6, C)[g.permutation(C)]
    y = X @ beta + 0.05 * g.standard_normal(n)
    chosen, search = lasso.select_channels(X, y, keep, return_search=True)
    assert search.exact and search.nonzero == keep and len(chosen) == keep
    s = float(np.sqrt(np.mean(y * y)))
    fit = Lasso(alpha=search.alpha, fit_intercept=False, max_iter=100000, tol=1e-10).fit(X / s, y / s)
    assert sorted(np.flatnonzero(fit.coef_).tolist()) == chosen
    assert chosen == sorted(np.argsort(-np.abs(beta))[:keep].tolist())  # the largest true ones
    path = sorted(search.path)
    assert all(a[1] >= b[1] for a, b in zip(path, path[1:], strict=False))


# ------------------------------------------------------------------ M26: MRTS eq. 11 at ties
def _eq11_reference(values: list[float], delta: float) -> float:
    """The first sorted ``gamma_t`` with ``sum_N < delta * total <= sum_N + gamma_t``."""
    s = sorted(abs(v) for v in values)
    limit = delta * sum(s)
    acc = 0.0
    for v in s:
        if acc < limit <= acc + v:
            return v
        acc += v
    return s[0] if limit <= 0 else s[-1]


def test_mrts_threshold_at_an_exact_tie_keeps_gamma_t() -> None:
    """Factors [1, 3] at delta = 0.25: the limit 1 equals the first factor, so eq. 11 holds with
    N empty and gamma_t = 1 (``0 < 1 <= 1``): nothing is cut. Dyadic factors make every limit
    equal to a partial sum exactly, and each threshold matches the reference."""
    assert layer_thresholds([torch.tensor([1.0, 3.0])], 0.25) == [1.0]
    assert threshold_widths({"a": torch.tensor([3.0, -1.0])}, 0.25) == {"a": 2}
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        v = torch.randint(0, 4, (7,), generator=g).double()
        v = torch.cat([v, (32 - v.sum()).reshape(1)])[torch.randperm(8, generator=g)]  # total 32
        for k in range(1, 8):
            delta = float(torch.sort(v).values[:k].sum()) / 32  # exact: a partial sum / 2^5
            assert layer_thresholds([v], delta) == [_eq11_reference(v.tolist(), delta)], (v, delta)
    # exact zeros: with any positive delta they are cut, the first non-zero factor is kept
    assert layer_thresholds([torch.tensor([0.0, 0.0, 0.5, 1.0])], 1e-3) == [0.5]


# ------------------------------------------------------------------ M30: ratio rounding
def test_ratio_budget_rounds_the_removed_count() -> None:
    """``C - round(ratio * C)`` (at least one): ratio 0.3 removes round(3.6) = 4 of 12 channels
    and round(1.8) = 2 of 6 (truncation would remove 3 and 1)."""
    torch.manual_seed(0)
    model = Net(c1=12, c2=6).eval()
    x = torch.randn(1, 1, 8, 8)
    info = analyse(model, x)
    assert widths_at_ratio(info, 0.3) == {"conv1": 8, "conv2": 4}
    res = prunekit.prune(copy.deepcopy(model), x, method="l1", ratio=0.3)
    assert res.model.conv1.out_channels == 8 and res.model.conv2.out_channels == 4
