"""Selection: every method that ranks channels removes the RIGHT ones (issue #20, item 1).

Each test builds a tiny network whose channel scores are set by hand (filters with known
norms, BatchNorm scales, input maps with known activation statistics, classifier columns with
known gradients) and asserts the exact channels kept, read from ``result.plan`` and from which
original filters survive in the pruned model. The constructions make the criteria disagree
with each other, with "keep the first channels" and with "keep the lowest", so a reversed
ranking, a swapped criterion or a swapped normalisation fails.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from prunekit.api import PruneResult
from prunekit.data.dataset import ImageDataset
from prunekit.engine import DependencyInfo
from prunekit.engine.ranking import global_widths
from prunekit.methods import PruneContext, lasso, oneshot, thinet

torch.set_num_threads(1)


# ------------------------------------------------------------------------------- helpers
class Chain(nn.Module):
    """``conv{i} -> bn{i} -> relu`` for each width, global average pooling, ``fc``.

    Every conv is bias-free with ``kernel x kernel`` filters ("same" padding); the BatchNorms
    start as identities (scale 1, shift 0, running mean 0, running variance 1); ``fc`` is the
    classifier (never pruned). Groups are named ``conv1``, ``conv2`` ...
    """

    def __init__(self, widths: Sequence[int], in_channels: int = 1, kernel: int = 1,
                 classes: int = 10) -> None:
        super().__init__()
        self.depth = len(widths)
        c = in_channels
        for i, w in enumerate(widths, 1):
            setattr(self, f"conv{i}", nn.Conv2d(c, w, kernel, padding=kernel // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(w))
            c = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(self.flatten(self.pool(x)))


def _dataset(images: torch.Tensor, labels: torch.Tensor | None = None) -> ImageDataset:
    """uint8 images as an ImageDataset normalised to ``pixel / 255`` (mean 0, std 1)."""
    c = images.shape[1]
    if labels is None:
        labels = torch.zeros(images.shape[0], dtype=torch.long)
    return ImageDataset(images.to(torch.uint8), labels, mean=(0.0,) * c, std=(1.0,) * c,
                        num_classes=10, name="hand-made")


def _top(values: Sequence[float], n: int) -> list[int]:
    """Indices of the ``n`` largest values, ascending; the cut must not fall on a tie."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if n < len(values):
        assert values[order[n - 1]] > values[order[n]], "construction error: tie at the cut"
    return sorted(order[:n])


def _width(size: int, ratio: float) -> int:
    """Channels a group keeps at ``ratio`` (``C - round(ratio * C)``, at least one)."""
    return max(1, size - int(round(ratio * size)))


def _kept(result: PruneResult, group: str, size: int) -> list[int]:
    """Channels of ``group`` kept by the result's plan (all of them if the plan skips it)."""
    for gp in result.plan:
        if gp.group == group:
            return list(gp.keep)
    return list(range(size))


def _surviving(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """For each row (output channel) of ``pruned``, the index of the equal row of ``original``."""
    rows = []
    for row in pruned:
        match = [i for i, o in enumerate(original) if torch.equal(o, row)]
        assert len(match) == 1, "a pruned row matches no (or several) original rows"
        rows.append(match[0])
    return rows


def _identity_conv(model: Chain, index: int = 1) -> None:
    """Make the 1x1 ``conv{index}`` the identity (channel c reads input channel c)."""
    conv = getattr(model, f"conv{index}")
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(conv.out_channels):
            conv.weight[c, c] = 1.0


def _origins(pruned: Chain) -> list[int]:
    """Original channels surviving in a pruned model whose ``conv1`` was the identity: the
    input channel each remaining filter reads."""
    return [int(row.flatten().argmax()) for row in pruned.conv1.weight]


# ------------------------------------------------------------------ weight criteria and peers
# conv1 (1 -> 8, 3x3) and conv2 (8 -> 6, 3x3). Filter c of a layer has a "rank" r: its 3x3
# kernel holds r + 1 non-zero entries of alternating sign and magnitude (10 - r/5) / sqrt(r + 1),
# so its L2 norm 10 - r/5 FALLS with the rank while its L1 norm (10 - r/5) * sqrt(r + 1) RISES:
# l1 keeps the high ranks, l2 the low ranks. conv2 repeats its kernel over all 8 inputs (every
# input column of conv2 has the same norm, so Torch-Pruning's group magnitude, which adds the
# consumer's columns, ranks by the filters too). The BN scales |gamma| = (g + 1) / 100 follow a
# third order, small enough not to move Torch-Pruning's group magnitude sums.
RANK1 = [2, 7, 4, 0, 6, 1, 5, 3]
RANK2 = [3, 0, 5, 1, 4, 2]
GAMMA1 = [6, 5, 1, 0, 7, 4, 3, 2]
GAMMA2 = [5, 2, 0, 4, 1, 3]


def _l2_of(rank: int) -> float:
    return 10.0 - rank / 5


def _l1_of(rank: int) -> float:
    return _l2_of(rank) * math.sqrt(rank + 1)


def _kernel(rank: int) -> torch.Tensor:
    """A 3x3 kernel with ``rank + 1`` entries of alternating sign, L2 norm ``_l2_of(rank)``."""
    k = torch.zeros(9)
    a = rank + 1
    for i in range(a):
        k[i] = (-1) ** i * _l2_of(rank) / math.sqrt(a)
    return k.view(3, 3)


def _weight_net() -> Chain:
    model = Chain([8, 6], in_channels=1, kernel=3).eval()
    with torch.no_grad():
        for c, r in enumerate(RANK1):
            model.conv1.weight[c, 0] = _kernel(r)
        for j, r in enumerate(RANK2):
            model.conv2.weight[j] = _kernel(r).expand(8, 3, 3)
        for bn, ranks in ((model.bn1, GAMMA1), (model.bn2, GAMMA2)):
            bn.weight.copy_(torch.tensor([(-1) ** i * (g + 1) / 100 for i, g in enumerate(ranks)]))
        model.fc.weight.copy_(torch.linspace(-1, 1, 10)[:, None].expand(10, 6))
        model.fc.bias.zero_()
    return model


WEIGHT_X = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
HALF = (_width(8, 0.5), _width(6, 0.5))        # channels kept at ratio 0.5: 4 of 8, 3 of 6


def _weight_scores(criterion: str) -> tuple[list[float], list[float]]:
    """The hand-set scores of both groups of ``_weight_net`` under ``criterion``."""
    if criterion == "l1":
        return [_l1_of(r) for r in RANK1], [8 * _l1_of(r) for r in RANK2]
    if criterion == "l2":
        return [_l2_of(r) for r in RANK1], [math.sqrt(8) * _l2_of(r) for r in RANK2]
    if criterion == "bn-scale":
        return [(g + 1) / 100 for g in GAMMA1], [(g + 1) / 100 for g in GAMMA2]
    raise AssertionError(criterion)


def _weight_expected(criterion: str, n1: int, n2: int) -> tuple[list[int], list[int]]:
    s1, s2 = _weight_scores(criterion)
    return _top(s1, n1), _top(s2, n2)


def _weight_survivors(model: nn.Module) -> tuple[list[int], list[int]]:
    """Original filters of conv1 and conv2 present in a pruned copy of ``_weight_net``."""
    ref = _weight_net()
    return (_surviving(ref.conv1.weight, model.conv1.weight),
            _surviving(ref.conv2.weight[:, :1], model.conv2.weight[:, :1]))


def _check_weight_construction() -> None:
    """The premise of the weight tests: the hand-set scores are what the construction says (L1
    up, L2 down with the rank), and l1, l2 and bn-scale keep three different sets, none the
    first or the last channels."""
    model = _weight_net()
    for crit, (s1, s2) in ((c, _weight_scores(c)) for c in ("l1", "l2")):
        p = 1 if crit == "l1" else 2
        got1 = model.conv1.weight.flatten(1).norm(p=p, dim=1)
        got2 = model.conv2.weight.flatten(1).norm(p=p, dim=1)
        assert torch.allclose(got1, torch.tensor(s1), rtol=1e-5)
        assert torch.allclose(got2, torch.tensor(s2), rtol=1e-5)
    sets = {c: _weight_expected(c, *HALF) for c in ("l1", "l2", "bn-scale")}
    assert len({(tuple(a), tuple(b)) for a, b in sets.values()}) == 3
    for s1, s2 in sets.values():
        assert s1 not in ([0, 1, 2, 3], [4, 5, 6, 7]) and s2 not in ([0, 1, 2], [3, 4, 5])


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale"])
def test_weight_criterion_keeps_its_top_channels(criterion: str) -> None:
    """One-shot l1 / l2 / bn-scale at ratio 0.5 keep, in each group, exactly the channels with
    the highest hand-set filter norm / |gamma|; the pruned model holds those original filters."""
    _check_weight_construction()
    res = prunekit.prune(_weight_net(), WEIGHT_X, method=criterion, ratio=0.5)
    want1, want2 = _weight_expected(criterion, *HALF)
    assert _kept(res, "conv1", 8) == want1
    assert _kept(res, "conv2", 6) == want2
    assert _weight_survivors(res.model) == (want1, want2)
    ref = _weight_net()
    assert torch.equal(res.model.bn1.weight, ref.bn1.weight[want1])


@pytest.mark.parametrize("peer", ["tp:l1", "tp:l2", "tp:bn-scale"])
def test_peer_keeps_the_same_top_channels(peer: str) -> None:
    """Torch-Pruning's l1 / l2 / bn-scale at ratio 0.5 keep the same channels as our criterion
    of the same name on the hand-set network (read from the surviving filters)."""
    res = prunekit.prune(_weight_net(), WEIGHT_X, method=peer, ratio=0.5)
    assert res.plan is None
    assert _weight_survivors(res.model) == _weight_expected(peer[3:], *HALF)


def _random_expected(seed: int, n1: int, n2: int) -> tuple[list[int], list[int]]:
    """``random``'s documented scores: uniform draws of one generator seeded with ``seed``,
    group by group in network order."""
    gen = torch.Generator().manual_seed(seed)
    s1 = torch.rand(8, generator=gen, dtype=torch.float64).tolist()
    s2 = torch.rand(6, generator=gen, dtype=torch.float64).tolist()
    return _top(s1, n1), _top(s2, n2)


def test_random_criterion_keeps_the_top_of_its_seeded_scores() -> None:
    """``random`` keeps the channels with the highest seeded uniform scores; another seed keeps
    other channels."""
    kept = {}
    for seed in (0, 1):
        res = prunekit.prune(_weight_net(), WEIGHT_X, method="random", ratio=0.5, seed=seed)
        kept[seed] = (_kept(res, "conv1", 8), _kept(res, "conv2", 6))
        assert kept[seed] == _random_expected(seed, *HALF)
        assert _weight_survivors(res.model) == kept[seed]
    assert kept[0] != kept[1]


def test_random_peer_keeps_the_top_of_its_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tp:random`` keeps, in each group, the channels with the highest of Torch-Pruning's
    random draws (recorded as they are made; the groups have different sizes, so each draw is
    matched to its group by its length), and its seed decides the draws."""
    import torch_pruning as tp

    draw = tp.importance.RandomImportance.__call__
    drawn: dict[int, list[float]] = {}

    def record(self: object, group: object, **kw: object) -> torch.Tensor:
        v = draw(self, group, **kw)
        drawn[len(v)] = v.tolist()
        return v

    monkeypatch.setattr(tp.importance.RandomImportance, "__call__", record)
    kept = {}
    for seed in (0, 1):
        drawn.clear()
        res = prunekit.prune(_weight_net(), WEIGHT_X, method="tp:random", ratio=0.5, seed=seed)
        assert sorted(drawn) == [6, 8]
        kept[seed] = _weight_survivors(res.model)
        assert kept[seed] == (_top(drawn[8], HALF[0]), _top(drawn[6], HALF[1]))
    assert kept[0] != kept[1]


def test_target_macs_budget_keeps_the_top_channels_at_its_widths() -> None:
    """With a MACs target the searched widths are whatever they are, but the channels kept at
    those widths are still the top l1 filters of each group."""
    res = prunekit.prune(_weight_net(), WEIGHT_X, method="l1", target_macs=0.4)
    widths = res.plan.widths()
    n1, n2 = widths.get("conv1", (8, 8))[1], widths.get("conv2", (6, 6))[1]
    assert n1 < 8 and n2 < 6
    want = _weight_expected("l1", n1, n2)
    assert (_kept(res, "conv1", 8), _kept(res, "conv2", 6)) == want
    assert _weight_survivors(res.model) == want


# ------------------------------------------------------------------------- data criteria
# conv1 is the 1x1 identity on 8 input channels and bn1 the identity, so channel c's map (the
# BN output the data criteria read, rectified) is input channel c / 255 up to BN's constant
# 1 / sqrt(1 + eps). Two 2x2 images; each channel is one pattern of amplitude h:
#   "flat"   h everywhere in both images        mean h     std 0       l2 2h          var 0
#   "spot"   h at one place in both images      mean h/4   std h*3^.5/4 l2 h          var 0
#   "flash"  h everywhere in image 0, 0 in 1    mean h/2   std 0       l2 h (mean)    var h^2
#   "blip"   h at one place in image 0, 0 in 1  mean h/8   std h*3^.5/8 l2 h/2        var h^2/4
#   "pair"   h at two places in image 0, 0 in 1 mean h/4   std h/4     l2 h/2^.5      var h^2/2
# ("mean", "std": over the places, averaged over images; "l2": per-image norm averaged; "var":
# variance of the per-image norm over the images; apoz keeps 1 - the share of zeros: flat 1,
# flash 1/2, spot and pair 1/4, blip 1/8.) The amplitudes make apoz, mean-mean, mean-std,
# mean-l2 and var-l2 keep five different sets of four channels (mean-l1 = 4 x mean-mean on these
# non-negative maps: the same set as mean-mean).
PATTERNS = [("spot", 240), ("flat", 56), ("blip", 250), ("flash", 180), ("pair", 140),
            ("spot", 200), ("flat", 24), ("flash", 80)]


def _pattern(kind: str, h: int, c: int) -> torch.Tensor:
    """Images 0 and 1 of one channel, ``[2, 2, 2]`` (the hot places vary with the channel)."""
    m = torch.zeros(2, 4)
    spot = [c % 4, (c + 1) % 4]
    if kind == "flat":
        m[:] = h
    elif kind == "spot":
        m[0, spot[0]] = m[1, spot[1]] = h
    elif kind == "flash":
        m[0] = h
    elif kind == "blip":
        m[0, spot[0]] = h
    elif kind == "pair":
        m[0, spot] = h
    return m.view(2, 2, 2)


def _activation_data(copies: int = 40) -> ImageDataset:
    """The two images, repeated: 80 images, scored in two batches (64 + 16) with the same
    statistics as the pair."""
    images = torch.stack([_pattern(k, h, c) for c, (k, h) in enumerate(PATTERNS)], 1)
    return _dataset(images.repeat(copies, 1, 1, 1), torch.tensor([0, 1]).repeat(copies))


def _reference_statistic(criterion: str, maps: torch.Tensor) -> float:
    """The documented statistic of one channel's rectified maps ``[N, H, W]`` (plain float64
    formulas)."""
    a = maps.double().flatten(1).clamp_min(0)
    n2 = a.norm(dim=1)
    if criterion == "apoz":
        return float(1 - (a == 0).double().mean())
    if criterion == "mean-mean":
        return float(a.mean(1).mean())
    if criterion == "mean-std":
        return float(a.std(1, unbiased=False).mean())
    if criterion == "mean-l1":
        return float(a.abs().sum(1).mean())
    if criterion == "mean-l2":
        return float(n2.mean())
    if criterion == "var-l2":
        return float(((n2 - n2.mean()) ** 2).mean())
    raise AssertionError(criterion)


ACTIVATION = ("apoz", "mean-mean", "mean-std", "mean-l1", "mean-l2", "var-l2")


def _activation_expected(criterion: str, n: int = 4) -> list[int]:
    images = _activation_data().images
    return _top([_reference_statistic(criterion, images[:, c] / 255) for c in range(8)], n)


def _identity_net(channels: int = 8) -> Chain:
    model = Chain([channels], in_channels=channels, kernel=1).eval()
    _identity_conv(model)
    return model


def _check_activation_construction() -> None:
    """The premise of the data-criteria tests: the five distinct statistics keep five different
    sets of four channels of the hand-made maps, none the first or the last four."""
    sets = {c: tuple(_activation_expected(c)) for c in ACTIVATION}
    assert sets["mean-l1"] == sets["mean-mean"]
    distinct = {sets[c] for c in ACTIVATION if c != "mean-l1"}
    assert len(distinct) == 5 and not distinct & {(0, 1, 2, 3), (4, 5, 6, 7)}
    assert sets["apoz"] == (1, 3, 6, 7)      # the two flat and the two flash channels


@pytest.mark.parametrize("criterion", ACTIVATION)
def test_activation_criterion_keeps_its_top_channels(criterion: str) -> None:
    """Each data criterion at ratio 0.5 keeps exactly the four channels whose statistic of the
    hand-made maps is highest; the pruned conv1 still reads those four input channels."""
    _check_activation_construction()
    data = _activation_data()
    res = prunekit.prune(_identity_net(), data.example_input(2), method=criterion, ratio=0.5,
                         data=data, calib_images=len(data))
    want = _activation_expected(criterion)
    assert _kept(res, "conv1", 8) == want
    assert _origins(res.model) == want



# The data criteria read the BatchNorm's output, not the conv's: here all 8 conv outputs are
# the same map u (identity conv, identical input channels) and only bn1 tells the channels
# apart, by its scale K_c (every statistic but apoz grows with K_c) or by its shift B_c < 0 (the
# share of u above -B_c, i.e. apoz, grows with B_c). Read at the conv, all channels would tie.
BN_SCALE = [0.5, 2.0, 1.25, 0.25, 1.75, 0.75, 1.5, 1.0]
BN_SHIFT = [-0.35, -0.05, -0.3, -0.5, -0.15, -0.45, -0.1, -0.25]


@pytest.mark.parametrize("criterion", ACTIVATION)
def test_data_criteria_read_the_batchnorm_output(criterion: str) -> None:
    """Each data criterion ranks the BN output ``K_c u + B_c`` (rectified): the four channels it
    keeps are the top four of the reference statistic of that map, not the first four."""
    data = _taylor_data()
    model = _identity_net()
    shift = criterion == "apoz"
    with torch.no_grad():
        model.bn1.weight.copy_(torch.ones(8) if shift else torch.tensor(BN_SCALE))
        model.bn1.bias.copy_(torch.tensor(BN_SHIFT) if shift else torch.zeros(8))
        bn_out = model.bn1(data.batch(torch.arange(len(data)))[0])
    want = _top([_reference_statistic(criterion, bn_out[:, c]) for c in range(8)], 4)
    assert want == (_top(BN_SHIFT, 4) if shift else _top(BN_SCALE, 4))
    res = prunekit.prune(model, data.example_input(2), method=criterion, ratio=0.5, data=data,
                         calib_images=len(data))
    assert _kept(res, "conv1", 8) == want != [0, 1, 2, 3]


# ----------------------------------------------------- gradient / output criteria (Taylor, KL)
# conv1 and bn1 are identities and all 8 input channels carry the SAME map, so every channel
# has the same activation; channel c reaches the logits only through fc's column t_c * w. The
# loss gradient at channel c is therefore t_c times one common factor, and so are Taylor-FO
# |mean(a * dL/da)| (ours) and Torch-Pruning's group Taylor |w * dL/dw| (conv row, BN scale,
# fc column). Every label is 0 and w_0 is w's largest entry, so that factor, w . softmax - w_0,
# is negative on every image and cannot cancel. CURL: removing channel c moves the logits by
# -t_c * pooled * w, and KL(p || q) grows with the step, so CURL ranks by t_c as well. Weight
# and activation criteria see eight identical channels here.
T_SCALE = [2, 8, 5, 1, 7, 3, 6, 4]
W_CLASSES = [1.0, -0.6, 0.2, -0.2, 0.6, -1.0, 0.4, -0.4, 0.0, 0.8]


def _taylor_net() -> Chain:
    model = _identity_net()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(W_CLASSES)[:, None] * torch.tensor(T_SCALE)[None, :] / 4)
        model.fc.bias.zero_()
    return model


def _taylor_data(n: int = 8) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (n, 1, 4, 4), generator=g)
    return _dataset(one.expand(n, 8, 4, 4).contiguous())


TAYLOR_TOP4 = _top(T_SCALE, 4)


def test_taylor_criterion_keeps_the_channels_with_the_largest_gradient_share() -> None:
    """One-shot Taylor-FO (the ``taylor`` criterion, run through the one-shot method) keeps the
    four channels with the largest classifier scale t_c."""
    data = _taylor_data()
    ctx = PruneContext(model=_taylor_net(), example_inputs=data.example_input(2), ratio=0.5,
                       train_set=data, options={"calib_images": 8})
    out = oneshot.run(ctx, "taylor")
    assert [list(gp.keep) for gp in out.plan] == [TAYLOR_TOP4]
    assert _origins(out.model) == TAYLOR_TOP4


def test_iterative_taylor_removes_the_lowest_channels_step_by_step() -> None:
    """Iterative Taylor (2 steps, no fine-tuning) removes the two lowest t_c first, then, on the
    smaller model, the next two: the chained plan's indices refer to the model of each step."""
    data = _taylor_data()
    res = prunekit.prune(_taylor_net(), data.example_input(2), method="taylor", ratio=0.5,
                         data=data, steps=2, finetune_epochs_per_step=0, calib_images=8)
    first = _top(T_SCALE, 6)
    left = [T_SCALE[c] for c in first]
    assert [list(gp.keep) for gp in res.plan] == [first, _top(left, 4)]
    assert _origins(res.model) == TAYLOR_TOP4


def test_taylor_peer_keeps_the_channels_with_the_largest_gradient_share() -> None:
    """Torch-Pruning's group Taylor keeps the same four channels."""
    data = _taylor_data()
    res = prunekit.prune(_taylor_net(), data.example_input(2), method="tp:taylor", ratio=0.5,
                         data=data, calib_images=8)
    assert _origins(res.model) == TAYLOR_TOP4


def test_curl_keeps_the_channels_whose_removal_moves_the_output_most() -> None:
    """CURL's KL scores grow with t_c: it keeps the four largest."""
    data = _taylor_data()
    res = prunekit.prune(_taylor_net(), data.example_input(2), method="curl", ratio=0.5,
                         data=data, calib_images=8)
    assert _kept(res, "conv1", 8) == TAYLOR_TOP4
    assert _origins(res.model) == TAYLOR_TOP4
    kl = res.report["method_scores"]["conv1"]
    assert sorted(range(8), key=lambda c: kl[c]) == sorted(range(8), key=lambda c: T_SCALE[c])
    # in two rounds: the two lowest go first, then the next two of the re-scored smaller model
    res = prunekit.prune(_taylor_net(), data.example_input(2), method="curl", ratio=0.5,
                         data=data, calib_images=8, steps=2)
    first = _top(T_SCALE, 6)
    assert [list(gp.keep) for gp in res.plan] == [first, _top([T_SCALE[c] for c in first], 4)]
    assert _origins(res.model) == TAYLOR_TOP4


# ---------------------------------------------------------------------- coupled (residual) group
# The stem conv1 and the block's last conv3 write the same trunk channels (a residual add):
# one group of 6 channels scored as the MEAN over its two producers (l1) / its two BatchNorms
# (bn-scale). Each layer alone, and the larger of the two, would keep other channels:
#   layer 1        .9   .1   .5   .7   .2   .6     top 3: 0 3 5
#   layer 3        .04 -.92  .5   .08  .76  .56    top 3 (by size): 1 4 5
#   mean |.|       .47  .51  .5   .39  .48  .58    top 3: 1 2 5
#   max |.|        .9   .92  .5   .7   .76  .6     top 3: 0 1 4
TRUNK1 = [0.9, 0.1, 0.5, 0.7, 0.2, 0.6]
TRUNK3 = [0.04, -0.92, 0.5, 0.08, 0.76, 0.56]
INNER = [0.3, 0.9, 0.1, 0.6]          # conv2's filters and bn2's scales: keeps 1 and 3


class Residual(nn.Module):
    """``t = relu(bn1(conv1 x))``; ``relu(t + bn3(conv3 relu(bn2(conv2 t))))``; pool; fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(t)))
        return self.fc(self.flatten(self.pool(F.relu(t + self.bn3(self.conv3(h))))))


def _residual_net() -> Residual:
    """Each filter has one non-zero weight, equal to its BatchNorm's scale (so the filter's l1
    and |gamma| are the table's values)."""
    model = Residual().eval()
    with torch.no_grad():
        for conv, bn, values in ((model.conv1, model.bn1, TRUNK1), (model.conv2, model.bn2, INNER),
                                 (model.conv3, model.bn3, TRUNK3)):
            conv.weight.zero_()
            conv.weight[:, 0] = torch.tensor(values)[:, None, None]
            bn.weight.copy_(torch.tensor(values))
    return model


@pytest.mark.parametrize("method", ["l1", "bn-scale", "tp:bn-scale"])
def test_coupled_group_is_ranked_by_the_mean_over_its_layers(method: str) -> None:
    """A residual trunk keeps the channels with the largest mean |score| over its producers /
    BatchNorms (not the first layer's, the last layer's or the largest); the block's own group
    keeps its top two."""
    trunk = [(abs(a) + abs(b)) / 2 for a, b in zip(TRUNK1, TRUNK3, strict=True)]
    want = _top(trunk, 3)
    assert len({tuple(want), tuple(_top(TRUNK1, 3)), tuple(_top([abs(v) for v in TRUNK3], 3)),
                tuple(_top([max(abs(a), abs(b)) for a, b in zip(TRUNK1, TRUNK3, strict=True)], 3))}) == 4
    ref = _residual_net()
    res = prunekit.prune(_residual_net(), torch.ones(1, 1, 4, 4), method=method, ratio=0.5)
    assert _surviving(ref.bn1.weight[:, None], res.model.bn1.weight[:, None]) == want
    assert _surviving(ref.bn3.weight[:, None], res.model.bn3.weight[:, None]) == want
    assert _surviving(ref.bn2.weight[:, None], res.model.bn2.weight[:, None]) == _top(INNER, 2)
    if res.plan is not None:
        assert _kept(res, "conv1", 6) == want



# ------------------------------------------------------------------- concatenated group (DenseNet)
# ``cat([a, b])`` with a = conv1's 5 channels and b = conv2's 3 feeds bn3 (8 features): conv1's
# channel c is scored by bn1[c] and bn3[c], conv2's channel j by bn2[j] and bn3[5 + j]:
#   bn1        .1   .9   .5   .7   .2    top 2: 1 3      bn2         .4   .9   .5    top 1: 1
#   bn3[:5]    .8   .1   .6   .2   .75   top 2: 0 4      bn3[5:]     .7   .05  .65   top 1: 0
#   mean       .45  .5   .55  .45  .475  top 2: 1 2      mean        .55  .475 .575  top 1: 2
# (bn3[0:3] in place of bn3[5:] would make conv2 keep 0.)
CAT_BN1 = [0.1, 0.9, 0.5, 0.7, 0.2]
CAT_BN2 = [0.4, 0.9, 0.5]
CAT_BN3 = [0.8, 0.1, 0.6, 0.2, 0.75, 0.7, 0.05, 0.65]


class Concat(nn.Module):
    """``a = relu(bn1(conv1 x))``, ``b = relu(bn2(conv2 a))``, ``relu(bn3(cat[a, b]))``, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.bn3 = nn.BatchNorm2d(8)
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)))
        return self.fc(self.flatten(self.pool(F.relu(self.bn3(torch.cat([a, b], 1))))))


@pytest.mark.parametrize("method", ["bn-scale", "tp:bn-scale"])
def test_concatenated_channels_are_scored_at_their_own_positions(method: str) -> None:
    """After a concatenation each group reads its own slice of the shared BatchNorm: conv1 keeps
    the top two and conv2 the top one of the mean over their two BatchNorms (the table)."""
    model = Concat().eval()
    with torch.no_grad():
        for bn, values in ((model.bn1, CAT_BN1), (model.bn2, CAT_BN2), (model.bn3, CAT_BN3)):
            bn.weight.copy_(torch.tensor(values))
    mean1 = [(a + b) / 2 for a, b in zip(CAT_BN1, CAT_BN3[:5], strict=True)]
    mean2 = [(a + b) / 2 for a, b in zip(CAT_BN2, CAT_BN3[5:], strict=True)]
    want1, want2 = _top(mean1, 2), _top(mean2, 1)
    assert want2 != _top([(a + b) / 2 for a, b in zip(CAT_BN2, CAT_BN3[:3], strict=True)], 1)
    res = prunekit.prune(model, torch.ones(1, 1, 4, 4), method=method, ratio=0.6)
    assert _surviving(model.bn1.weight[:, None], res.model.bn1.weight[:, None]) == want1
    assert _surviving(model.bn2.weight[:, None], res.model.bn2.weight[:, None]) == want2
    kept3 = want1 + [5 + j for j in want2]
    assert torch.equal(res.model.bn3.weight, model.bn3.weight[kept3])


# ------------------------------------------------------------------------- global ranking
# Three groups with hand-set scores (conv1: A, conv2: B, conv3: C); 2 of the 8 channels go.
#   normalize  A = [3, 1, 6, 7]             B = [2, 4]      C = [8, 3]      two lowest  widths
#   "none"     3, 1, 6, 7                   2, 4            8, 3            A1, B0      3, 1, 2
#   "max"      .43, .14, .86, 1             .5, 1           1, .38          A1, C1      3, 2, 1
#   "l2"       .31, .10, .62, .72 (/9.75)   .45, .89 (/4.47) .94, .35 (/8.54) A1, A0    2, 2, 2
# and local ranking (2 - round(0.25 * C) per group, no ranking across groups): 3, 2, 2.
GLOBAL = {"conv1": [3.0, 1.0, 6.0, 7.0], "conv2": [2.0, 4.0], "conv3": [8.0, 3.0]}
GLOBAL_WIDTHS = {"none": {"conv1": 3, "conv2": 1, "conv3": 2},
                 "max": {"conv1": 3, "conv2": 2, "conv3": 1},
                 "l2": {"conv1": 2, "conv2": 2, "conv3": 2}}


def _global_scores() -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in GLOBAL.items()}


def _global_net() -> Chain:
    """1x1 convs whose filters have a single non-zero weight +-score (so l1 = l2 = the score),
    and BatchNorm scales +-score: every weight criterion and slimming see ``GLOBAL``."""
    model = Chain([4, 2, 2], in_channels=1, kernel=1).eval()
    with torch.no_grad():
        for i, values in enumerate(GLOBAL.values(), 1):
            conv, bn = getattr(model, f"conv{i}"), getattr(model, f"bn{i}")
            conv.weight.zero_()
            for c, v in enumerate(values):
                sign = (-1) ** (c + i)
                conv.weight[c, c if i > 1 else 0] = sign * v
                bn.weight[c] = sign * v
    return model


def _global_expected(widths: dict[str, int]) -> dict[str, list[int]]:
    return {name: _top(GLOBAL[name], widths[name]) for name in GLOBAL}


def _all_kept(result: PruneResult) -> dict[str, list[int]]:
    return {name: _kept(result, name, len(v)) for name, v in GLOBAL.items()}


GLOBAL_X = torch.ones(1, 1, 4, 4)


def test_global_widths_of_each_normalisation() -> None:
    """The three normalisations give the three different hand-computed widths of the table."""
    for normalize, widths in GLOBAL_WIDTHS.items():
        assert global_widths(_global_scores(), 0.25, normalize) == widths, normalize
    assert global_widths(_global_scores(), 0.25) == GLOBAL_WIDTHS["l2"]    # the default
    assert len({tuple(w.values()) for w in GLOBAL_WIDTHS.values()} | {(3, 2, 2)}) == 4


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale"])
def test_global_ranking_option_uses_l2_normalised_scores(criterion: str) -> None:
    """``global_ranking=True`` removes the two lowest L2-normalised scores network-wide (both in
    conv1); without it every group loses round(0.25 C) of its own lowest channels."""
    res = prunekit.prune(_global_net(), GLOBAL_X, method=criterion, ratio=0.25, global_ranking=True)
    assert _all_kept(res) == _global_expected(GLOBAL_WIDTHS["l2"])
    local = prunekit.prune(_global_net(), GLOBAL_X, method=criterion, ratio=0.25)
    assert _all_kept(local) == _global_expected({"conv1": 3, "conv2": 2, "conv3": 2})


def test_slimming_ranks_the_raw_bn_scales_across_layers() -> None:
    """Network slimming (no sparsity training) cuts the two smallest |gamma| of the whole network
    without normalisation: conv1's 1 and conv2's 2."""
    res = prunekit.prune(_global_net(), GLOBAL_X, method="slimming", ratio=0.25, sparsity_epochs=0)
    assert _all_kept(res) == _global_expected(GLOBAL_WIDTHS["none"])
    ref = _global_net()
    assert torch.equal(res.model.bn2.weight, ref.bn2.weight[[1]])


def _scores_by_hand(info: DependencyInfo, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
    """Stands in for a method's scoring pass: the hand-set ``GLOBAL`` scores."""
    return {g.name: _global_scores()[g.name] for g in info.groups}


@pytest.mark.parametrize("normalize", ["l2", "max", "none"])
def test_curl_global_ranking_follows_its_normalisation(normalize: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """CURL with hand-set KL scores: each ``normalize`` option gives its own widths (the table)
    and keeps each group's highest scores."""
    from prunekit.methods import curl

    monkeypatch.setattr(curl, "kl_scores", _scores_by_hand)
    data = _dataset(torch.randint(0, 256, (4, 1, 4, 4), generator=torch.Generator().manual_seed(0)))
    res = prunekit.prune(_global_net(), GLOBAL_X, method="curl", ratio=0.25, data=data,
                         normalize=normalize)
    assert _all_kept(res) == _global_expected(GLOBAL_WIDTHS[normalize])


def test_iterative_taylor_ranks_l2_normalised_scores_across_layers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Iterative Taylor with hand-set scores divides each layer's scores by their L2 norm
    before the network-wide ranking (seed 004)."""
    from prunekit.methods import taylor

    monkeypatch.setattr(taylor, "score", _scores_by_hand)
    data = _dataset(torch.randint(0, 256, (4, 1, 4, 4), generator=torch.Generator().manual_seed(0)))
    res = prunekit.prune(_global_net(), GLOBAL_X, method="taylor", ratio=0.25, data=data,
                         steps=1, finetune_epochs_per_step=0)
    assert _all_kept(res) == _global_expected(GLOBAL_WIDTHS["l2"])


# ------------------------------------------------------------------------------------ MRTS
# Polarised BN scales: in each layer a few factors near 0 and the rest far from it (a negative
# one among them: the factor is |gamma|). The budget asks for exactly the near-zero channels.
TINY = {"conv1": [0, 3, 5], "conv2": [2, 4]}


def _polarised_net() -> Chain:
    torch.manual_seed(0)
    model = Chain([8, 6], in_channels=1, kernel=3).eval()
    big = iter([0.9, 0.6, -1.1, 0.7, 1.3, 0.8, 1.2, -0.5, 1.0])
    with torch.no_grad():
        for i, tiny in enumerate(TINY.values(), 1):
            bn = getattr(model, f"bn{i}")
            for c in range(bn.num_features):
                bn.weight[c] = 1e-3 * (tiny.index(c) + 1) if c in tiny else next(big)
    return model


def test_mrts_thresholds_cut_exactly_the_near_zero_factors() -> None:
    """MRTS (no sparsity training) at the ratio of near-zero factors (5 of 14) cuts each layer at
    the gap between its two modes: every near-zero channel goes, every other one stays."""
    res = prunekit.prune(_polarised_net(), WEIGHT_X, method="mrts", ratio=5 / 14, sparsity_epochs=0)
    assert res.report["method_budget_met_by_thresholds"] is True
    for name, size in (("conv1", 8), ("conv2", 6)):
        assert _kept(res, name, size) == [c for c in range(size) if c not in TINY[name]]



def test_mrts_falls_back_to_the_raw_global_ranking() -> None:
    """Factors that are not polarised (``GLOBAL``): the cheapest layer thresholds that remove 2
    channels cut conv1's 1 and 3, 4/17 of its mass (one channel of conv2 or conv3 would cut 2/6
    or 3/11), far above ``max_delta``; MRTS reports the fallback and ranks the raw factors
    network-wide, like slimming (the "none" row of the table)."""
    res = prunekit.prune(_global_net(), GLOBAL_X, method="mrts", ratio=0.25, sparsity_epochs=0)
    assert res.report["method_delta_needed"] == pytest.approx(4 / 17, abs=1e-6)
    assert res.report["method_fallback"] == "global-ranking"
    assert _all_kept(res) == _global_expected(GLOBAL_WIDTHS["none"])


# ------------------------------------------------------------------------------------ C-SGD
# Channel c of the survey set is a constant image s_c * L_k(n) + o_c with k = CLUSTER[c] one
# of three random level sequences: within a cluster the GAP vectors are exact positive affine
# copies (Pearson correlation 1), across clusters they are unrelated.
CLUSTER = [0, 0, 1, 2, 1, 0, 2, 1]


def _clustered_data(n: int = 16) -> tuple[ImageDataset, list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 101, (3, n), generator=g)
    scale = [1, 2, 2, 1, 1, 2, 1, 2]
    offset = [0, 10, 30, 20, 5, 0, 25, 15]
    images = torch.stack([scale[c] * levels[k] + offset[c] for c, k in enumerate(CLUSTER)], 1)
    clusters = [[c for c in range(8) if CLUSTER[c] == k] for k in range(3)]
    return _dataset(images[:, :, None, None].expand(n, 8, 2, 2).contiguous()), clusters


def test_csgd_merges_each_planted_cluster_into_its_lowest_member() -> None:
    """C-SGD's clustering (S2) finds the three planted clusters; the plan keeps each cluster's
    lowest channel and merges the rest into it (the pruned classifier column of a kept channel
    is the sum of its cluster's columns). No centripetal training: only the selection."""
    data, clusters = _clustered_data()
    levels = torch.tensor([[float(data.images[n, cl[0], 0, 0]) for n in range(16)] for cl in clusters])
    cross = torch.corrcoef(levels).abs() - torch.eye(3)
    assert float(cross.max()) < 0.9                                  # the clusters are distinct
    model = _identity_net()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = prunekit.prune(model, data.example_input(2), method="csgd", ratio=5 / 8, data=data,
                             centripetal_epochs=0, recalibrate_bn=False, survey_samples=16)
    (gp,) = res.plan.groups
    assert gp.keep == [cl[0] for cl in clusters] != [0, 1, 2]
    assert gp.merge == {cl[0]: cl[1:] for cl in clusters}
    assert _origins(res.model) == gp.keep
    for i, cl in enumerate(clusters):
        assert torch.allclose(res.model.fc.weight[:, i], model.fc.weight[:, cl].sum(1))


# ------------------------------------------------------------------------------- AutoPruner
GATES = [0.9, 0.2, 0.8, 0.1, 0.7, 0.95, 0.3, 0.6]


@pytest.mark.parametrize("enforce_budget", [True, False])
def test_autopruner_keeps_the_highest_gates(enforce_budget: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the trained gate values replaced by hand-set ones, AutoPruner keeps the four highest
    gates (budget enforced, ratio 0.5) or exactly the gates above 0.5 (not enforced)."""
    from prunekit.methods import autopruner

    monkeypatch.setattr(autopruner, "gate_values",
                        lambda *a, **k: {"conv1": torch.tensor(GATES, dtype=torch.float64)})
    data = _taylor_data()
    res = prunekit.prune(_identity_net(), data.example_input(2), method="autopruner", ratio=0.5,
                         data=data, epochs=1, max_steps_per_epoch=1, batch_size=4, augment=False,
                         device="cpu", enforce_budget=enforce_budget)
    want = _top(GATES, 4) if enforce_budget else [c for c, v in enumerate(GATES) if v > 0.5]
    assert _kept(res, "conv1", 8) == want
    assert _origins(res.model) == want


# ------------------------------------------------------------------- ThiNet and LASSO kernels
def _orthonormal(n: int, c: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, c, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


def test_thinet_greedy_finds_the_cancelling_pair() -> None:
    """ThiNet, y = sum of the contributions, keep 3 of 5 (q_i orthonormal):
    X0 = 10 q0, X1 = 3 q1, X2 = -3 q1 + 7^.5 q2, X3 = 12^.5 q3, X4 = 10 q4. Greedy: X1 has the
    smallest norm (9) and goes first; then removing X2 as well adds -18 + 16 = -2 (it cancels
    X1) against 12 for X3: X1 and X2 go, error ||X1 + X2||^2 = 7, the brute-force optimum.
    Keeping the largest norms would remove X1 and X3 instead (error 21)."""
    q = _orthonormal(40, 5)
    X = torch.stack([10 * q[:, 0], 3 * q[:, 1], -3 * q[:, 1] + math.sqrt(7) * q[:, 2],
                     math.sqrt(12) * q[:, 3], 10 * q[:, 4]], 1)
    y = X.sum(1)

    def error(kept: Sequence[int]) -> float:
        return float((y - X[:, list(kept)].sum(1)).pow(2).sum())

    best = min(itertools.combinations(range(5), 3), key=error)
    assert list(best) == [0, 3, 4] and error(best) == pytest.approx(7)
    assert thinet.select_channels(X, y, 3) == [0, 3, 4]
    assert _top(X.norm(dim=0).tolist(), 3) == [0, 2, 4]              # not the norm ranking


def test_lasso_keeps_the_largest_true_coefficients() -> None:
    """LASSO on orthogonal contributions, y = 3 X1 + 1 X3 + 2 X4 + 4 X6: channels 0, 2, 5, 7
    have 5x larger columns but do not enter y (X_j . y = 0, their coefficient is 0 at every
    penalty); with equal norms the soft threshold keeps the largest |beta|: 6, 1, 4 for
    keep=3, all four true channels for keep=4."""
    q = _orthonormal(40, 8)
    norms = torch.tensor([5.0, 1, 5, 1, 1, 5, 1, 5], dtype=torch.float64)
    X = q * norms
    beta = torch.tensor([0.0, 3, 0, 1, 2, 0, 4, 0], dtype=torch.float64)
    y = X @ beta
    assert lasso.select_channels(X, y, 3) == _top(beta.abs().tolist(), 3) == [1, 4, 6]
    assert lasso.select_channels(X, y, 4) == [1, 3, 4, 6]


DEAD = [0, 3, 5, 6]


@pytest.mark.parametrize("method", ["thinet", "lasso", "reconstruct"])
def test_reconstruction_methods_drop_channels_the_next_layer_ignores(method: str) -> None:
    """conv2 reads none of conv1's channels 0, 3, 5, 6 (zero input columns): their contribution
    to every sampled output is 0, so ThiNet (removal costs nothing) and LASSO (coefficient 0)
    drop exactly them at ratio 0.5, end to end."""
    torch.manual_seed(0)
    model = Chain([8, 4], in_channels=1, kernel=3).eval()
    with torch.no_grad():
        model.conv2.weight[:, DEAD] = 0
    g = torch.Generator().manual_seed(1)
    data = _dataset(torch.randint(0, 256, (16, 1, 8, 8), generator=g))
    extra = {"widths": "uniform", "prune_trunk": False} if method == "reconstruct" else {}
    res = prunekit.prune(model, data.example_input(2), method=method, ratio=0.5, data=data,
                         calib_images=16, **extra)
    want = [c for c in range(8) if c not in DEAD]
    assert _kept(res, "conv1", 8) == want
    assert _surviving(model.conv1.weight, res.model.conv1.weight) == want


# ---------------------------------------------------------------------------------- round_to
@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale"])
def test_round_to_peer_gets_our_widths_and_channels(criterion: str) -> None:
    """ratio 0.2 keeps 6 of conv1's 8 and 5 of conv2's 6 channels, rounded down to multiples of
    4: 4 and 4. The criterion and its tp:* peer both keep exactly the top four of each group."""
    ours = prunekit.prune(_weight_net(), WEIGHT_X, method=criterion, ratio=0.2, round_to=4)
    peer = prunekit.prune(_weight_net(), WEIGHT_X, method=f"tp:{criterion}", ratio=0.2, round_to=4)
    want = _weight_expected(criterion, 4, 4)
    assert (_kept(ours, "conv1", 8), _kept(ours, "conv2", 6)) == want
    assert _weight_survivors(ours.model) == _weight_survivors(peer.model) == want


@pytest.mark.parametrize("peer", ["tp:taylor", "tp:random"])
def test_round_to_gives_every_peer_our_widths(peer: str) -> None:
    """The peers that rank by gradients or at random get the same rounded widths (4 and 4)."""
    data = _dataset(torch.randint(0, 256, (8, 1, 6, 6), generator=torch.Generator().manual_seed(0)))
    res = prunekit.prune(_weight_net(), WEIGHT_X, method=peer, ratio=0.2, round_to=4, data=data,
                         calib_images=8)
    assert (res.model.conv1.out_channels, res.model.conv2.out_channels) == (4, 4)


def test_round_to_with_a_macs_target_matches_the_peer() -> None:
    """At a MACs target with round_to=4, l1 and tp:l1 reach the same rounded widths and keep
    the same (top l1) filters."""
    ours = prunekit.prune(_weight_net(), WEIGHT_X, method="l1", target_macs=0.5, round_to=4)
    peer = prunekit.prune(_weight_net(), WEIGHT_X, method="tp:l1", target_macs=0.5, round_to=4)
    n1, n2 = ours.model.conv1.out_channels, ours.model.conv2.out_channels
    assert (n1 % 4, n2 % 4) == (0, 0) and (n1, n2) != (8, 6)
    assert (peer.model.conv1.out_channels, peer.model.conv2.out_channels) == (n1, n2)
    assert _weight_survivors(ours.model) == _weight_survivors(peer.model) == _weight_expected("l1", n1, n2)


# ---------------------------------------------------------------------------------- coverage
COVERED_CRITERIA = {"random", "l1", "l2", "bn-scale", "taylor", *ACTIVATION}
COVERED_METHODS = (COVERED_CRITERIA - {"taylor"}) | {
    "taylor", "slimming", "mrts", "curl", "autopruner", "thinet", "lasso", "csgd",
    "reconstruct", "tp:l1", "tp:l2", "tp:bn-scale", "tp:taylor", "tp:random"}


def test_every_criterion_and_method_has_a_selection_test() -> None:
    """A criterion or method added later must get a selection test here too."""
    from prunekit.criteria import CRITERIA
    from prunekit.methods import available

    assert set(CRITERIA) == COVERED_CRITERIA
    assert set(available()) <= COVERED_METHODS, set(available()) - COVERED_METHODS
