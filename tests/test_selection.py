"""Selection: every method that ranks channels removes the RIGHT ones (issue #20, item 1).

Each test builds a tiny network whose channel scores are set by hand (filters with known
norms, BatchNorm scales, input maps with known activation statistics, classifier columns with
known gradients) and asserts the exact channels kept, read from ``result.plan`` and from which
original filters survive in the pruned model. The constructions make the criteria disagree
with each other, with "keep the first channels" and with "keep the lowest", so a reversed
ranking, a swapped criterion or a swapped normalisation fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from prunekit.api import PruneResult
from prunekit.data.dataset import ImageDataset
from prunekit.methods import PruneContext, oneshot

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


def test_weight_construction_makes_the_criteria_disagree() -> None:
    """The hand-set scores are what the construction says (L1 up, L2 down with the rank), and
    l1, l2 and bn-scale keep three different sets, none the first or the last channels."""
    model = _weight_net()
    for crit, (s1, s2) in ((c, _weight_scores(c)) for c in ("l1", "l2")):
        p = 1 if crit == "l1" else 2
        got1 = model.conv1.weight.flatten(1).norm(p=p, dim=1)
        got2 = model.conv2.weight.flatten(1).norm(p=p, dim=1)
        assert torch.allclose(got1, torch.tensor(s1), rtol=1e-5)
        assert torch.allclose(got2, torch.tensor(s2), rtol=1e-5)
    sets = {c: _weight_expected(c, 4, 3) for c in ("l1", "l2", "bn-scale")}
    assert len({(tuple(a), tuple(b)) for a, b in sets.values()}) == 3
    for s1, s2 in sets.values():
        assert s1 not in ([0, 1, 2, 3], [4, 5, 6, 7]) and s2 not in ([0, 1, 2], [3, 4, 5])


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale"])
def test_weight_criterion_keeps_its_top_channels(criterion: str) -> None:
    """One-shot l1 / l2 / bn-scale at ratio 0.5 keep, in each group, exactly the channels with
    the highest hand-set filter norm / |gamma|; the pruned model holds those original filters."""
    res = prunekit.prune(_weight_net(), WEIGHT_X, method=criterion, ratio=0.5)
    want1, want2 = _weight_expected(criterion, 4, 3)
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
    assert _weight_survivors(res.model) == _weight_expected(peer[3:], 4, 3)


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
        assert kept[seed] == _random_expected(seed, 4, 3)
        assert _weight_survivors(res.model) == kept[seed]
    assert kept[0] != kept[1]


def test_random_peer_keeps_the_top_of_its_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tp:random`` keeps, in each group, the channels with the highest of Torch-Pruning's
    random draws (recorded as they are made; the groups have different sizes, so each draw is
    matched to its group by its length), and its seed decides the draws."""
    import torch_pruning as tp

    draw = tp.importance.RandomImportance.__call__
    drawn: dict[int, list[float]] = {}

    def record(self, group, **kw):  # noqa: ANN001, ANN202 (Torch-Pruning's signature)
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
        assert kept[seed] == (_top(drawn[8], 4), _top(drawn[6], 3))
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


def _activation_data() -> ImageDataset:
    images = torch.stack([_pattern(k, h, c) for c, (k, h) in enumerate(PATTERNS)], 1)
    return _dataset(images, torch.tensor([0, 1]))


def _reference_statistic(criterion: str, maps: torch.Tensor) -> float:
    """The documented statistic of one channel's maps ``[N, H, W]`` (plain float64 formulas)."""
    a = maps.double().flatten(1) / 255
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
    return _top([_reference_statistic(criterion, images[:, c]) for c in range(8)], n)


def _identity_net(channels: int = 8) -> Chain:
    model = Chain([channels], in_channels=channels, kernel=1).eval()
    _identity_conv(model)
    return model


def test_activation_construction_makes_the_criteria_disagree() -> None:
    """The five distinct data statistics keep five different sets of four channels on the
    hand-made maps, none the first or the last four."""
    sets = {c: tuple(_activation_expected(c)) for c in ACTIVATION}
    assert sets["mean-l1"] == sets["mean-mean"]
    distinct = {sets[c] for c in ACTIVATION if c != "mean-l1"}
    assert len(distinct) == 5 and not distinct & {(0, 1, 2, 3), (4, 5, 6, 7)}
    assert sets["apoz"] == (1, 3, 6, 7)      # the two flat and the two flash channels


@pytest.mark.parametrize("criterion", ACTIVATION)
def test_activation_criterion_keeps_its_top_channels(criterion: str) -> None:
    """Each data criterion at ratio 0.5 keeps exactly the four channels whose statistic of the
    hand-made maps is highest; the pruned conv1 still reads those four input channels."""
    data = _activation_data()
    res = prunekit.prune(_identity_net(), data.example_input(2), method=criterion, ratio=0.5,
                         data=data, calib_images=2)
    want = _activation_expected(criterion)
    assert _kept(res, "conv1", 8) == want
    assert _origins(res.model) == want


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
