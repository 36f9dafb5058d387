"""AutoPruner (trained gates), CURL (KL scores, stage-wide trunks) and small-data fine-tuning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.data.dataset import ImageDataset
from prunekit.engine import analyse, apply_plan, leftover_hooks
from prunekit.methods import autopruner as ap
from prunekit.methods.curl import kl_scores
from prunekit.models import create
from prunekit.testing import randomise_bn
from prunekit.train import TrainConfig
from prunekit.train.smalldata import expand, finetune_small_data, patch_shuffle, refinement_loss

torch.set_num_threads(1)
FMNIST = Path("/usr/share/datasets/fashion-mnist")




def _synthetic(n: int = 256, size: int = 16, seed: int = 0) -> ImageDataset:
    """Random images labelled by their brightest quadrant (a learnable task)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    h = size // 2
    quads = torch.stack([images[:, 0, :h, :h], images[:, 0, :h, h:], images[:, 0, h:, :h],
                         images[:, 0, h:, h:]], 1).float().mean((2, 3))
    return ImageDataset(images, quads.argmax(1), mean=(0.5,), std=(0.25,), num_classes=10,
                        name="synthetic")


def _small_train() -> ImageDataset:
    """512 Fashion-MNIST training images at 16x16 (a synthetic task without the dataset)."""
    if FMNIST.is_dir():
        from prunekit.data import load, resize
        return resize(load("fashion-mnist", train_samples=512)[0], 16)
    return _synthetic(512, 16)


def _no_gates(model: nn.Module) -> bool:
    return (not any(isinstance(m, ap.ChannelGate) for m in model.modules())
            and not hasattr(model, ap.GatedModel.ATTR) and not leftover_hooks(model))


# ----------------------------------------------------------------------------- AutoPruner
def test_autopruner_reaches_keep_ratio_and_leaves_no_gates():
    train = _small_train()
    torch.manual_seed(0)
    model = create("resnet8", num_classes=10, in_channels=1, width=0.5)
    x = train.example_input(2)
    # enforce_budget=False: the channels kept are exactly those whose trained gate is open
    res = prunekit.prune(model, x, method="autopruner", ratio=0.5, data=train, enforce_budget=False,
                         epochs=6, batch_size=32, device="cpu")
    widths = res.plan.widths()
    info = analyse(model, x)
    kept = sum(widths.get(g.name, (g.size, g.size))[1] for g in info.groups)
    total = sum(g.size for g in info.groups)
    assert abs(kept / total - 0.5) <= 0.02, (kept, total, widths)
    assert res.report["method_target_keep"] == pytest.approx(0.5, abs=0.01)
    assert res.report["method_binary_fraction"] > 0.95
    assert _no_gates(res.model) and _no_gates(model)
    assert res.model(x).shape == (2, 10)
    assert min(w for _, w in widths.values()) >= 1


def test_gate_plan_never_empties_a_group_and_enforces_widths():
    model = create("resnet8", num_classes=10, in_channels=1, width=0.5)
    info = analyse(model, torch.randn(2, 1, 16, 16))
    values = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in info.groups}
    first = info.groups[0]
    values[first.name][[1, 2]] = 1.0
    plan, stats = ap.gate_plan(info, values)
    assert all(len(gp.keep) >= 1 for gp in plan) and plan.widths()[first.name] == (first.size, 2)
    widths = {g.name: 3 for g in info.groups}
    plan, stats = ap.gate_plan(info, values, widths)
    assert all(w == 3 for _, w in plan.widths().values())
    assert 1 in plan.groups[0].keep and 2 in plan.groups[0].keep
    assert stats["forced"] == 3 * len(info.groups) - 2


@pytest.mark.parametrize("name,kw", [("resnet8", {}), ("resnet164", {"width": 0.25}),
                                     ("mobilenetv2", {"width": 0.25}), ("densenet40", {"width": 0.25}),
                                     ("simplecnn", {"input_size": 16})])
def test_binary_gates_fold_exactly(name, kw):
    """Gating at the consumers' inputs equals removal: with binary gates the gated network and
    the folded, pruned network give the same outputs (residual trunks, a BN between trunk and
    consumer in pre-activation ResNets, depthwise convs, concatenation, flatten -> Linear)."""
    torch.manual_seed(0)
    model = randomise_bn(create(name, num_classes=10, in_channels=3, **kw)).double().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    info = analyse(model, x)
    gated = ap.GatedModel(model, info.groups, x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for g, gate in gated.items():
            gate.double()
            gate.fc.weight.zero_()
            open_ = torch.rand(g.size, generator=gen) < 0.5
            open_[0] = True
            gate.fc.bias.copy_(torch.where(open_, 50.0, -50.0))  # sigmoid(+-50) == 1 / 0 exactly-ish
            gate.alpha = 1.0
        gated_out = model(x)
        values = {g.name: gate.v.detach().clone() for g, gate in gated.items()}
    gated.detach()
    assert _no_gates(model)
    plan, stats = ap.gate_plan(info, values)
    assert stats["forced"] == 0 and len(plan) > 0
    ap.fold_gates(info, values)
    pruned = apply_plan(model, x, plan)
    with torch.no_grad():
        out = pruned(x)
    assert (out - gated_out).abs().max() <= 1e-9 * gated_out.abs().max().clamp_min(1)


def test_gates_are_differentiable_and_regularised():
    torch.manual_seed(0)
    model = create("resnet8", num_classes=10, in_channels=1, width=0.5)
    x = torch.randn(8, 1, 16, 16)
    info = analyse(model, x)
    gated = ap.GatedModel(model, info.groups, x)
    model.train()
    out = model(x)
    reg = sum((gate.v.mean() - 0.3) ** 2 for _, gate in gated.items())
    (out.square().mean() + reg).backward()
    assert all(gate.fc.weight.grad is not None and gate.fc.weight.grad.abs().sum() > 0
               for _, gate in gated.items())
    gated.detach()
    assert _no_gates(model)


# ----------------------------------------------------------------------------- CURL
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.bn(self.conv(x))))))


def test_curl_kl_of_dead_channel_is_zero_and_signal_channel_largest():
    torch.manual_seed(0)
    model = _Tiny().double().eval()
    with torch.no_grad():
        model.conv.weight.normal_()
        model.conv.weight[0].zero_()
        model.conv.bias[0] = 0.0
        model.bn.bias[0] = 0.0
        model.bn.running_mean[0] = 0.0      # channel 0 is always exactly 0 -> removing it is a no-op
        model.conv.weight[1].abs_()          # channel 1 is positive on positive images ...
        model.conv.bias[1] = 1.0
        model.fc.weight.mul_(0.1)
        model.fc.weight[:, 1] = torch.tensor([8.0, -4.0, -4.0])  # ... and decides the output
    data = _synthetic(32, 8)
    info = analyse(model, data.example_input(2).double())
    data_d = _DoubleData(data)
    s = kl_scores(info, data_d, calib_images=32, channel_batch=3, batch_size=16)["conv"]
    assert s[0] == 0.0 or s[0] < 1e-12
    assert int(s.argmax()) == 1 and s[1] > 10 * s[2:].max()


class _DoubleData:
    """An ImageDataset view returning float64 batches (exactness tests)."""

    def __init__(self, data: ImageDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, idx):
        x, y = self.data.batch(idx)
        return x.double(), y


def test_batched_kl_equals_one_forward_per_channel():
    torch.manual_seed(0)
    model = randomise_bn(create("resnet8", num_classes=10, in_channels=1, width=0.5)).double().eval()
    data = _DoubleData(_synthetic(12, 12))
    info = analyse(model, data.batch([0, 1])[0])
    one = kl_scores(info, data, calib_images=12, channel_batch=1, batch_size=5)
    many = kl_scores(info, data, calib_images=12, channel_batch=7, batch_size=5)
    assert not leftover_hooks(model)
    assert set(one) == {g.name for g in info.groups}
    for name in one:
        assert torch.allclose(one[name], many[name], rtol=1e-9, atol=1e-15), name
        assert (one[name] >= 0).all()
    assert any(v.max() > 0 for v in one.values())


def test_curl_prunes_whole_stage_trunks_consistently():
    torch.manual_seed(0)
    model = randomise_bn(create("resnet20", num_classes=10, in_channels=1, width=0.5)).eval()
    data = _synthetic(16, 16)
    x = data.example_input(2)
    res = prunekit.prune(model, x, method="curl", target_macs=0.5, data=data, calib_images=16,
                         channel_batch=8)
    pruned = res.model
    assert res.report["macs_fraction"] <= 0.5 and pruned(x).shape == (2, 10)
    assert _no_gates(pruned) and not leftover_hooks(model)
    trunk_pruned = False
    for i, stage in enumerate((pruned.layer1, pruned.layer2, pruned.layer3)):
        outs = {b.conv2.out_channels for b in stage}
        outs |= {b.shortcut[0].out_channels for b in stage if isinstance(b.shortcut, nn.Sequential)}
        if i == 0:
            outs.add(pruned.conv1.out_channels)
        assert len(outs) == 1, (i, outs)          # every block of a stage writes the same width
        original = (model.layer1, model.layer2, model.layer3)[i][0].conv2.out_channels
        trunk_pruned |= outs.pop() < original
    assert trunk_pruned


# ----------------------------------------------------------------------------- small data
def test_patch_shuffle_and_expansion_keep_labels_and_shapes():
    data = _synthetic(20, 12)
    g = torch.Generator().manual_seed(0)
    x = data.images
    assert torch.equal(patch_shuffle(x, 1, g), x)
    for grid in (2, 3, 4, 5):
        y = patch_shuffle(x, grid, g)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # same pixels
    assert not torch.equal(patch_shuffle(x, 2, g), x)
    assert patch_shuffle(x[0], 3, g).shape == x[0].shape
    big = expand(data, 4, seed=1)
    assert len(big) == 80 and big.images.shape[1:] == x.shape[1:] and big.images.dtype == torch.uint8
    assert torch.equal(big.targets, data.targets.repeat(4)) and torch.equal(big.images[:20], x)
    assert torch.equal(expand(data, 4, seed=1).images, big.images)        # seeded
    assert torch.equal(expand(data, 1).images, x)
    with pytest.raises(prunekit.ConfigError):
        expand(data, 2, transforms=("nope",))


def test_refinement_gradient_matches_autograd():
    s = torch.randn(5, 4, dtype=torch.float64)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    _, grad = refinement_loss(s, z.detach(), y, 0.7, 3.0)
    q = torch.softmax(s / 3.0, 1)
    kl = (q * (q.log() - torch.log_softmax(z, 1))).sum()  # per-sample terms summed
    kl.mul(0.7 * 9).backward()
    assert torch.allclose(grad, z.grad)


def test_finetune_small_data_runs_all_phases():
    train = _synthetic(64, 12)
    torch.manual_seed(0)
    teacher = create("resnet8", num_classes=10, in_channels=1, width=0.5).eval()
    student = prunekit.prune(teacher, train.example_input(2), method="l1", ratio=0.5).model
    cfg = TrainConfig(batch_size=32, lr=0.01, device="cpu")
    res = finetune_small_data(student, teacher, train, epochs=1, factor=3, cfg=cfg, test_set=train)
    assert [p["name"] for p in res.phases] == ["step1: original+mixup+kd", "step2: refine"]
    assert res.steps == 6 and res.phases[1]["data"] == 192
    assert 0 <= res.labels["changed"] <= 1 and res.test_acc is not None
    plain = finetune_small_data(copy.deepcopy(student), None, train, epochs=1, expand=False,
                                distill=False, refine_labels=False, cfg=cfg)
    assert [p["name"] for p in plain.phases] == ["finetune"] and plain.steps == 2
    with pytest.raises(prunekit.ConfigError):
        finetune_small_data(student, None, train, epochs=1, distill=True)


def test_prune_fine_tunes_with_the_small_data_recipe() -> None:
    """``expand`` / ``refine_labels`` switch prune()'s fine-tuning to CURL's small-data recipe,
    for any method, and are refused without fine-tuning."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=g)
    data = ImageDataset(images, torch.arange(64) % 4, mean=(0.5,), std=(0.25,), num_classes=4,
                        name="tiny")
    model = create("resnet8", num_classes=4, in_channels=1, width=0.5).eval()
    res = prunekit.prune(model, method="l1", ratio=0.5, data=(data, data), finetune_epochs=1,
                         distill=True, expand=True, refine_labels=True)
    assert res.report["expand"] and res.report["refine_labels"] and res.report["times"]["finetune_s"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(
        res.model.state_dict().values(),
        prunekit.prune(model, data.example_input(1), method="l1", ratio=0.5).model.state_dict().values(),
        strict=True))
    with pytest.raises(prunekit.ConfigError):
        prunekit.prune(model, method="l1", ratio=0.5, data=(data, data), expand=True)
