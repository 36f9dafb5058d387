"""Random-architecture fuzzing of the pruning engine (``prunekit.testing.fuzz``).

Thirty seeded random CNNs, each pruned with three criteria (rotating, so every criterion is
exercised) and merged (forced-identical channels, float64). Properties: the pruned model runs
with the original output shape; its MACs, counted afresh, match the report and are below the
original; removing the plan's channels equals zeroing their consumers' inputs (float64); the merge
leaves outputs unchanged; the checkpoint reloads into a fresh unpruned instance with identical
outputs. A model the engine cannot handle must be refused with a typed error naming a layer.
``bench/fuzz.py`` runs the same checks on hundreds of seeds with every criterion.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.criteria import CRITERIA
from prunekit.errors import UnsupportedLayerError
from prunekit.testing.fuzz import (
    MERGE,
    FuzzNet,
    build,
    check_architecture,
    check_merge,
    check_method,
    describe,
    random_spec,
    spec_features,
)

torch.set_num_threads(1)

SEEDS = range(30)


def methods_for(seed: int, k: int = 3) -> list[str]:
    """``k`` criteria per seed, rotating through CRITERIA, plus the merge check."""
    return [CRITERIA[(seed * k + i) % len(CRITERIA)] for i in range(k)] + [MERGE]


def test_rotation_covers_every_criterion() -> None:
    used = {m for s in SEEDS for m in methods_for(s)}
    assert used == set(CRITERIA) | {MERGE}


@pytest.mark.parametrize("seed", SEEDS)
def test_random_architecture(seed: int, tmp_path) -> None:
    spec = random_spec(seed)
    outcomes = check_architecture(spec, methods_for(seed), tmp=tmp_path)
    failed = [f"{o.method} (ratio {o.ratio}): {o.message}" for o in outcomes if o.status == "failed"]
    assert not failed, f"seed {seed} [{describe(spec)}]:\n" + "\n".join(failed)
    statuses = {o.status for o in outcomes}
    # the engine refuses a whole architecture or none of it
    assert len(statuses) == 1, [(o.method, o.status, o.message) for o in outcomes]


def test_generator_is_deterministic_and_json() -> None:
    for seed in (0, 5, 123):
        a, b = random_spec(seed), random_spec(seed)
        assert a == b and json.loads(json.dumps(a)) == a
        (m1, x1), (m2, x2) = build(a), build(b)
        assert torch.equal(x1, x2)
        for (k, v1), (_, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
            assert torch.equal(v1, v2), k
    assert random_spec(1) != random_spec(2)


def test_generator_covers_the_architecture_space() -> None:
    """Across 300 seeds the generator draws every feature the fuzzing is meant to cover."""
    feats: set[str] = set()
    sizes, widths = set(), set()
    for seed in range(300):
        spec = random_spec(seed)
        feats.update(spec_features(spec))
        sizes.add(spec["size"])
        widths.update(b["out"] for b in spec["blocks"] if b["op"] == "conv")
        model, x = build(spec)
        if seed < 40:  # building is cheap; running a forward is the real validity check
            with torch.no_grad():
                assert model(x).shape == (2, spec["num_classes"])
    for f in ("residual-identity", "residual-projection", "inverted-residual", "concat-dense",
              "concat-dense-bn-after-concat", "concat-branches", "depthwise", "grouped", "dw_mult",
              "maxpool", "avgpool", "head-gap_avg", "head-gap_max", "head-adaptive2", "head-fmean",
              "head-none", "hidden-linear", "hidden-linear-bn", "head-defined-first", "bn-all",
              "bn-none", "bn-mixed", "bias-on", "bias-off", "strided"):
        assert f in feats, f
    assert sizes == {8, 10, 12, 16} and min(widths) == 2 and max(widths) == 12


def test_grouped_conv_is_pruned_and_passes_every_check(tmp_path) -> None:
    """Grouped convs are pruned (the same position in every group): seed 55 has one
    (6 -> 6 channels, 3 groups) after a dense block; every property holds, for a weight
    criterion, a data criterion and the merge."""
    spec = random_spec(55)
    assert any(b["op"] == "grouped" and b["groups"] == 3 for b in spec["blocks"])
    outcomes = check_architecture(spec, ["l1", "apoz", MERGE], tmp=tmp_path)
    assert [o.status for o in outcomes] == ["passed"] * 3, [o.message for o in outcomes]


def test_grouped_conv_reading_two_groups_at_tied_positions_is_refused(tmp_path) -> None:
    """Seed 32 concatenates three branches into a conv with 31 groups of 2 channels: a group
    mixes channels of two branches, which the engine cannot prune one branch at a time."""
    spec = random_spec(32)
    model, x = build(spec)
    name = next(f"blocks.{i}.conv.0" for i, b in enumerate(spec["blocks"]) if b["op"] == "grouped")
    with pytest.raises(UnsupportedLayerError, match=name.replace(".", r"\.")):
        prunekit.prune(model, x, method="l1", ratio=0.5)
    outcomes = check_architecture(spec, ["l1", MERGE], tmp=tmp_path)
    assert [o.status for o in outcomes] == ["rejected", "rejected"]


# ------------------------------------------------------------------ the checks are not vacuous

def test_a_wrong_surgery_is_caught(monkeypatch, tmp_path) -> None:
    """If the pruned model read the wrong channels, check_method would say so."""
    spec = random_spec(1)
    real_prune = prunekit.prune

    def prune_then_swap_rows(*args, **kwargs):
        res = real_prune(*args, **kwargs)
        conv = next(m for m in res.model.modules() if isinstance(m, nn.Conv2d) and m.out_channels > 1)
        with torch.no_grad():
            conv.weight.copy_(conv.weight.flip(0))
            if conv.bias is not None:
                conv.bias.copy_(conv.bias.flip(0))
        return res

    monkeypatch.setattr(prunekit, "prune", prune_then_swap_rows)
    outcome = check_method(spec, "l1", 0.5, tmp_path)
    assert outcome.status == "failed" and "zeroed-input" in outcome.message


def test_a_merge_that_drops_members_is_caught(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("prunekit.engine.surgery.fold_consumers", lambda group, merge: None)
    outcome = check_merge(random_spec(1), tmp_path)
    assert outcome.status == "failed" and "merge" in outcome.message


# ------------------------------------------------------------------ regressions found by fuzzing

class ConcatFlatten(nn.Module):
    """conv -> [conv branch, max-pool branch] concatenated -> flatten -> Linear (no pooling).

    Torch-Pruning 1.6 left such a concatenation without channel offsets (it compared the
    concatenation's width with the Linear's in_features), coupling the wrong channels: before
    the fix in ``DependencyInfo._map_concats`` this crashed with IndexError or produced a model
    whose Linear no longer matched (fuzz seeds 31, 36, 38, 82, 97, 102, 105, 141)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.branch = nn.Conv2d(6, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.fc = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.branch(y)), self.pool(y)], dim=1)
        return self.fc(torch.flatten(y, 1))


class ClassifierDefinedFirst(nn.Module):
    """The classifier is defined before a hidden Linear: before the fix, the engine took the
    last Linear *defined* for the classifier and pruned the real classifier's output units
    (output (2, 4) became (2, 2); fuzz seeds 0, 42, 104, 111, 127)."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(6, 4)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(self.conv(x).mean((2, 3)))))


@pytest.mark.parametrize("net", [ConcatFlatten, ClassifierDefinedFirst])
def test_fuzz_regressions(net) -> None:
    torch.manual_seed(0)
    model, x = net().eval(), torch.randn(2, 3, 4, 4)
    ref = model(x)
    for method in ("l1", "random"):
        res = prunekit.prune(model, x, method=method, ratio=0.5, seed=3)
        assert res.model(x).shape == ref.shape
        assert res.report["macs_after"] < res.report["macs_before"]
    # exactness of the removal: zero the removed channels' inputs in the original instead
    res = prunekit.prune(model.double(), x.double(), method="random", ratio=0.5, seed=3)
    from prunekit.testing.fuzz import zero_removed_inputs

    zeroed = zero_removed_inputs(model.double(), x.double(), res.plan)
    torch.testing.assert_close(res.model(x.double()), zeroed(x.double()), rtol=1e-9, atol=1e-12)


def test_fuzz_net_checkpoint_needs_the_instance(tmp_path) -> None:
    """A FuzzNet is not a zoo model: load() needs the unpruned instance, as documented."""
    spec = random_spec(3)
    model, x = build(spec)
    prunekit.save(model, tmp_path / "m.pt")
    with pytest.raises(prunekit.CheckpointError, match="pass the unpruned model instance"):
        prunekit.load(tmp_path / "m.pt")
    loaded, _ = prunekit.load(tmp_path / "m.pt", model=FuzzNet(spec))
    assert torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------ open findings (extended fuzzing)

class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle between two convs (``bench/fuzz.py`` extended seeds)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.relu(self.c2(y)).mean((2, 3)))


def test_channel_shuffle_is_refused_naming_the_layer() -> None:
    """A channel shuffle (view -> transpose -> reshape) reorders channels: pruning through it
    used to remove the wrong channels silently; now it is a typed error naming the producer,
    and the rest of the model still prunes exactly once that layer is ignored."""
    from prunekit.testing.fuzz import zero_removed_inputs

    torch.manual_seed(0)
    model, x = ChannelShuffle().double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match="'c1'.*transpose"):
        prunekit.prune(model, x, method="random", ratio=0.5, seed=1)
    res = prunekit.prune(model, x, method="random", ratio=0.5, seed=1, ignored_layers=["c1"])
    assert res.model.c1.out_channels == model.c1.out_channels
    zeroed = zero_removed_inputs(model, x, res.plan)
    torch.testing.assert_close(res.model(x), zeroed(x), rtol=1e-9, atol=1e-12)


def test_pruned_prelu_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    res = prunekit.prune(net, x, method="l1", ratio=0.5)
    prunekit.save(res.model, tmp_path / "p.pt")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2))
    loaded, _ = prunekit.load(tmp_path / "p.pt", model=fresh)
    assert torch.equal(loaded(x), res.model(x))
