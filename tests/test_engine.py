"""The shared engine: groups, plans, surgery (remove / merge / reconstruct), criteria, budgets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.criteria import CRITERIA, score
from prunekit.data.dataset import ImageDataset
from prunekit.engine import (
    GroupPlan,
    PlanError,
    PruningPlan,
    analyse,
    apply_plan,
    leftover_hooks,
    make_identical,
)
from prunekit.engine.budget import count_macs_params
from prunekit.models import create
from prunekit.testing import randomise_bn

torch.set_num_threads(1)

# width multipliers keep the big models quick; the structure (residuals, concat, dw) is intact
ZOO = {
    "resnet20": {}, "resnet56": {"width": 0.5}, "resnet164": {"width": 0.25},
    "vgg16_bn": {"width": 0.125}, "densenet40": {"width": 0.5}, "mobilenetv2": {"width": 0.25},
    "simplecnn": {"input_size": 16}, "mlpcnn": {},
}




def _model(name: str, in_channels: int = 3, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    m = create(name, num_classes=10, in_channels=in_channels, **ZOO[name]).eval()
    randomise_bn(m, torch.Generator().manual_seed(seed))
    size = ZOO[name].get("input_size", 16 if name != "densenet40" else 16)
    return m, torch.randn(2, in_channels, size, size)


def _calib(n: int = 8, size: int = 16, channels: int = 3) -> ImageDataset:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(n) % 10, mean=(0.5,) * channels, std=(0.25,) * channels,
                        num_classes=10, name="random")


def _random_clusters(size: int, gen: torch.Generator) -> list[list[int]]:
    """A random partition of range(size) into about size/2 clusters, each sorted."""
    perm = torch.randperm(size, generator=gen).tolist()
    n = max(1, size // 2)
    clusters = [sorted(perm[i::n]) for i in range(n)]
    return sorted(clusters, key=lambda c: c[0])


def _merge_everything(model: nn.Module, x: torch.Tensor, seed: int = 0) -> PruningPlan:
    """Make every group's random clusters identical and return the merge plan."""
    info = analyse(model, x)
    gen = torch.Generator().manual_seed(seed)
    plans = []
    for g in info.groups:
        clusters = _random_clusters(g.size, gen)
        make_identical(g, clusters)
        plans.append(GroupPlan(g.name, g.size, [c[0] for c in clusters],
                               {c[0]: c[1:] for c in clusters if len(c) > 1}))
    return PruningPlan(plans)


@pytest.mark.parametrize("name", ["simplecnn", "resnet20", "densenet40", "mobilenetv2", "mlpcnn",
                                  "resnet164"])
def test_merge_is_exact(name):
    """S4 merge of forced-identical members leaves outputs unchanged (plain stack, residual
    stages, DenseNet concatenation, depthwise convs, flatten -> Linear, hidden Linear)."""
    model, x = _model(name)
    model, x = model.double(), x.double()  # float64: exactness is not hidden by round-off
    plan = _merge_everything(model, x)
    before = model(x)
    pruned = apply_plan(model, x, plan)
    after = pruned(x)
    assert count_macs_params(pruned, x)[0] < count_macs_params(model, x)[0]
    scale = before.abs().max().clamp_min(1.0)
    assert ((after - before).abs().max() / scale) < 1e-5
    # and without making them identical first, a merge does change the outputs (test is not vacuous)
    fresh, _ = _model(name, seed=1)
    fresh = fresh.double()
    info = analyse(fresh, x)
    plan2 = PruningPlan([GroupPlan(g.name, g.size, [0], {0: list(range(1, g.size))})
                         for g in info.groups])
    ref = fresh(x)
    assert (apply_plan(fresh, x, plan2)(x) - ref).abs().max() / ref.abs().max().clamp_min(1.0) > 1e-3


def test_groups_of_a_residual_stage():
    model, x = _model("resnet20")
    info = analyse(model, x)
    stage1 = info.group_of("conv1") if hasattr(model, "conv1") else info.groups[0]
    # the stem and every block's second conv of stage 1 write the same trunk channels
    assert len(stage1.producers) >= 4
    assert len(info.groups) == 12  # 9 internal + 3 trunk groups
    assert info.groups[-1].size == 64
    # the classifier is not prunable by default
    assert all(not isinstance(s.module, nn.Linear) or s.role == "consumer"
               for g in info.groups for s in g.slots)


@pytest.mark.parametrize("name", list(ZOO))
def test_every_model_every_criterion(name):
    model, x = _model(name)
    calib = _calib(8, x.shape[-1])
    macs0, params0 = count_macs_params(model, x)
    info = analyse(model, x)
    for crit in CRITERIA:
        scores = score(info, crit, calib, samples=8, batch_size=8)
        assert set(scores) == {g.name for g in info.groups}
        for g in info.groups:
            assert scores[g.name].shape == (g.size,) and torch.isfinite(scores[g.name]).all()
        res = prunekit.prune(model, x, method=crit if crit != "taylor" else "taylor", ratio=0.5,
                             data=calib, calib_images=8)
        out = res.model(x)
        assert out.shape == (2, 10)
        assert res.report["macs_after"] < macs0 and res.report["params_after"] < params0
        assert res.report["macs_after"] == count_macs_params(res.model, x)[0]
        assert not leftover_hooks(res.model)
        assert not any(isinstance(b, torch.Tensor) and b.dtype == torch.bool
                       for b in res.model.state_dict().values())  # no masks


def test_plan_json_roundtrip_and_reproducible():
    model, x = _model("resnet20")
    res = prunekit.prune(model, x, method="l1", ratio=0.4)
    text = res.plan.to_json()
    plan2 = PruningPlan.from_json(text)
    assert plan2.to_json() == text
    again = apply_plan(model, x, plan2)
    for (k, a), (_, b) in zip(res.model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert res.plan.widths()[info_first(model, x)] == (16, 10)


def info_first(model, x):
    return analyse(model, x).groups[0].name


def test_reconstruct_writes_consumer_weights():
    model, x = _model("simplecnn")
    info = analyse(model, x)
    g = info.groups[0]
    consumer = g.consumers[0]
    new_w = torch.randn(consumer.module.weight.shape[0], 4, *consumer.module.weight.shape[2:])
    plan = PruningPlan([GroupPlan(g.name, g.size, [0, 1, 2, 3],
                                  reconstruct={consumer.name: {"weight": new_w, "bias": None}})])
    pruned = apply_plan(model, x, plan)
    assert torch.equal(dict(pruned.named_modules())[consumer.name].weight, new_w)
    bad = PruningPlan([GroupPlan(g.name, g.size, [0, 1, 2],
                                 reconstruct={consumer.name: {"weight": new_w}})])
    with pytest.raises(PlanError):
        apply_plan(model, x, bad)


def test_plan_validation():
    with pytest.raises(PlanError, match="merges none"):  # keep=[]: a branch removed whole
        GroupPlan("a", 4, [], merge={0: [1]})
    with pytest.raises(PlanError):
        GroupPlan("a", 4, [0, 5])
    with pytest.raises(PlanError):
        GroupPlan("a", 4, [0, 1], merge={0: [1]})
    model, x = _model("simplecnn")
    with pytest.raises(PlanError):
        apply_plan(model, x, PruningPlan([GroupPlan("nope", 4, [0])]))
    with pytest.raises(PlanError, match="cannot keep no channels"):  # no residual branch here
        apply_plan(model, x, PruningPlan([GroupPlan(analyse(model, x).groups[0].name,
                                                    analyse(model, x).groups[0].size, [])]))


@pytest.mark.parametrize("target", [0.4, 0.6])
def test_target_macs_is_met_within_two_points(target):
    model, x = _model("resnet20")
    res = prunekit.prune(model, x, method="l1", target_macs=target)
    frac = count_macs_params(res.model, x)[0] / count_macs_params(model, x)[0]
    assert target - 0.02 <= frac <= target


def test_global_ranking_keeps_one_channel_everywhere():
    model, x = _model("resnet20")
    res = prunekit.prune(model, x, method="l2", ratio=0.9, global_ranking=True)
    assert min(w for _, w in res.plan.widths().values()) >= 1
    assert res.model(x).shape == (2, 10)


def test_bad_budgets_raise_config_error():
    model, x = _model("simplecnn")
    for kw in ({"ratio": 0.0}, {"ratio": 1.0}, {"target_macs": 1.5}, {}, {"ratio": 0.5, "target_macs": 0.5}):
        with pytest.raises(prunekit.ConfigError):
            prunekit.prune(model, x, method="l1", **kw)
    with pytest.raises(prunekit.ConfigError):
        prunekit.prune(model, x, method="nope", ratio=0.5)
    with pytest.raises(prunekit.DataError):
        prunekit.prune(model, x, method="apoz", ratio=0.5)


def test_macs_match_an_independent_count():
    """MACs of a pruned model counted by hand with hooks equal Torch-Pruning's counter, whose
    convention is: conv = output elements x in/groups x kh x kw; linear = in x out (+ out for the
    bias); affine BN = 2 per output element; ReLU = 1 per element; global pooling = 1 per input
    element."""
    model, x = _model("resnet20")
    pruned = prunekit.prune(model, x[:1], method="l1", ratio=0.5).model
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * out.numel()
        elif isinstance(m, nn.ReLU):
            total += out.numel()
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            total += inp[0].numel()
    hs = [m.register_forward_hook(hook) for m in pruned.modules()]
    with torch.no_grad():
        pruned(x[:1])
    for h in hs:
        h.remove()
    assert count_macs_params(pruned, x[:1])[0] == total


def test_peer_prunes_to_the_same_budget():
    model, x = _model("resnet20")
    ours = prunekit.prune(model, x, method="l1", target_macs=0.5)
    peer = prunekit.prune(model, x, method="tp:l1", target_macs=0.5)
    assert abs(ours.report["macs_fraction"] - peer.report["macs_fraction"]) < 0.03
    with torch.no_grad():  # a plain module: a deep copy computes the same function
        out = peer.model(x)
        assert out.shape == (2, 10) and torch.equal(copy.deepcopy(peer.model)(x), out)
    assert not leftover_hooks(peer.model)


def _pruned_widths(model: nn.Module) -> list[int]:
    """Output widths of every conv except the classifier side (all prunable in resnet20)."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_round_width_rules():
    from prunekit.engine.budget import round_width
    assert round_width(10, 16, 8) == 8       # down to a multiple
    assert round_width(5, 16, 8) == 8        # but at least one multiple
    assert round_width(24, 32, 8) == 24      # already a multiple
    assert round_width(3, 6, 8) == 3         # a group no larger than round_to is left alone
    assert round_width(10, 16, None) == 10


@pytest.mark.parametrize("method", ["l1", "tp:l1"])
def test_round_to_gives_multiples_within_the_budget(method):
    model, x = _model("resnet20")
    res = prunekit.prune(model, x, method=method, target_macs=0.4, round_to=8)
    widths = _pruned_widths(res.model)
    assert all(w % 8 == 0 for w in widths), widths
    assert min(widths) < 16 and max(widths) < 64            # it did prune every stage
    frac = count_macs_params(res.model, x)[0] / count_macs_params(model, x)[0]
    assert 0.3 <= frac <= 0.4
    assert res.report["round_to"] == 8
    ratio = prunekit.prune(model, x, method="l1", ratio=0.375, round_to=8).model
    # ratio 0.375: keep 10 / 20 / 40 -> 8 / 16 / 40
    assert sorted(set(_pruned_widths(ratio))) == [8, 16, 40]


def test_round_to_refused_where_it_does_not_apply():
    model, x = _model("resnet20")
    for bad in (0, 2.5, -8):
        with pytest.raises(prunekit.ConfigError):
            prunekit.prune(model, x, method="l1", ratio=0.5, round_to=bad)
    with pytest.raises(prunekit.ConfigError, match="round_to"):
        prunekit.prune(model, x, method="curl", ratio=0.5, round_to=8)
