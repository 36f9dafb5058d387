"""AutoPruner (trained gates), CURL (KL scores, stage-wide trunks) and small-data fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import gratings, top1

import prunekit
from prunekit.data.dataset import ImageDataset
from prunekit.engine import analyse, apply_plan, leftover_hooks
from prunekit.methods import autopruner as ap
from prunekit.methods.curl import kl_scores
from prunekit.models import create
from prunekit.testing import randomise_bn
from prunekit.train import TrainConfig
from prunekit.train.smalldata import distillation_loss as _real_kd
from prunekit.train.smalldata import expand, finetune_small_data, patch_shuffle, refinement_loss

torch.set_num_threads(1)


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
    """512 learnable synthetic training images at 16x16 (no real images needed)."""
    return gratings(512, 16)


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
    moved = 0
    for grid in (2, 3, 4, 5):
        y = patch_shuffle(x, grid, g)
        assert y.shape == x.shape and y.dtype == x.dtype
        p = 12 // grid                       # patch side; the last 12 % grid rows/columns stay
        edge = grid * p
        assert torch.equal(y[..., edge:, :], x[..., edge:, :]) and torch.equal(y[..., edge:], x[..., edge:])
        for a, b in zip(x, y, strict=True):  # each image: its own patches, permuted
            cut = [[img[:, i * p:(i + 1) * p, j * p:(j + 1) * p] for i in range(grid) for j in range(grid)]
                   for img in (a, b)]
            src = [t.flatten().tolist() for t in cut[0]]
            dst = [t.flatten().tolist() for t in cut[1]]
            assert sorted(src) == sorted(dst)
            moved += src != dst
    assert moved > 0.8 * 4 * len(x)          # almost every image is actually shuffled
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


class _LossSpy:
    """Wraps prunekit.train.smalldata's loss functions and the teacher's forward: records every
    call, and checks each distillation loss against the teacher's logits for the very batch and
    against the loss computed by hand."""

    def __init__(self, monkeypatch, teacher: nn.Module | None) -> None:
        import prunekit.train.smalldata as sd

        self.kd, self.refine, self.teacher_out = [], [], []
        real_kd, real_refine = _real_kd, refinement_loss    # never a previous spy
        if teacher is not None:
            teacher.register_forward_hook(self._teacher_hook)

        def kd(s, t, y, alpha, temperature, *rest):
            assert self.teacher_out and t is self.teacher_out[-1]    # the teacher's logits, unchanged
            out = real_kd(s, t, y, alpha, temperature, *rest)
            log_q = torch.log_softmax(s.double() / temperature, 1)
            p = torch.softmax(t.double() / temperature, 1)
            hand = (alpha * temperature ** 2 * (p * (p.log() - log_q)).sum(1).mean()
                    + (1 - alpha) * F.cross_entropy(s.double(), y))
            assert float(out.detach()) == pytest.approx(float(hand.detach()), rel=1e-5, abs=1e-6)
            self.kd.append((s.shape, alpha, temperature))
            return out

        def refine(s, z, y, alpha, temperature):
            self.refine.append((z.detach().clone(), y.clone(), alpha, temperature))
            return real_refine(s, z, y, alpha, temperature)

        monkeypatch.setattr(sd, "distillation_loss", kd)
        monkeypatch.setattr(sd, "refinement_loss", refine)

    def _teacher_hook(self, module, args, out):
        assert not module.training                                     # used in eval mode
        self.teacher_out.append(out)


def test_finetune_small_data_distils_and_refines_from_the_teacher(monkeypatch):
    """Step 1 distils from the teacher on the original images (every step, the teacher's
    logits of that very batch, the KD loss as written by hand); step 2 refines soft labels
    that start as the teacher's temperature-scaled logits of the EXPANDED images; the teacher
    is never trained; the reported accuracy and label statistics are the real ones."""
    train, test = _synthetic(64, 12), _synthetic(40, 12, seed=5)
    torch.manual_seed(0)
    teacher = create("resnet8", num_classes=10, in_channels=1, width=0.5).eval()
    frozen = copy.deepcopy(teacher.state_dict())
    student = prunekit.prune(teacher, train.example_input(2), method="l1", ratio=0.5).model
    cfg = TrainConfig(batch_size=32, lr=0.01, device="cpu")
    expanded = expand(train, 3, seed=0)
    with torch.no_grad():
        z0 = teacher(expanded.batch(torch.arange(len(expanded)))[0]) / cfg.distill_temperature
    spy = _LossSpy(monkeypatch, teacher)
    res = finetune_small_data(student, teacher, train, epochs=1, factor=3, cfg=cfg, test_set=test)
    assert [p["name"] for p in res.phases] == ["step1: original+mixup+kd", "step2: refine"]
    assert res.steps == 6 and res.phases[1]["data"] == 192 and res.phases[0]["data"] == 64
    # step 1: two steps, each two KD terms (mixup: the two label sets) with the config's alpha, T
    assert spy.kd == [((32, 10), cfg.distill_alpha, cfg.distill_temperature)] * 4
    # step 2: four steps on the expanded set; the soft labels used are the teacher's initial ones
    # (each image is visited once in 4 x 32 < 192 draws), with the images' own labels
    assert len(spy.refine) == 4
    for z, y, alpha, temperature in spy.refine:
        assert (alpha, temperature) == (cfg.distill_alpha, cfg.distill_temperature)
        rows = [int(torch.cdist(r[None], z0).argmin()) for r in z]
        assert torch.allclose(z, z0[rows], atol=1e-5)
        assert torch.equal(y, expanded.targets[rows])
        assert len(set(rows)) == len(rows)
    assert res.labels["agree_init"] == pytest.approx(
        float((z0.argmax(1) == expanded.targets).double().mean()))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert res.test_acc == top1(student, test) == res.phases[-1]["test_acc"]


def test_finetune_small_data_without_teacher_uses_no_distillation(monkeypatch):
    train = _synthetic(64, 12)
    torch.manual_seed(0)
    student = create("resnet8", num_classes=10, in_channels=1, width=0.5).eval()
    cfg = TrainConfig(batch_size=32, lr=0.01, device="cpu")
    spy = _LossSpy(monkeypatch, None)
    before = copy.deepcopy(student.state_dict())
    plain = finetune_small_data(student, None, train, epochs=1, expand=False, distill=False,
                                refine_labels=False, cfg=cfg)
    assert [p["name"] for p in plain.phases] == ["finetune"] and plain.steps == 2
    assert spy.kd == [] and spy.refine == [] and plain.test_acc is None
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items()
               if v.is_floating_point())
    # refinement without a teacher: soft labels start at 10 * one-hot of the true label
    refined = finetune_small_data(student, None, train, epochs=1, expand=False, distill=False,
                                  refine_labels=True, cfg=cfg)
    assert spy.kd == [] and len(spy.refine) == refined.phases[-1]["steps"] > 0
    for z, y, *_ in spy.refine:
        assert torch.equal(z, 10.0 * F.one_hot(y, 10).float())
    assert refined.labels["agree_init"] == 1.0
    with pytest.raises(prunekit.ConfigError):
        finetune_small_data(student, None, train, epochs=1, distill=True)


def test_prune_fine_tunes_with_the_small_data_recipe(monkeypatch) -> None:
    """``expand`` / ``refine_labels`` switch prune()'s fine-tuning to CURL's small-data recipe,
    for any method: the returned model is the one fine-tuned, the teacher is the original
    network (not the pruned one) and its logits feed the distillation loss; refused without
    fine-tuning."""
    import prunekit.train.smalldata as sd

    data = _synthetic(64, 16)
    torch.manual_seed(0)
    model = create("resnet8", num_classes=4, in_channels=1, width=0.5).eval()
    calls = []
    real = sd.finetune_small_data

    def spy_recipe(student, teacher, train_set, epochs, **kw):
        calls.append({"student": student, "teacher": teacher, "data": train_set, "epochs": epochs, **kw})
        kd = _LossSpy(monkeypatch, teacher)
        if teacher is not None:
            x = data.example_input(8)
            with torch.no_grad():
                assert torch.equal(teacher(x), model(x))    # the original network's function
            kd.teacher_out.clear()
        before = copy.deepcopy(student.state_dict())
        out = real(student, teacher, train_set, epochs, **kw)
        calls[-1].update(kd=len(kd.kd), refine=len(kd.refine),
                         trained=any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items()))
        return out

    monkeypatch.setattr(sd, "finetune_small_data", spy_recipe)
    res = prunekit.prune(model, method="l1", ratio=0.5, data=(data, data), finetune_epochs=1,
                         distill=True, expand=True, refine_labels=True)
    assert len(calls) == 1
    c = calls[0]
    assert c["student"] is res.model and c["data"] is data and c["epochs"] == 1
    assert c["expand"] is True and c["refine_labels"] is True and c["distill"] is True
    assert c["kd"] > 0 and c["refine"] > 0 and c["trained"]
    assert res.report["expand"] and res.report["refine_labels"]
    assert res.report["acc_final"] == top1(res.model, data)
    # without distill: no teacher, no distillation loss
    prunekit.prune(model, method="l1", ratio=0.5, data=(data, data), finetune_epochs=1, expand=True)
    assert calls[1]["teacher"] is None and calls[1]["kd"] == 0 and calls[1]["refine"] == 0
    with pytest.raises(prunekit.ConfigError):
        prunekit.prune(model, method="l1", ratio=0.5, data=(data, data), expand=True)
