"""Residual branches removed whole (a group pruned to no channel, ``engine/depth.py``) and the
latency budget that removes them first (``--depth``, ``measure/latency_depth.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_one_line_error, run
from torch import nn
from torch.utils.data import TensorDataset

import prunekit
from prunekit.engine import GroupPlan, PlanError, PruningPlan, analyse, apply_plan
from prunekit.engine.budget import LatencyTarget, budget_widths, count_macs_params
from prunekit.engine.depth import BranchConstant, Vanished, vanish_refusal, vanishable
from prunekit.models import create

X = torch.randn(6, 1, 20, 20, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))


def _trained_like(net: nn.Module) -> nn.Module:
    """Random BN statistics and affine parameters, so a constant branch is not zero."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


def _resnet(name: str = "resnet20") -> nn.Module:
    torch.manual_seed(0)
    return _trained_like(create(name, num_classes=10, in_channels=1))


def test_the_hidden_groups_of_residual_branches_can_vanish_and_nothing_else() -> None:
    net = _resnet()
    info = analyse(net, X[:1])
    assert vanishable(info) == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    reasons = {g.name: vanish_refusal(info, g) for g in info.groups}
    assert "residual stream" in reasons["conv1"]  # the stem feeds the identity shortcuts
    # a plain chain: a consumer whose output is not added to another path
    vgg = create("vgg16_bn", num_classes=10, in_channels=1).eval()
    vinfo = analyse(vgg, torch.randn(1, 1, 32, 32))
    assert vanishable(vinfo) == []
    assert all("not added to a shortcut" in vanish_refusal(vinfo, g) for g in vinfo.groups[:-1])
    # MobileNetV2: the expansions of the blocks with a shortcut (depthwise convs passed over)
    mb = create("mobilenetv2", num_classes=10, in_channels=1).eval()
    minfo = analyse(mb, torch.randn(1, 1, 32, 32))
    names = vanishable(minfo)
    skips = [n for n, m in mb.named_modules() if getattr(m, "use_residual", False)]
    assert names and len(names) == len(skips), (names, skips)


def _conv_macs(net: nn.Module) -> int:
    """MACs of the Conv2d layers for one input image (hooks on the modules' outputs)."""
    total = []

    def hook(m, _i, y):
        total.append(y[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(X[:1])
    for h in handles:
        h.remove()
    return sum(total)


def _branch_macs(block: nn.Module, hw: tuple[int, int]) -> int:
    """conv1 + conv2 MACs of a basic block at its output size (independent count)."""
    c1, c2 = block.conv1, block.conv2
    n = hw[0] * hw[1]
    return n * (c1.in_channels * c1.out_channels * 9 + c2.in_channels * c2.out_channels * 9)


def test_a_vanished_branch_gives_the_outputs_of_its_zeroed_consumer() -> None:
    """Exact: the model with branches removed (one with a stride-2 first conv and a projection
    shortcut) and another group cut equals the original with those branches' last conv reading
    zeros, and its MACs drop by the branches' conv MACs."""
    net = _resnet()
    sizes = {g.name: g.size for g in analyse(net, X[:1]).groups}
    drop = ["layer1.1.conv1", "layer2.0.conv1", "layer3.2.conv1"]
    cut = GroupPlan("layer2.2.conv1", 32, list(range(0, 32, 3)))
    pruned = apply_plan(net, X[:1], PruningPlan([GroupPlan(n, sizes[n], []) for n in drop] + [cut]))
    ref = copy.deepcopy(net)
    for n in drop:
        ref.get_submodule(n.replace("conv1", "conv2")).weight.data.zero_()
    ref = apply_plan(ref, X[:1], PruningPlan([cut]))
    with torch.no_grad():
        assert torch.allclose(pruned(X), ref(X), atol=1e-5, rtol=0)
        assert not torch.allclose(pruned(X), net(X), atol=1e-3)
    for n in drop:
        block = pruned.get_submodule(n.rsplit(".", 1)[0])
        assert isinstance(block.conv1, Vanished) and isinstance(block.bn1, Vanished)
        assert isinstance(block.conv2, BranchConstant)
    hw = {"layer1": (20, 20), "layer2": (10, 10), "layer3": (5, 5)}
    removed = sum(_branch_macs(ref.get_submodule(n.rsplit(".", 1)[0]), hw[n.split(".")[0]]) for n in drop)
    assert _conv_macs(pruned) == _conv_macs(ref) - removed
    assert count_macs_params(pruned, X[:1])[0] <= count_macs_params(ref, X[:1])[0] - removed


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with a projection shortcut where the shape changes."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.short(x))


def test_a_bottleneck_branch_vanishes_with_every_layer_before_its_last() -> None:
    """A bottleneck's branch is the chain of its two hidden groups: the second can vanish (the
    first alone cannot: its consumer's output is not added), taking ``conv1`` and ``conv2``
    with it; exact against the last conv reading zeros."""
    torch.manual_seed(0)
    net = _trained_like(nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      _Bottleneck(16, 8, 32, 2), _Bottleneck(32, 8, 32),
                                      _Bottleneck(32, 8, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(32, 10)))
    info = analyse(net, X[:1])
    assert vanishable(info) == ["3.conv2", "4.conv2", "5.conv2"]
    assert "not added to a shortcut" in vanish_refusal(info, info.producer_group("4.conv1"))
    pruned = apply_plan(net, X[:1], PruningPlan([GroupPlan("3.conv2", 8, []), GroupPlan("4.conv2", 8, [])]))
    ref = copy.deepcopy(net)
    ref[3].conv3.weight.data.zero_()
    ref[4].conv3.weight.data.zero_()
    with torch.no_grad():
        assert torch.allclose(pruned(X), ref(X), atol=1e-5, rtol=0)
    for i in (3, 4):
        assert all(isinstance(getattr(pruned[i], n), Vanished) for n in ("conv1", "bn1", "conv2", "bn2"))
        assert isinstance(pruned[i].conv3, BranchConstant)
    assert isinstance(pruned[5].conv1, nn.Conv2d)
    assert _conv_macs(pruned) == _conv_macs(ref) - sum(
        _conv_macs_of(ref, i) for i in (3, 4))


def _conv_macs_of(net: nn.Sequential, i: int) -> int:
    """conv1 + conv2 + conv3 MACs of bottleneck ``net[i]`` (20x20 input, stride in conv2)."""
    b = net[i]
    hw_in = 20 * 20 if i == 3 else 10 * 10
    hw_out = 10 * 10
    return (hw_in * b.conv1.in_channels * b.conv1.out_channels
            + hw_out * b.conv2.in_channels * b.conv2.out_channels * 9
            + hw_out * b.conv3.in_channels * b.conv3.out_channels)


def test_a_model_with_vanished_branches_reloads_exports_and_prunes_again(tmp_path) -> None:
    net = _resnet()
    sizes = {g.name: g.size for g in analyse(net, X[:1]).groups}
    drop = ["layer1.0.conv1", "layer2.1.conv1"]
    pruned = apply_plan(net, X[:1], PruningPlan([GroupPlan(n, sizes[n], []) for n in drop]))
    # checkpoint: rebuilt from the zoo name, the branches replaced again, weights exact
    prunekit.save(pruned, tmp_path / "p.pt")
    back, _ = prunekit.load(tmp_path / "p.pt")
    with torch.no_grad():
        assert torch.equal(back(X), pruned(X))
    # ONNX Runtime runs it (dynamic batch), outputs verified against PyTorch
    from prunekit.measure.runtimes import profile_runtimes

    rep = profile_runtimes(pruned, X[:1], batch_sizes=(3,), runtimes=["onnxruntime"], max_seconds=0.05,
                           check_input=X)
    assert rep["runtimes"]["onnxruntime"]["ok"], rep
    # pruned again: the residual stream (read by the branches' constants) loses channels
    keep = list(range(0, 16, 2))
    again = apply_plan(pruned, X[:1], PruningPlan([GroupPlan("conv1", 16, keep)]))
    once = apply_plan(net, X[:1], PruningPlan([GroupPlan("conv1", 16, keep)]
                                              + [GroupPlan(n, sizes[n], []) for n in drop]))
    assert again.layer1[0].conv2.bias.shape == (8,)
    with torch.no_grad():
        assert torch.allclose(again(X), once(X), atol=1e-5, rtol=0)


def test_a_group_that_cannot_vanish_is_refused_with_the_reason() -> None:
    net = _resnet()
    with pytest.raises(PlanError, match="residual stream"):
        apply_plan(net, X[:1], PruningPlan([GroupPlan("conv1", 16, [])]))
    with pytest.raises(PlanError, match="merges none"):
        GroupPlan("layer1.0.conv1", 16, [], merge={0: [1]})


@pytest.fixture()
def layer_cost_runtime(monkeypatch):
    """A fake runtime where every conv layer costs a fixed 2 % of the original's latency beside
    its MACs: ratio = 0.1 + 0.4 x MACs fraction + 0.5 x conv-layer fraction (deterministic).
    A branch removed whole saves its two layers' fixed cost; cutting widths does not."""
    from prunekit.measure import latency_table

    def convs(m: nn.Module) -> int:
        return sum(isinstance(x, nn.Conv2d) for x in m.modules())

    def fake(model, original, example_input, runtime, batch_size, threads, **_kw):
        macs = count_macs_params(model, example_input)[0] / count_macs_params(original, example_input)[0]
        ratio = 0.1 + 0.4 * macs + 0.5 * convs(model) / convs(original)
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", fake)
    return fake


def test_depth_removes_the_least_damaging_branches_first_and_lands_in_the_window(
        layer_cost_runtime) -> None:
    """One branch whose last conv reads nothing (weights zero) changes nothing when removed:
    it must be the first removed; the result lands in the window by the runtime's own
    measure and keeps more MACs than the widths alone at the same budget."""
    net = _resnet()
    net.layer3[1].conv2.weight.data.zero_()
    info = analyse(net, X[:1])
    target = LatencyTarget(0.7, "deploy", table_seconds=0.01, use_cache=False, depth=2,
                           calibration=X)
    _, widths, frac = budget_widths(info, None, target, round_to=8)
    lb, depth = target.result, target.result["depth"]
    assert depth["damage"]["layer3.1.conv1"] == pytest.approx(0.0, abs=1e-12)
    assert min(depth["damage"], key=depth["damage"].get) == "layer3.1.conv1"
    assert depth["branches"][0] == "layer3.1.conv1" and len(depth["branches"]) >= 2
    assert {n for n, w in widths.items() if w == 0} == set(depth["branches"])
    model = apply_plan(net, X[:1], PruningPlan([GroupPlan(g.name, g.size, list(range(widths[g.name])))
                                                for g in info.groups if widths[g.name] < g.size]))
    measured = layer_cost_runtime(model, net, X[:1], "deploy", 1, 1)[0]
    assert 0.65 <= measured <= 0.7 and lb["reached"], lb["rounds"]
    plain = LatencyTarget(0.7, "deploy", table_seconds=0.01, use_cache=False)
    _, _, frac_plain = budget_widths(analyse(net, X[:1]), None, plain, round_to=8)
    assert 0.65 <= plain.result["measured_ratio"] <= 0.7
    assert frac > frac_plain + 0.05, (frac, frac_plain)


@pytest.mark.parametrize("depth, per_stage, goal", [(1, 1, 0.55), (2, 2, 0.4), (5, 2, 0.4)])
def test_depth_takes_at_most_its_count_per_stage_and_leaves_one(layer_cost_runtime, depth,
                                                                 per_stage, goal) -> None:
    """At targets that removing branches alone could nearly reach, each stage loses at most
    ``depth`` branches and never all three; the rest comes from the widths."""
    net = _resnet()
    target = LatencyTarget(goal, "deploy", table_seconds=0.01, use_cache=False, depth=depth,
                           calibration=X)
    budget_widths(analyse(net, X[:1]), None, target, round_to=8)
    branches = target.result["depth"]["branches"]
    for stage in (1, 2, 3):
        assert sum(b.startswith(f"layer{stage}.") for b in branches) == per_stage, branches
    assert goal - 0.05 <= target.result["measured_ratio"] <= goal, target.result["rounds"]


def test_branches_alone_in_the_window_are_confirmed_and_reported_like_a_search(
        layer_cost_runtime) -> None:
    """At 0.74 three branches alone land in the window (0.719 by the fake runtime): no width is
    cut, the result is confirmed in fresh sessions, and the report has every field a widths
    search gives (the bench and the command line read them)."""
    net = _resnet()
    info = analyse(net, X[:1])
    target = LatencyTarget(0.74, "deploy", table_seconds=0.01, use_cache=False, depth=1,
                           calibration=X)
    _, widths, frac = budget_widths(info, None, target, round_to=8)
    lb = target.result
    assert lb["predictor"] == "depth" and len(lb["depth"]["branches"]) == 3
    assert {n for n, w in widths.items() if w < info.group(n).size} == set(lb["depth"]["branches"])
    assert 0.69 <= lb["measured_ratio"] == lb["confirmed_ratio"] <= 0.74 and lb["reached"]
    for key in ("target_latency", "runtime", "batch_size", "threads", "predicted_ratio", "rounds"):
        assert key in lb
    assert set(lb["table"]) >= {"seconds", "cached"} and lb["macs_fraction"] == pytest.approx(frac)
    assert all("macs_fraction" in r for r in lb["rounds"])


def test_savings_that_add_up_to_more_than_their_sum_are_scaled_not_stepped_back(
        monkeypatch) -> None:
    """A runtime where branches removed together save more than their single savings summed
    (as ONNX Runtime does): ratio = 0.5 x MACs fraction + 0.5 x max(0.2, 1 - 0.06 n - 0.04 n^2)
    for n branches removed. The first count the sum predicts measures under the window; the
    next one measured, scaled by that shortfall, is already in or over it (stepping back one
    branch at a time took three measurements), and the result lands in the window."""
    from prunekit.measure import latency_table

    def fake(model, original, example_input, runtime, batch_size, threads, **_kw):
        macs = count_macs_params(model, example_input)[0] / count_macs_params(original, example_input)[0]
        n = sum(isinstance(m, BranchConstant) for m in model.modules())
        ratio = 0.5 * macs + 0.5 * max(0.2, 1 - 0.06 * n - 0.04 * n * n)
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", fake)
    net = _resnet()
    target = LatencyTarget(0.5, "deploy", table_seconds=0.01, use_cache=False, depth=2,
                           calibration=X)
    budget_widths(analyse(net, X[:1]), None, target, round_to=8)
    steps = [r for r in target.result["rounds"] if r.get("phase") == "depth"]
    assert len(steps) == 2, steps
    assert steps[0]["measured_ratio"] < 0.45 <= steps[1]["measured_ratio"], steps
    assert steps[1]["branches"] < steps[0]["branches"] - 1, steps
    assert len(target.result["depth"]["branches"]) == steps[1]["branches"]
    assert 0.45 <= target.result["measured_ratio"] <= 0.5, target.result["rounds"]


def test_prune_with_depth_gives_a_plain_model_with_those_branches_removed(layer_cost_runtime) -> None:
    net = _resnet()  # ResNet-8 has one branch per stage: none can go
    res = prunekit.prune(net, X[:1], method="l1", target_latency=0.7, runtime="deploy",
                         latency_depth=1, data=TensorDataset(X, torch.zeros(6).long()),
                         evaluate=False)
    branches = res.report["latency_budget"]["depth"]["branches"]
    assert branches
    for n in branches:
        assert isinstance(res.model.get_submodule(n), Vanished)
        assert res.report["widths"][n][1] == 0
    with torch.no_grad():
        assert res.model(X).shape == (6, 10)


def test_compare_with_depth_removes_branches_for_every_method_and_reports_them(
        layer_cost_runtime, tmp_path) -> None:
    """``compare(..., latency_depth=1)``: every method's model has branches removed (at most
    one per stage), its checkpoint reloads with them, the report names them, and a rerun with
    another depth is redone rather than reused. (Widths alone cannot reach 0.6 here: the fake
    runtime's fixed cost per layer stays.)"""
    from prunekit.data import ImageDataset
    from prunekit.report import compare

    g = torch.Generator().manual_seed(2)
    images = ImageDataset(torch.randint(0, 256, (24, 1, 20, 20), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (24,), generator=g), mean=[0.5], std=[0.25],
                          num_classes=10, name="random")
    args = {"target_latency": 0.6, "runtime": "deploy", "data": (images, images), "onnx": False,
            "out_dir": tmp_path, "batch_sizes": (1,), "latency_seconds": 0.01, "progress": False}
    res = compare(_resnet(), None, ["l1", "mean-l2"], latency_depth=1, **args)
    assert res["settings"]["latency_depth"] == 1 and not res["failed"]
    report = (tmp_path / "report.md").read_text()
    assert "up to 1 whole residual branch(es) per stage" in report
    for e in res["methods"]:
        lb = e["latency_budget"]
        branches = lb["depth"]["branches"]
        assert branches and all(sum(b.startswith(f"layer{s}.") for b in branches) <= 1
                                for s in (1, 2, 3)), branches
        assert 0.55 <= lb["measured_ratio"] <= 0.6, lb["rounds"]
        assert f"{e['method']}: residual branches removed whole: {', '.join(branches)}." in report
        model = prunekit.load(tmp_path / e["checkpoint"]["file"])[0]
        assert all(isinstance(model.get_submodule(b), Vanished) for b in branches)
        assert model(images.batch([0, 1])[0]).shape == (2, 10)
    again = compare(_resnet(), None, ["l1"], latency_depth=2, **args)
    assert "latency_depth" in again["redone"]["l1"] and not again["failed"]
    assert again["settings"]["latency_depth"] == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    prunekit.save(_resnet("resnet8"), path, meta={"input_shape": [1, 20, 20], "data": "fashion-mnist"})
    return path


@pytest.mark.parametrize("flags, match", [
    (["--method", "l1", "--target-macs", "0.5", "--depth", "1"], "applies to a latency budget"),
    (["--method", "thinet", "--target-latency", "0.5", "--runtime", "deploy", "--depth", "1"],
     "cannot plan"),
    (["--method", "l1", "--target-latency", "0.5", "--runtime", "deploy", "--depth", "-1"],
     "depth"),
    (["--method", "l1", "--target-latency", "0.5", "--runtime", "deploy", "--depth", "some"],
     "'auto' or a whole number"),
], ids=["no-latency", "method", "negative", "word"])
def test_depth_misused_exits_2(checkpoint, tmp_path, capsys, flags, match) -> None:
    out = tmp_path / "p.pt"
    assert_one_line_error(*run(capsys, "prune", checkpoint, *flags, "--out", out), match=match)
    assert not out.exists()
    report = tmp_path / "r"
    flags = ["--methods" if f == "--method" else f for f in flags]
    assert_one_line_error(*run(capsys, "compare", checkpoint, *flags, "--report", report),
                          match=match)
    assert not report.exists()


def _macs_runtime(monkeypatch, fixed: float):
    """A fake runtime whose latency falls with the MACs alone above a fixed part:
    ratio = fixed + (1 - fixed) x MACs fraction; a branch removed saves only its MACs."""
    from prunekit.measure import latency_table

    def fake(model, original, example_input, runtime, batch_size, threads, **_kw):
        macs = count_macs_params(model, example_input)[0] / count_macs_params(original, example_input)[0]
        ratio = fixed + (1 - fixed) * macs
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", fake)


def test_auto_depth_keeps_branches_removed_where_widths_pay_badly(layer_cost_runtime) -> None:
    """``depth="auto"`` at 0.7 on the fixed-cost-per-layer runtime: widths alone keep under
    0.75 of the MACs per unit of latency, so one branch per stage is tried; it keeps more
    than 1.1x the MACs at the same budget and wins, both results recorded, in the window."""
    net = _resnet()
    target = LatencyTarget(0.7, "deploy", table_seconds=0.01, use_cache=False, depth="auto",
                           calibration=X)
    _, widths, frac = budget_widths(analyse(net, X[:1]), None, target, round_to=8)
    auto = target.result["depth_auto"]
    assert auto["tried"] and auto["chosen"] == "depth", auto
    assert auto["efficiency"] < 0.75 and auto["widths"]["reached"]
    assert auto["depth"]["macs_fraction"] >= 1.1 * auto["widths"]["macs_fraction"], auto
    branches = target.result["depth"]["branches"]
    assert branches and all(sum(b.startswith(f"layer{s}.") for b in branches) <= 1 for s in (1, 2, 3))
    assert {n for n, w in widths.items() if w == 0} == set(branches)
    assert frac == pytest.approx(auto["depth"]["macs_fraction"])
    assert 0.65 <= target.result["measured_ratio"] <= 0.7 and target.depth == "auto"


def test_auto_depth_is_not_tried_where_widths_pay_well(monkeypatch) -> None:
    """Latency falling with the MACs alone (no fixed part): widths alone keep about as many
    MACs as latency, so no branch is tried, scored or removed."""
    _macs_runtime(monkeypatch, 0.0)
    from prunekit.measure import latency_depth

    monkeypatch.setattr(latency_depth, "solve_with_depth",
                        lambda *a, **k: pytest.fail("depth searched"))
    target = LatencyTarget(0.6, "deploy", table_seconds=0.01, use_cache=False, depth="auto",
                           calibration=X)
    _, widths, _ = budget_widths(analyse(_resnet(), X[:1]), None, target, round_to=8)
    auto = target.result["depth_auto"]
    assert not auto["tried"] and auto["efficiency"] >= 0.75, auto
    assert min(widths.values()) > 0 and "depth" not in target.result
    assert 0.55 <= target.result["measured_ratio"] <= 0.6


def test_auto_depth_tried_but_not_kept_without_a_clear_gain(monkeypatch) -> None:
    """A large fixed part (0.5) makes widths pay badly, but removing a branch saves only its
    MACs, as widths do: the model with branches removed keeps under 1.1x the MACs, so the
    widths alone are kept, and both are reported."""
    _macs_runtime(monkeypatch, 0.5)
    target = LatencyTarget(0.75, "deploy", table_seconds=0.01, use_cache=False, depth="auto",
                           calibration=X)
    _, widths, frac = budget_widths(analyse(_resnet(), X[:1]), None, target, round_to=8)
    auto = target.result["depth_auto"]
    assert auto["tried"] and auto["chosen"] == "widths", auto
    assert auto["depth"]["macs_fraction"] < 1.1 * auto["widths"]["macs_fraction"]
    assert min(widths.values()) > 0 and frac == pytest.approx(auto["widths"]["macs_fraction"])
    assert 0.7 <= target.result["measured_ratio"] <= 0.75


def test_auto_depth_reaches_a_target_widths_alone_cannot(layer_cost_runtime) -> None:
    """At 0.52 the narrowest widths measure above the budget on the fixed-cost runtime (a
    ConfigError with ``depth=0``); ``"auto"`` reaches it by removing branches."""
    net = _resnet()
    with pytest.raises(prunekit.ConfigError, match="below what pruning can reach"):
        budget_widths(analyse(net, X[:1]), None,
                      LatencyTarget(0.52, "deploy", table_seconds=0.01, use_cache=False), round_to=8)
    target = LatencyTarget(0.52, "deploy", table_seconds=0.01, use_cache=False, depth="auto",
                           calibration=X)
    budget_widths(analyse(net, X[:1]), None, target, round_to=8)
    assert target.result["depth_auto"]["chosen"] == "depth" and "widths" not in target.result["depth_auto"]
    assert 0.47 <= target.result["measured_ratio"] <= 0.52, target.result["rounds"]


def test_prune_defaults_to_auto_depth_and_a_method_that_cannot_remove_a_branch_uses_widths(
        layer_cost_runtime) -> None:
    data = TensorDataset(X, torch.zeros(6).long())
    res = prunekit.prune(_resnet(), X[:1], method="l1", target_latency=0.7, runtime="deploy",
                         data=data, evaluate=False)
    lb = res.report["latency_budget"]
    assert lb["depth_auto"]["chosen"] == "depth" and lb["depth"]["branches"]
    assert all(isinstance(res.model.get_submodule(b), Vanished) for b in lb["depth"]["branches"])
    plain = prunekit.prune(_resnet(), X[:1], method="l1", target_latency=0.7, runtime="deploy",
                           data=data, evaluate=False, latency_depth=0)
    assert "depth_auto" not in plain.report["latency_budget"]
    assert plain.report["macs_fraction"] * 1.1 <= res.report["macs_fraction"]
    from prunekit.api import check_depth

    assert check_depth("thinet", 0.6, "auto") == 0 and check_depth("l1", None, "auto") == 0
    assert check_depth("l1", 0.6, "auto") == "auto"


def test_auto_depth_below_reach_either_way_names_both_floors(layer_cost_runtime) -> None:
    """At 0.3 neither the narrowest widths (0.648) nor those with one branch per stage removed
    reach the budget on the fixed-cost runtime: one ConfigError names both measurements."""
    target = LatencyTarget(0.3, "deploy", table_seconds=0.01, use_cache=False, depth="auto",
                           calibration=X)
    with pytest.raises(prunekit.ConfigError) as e:
        budget_widths(analyse(_resnet(), X[:1]), None, target, round_to=8)
    msg = str(e.value)
    assert "below what pruning can reach" in msg and "measured 0.648" in msg, msg
    both = float(msg.rsplit("as well: ", 1)[1])
    assert 0.3 < both < 0.6, msg


def test_auto_depth_does_not_search_the_widths_twice_where_no_branch_goes(
        layer_cost_runtime, monkeypatch) -> None:
    """Where the branch count comes out 0 (forced here), ``auto`` reuses its widths-alone
    search: the widths search runs once, and the widths alone are kept."""
    from prunekit.measure import latency_depth, latency_table

    monkeypatch.setattr(latency_depth._DepthSearch, "count", lambda self, order, single: (0, 1.0, 1.0))
    calls = []
    solve = latency_table._solve

    def counted(*a, **k):
        calls.append(1)
        return solve(*a, **k)

    monkeypatch.setattr(latency_table, "_solve", counted)
    target = LatencyTarget(0.7, "deploy", table_seconds=0.01, use_cache=False, depth="auto",
                           calibration=X)
    _, widths, _ = budget_widths(analyse(_resnet(), X[:1]), None, target, round_to=8)
    auto = target.result["depth_auto"]
    assert auto["tried"] and auto["chosen"] == "widths" and auto["depth"]["branches"] == []
    assert min(widths.values()) > 0
    assert len(calls) == 1  # no channel block here: one widths search, not two
    assert target.result["measured_ratio"] == auto["widths"]["measured_ratio"]
