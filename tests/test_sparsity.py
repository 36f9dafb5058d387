"""Network slimming, MRTS (polarisation + layer-adaptive thresholds) and iterative Taylor-FO."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import gratings

import prunekit
from prunekit import methods
from prunekit.api import layer_widths
from prunekit.data.dataset import ImageDataset
from prunekit.engine import analyse, apply_plan, leftover_hooks
from prunekit.errors import ConfigError, DataError
from prunekit.methods import slimming, taylor
from prunekit.methods.slimming import (
    ScaleRegulariser,
    auto_sparsity,
    global_threshold_widths,
    layer_thresholds,
    liu_sparsity,
    polarization,
    separation,
    threshold_widths,
)
from prunekit.models import create
from prunekit.report import plots
from prunekit.train import TrainConfig

torch.set_num_threads(1)

MODELS = {"resnet8": {}, "densenet40": {"width": 0.25}, "vgg16_bn": {"width": 0.125}}
QUICK = TrainConfig(batch_size=32, lr=0.01, max_steps_per_epoch=2, augment=False)


@pytest.fixture(scope="module")
def data() -> tuple[ImageDataset, ImageDataset]:
    """192 training and 64 test images of a learnable synthetic task at 28x28 (the methods need
    no real images; the same data every run, never a silent substitute)."""
    return gratings(192, 28, seed=0), gratings(64, 28, seed=1)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create(name, num_classes=10, in_channels=1, **MODELS[name]).eval()


def _check_valid(result, original: nn.Module, x: torch.Tensor) -> None:
    """A smaller, working, plain model; no layer emptied; the plan rebuilds its architecture."""
    pruned = result.model
    assert pruned(x).shape == (1, 10)
    assert result.report["macs_after"] < result.report["macs_before"]
    assert not leftover_hooks(pruned)
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels >= 1 and m.in_channels >= 1, name
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.num_features >= 1, name
    if result.plan is not None:
        rebuilt = apply_plan(original, x, result.plan)
        assert layer_widths(rebuilt) == layer_widths(pruned)


# ------------------------------------------------------------------------- thresholds (eq. 11)
def test_layer_thresholds_cut_bimodal_layer_at_the_gap_and_spare_a_large_one() -> None:
    g = torch.Generator().manual_seed(0)
    small = 1e-3 * (1 + 0.1 * torch.rand(30, generator=g))       # 30 % near 1e-3
    large = 0.5 + 0.05 * torch.randn(70, generator=g)             # 70 % near 0.5
    bimodal = torch.cat([large[:35], small, large[35:]])          # order must not matter
    all_large = 0.3 + 0.4 * torch.rand(64, generator=g)
    thr = layer_thresholds([bimodal, all_large], delta=1e-3)
    assert thr[0] == pytest.approx(float(large.min()))            # exactly at the gap
    assert int((bimodal < thr[0]).sum()) == 30
    assert thr[1] == pytest.approx(float(all_large.min()))
    assert int((all_large < thr[1]).sum()) == 0
    widths = threshold_widths({"a": bimodal, "b": all_large}, 1e-3)
    assert widths == {"a": 70, "b": 64}


def test_layer_thresholds_never_empty_a_layer() -> None:
    layers = [torch.zeros(8), torch.tensor([0.7]), torch.full((5,), 0.2), torch.tensor([0.0, 0.0, 1e-9])]
    for delta in (0.0, 1e-3, 0.5, 0.999):
        thr = layer_thresholds(layers, delta)
        for layer, t in zip(layers, thr, strict=True):
            assert int((layer.abs() >= t).sum()) >= 1
        widths = threshold_widths({str(i): v for i, v in enumerate(layers)}, delta)
        assert all(w >= 1 for w in widths.values())
    # larger delta never keeps more
    v = torch.linspace(0.01, 1, 50)
    kept = [threshold_widths({"v": v}, d)["v"] for d in (0.0, 0.01, 0.1, 0.5, 0.9)]
    assert kept == sorted(kept, reverse=True) and kept[0] == 50


def test_layer_thresholds_reject_bad_input() -> None:
    with pytest.raises(ConfigError):
        layer_thresholds([torch.ones(3)], delta=1.0)
    with pytest.raises(ConfigError):
        layer_thresholds([torch.ones(3)], delta=-0.1)
    with pytest.raises(ConfigError):
        layer_thresholds([torch.tensor([])])
    with pytest.raises(ConfigError):
        layer_thresholds([torch.tensor([1.0, float("nan")])])


def test_global_threshold_is_on_raw_factors_and_keeps_one_per_group() -> None:
    scores = {"tiny": torch.full((4,), 1e-3), "big": torch.linspace(0.2, 1.0, 8)}
    w = global_threshold_widths(scores, 0.5)                      # removes 6 of 12
    assert w == {"tiny": 1, "big": 5}                             # tiny layer first, never emptied
    assert global_threshold_widths(scores, 0.99) == {"tiny": 1, "big": 1}


def test_separation_measures_bimodality() -> None:
    g = torch.Generator().manual_seed(0)
    assert separation(torch.tensor([0.0] * 5 + [1.0] * 5)) == pytest.approx(1.0)
    assert separation(torch.randn(5000, generator=g)) == pytest.approx(2 / torch.pi, abs=0.02)
    assert separation(torch.ones(4)) == 0.0


# ---------------------------------------------------------------------------- regularisers
def _bn_toy(c: int = 6) -> tuple[nn.Module, object]:
    model = nn.Sequential(nn.Linear(c, c, bias=False), nn.BatchNorm1d(c), nn.Linear(c, 1))
    return model, analyse(model, torch.randn(4, c))


def test_regulariser_subgradients_and_clamp() -> None:
    model, info = _bn_toy()
    gamma = torch.tensor([0.0, 0.1, 0.2, 0.6, 0.9, -0.5])
    with torch.no_grad():
        model[1].weight.copy_(gamma)
    model[1].weight.grad = torch.zeros(6)
    ScaleRegulariser(info, "l1", 0.01).grad_transform(model)
    assert torch.allclose(model[1].weight.grad, 0.01 * torch.sign(gamma))

    model[1].weight.grad = torch.zeros(6)
    reg = ScaleRegulariser(info, "polarization", 0.01, tau=1.5, clamp=True)
    reg.grad_transform(model)
    m = gamma.abs().mean()
    want = 0.01 * torch.sign(gamma) * (1.5 - torch.sign(gamma.abs() - m) + torch.sign(gamma.abs() - m).mean())
    assert torch.allclose(model[1].weight.grad, want)
    # ... which is the gradient autograd gives for R (where R is differentiable)
    g = gamma.clone().requires_grad_(True)
    polarization(g, 1.5).backward()
    assert torch.allclose(model[1].weight.grad, 0.01 * g.grad)
    assert reg.value() == pytest.approx(0.01 * float(polarization(gamma, 1.5)), rel=1e-6)
    assert float(polarization(gamma, 1.5)) == pytest.approx(float(1.5 * gamma.abs().sum()
                                                                 - (gamma.abs() - m).abs().sum()))
    # clamp: magnitude into [0, eps], sign never flips
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([-0.2, 0.1, 3.0, 0.6, 0.9, -3.0]))
    reg.clamp_()
    assert torch.allclose(model[1].weight, torch.tensor([0.0, 0.1, 1.0, 0.6, 0.9, -1.0]))
    with torch.no_grad():
        model[1].weight[5] = 0.3          # the negative factor crossed zero: held at zero
    reg.clamp_()
    assert float(model[1].weight.detach()[5]) == 0.0


def _toy_factors(kind: str, lam: float = 0.2, steps: int = 300, c: int = 64) -> torch.Tensor:
    """A BN layer whose channels matter unequally (frozen read-out weights 0.05 .. 1): sparsity
    training under ``kind`` on a regression whose best factors are all 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(c, c, bias=False), nn.BatchNorm1d(c), nn.Linear(c, 1))
    w = torch.linspace(0.05, 1.0, c)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(c))
        model[2].weight.copy_(w[None])
        model[2].bias.zero_()
        model[1].weight.fill_(0.5)
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)
    info = analyse(model, torch.randn(4, c))
    reg = ScaleRegulariser(info, kind, lam, tau=1.5, clamp=kind == "polarization")
    opt = torch.optim.SGD([model[1].weight, model[1].bias], lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(128, c)
        loss = ((model(x) - (x * w).sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        reg.grad_transform(model)
        opt.step()
        reg.post_step(model)
    return model[1].weight.detach().abs()


def test_polarisation_splits_factors_into_two_groups_unlike_l1() -> None:
    stats = {}
    for kind in ("l1", "polarization"):
        g = _toy_factors(kind)
        rel = g / g.max()
        stats[kind] = {"sep": separation(g), "zero": float((rel < 1e-3).float().mean()),
                       "between": float(((rel > 0.05) & (rel < 0.5)).float().mean())}
    pol, l1 = stats["polarization"], stats["l1"]
    assert pol["zero"] >= 0.25 and pol["zero"] > l1["zero"] + 0.2     # a mode at exactly zero
    assert pol["between"] < 0.1 and pol["between"] < l1["between"]      # few in between
    assert pol["sep"] > 0.93 and pol["sep"] > l1["sep"] + 0.05           # two well-separated groups


def test_sparsity_defaults() -> None:
    x = torch.randn(1, 1, 28, 28)
    assert liu_sparsity(analyse(_model("vgg16_bn"), x)) == 1e-4           # Liu et al.'s values
    assert liu_sparsity(analyse(_model("resnet8"), x)) == 1e-5
    assert liu_sparsity(analyse(_model("densenet40"), x)) == 1e-5
    # "auto": lambda * sum(lr) / (1 - momentum) = 0.6 over the phase
    cfg = TrainConfig(epochs=4, lr=0.1, batch_size=64, schedule="constant")
    assert auto_sparsity(cfg, 4000) == pytest.approx(0.6 / (0.1 * 4 * 62 / 0.1))
    long = TrainConfig(epochs=160, lr=0.1, batch_size=128, schedule="step", milestones=(0.5, 0.75))
    assert 1e-5 < auto_sparsity(long, 50000) < 1e-4                        # Liu et al.'s regime
    assert auto_sparsity(QUICK, 64) == slimming.AUTO_MAX                    # capped
    with pytest.raises(ConfigError):
        slimming.SparsityOptions(sparsity="huge").validate()


def test_registry_entry_points() -> None:
    assert methods.get("slimming") is slimming.run_slimming
    assert methods.get("mrts") is slimming.run_mrts
    assert methods.get("taylor") is taylor.run
    assert {"slimming", "mrts", "taylor"} <= set(methods.available())


# --------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["slimming", "mrts", "taylor"])
def test_method_yields_valid_smaller_model(method: str, name: str, data) -> None:
    train, test = data
    model = _model(name)
    x = train.example_input(1)
    opts = ({"steps": 2, "calib_images": 32, "finetune_epochs_per_step": 1} if method == "taylor"
            else {"sparsity_epochs": 1, "sparsity": 1e-3})
    result = prunekit.prune(model, x, method=method, ratio=0.4, data=(train, test), train_config=QUICK,
                            **opts)
    _check_valid(result, model, x)
    assert result.report["method_train_epochs"] == 1.0
    if method != "taylor":
        assert result.report["method_removed_channel_fraction"] == pytest.approx(0.4, abs=0.02)


@pytest.mark.parametrize("method", ["slimming", "mrts", "taylor"])
def test_target_macs_is_met_and_reported(method: str, data) -> None:
    train, test = data
    model = _model("resnet8")
    x = train.example_input(1)
    opts = ({"steps": 2, "calib_images": 32, "finetune_epochs_per_step": 0} if method == "taylor"
            else {"sparsity_epochs": 0})
    result = prunekit.prune(model, x, method=method, target_macs=0.5, data=train, **opts)
    _check_valid(result, model, x)
    assert 0.4 < result.report["macs_fraction"] <= 0.5
    assert result.report["method_reached_macs_fraction"] == pytest.approx(result.report["macs_fraction"])


def test_mrts_cuts_polarised_layers_at_the_gap_and_falls_back_when_needed() -> None:
    model = _model("vgg16_bn")
    x = torch.randn(1, 1, 28, 28)
    info = analyse(model, x)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                    # polarised by hand: 40 % of every layer at zero
        for grp in info.groups:
            bn = slimming.bn_slots(grp)[0].module
            n = bn.num_features
            bn.weight.copy_(0.4 + 0.2 * torch.rand(n, generator=g))
            bn.weight[torch.randperm(n, generator=g)[: int(0.4 * n)]] = 0.0
    total = sum(grp.size for grp in info.groups)
    zeros = sum(int(0.4 * grp.size) for grp in info.groups)
    natural = prunekit.prune(model, x, method="mrts", ratio=0.1, sparsity_epochs=0, adaptive=True)
    rep = natural.report
    assert rep["method_delta_used"] == 1e-3 and rep["method_fallback"] is None
    assert rep["method_removed_channel_fraction"] == pytest.approx(zeros / total)
    assert rep["method_budget_met_by_thresholds"] is True
    # smallest delta for a loose budget still removes exactly the zeros (they hold no mass)
    loose = prunekit.prune(model, x, method="mrts", ratio=0.1, sparsity_epochs=0)
    assert loose.report["method_removed_channel_fraction"] == pytest.approx(zeros / total)
    # a budget far beyond the gap: reported, and met by the global ranking of the factors
    deep = prunekit.prune(model, x, method="mrts", target_macs=0.1, sparsity_epochs=0)
    rep = deep.report
    assert rep["method_fallback"] == "global-ranking" and rep["method_budget_met_by_thresholds"] is False
    assert rep["method_delta_needed"] > rep["method_max_delta"]
    assert rep["macs_fraction"] <= 0.1
    _check_valid(deep, model, x)


@pytest.mark.parametrize("method,budget,opts", [
    ("slimming", {"ratio": 0.99}, {"sparsity_epochs": 0}),
    ("mrts", {"ratio": 0.99}, {"sparsity_epochs": 0, "delta": 0.999, "adaptive": True}),
    ("mrts", {"ratio": 0.2}, {"sparsity_epochs": 1, "sparsity": 10.0, "adaptive": True}),
    ("taylor", {"ratio": 0.99}, {"steps": 2, "calib_images": 16, "finetune_epochs_per_step": 0}),
])
def test_no_method_ever_empties_a_layer(method: str, budget: dict, opts: dict, data) -> None:
    train, _ = data
    model = _model("resnet8")
    x = train.example_input(1)
    result = prunekit.prune(model, x, method=method, data=train, train_config=QUICK, **budget, **opts)
    _check_valid(result, model, x)
    groups = analyse(result.model, x).groups
    assert groups and all(grp.size >= 1 for grp in groups)


def test_taylor_plan_chains_to_the_same_model(data) -> None:
    train, _ = data
    model = _model("resnet8")
    x = train.example_input(2)
    result = prunekit.prune(model, x, method="taylor", ratio=0.5, data=train, steps=3, calib_images=32,
                            finetune_epochs_per_step=0)
    hist = result.report["method_history"]
    assert len(hist) == 3 and sum(h["removed"] for h in hist) == round(0.5 * 224)
    rebuilt = apply_plan(model, x, result.plan)
    assert torch.allclose(rebuilt(x), result.model(x), atol=1e-5)
    assert result.report["method_train_epochs"] == 0.0


def test_data_requirements() -> None:
    model = _model("resnet8")
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(DataError):
        prunekit.prune(model, x, method="slimming", ratio=0.3, sparsity_epochs=1)
    with pytest.raises(DataError):
        prunekit.prune(model, x, method="taylor", ratio=0.3)
    out = prunekit.prune(model, x, method="slimming", ratio=0.3, sparsity_epochs=0)
    assert out.report["macs_fraction"] < 1
    with pytest.raises(ConfigError):
        prunekit.prune(model, x, method="mrts", ratio=0.3, sparsity_epochs=0, scope="global")


def test_sparsity_training_leaves_the_caller_model_alone(data) -> None:
    train, _ = data
    model = _model("resnet8")
    before = copy.deepcopy(model.state_dict())
    prunekit.prune(model, method="mrts", ratio=0.3, data=train, sparsity_epochs=1, train_config=QUICK)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plots_are_written(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    plots.plot_factor_histograms(
        {"slimming": torch.rand(100, generator=g) * 0.2,
         "MRTS": [torch.zeros(30), 0.5 + 0.1 * torch.rand(70, generator=g)]},
        tmp_path / "hist.png", title="factors")
    plots.plot_layer_widths({"slimming": {"conv1": [16, 9], "fc": [10, 10]},
                                "mrts": {"conv1": [16, 5], "fc": [10, 10]}}, tmp_path / "widths.png")
    assert (tmp_path / "hist.png").stat().st_size > 1000
    assert (tmp_path / "widths.png").stat().st_size > 1000
