"""Reconstruction pruning: ThiNet (seed 002) and LASSO channel pruning (seed 001)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.criteria import weight_scores
from prunekit.data.dataset import ImageDataset
from prunekit.engine import analyse, apply_plan
from prunekit.engine.budget import count_macs_params
from prunekit.errors import ConfigError, DataError
from prunekit.methods import PruneContext, lasso, thinet
from prunekit.methods.oneshot import keep_top
from prunekit.methods.reconstruct import conv_patches, sample_group
from prunekit.models import create

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers
def _synthetic(n: int = 32, size: int = 16, channels: int = 1, seed: int = 1) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(n) % 10, mean=(0.5,) * channels, std=(0.25,) * channels,
                        num_classes=10, name="random")


def _ctx(model: nn.Module, x: torch.Tensor, **kw) -> PruneContext:
    """A method's context the way :func:`prunekit.prune` builds it: the method consumes a copy
    of ``model``; ``model`` itself is the read-only original (reconstruction targets)."""
    return PruneContext(copy.deepcopy(model), x, original=model, **kw)


def _ls_error(X: torch.Tensor, y: torch.Tensor, subset) -> float:
    A = X[:, list(subset)]
    w = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    return float(((A @ w - y) ** 2).sum())


def _planted(seed: int, n: int = 1500, C: int = 10, keep: int = 5):
    """y is made of ``keep`` modest channels; the other channels are large (so the largest-L1
    choice keeps the wrong ones) and only partly cancel in the sum over all channels."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randperm(C, generator=g)[:keep].sort().values.tolist()
    scale = torch.full((C,), 3.0, dtype=torch.float64)
    scale[true] = 1.0
    X = torch.randn(n, C, generator=g, dtype=torch.float64) * scale
    X += 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)  # a shared component: correlated
    w = 1.0 + 0.3 * torch.randn(keep, generator=g, dtype=torch.float64)
    y = X[:, true] @ w + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, true


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selectors_reach_the_brute_force_optimum(seed):
    X, y, _ = _planted(seed)
    keep = 5
    best = min(_ls_error(X, y, s) for s in itertools.combinations(range(10), keep))
    l1 = X.abs().sum(0).argsort(descending=True)[:keep].tolist()
    l1_err = _ls_error(X, y, l1)
    for select in (thinet.select_channels, lasso.select_channels):
        chosen = select(X, y, keep)
        assert len(chosen) == keep and chosen == sorted(set(chosen))
        err = _ls_error(X, y, chosen)
        assert err <= 1.05 * best, (select.__module__, chosen, err, best)
        assert err < l1_err


def test_thinet_greedy_is_the_seed_formula_when_y_is_the_sum():
    """With y = sum_c X_c the score of a candidate is ||sum_{j in T + {c}} X_j||^2 (seed 002)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 12, generator=g, dtype=torch.float64)
    X = X * torch.rand(12, generator=g, dtype=torch.float64)
    removed: list[int] = []
    for _ in range(7):
        cands = [c for c in range(12) if c not in removed]
        removed.append(min(cands, key=lambda c: float(X[:, removed + [c]].sum(1).pow(2).sum())))
    expected = sorted(set(range(12)) - set(removed))
    assert thinet.select_channels(X, X.sum(1), 5) == expected


def test_thinet_scale_recovers_least_squares():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 6, generator=g, dtype=torch.float64)
    w_true = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    y = X[:, [0, 2, 5]] @ w_true
    assert torch.allclose(thinet.scale(X, y, [0, 2, 5]), w_true, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_lasso_returns_exactly_keep(seed):
    g = torch.Generator().manual_seed(seed)
    C = 16
    base = torch.randn(800, 4, generator=g, dtype=torch.float64)
    X = torch.cat([base @ torch.randn(4, C // 2, generator=g, dtype=torch.float64),  # collinear half
                   torch.randn(800, C // 2, generator=g, dtype=torch.float64)], 1)
    y = X @ torch.rand(C, generator=g, dtype=torch.float64)
    for keep in range(1, C + 1):
        chosen, search = lasso.select_channels(X, y, keep, return_search=True)
        assert len(chosen) == keep and len(set(chosen)) == keep
        assert chosen == sorted(chosen) and 0 <= chosen[0] and chosen[-1] < C
        assert search.fits <= 60
    # degenerate target: all coefficients zero at every penalty, still exactly `keep`
    assert len(lasso.select_channels(X, torch.zeros(800, dtype=torch.float64), 3)) == 3


def test_selectors_validate_input():
    X = torch.randn(10, 4)
    with pytest.raises(ConfigError):
        thinet.select_channels(X, torch.randn(9), 2)
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ConfigError):
            lasso.select_channels(X, torch.randn(10), bad)
        with pytest.raises(ConfigError):
            thinet.select_channels(X, torch.randn(10), bad)


def test_thinet_selection_on_a_large_layer():
    """50,000 samples x 512 channels (its speed: bench/selection_scaling.py): the
    212 channels the target does not contain go first, so all 256 kept channels are among the
    300 that make up y."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50_000, 512, generator=g)
    y = X[:, :300].sum(1)
    kept = thinet.select_channels(X, y, 256)
    assert len(kept) == 256 and kept == sorted(set(kept)) and max(kept) < 300


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(3, 1), dilation=2, padding=(2, 0), bias=False),
                                dict(kernel_size=3, padding=1, padding_mode="reflect"),
                                dict(kernel_size=1)])
def test_conv_patches_reproduce_the_convolution(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **kw).double()
    x = torch.randn(3, 5, 9, 8, dtype=torch.float64)
    y = conv(x)
    n_idx = torch.tensor([0, 1, 2, 2])
    oh = torch.tensor([0, y.shape[2] - 1, 1, 0])
    ow = torch.tensor([0, y.shape[3] - 1, 2, y.shape[3] - 1])
    P = conv_patches(x, conv, n_idx, oh, ow)
    pred = P @ conv.weight.flatten(1).T + (conv.bias if conv.bias is not None else 0)
    assert torch.allclose(pred, y[n_idx, :, oh, ow], atol=1e-10)


def test_contributions_sum_to_the_output_on_an_unpruned_model():
    """Before any pruning, sum_c X[:, c] is y (the original output minus bias), and the
    consumer's output is reproduced (float32 round-off only)."""
    torch.manual_seed(0)
    model = create("simplecnn", num_classes=10, in_channels=1, input_size=16).eval()
    data = _synthetic(8)
    info = analyse(model, data.example_input(1))
    for g in info.groups:
        for cs in sample_group(model, model, g, data, torch.arange(8), samples_per_image=5):
            X, y = cs.contributions()
            assert (X.sum(1) - y).abs().max() <= 1e-4 * y.abs().max()
            assert cs.relative_error() < 1e-5


# ----------------------------------------------------------------------------- whole network
@pytest.fixture
def trained(trained_resnet8, grating_data):
    """A ResNet-8 trained on learnable synthetic images (real ones are not needed to compare
    reconstruction errors), its training and test sets."""
    train, test = grating_data
    return trained_resnet8, train, test


@pytest.mark.parametrize("method", ["thinet", "lasso"])
def test_whole_network_reconstructs_better_than_l1(trained, method):
    model, train, test = trained
    x = train.example_input(1)
    out = prunekit.methods.get(method)(_ctx(model, x, ratio=0.5, train_set=train,
                                            options={"calib_images": 200}))
    # residual trunks are left alone by default; each block's internal channels are halved
    assert [gp.group for gp in out.plan] == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    assert all(len(gp.keep) == gp.size // 2 for gp in out.plan)
    held_out, _ = test.batch(torch.arange(500))
    with torch.no_grad():
        ref = model(held_out)
        mse = float(((out.model(held_out) - ref) ** 2).mean())
        info = analyse(model, x)
        widths = {gp.group: len(gp.keep) for gp in out.plan}
        l1 = apply_plan(model, x, keep_top(info, weight_scores(info, "l1"), widths))
        mse_l1 = float(((l1(held_out) - ref) ** 2).mean())
        assert mse < mse_l1, (mse, mse_l1)
        # the plan (with its reconstructed weights) replays exactly on a fresh copy
        replay = apply_plan(model, x, out.plan)
        assert torch.equal(replay(held_out), out.model(held_out))
    layers = out.extra["layers"]
    assert len(layers) == 3 and out.extra["largest_layer"] == "layer3.0.conv1"
    largest = max(layers, key=lambda r: (r["size"], r["select_s"]))
    assert out.extra["largest_layer_select_s"] == largest["select_s"]
    if method == "lasso":  # a least-squares refit cannot be worse on its own samples
        assert all(r["err_reconstructed"] <= r["err_removed"] + 1e-6 for r in layers)


@pytest.mark.parametrize("name,kw", [("densenet40", {"width": 0.5}), ("mobilenetv2", {"width": 0.25})])
@pytest.mark.parametrize("method", ["thinet", "lasso"])
def test_densenet_and_mobilenet_prune(name, kw, method):
    torch.manual_seed(0)
    model = create(name, num_classes=10, in_channels=1, **kw).eval()
    data = _synthetic(16)
    x = data.example_input(2)
    out = prunekit.methods.get(method)(_ctx(model, x, ratio=0.4, train_set=data,
                                            options={"calib_images": 16, "samples_per_image": 8}))
    macs0, params0 = count_macs_params(model, x)
    macs1, params1 = count_macs_params(out.model, x)
    assert macs1 < 0.8 * macs0 and params1 < params0
    assert out.model(x).shape == (2, 10)
    if name == "densenet40":  # every layer's output is read by several layers: pruned by stacking
        assert len(out.plan) == len(analyse(model, x).groups)
        assert any(len(r["consumers"]) > 5 for r in out.extra["layers"])
    else:  # expansion channels: read by the projection after the depthwise conv
        layers = {r["group"]: r for r in out.extra["layers"]}
        assert list(layers["features.3.conv.0.0"]["consumers"]) == ["features.3.conv.2"]
        assert "features.2.conv.2" in out.extra["skipped_groups"]  # a residual trunk
    with torch.no_grad():
        assert torch.equal(apply_plan(model, x, out.plan)(x), out.model(x))


def test_prune_trunk_and_target_macs():
    torch.manual_seed(0)
    model = create("resnet8", num_classes=10, in_channels=1).eval()
    data = _synthetic(16)
    x = data.example_input(1)
    out = thinet.run(_ctx(model, x, ratio=0.5, train_set=data,
                          options={"calib_images": 8, "prune_trunk": True}))
    assert "conv1" in [gp.group for gp in out.plan] and not out.extra["skipped_groups"]
    with torch.no_grad():
        assert torch.equal(apply_plan(model, x, out.plan)(x), out.model(x))
    res = prunekit.prune(model, x, method="lasso", target_macs=0.6, data=data, calib_images=8)
    assert res.report["macs_fraction"] <= 0.6
    assert [r["group"] for r in res.report["method_layers"]] == [gp.group for gp in res.plan]
    with torch.no_grad():  # the plan, reconstructed weights included, rebuilds the returned model
        assert torch.equal(apply_plan(model, x, res.plan)(data.example_input(4)),
                           res.model(data.example_input(4)))


def test_finetune_between_layers_runs(monkeypatch):
    """``finetune_epochs_between=0.5`` fine-tunes the network being pruned after every pruned
    layer but the last, on the calibration set, for half an epoch each; the original network
    (the reconstruction targets) is never trained."""
    import prunekit.train

    torch.manual_seed(0)
    model = create("simplecnn", num_classes=10, in_channels=1, input_size=16).eval()
    data = _synthetic(256)
    x = data.example_input(1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    real_fit = prunekit.train.fit

    def spy(net, train_set, cfg, **kw):
        widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
        weights = [p.detach().clone() for p in net.parameters()]
        result = real_fit(net, train_set, cfg, **kw)
        changed = any(not torch.equal(a, b) for a, b in zip(weights, net.parameters(), strict=True))
        calls.append({"net": net, "data": train_set, "widths": widths, "changed": changed,
                      "schedule": (cfg.epochs, cfg.max_steps_per_epoch, cfg.batch_size)})
        return result

    monkeypatch.setattr(prunekit.train, "fit", spy)
    out = thinet.run(_ctx(model, x, ratio=0.5, train_set=data,
                          options={"calib_images": 8, "finetune_epochs_between": 0.5}))
    assert len(out.plan) == 4 and out.train_epochs == pytest.approx(1.5)
    assert len(calls) == 3                                    # between 4 layers
    assert all(c["net"] is out.model and c["data"] is data and c["changed"] for c in calls)
    full = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    for k, c in enumerate(calls):                             # after layer k + 1 of 4 is pruned
        assert sum(a < b for a, b in zip(c["widths"], full, strict=True)) == k + 1
    # half an epoch: one of the two 128-image batches of the 256 calibration images
    assert [c["schedule"] for c in calls] == [(1, 1, 128)] * 3
    assert out.model(x).shape == (1, 10)
    # the original (the reconstruction targets) is never trained
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    monkeypatch.setattr(prunekit.train, "fit", real_fit)
    plain = thinet.run(_ctx(model, x, ratio=0.5, train_set=data, options={"calib_images": 8}))
    assert plain.train_epochs == 0
    assert not torch.equal(plain.model(x), out.model(x))      # the fine-tuning mattered


def test_needs_data():
    model = create("resnet8", num_classes=10, in_channels=1).eval()
    with pytest.raises(DataError):
        thinet.run(_ctx(model, torch.randn(1, 1, 16, 16), ratio=0.5))
    with pytest.raises(ConfigError):
        lasso.run(_ctx(model, torch.randn(1, 1, 16, 16), ratio=0.5, train_set=_synthetic(4),
                       options={"calib_images": 0}))


class _ChannelLast(nn.Module):
    """ConvNeXt's pattern: conv -> permute -> Linear -> GELU -> Linear -> permute; the Linear
    consumers read channel-last [N, H, W, C] maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pw1 = nn.Linear(8, 16)
        self.pw2 = nn.Linear(16, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.pw2(torch.nn.functional.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        return self.fc(y.mean((2, 3)))


def test_channel_last_linear_consumers_are_sampled_at_the_same_places():
    """A Linear reading [N, H, W, C] is sampled at drawn positions like a conv's output pixels:
    before pruning, the sampled inputs times the weights reproduce the original outputs drawn
    at those places (a misaligned place or a channel-first reading would not), and ThiNet
    prunes through both Linear consumers."""
    torch.manual_seed(0)
    model, data = _ChannelLast().eval(), _synthetic(8)
    info = analyse(model, data.example_input(1))
    consumers = set()
    for g in info.groups:
        for cs in sample_group(model, model, g, data, torch.arange(8), samples_per_image=5):
            consumers.add(cs.name)
            X, y = cs.contributions()
            assert 8 * 5 <= X.shape[0] <= 8 * 16  # a few of the 16x16 places per image, not whole maps
            assert (X.sum(1) - y).abs().max() <= 1e-4 * y.abs().max()
            assert cs.relative_error() < 1e-5
    assert consumers >= {"pw1", "pw2"}
    res = prunekit.prune(model, data.example_input(1), method="thinet", ratio=0.5, data=data,
                         calib_images=8, evaluate=False)
    assert res.model.pw1.in_features == 4 and res.model.pw1.out_features == 8
