"""The latency model of a large batch (``prunekit.measure.latency_model``): exact counts at any
widths, a fit that recovers known weights, and a search that lands in its window and keeps
more of the MACs than the method's uniform widths on a memory-bound runtime."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from prunekit.engine import analyse
from prunekit.engine.budget import (
    LatencyTarget,
    apply_plan,
    budget_widths,
    round_widths,
    width_plan,
    widths_at_ratio,
)
from prunekit.measure.latency_model import CostModel, cut_down
from prunekit.models import create

RUNTIME = "deploy"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name,kw,shape", [("mobilenetv2", {"width": 0.5}, (3, 32, 32)),
                                           ("resnet20", {}, (1, 28, 28)),
                                           ("densenet40", {"width": 0.5}, (3, 32, 32))])
def test_counts_at_any_widths_equal_the_pruned_models_own(name, kw, shape) -> None:
    """MACs and memory traffic predicted from the groups' shares of every layer equal the
    counts of the model actually cut to those widths (depthwise, residual, concat)."""
    torch.manual_seed(0)
    net = create(name, num_classes=10, in_channels=shape[0], **kw).eval()
    x = torch.randn(1, *shape)
    info = analyse(net, x)
    model = CostModel(info)
    rng = random.Random(0)
    for _ in range(3):
        widths = {g.name: rng.randint(1, g.size) for g in info.groups}
        cut = apply_plan(net, x, width_plan(info, widths))
        own = CostModel(analyse(cut, x))
        m, b = model.features(widths)
        assert m * model.macs0 == pytest.approx(own.macs0, rel=1e-9)
        assert b * model.bytes0 == pytest.approx(own.bytes0, rel=1e-9)
    assert model.features({}) == pytest.approx((1.0, 1.0))


def test_memory_traffic_counts_activations_per_image_and_parameters_per_call() -> None:
    """Two convs on 10x10 images, counted by hand: 3 -> 8 channels 3x3 (300 input and 512
    output elements per image, weight 216, bias 8), then 8 -> 4 channels 1x1 (512 in, 256 out,
    weight 32, bias 4). At batch B the activations are moved B times, the parameters once; the
    first conv's output channels (the one group) halved halve its output, weight and bias and
    the second conv's input and weight."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    info = analyse(net, torch.randn(1, 3, 10, 10))
    (group,) = info.groups
    for batch in (1, 64):
        model = CostModel(info, batch_size=batch)
        assert model.bytes0 == batch * (300 + 512 + 512 + 256) + 216 + 8 + 32 + 4
        assert model.macs0 == 512 * 27 + 256 * 8
        m, b = model.features({group.name: 4})
        assert m == pytest.approx(0.5)
        assert b * model.bytes0 == pytest.approx(batch * (300 + 256 + 256 + 256) + 108 + 4 + 16 + 4)


def test_fit_recovers_the_weights_of_a_memory_bound_runtime() -> None:
    torch.manual_seed(0)
    net, x = create("mobilenetv2", num_classes=10, width=0.5).eval(), torch.randn(1, 3, 32, 32)
    info = analyse(net, x)
    model = CostModel(info)
    points = []
    for r in (0.2, 0.5, 0.8):
        w = widths_at_ratio(info, r)
        m, b = model.features(w)
        points.append((w, 1 + 0.2 * (m - 1) + 0.7 * (b - 1)))
    model.fit(points)
    assert (model.alpha, model.beta) == pytest.approx((0.2, 0.7), abs=1e-6)
    # negative weights are not fitted: a runtime whose time falls with the MACs alone
    model.fit([(w, model.features(w)[0]) for w, _ in points])
    assert model.alpha == pytest.approx(1.0, abs=1e-6) and model.beta == 0.0


def test_a_single_point_is_fitted_by_the_macs_alone_whatever_its_last_digits() -> None:
    """One measured point fits either feature alone exactly; which one is fitted must not
    depend on the rounding of the two (equal) errors: the MACs alone, for every value."""
    torch.manual_seed(0)
    net, x = create("mobilenetv2", num_classes=10, width=0.5).eval(), torch.randn(1, 3, 32, 32)
    info = analyse(net, x)
    narrow = round_widths(info, widths_at_ratio(info, 0.999), 8)
    fits = set()
    for i in range(60):
        model = CostModel(info)
        model.fit([(narrow, 0.08 + i / 2000)])
        fits.add(model.beta == 0.0 and model.alpha > 0)
    assert fits == {True}


def test_cut_down_meets_its_aim_and_respects_the_floor() -> None:
    torch.manual_seed(0)
    net, x = create("mobilenetv2", num_classes=10, width=0.5).eval(), torch.randn(1, 3, 32, 32)
    info = analyse(net, x)
    model = CostModel(info)
    model.alpha, model.beta = 0.3, 0.6
    floor = round_widths(info, widths_at_ratio(info, 0.999), 8)
    widths = cut_down(model, floor, 0.5, {g.name: 8 for g in info.groups})
    assert model.predict(widths) <= 0.5
    assert all(floor[g] <= w <= model.sizes[g] for g, w in widths.items())
    assert all(w % 8 == 0 or w == model.sizes[g] or model.sizes[g] <= 8 for g, w in widths.items())


@pytest.fixture()
def memory_bound_runtime(monkeypatch):
    """MobileNetV2's dependency info, timed by a fake memory-bound runtime: latency 0.1 + 0.2 x
    MACs + 0.7 x memory traffic, as fractions of the original's, counted on the model cut."""
    from prunekit.measure import latency_table

    torch.manual_seed(0)
    net, x = create("mobilenetv2", num_classes=10, width=0.5).eval(), torch.randn(1, 3, 32, 32)
    info = analyse(net, x)
    counter = CostModel(info)

    def fake(model, original, example_input, runtime, batch_size, threads, **_kw):
        own = CostModel(analyse(model, example_input))
        ratio = 0.1 + 0.2 * own.macs0 / counter.macs0 + 0.7 * own.bytes0 / counter.bytes0
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", fake)
    return info


def test_model_search_lands_in_the_window_and_keeps_more_macs(memory_bound_runtime) -> None:
    """A memory-bound fake runtime (latency 0.1 + 0.2 x MACs + 0.7 x memory traffic, as
    fractions): the model's allocation lands in [f - slack, f] and keeps more of the MACs than
    the method's uniform widths at the same measured latency (efficiency, MACs / latency)."""
    info = memory_bound_runtime
    target = LatencyTarget(0.6, RUNTIME, batch_size=64, use_cache=False)
    budget_widths(info, None, target, round_to=8)
    lb = target.result
    assert lb["predictor"] == "model" and lb["rounds"][1]["phase"] == "calibrate"
    assert lb["reached"] and 0.55 <= lb["measured_ratio"] <= 0.6, lb["rounds"]
    assert lb["table"]["fit"]["beta"] == pytest.approx(0.7, abs=0.05)
    model_eff = lb["macs_fraction"] / lb["measured_ratio"]
    uniform = LatencyTarget(0.6, RUNTIME, batch_size=64, use_cache=False, predictor="table",
                            table_seconds=0.01)
    budget_widths(info, None, uniform, round_to=8)
    ub = uniform.result
    assert 0.55 <= ub["measured_ratio"] <= 0.6, ub["rounds"]
    assert model_eff > ub["macs_fraction"] / ub["measured_ratio"] + 0.05


def test_a_methods_own_allocation_keeps_its_shape_under_the_model(memory_bound_runtime) -> None:
    """A method with an allocation of its own (``keeps_shape``: a global ranking, the
    damage-optimal widths) has only its knob moved by the model: groups it never cuts stay
    whole, where the model's own allocation would cut them."""
    from prunekit.engine.budget import keeps_shape

    info = memory_bound_runtime
    hidden = {g.name for g in info.groups if g.name.endswith("conv.0.0")}  # expansion widths
    # a method that cuts everything but the expansion widths, which the model would cut first

    def no_hidden(r: float) -> dict[str, int]:
        return {g.name: g.size if g.name in hidden else max(1, g.size - int(round(r * g.size)))
                for g in info.groups}

    results = {}
    for name, fn in (("own", keeps_shape(no_hidden)), ("plain", lambda r: no_hidden(r))):
        target = LatencyTarget(0.7, RUNTIME, batch_size=64, use_cache=False)
        _, widths, _ = budget_widths(info, None, target, fn, round_to=8)
        results[name] = widths
        assert target.result["reached"]
    sizes = {g.name: g.size for g in info.groups}
    assert all(results["own"][g] == sizes[g] for g in hidden)
    assert any(results["plain"][g] < sizes[g] for g in hidden)


def test_both_shapes_are_searched_and_the_one_keeping_more_macs_wins(monkeypatch) -> None:
    """A runtime that runs uneven widths slowly (latency = MACs fraction + 0.5 x the spread of
    the groups' kept fractions), which the model cannot see: at the model's first aim the
    method's uniform widths keep more MACs per measured millisecond, so they are searched
    first; the model's own allocation is searched to the window too, and the accepted widths
    are uniform ones, which keep more MACs there."""
    from prunekit.measure import latency_table

    torch.manual_seed(0)
    net, x = create("mobilenetv2", num_classes=10, width=0.5).eval(), torch.randn(1, 3, 32, 32)
    info = analyse(net, x)
    counter = CostModel(info)
    sizes = {g.name: g.size for g in info.groups}

    def fake(model, original, example_input, runtime, batch_size, threads, **_kw):
        cut = analyse(model, example_input)
        kept = [g.size / sizes[g.name] for g in cut.groups if g.name in sizes]
        spread = max(kept) - min(kept) if kept else 0.0
        ratio = CostModel(cut).macs0 / counter.macs0 + 0.5 * spread
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", fake)
    target = LatencyTarget(0.6, RUNTIME, batch_size=64, use_cache=False)
    budget_widths(info, None, target, round_to=8)
    lb = target.result
    rounds = lb["rounds"]
    phases = [r["phase"] for r in rounds]
    own = next(r for r in rounds if r["phase"] == "model")
    knob = next(r for r in rounds if r["phase"] == "model-knob")
    assert own["aim"] == knob["aim"] and own["measured_ratio"] > knob["measured_ratio"]
    first_search = phases.index("model-knob") + 1
    assert phases[first_search] == "model-knob", phases  # the more efficient one first
    assert "model" in phases[first_search:], phases  # the other searched too
    accepted = [r for r in rounds if r.get("confirmed_ratio") == lb["measured_ratio"]]
    # the method's uniform widths: moved by the model's aim, or by the knob alone (phase b)
    assert len(accepted) == 1 and accepted[0]["phase"] in ("model-knob", "knob"), rounds
    assert lb["reached"] and 0.55 <= lb["measured_ratio"] <= 0.6
    # the model's own allocation, uneven, measured slower than the accepted widths at a
    # prediction the same or lower: it keeps fewer MACs per millisecond
    own = [r for r in rounds if r["phase"] == "model"]
    assert any(r["predicted_ratio"] <= accepted[0]["predicted_ratio"]
               and r["measured_ratio"] > accepted[0]["measured_ratio"] for r in own), rounds


def test_a_shape_that_missed_the_window_is_searched_on_when_it_keeps_more_macs(
        memory_bound_runtime, monkeypatch) -> None:
    """The memory-bound fake runtime, but its first three timings of uneven widths (the
    model's own allocation; the method's uniform widths stay even) run 0.04 fast, as one
    session can: the model's allocation misses the window in its first rounds and the uniform
    widths land in it, keeping fewer MACs. The model's allocation, which kept more MACs per
    measured millisecond near the window, is searched on ("model again") and its widths,
    measured in the window, are accepted."""
    from prunekit.measure import latency_table

    info = memory_bound_runtime
    true_ratio = latency_table.measure_ratio
    sizes = {g.name: g.size for g in info.groups}
    uneven = []

    def fast_at_first(model, original, example_input, *args, **kw):
        ratio = true_ratio(model, original, example_input, *args, **kw)[0]
        kept = [g.size / sizes[g.name] for g in analyse(model, example_input).groups
                if g.name in sizes]
        if max(kept) - min(kept) > 0.5:  # uneven: the memory cut, then the model's allocation
            uneven.append(ratio)
            if len(uneven) <= 3:
                ratio -= 0.04
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", fast_at_first)
    target = LatencyTarget(0.5, RUNTIME, batch_size=64, use_cache=False)
    budget_widths(info, None, target)
    lb = target.result
    rounds, phases = lb["rounds"], [r["phase"] for r in lb["rounds"]]
    lo, hi = 0.5 - target.slack + target.margin, 0.5 - target.margin
    knob_inside = [r for r in rounds if r["phase"] == "model-knob" and lo <= r["measured_ratio"] <= hi]
    assert knob_inside, rounds  # the uniform widths landed in the window first
    first_pass = phases[:phases.index("model again")] if "model again" in phases else phases
    assert not any(r["phase"] == "model" and lo <= r["measured_ratio"] <= hi
                   for r in rounds[:len(first_pass)]), rounds
    accepted = [r for r in rounds if r.get("confirmed_ratio") == lb["measured_ratio"]]
    assert len(accepted) == 1 and accepted[0]["phase"] == "model again", rounds
    assert lb["reached"] and 0.45 <= lb["measured_ratio"] <= 0.5
    assert accepted[0]["macs_fraction"] > max(r["macs_fraction"] for r in knob_inside) + 0.05


def test_a_shape_that_steps_over_the_window_is_widened_group_by_group(
        memory_bound_runtime, monkeypatch) -> None:
    """The memory-bound fake runtime with a latency cliff the model cannot see: the last 1x1
    conv runs 0.06 slower once it is wider than 262 channels (a runtime switching kernels at a
    width). The model's own allocation widens that conv with every other group, so it measures
    under the window or over it, in its rounds and searched on ("model again"); the method's
    uniform widths land in the window keeping far fewer MACs. The widest widths of the model's
    allocation measured under the window are widened group by group ("model widened"): those
    land in the window, keep the conv under the cliff and are accepted."""
    from prunekit.measure import latency_table

    info = memory_bound_runtime
    true_ratio = latency_table.measure_ratio
    cliff_group, cliff = "features.18.0", 262

    def with_cliff(model, original, example_input, *args, **kw):
        ratio = true_ratio(model, original, example_input, *args, **kw)[0]
        widths = {g.name: g.size for g in analyse(model, example_input).groups}
        ratio += 0.06 if widths[cliff_group] > cliff else 0.0
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", with_cliff)
    target = LatencyTarget(0.5, RUNTIME, batch_size=64, use_cache=False)
    _, widths, _ = budget_widths(info, None, target)
    lb = target.result
    rounds, phases = lb["rounds"], [r["phase"] for r in lb["rounds"]]
    lo, hi = 0.5 - target.slack + target.margin, 0.5 - target.margin
    again = [r for r in rounds if r["phase"] == "model again"]
    assert again and not any(lo <= r["measured_ratio"] <= hi for r in again), rounds
    knob_inside = [r for r in rounds if r["phase"] == "model-knob" and lo <= r["measured_ratio"] <= hi]
    assert knob_inside, rounds
    accepted = [r for r in rounds if r.get("confirmed_ratio") == lb["measured_ratio"]]
    assert len(accepted) == 1 and accepted[0]["phase"] == "model widened", phases
    assert lb["reached"] and 0.45 <= lb["measured_ratio"] <= 0.5
    assert accepted[0]["macs_fraction"] > max(r["macs_fraction"] for r in knob_inside) + 0.1
    assert widths[cliff_group] <= cliff


def test_a_candidate_failing_confirmation_with_far_more_macs_sends_the_search_on(
        memory_bound_runtime, monkeypatch) -> None:
    """The memory-bound fake runtime, but the first widths of the model's own allocation that
    are confirmed re-time 0.03 slow in their fresh sessions (a session pair that runs off):
    the candidate leaves the window while the method's uniform widths, keeping far fewer MACs,
    wait in it. The search goes on instead of confirming those, and accepts widths of the
    model's allocation, confirmed in the window."""
    from prunekit.measure import latency_table

    info = memory_bound_runtime
    true_ratio = latency_table.measure_ratio
    sizes = {g.name: g.size for g in info.groups}
    slow: list[tuple] = []

    def first_confirmed_slow(model, original, example_input, *args, precision=None, **kw):
        ratio = true_ratio(model, original, example_input, *args, **kw)[0]
        cut = analyse(model, example_input)
        kept = [g.size / sizes[g.name] for g in cut.groups if g.name in sizes]
        key = tuple(g.size for g in cut.groups)
        if precision == LatencyTarget.confirm_precision and max(kept) - min(kept) > 0.5:
            if not slow:
                slow.append(key)
            if key == slow[0]:
                ratio += 0.03
        return ratio, ratio, 1.0

    monkeypatch.setattr(latency_table, "measure_ratio", first_confirmed_slow)
    target = LatencyTarget(0.6, RUNTIME, batch_size=64, use_cache=False)
    budget_widths(info, None, target, round_to=8)
    lb = target.result
    rounds = lb["rounds"]
    lo, hi = 0.6 - target.slack + target.margin, 0.6 - target.margin
    failed = [r for r in rounds if "confirmed_ratio" in r and r["confirmed_ratio"] > hi]
    assert slow and len(failed) == 1, rounds
    knob_inside = [r for r in rounds if r["phase"].startswith("model-knob")
                   and lo <= r["measured_ratio"] <= hi]
    assert knob_inside, rounds  # the uniform widths waited in the window
    accepted = [r for r in rounds if r.get("confirmed_ratio") == lb["measured_ratio"]]
    assert len(accepted) == 1 and not accepted[0]["phase"].startswith("model-knob"), rounds
    assert lb["reached"] and lo <= lb["measured_ratio"] <= hi
    assert accepted[0]["macs_fraction"] > max(r["macs_fraction"] for r in knob_inside) + 0.05
