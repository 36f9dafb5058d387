"""Pruning without retraining (``method="reconstruct"``): backward elimination, layer-adaptive
widths, least-squares refit, BatchNorm re-estimation, label-free distillation."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
from conftest import assert_one_line_error, run, top1, write_image_folder
from torch.utils.data import Dataset

import prunekit
from prunekit.engine import analyse
from prunekit.engine.allocate import allocate_widths
from prunekit.engine.budget import count_macs_params, macs_of_widths
from prunekit.errors import ConfigError, DataError
from prunekit.methods.elimination import eliminate
from prunekit.methods.sampling import ConsumerSamples
from prunekit.models import create

torch.set_num_threads(1)


# ------------------------------------------------------------------ backward elimination
def _samples(U: torch.Tensor, T: torch.Tensor, C: int, kk: int) -> ConsumerSamples:
    """A consumer reading ``C`` channels with ``kk`` columns each (a conv flattened)."""
    K = C * kk
    cols = torch.arange(K)
    chan = torch.arange(C).repeat_interleave(kk)
    W = torch.randn(T.shape[1], K, dtype=torch.float64)
    return ConsumerSamples("c", W, (T.shape[1], C, kk), None, kk, cols, chan,
                           {c: [c] for c in range(C)}, C, U, T, float((T ** 2).sum()),
                           torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def _refit_residual(U: torch.Tensor, T: torch.Tensor, keep, kk: int) -> float:
    cols = [c * kk + j for c in sorted(keep) for j in range(kk)]
    D = U[:, cols]
    B = torch.linalg.lstsq(D, T).solution
    return float(((T - D @ B) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elimination_path_equals_brute_force_refits(seed):
    """Every step removes the channel whose removal raises the least-squares REFIT residual
    least (checked against a refit of every candidate), and the recorded error at each width is
    that refit residual (relative to ||Y||^2)."""
    g = torch.Generator().manual_seed(seed)
    C, kk, S, out = 6, 3, 400, 4
    U = torch.randn(S, C * kk, dtype=torch.float64, generator=g)
    U[:, 3 * kk:4 * kk] = U[:, 0:kk] * 2.0 + 0.01 * torch.randn(S, kk, dtype=torch.float64, generator=g)
    Wt = torch.randn(C * kk, out, dtype=torch.float64, generator=g)
    T = U @ Wt + 0.1 * torch.randn(S, out, dtype=torch.float64, generator=g)
    path = eliminate([_samples(U, T, C, kk)], ridge=0.0)
    y_sq = float((T ** 2).sum())
    alive = set(range(C))
    for removed in path.order[:-1]:
        costs = {c: _refit_residual(U, T, alive - {c}, kk) for c in alive}
        assert removed == min(costs, key=lambda c: (costs[c], c))
        alive.discard(removed)
        assert float(path.errors[len(alive)]) == pytest.approx(costs[removed] / y_sq, rel=1e-6, abs=1e-9)
    assert path.keep(C) == list(range(C))
    assert float(path.errors[C]) == pytest.approx(_refit_residual(U, T, range(C), kk) / y_sq, rel=1e-6)
    # the near-copy (channel 3 = 2 x channel 0) costs almost nothing: one of the pair goes first
    assert path.order[0] in (0, 3)


def test_elimination_beats_lasso_and_thinet_on_the_refit_error():
    """On a problem with correlated channels, the kept set of backward elimination has a refit
    error no larger than LASSO's or ThiNet's kept set (all refit by least squares)."""
    from prunekit.methods import lasso, thinet
    from prunekit.methods.sampling import stacked_contributions

    g = torch.Generator().manual_seed(5)
    C, kk, S, out = 10, 4, 600, 6
    base = torch.randn(S, 4 * kk, dtype=torch.float64, generator=g)
    mix = torch.randn(4 * kk, C * kk, dtype=torch.float64, generator=g)
    U = base @ mix + 0.3 * torch.randn(S, C * kk, dtype=torch.float64, generator=g)
    T = U @ torch.randn(C * kk, out, dtype=torch.float64, generator=g)
    cs = _samples(U, T, C, kk)
    cs.rows_s = torch.arange(S).repeat_interleave(2)
    cs.rows_o = torch.randint(out, (2 * S,), generator=g)
    cs.weight = (torch.linalg.lstsq(U, T).solution.T).contiguous()
    X, y = stacked_contributions([cs])
    for keep in (3, 5, 7):
        ours = _refit_residual(U, T, eliminate([cs], ridge=0.0).keep(keep), kk)
        assert ours <= _refit_residual(U, T, lasso.select_channels(X, y, keep), kk) + 1e-9
        assert ours <= _refit_residual(U, T, thinet.select_channels(X, y, keep), kk) + 1e-9


# ------------------------------------------------------------------ allocation
def test_allocation_meets_the_budget_and_spends_it_where_damage_is_low():
    model = create("resnet8", num_classes=10, in_channels=1).eval()
    x = torch.randn(1, 1, 16, 16)
    info = analyse(model, x)
    names = [g.name for g in info.groups]
    # a damage curve that is zero for one group: it must lose more channels than the others
    cheap = names[1]
    curves = {n: (torch.zeros(info.group(n).size + 1) if n == cheap
                  else torch.linspace(1.0, 0.0, info.group(n).size + 1) ** 2) for n in names}
    base = count_macs_params(model, x)[0]
    for target in (0.7, 0.5, 0.35):
        widths, frac = allocate_widths(info, curves, target)
        full = {g.name: g.size for g in info.groups}
        exact = macs_of_widths(info, {**full, **widths}) / base
        assert exact == pytest.approx(frac, abs=1e-9)
        assert target - 0.02 <= exact <= target  # within 2 points of the budget, never above
        share = {n: widths[n] / info.group(n).size for n in names}
        assert share[cheap] < min(v for n, v in share.items() if n != cheap)
    with pytest.raises(ConfigError, match="below what pruning"):
        allocate_widths(info, curves, 0.001)


def test_allocation_respects_round_to():
    model = create("resnet20", num_classes=10, in_channels=1).eval()
    info = analyse(model, torch.randn(1, 1, 16, 16))
    curves = {g.name: torch.linspace(1.0, 0.0, g.size + 1) for g in info.groups}
    widths, frac = allocate_widths(info, curves, 0.5, round_to=8)
    assert frac <= 0.5
    assert all(w % 8 == 0 or w == info.group(n).size for n, w in widths.items())


# ------------------------------------------------------------------ the method end to end
class _ImagesOnly(Dataset):
    """Calibration images without labels; touching a label is an error."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data.images[i].float().div(255).sub(0.5).div(0.25)


class _NoLabels:
    """An ImageDataset whose labels raise when read."""

    def __init__(self, data):
        self.__dict__["_data"] = data

    def __getattr__(self, name):
        if name in ("labels", "targets"):
            raise AssertionError("labels were read")
        return getattr(self._data, name)

    def __len__(self):
        return len(self._data)

    def batch(self, idx, *args, **kw):
        x, _ = self._data.batch(idx, *args, **kw)
        return x, None


def _prune(model, data, **kw):
    kw.setdefault("calib_images", 128)
    kw.setdefault("probe_images", 32)
    kw.setdefault("target_macs", 0.5)
    return prunekit.prune(model, data=data, method="reconstruct", evaluate=False, **kw)


def test_reconstruct_keeps_accuracy_without_labels(trained_resnet8, grating_data):
    """Image-only calibration data (no label exists) gives a plain smaller model within the
    budget that keeps most of the accuracy, where L1 without retraining collapses."""
    train, test = grating_data
    res = _prune(trained_resnet8, _ImagesOnly(train))
    assert res.report["macs_fraction"] <= 0.5
    assert res.report["macs_fraction"] >= 0.48
    assert not any(type(m).__name__.endswith("Mask") for m in res.model.modules())
    assert res.report["method_labels_read"] is False
    acc = top1(res.model, test)
    l1 = prunekit.prune(trained_resnet8, torch.randn(1, 1, 16, 16), method="l1", target_macs=0.5,
                        evaluate=False)
    assert acc >= 95.0
    assert acc > top1(l1.model, test) + 10


def test_few_calibration_images_draw_more_places_and_warn(trained_resnet8, grating_data):
    """With few calibration images each wide consumer draws more output places per image (its
    refit keeps ROWS_PER_COLUMN rows per weight column where the maps allow: 16 images gave
    85 % without this, 96-100 % with it), and a refit left with fewer than 2 rows per column
    warns."""
    from prunekit.methods.sampling import ROWS_PER_COLUMN, OriginalTargets, _columns

    train, test = grating_data
    mods = dict(trained_resnet8.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, nn.Conv2d)]
    targets = OriginalTargets(trained_resnet8, names, train, 16, samples_per_image=2)
    for n in names:
        h, w = targets.sizes[n]
        wanted = -(-ROWS_PER_COLUMN * _columns(mods[n]) // 16)
        assert targets.per_image[n] == min(h * w, max(2, wanted)), n
        assert targets.outputs[n][0].shape[0] == 16 * targets.per_image[n]
    assert max(targets.per_image.values()) > 2
    with pytest.warns(prunekit.PrunekitWarning, match="fewer than 2 samples per weight column"):
        res = _prune(trained_resnet8, train, calib_images=16, probe_images=16)
    assert top1(res.model, test) >= 93.0


def test_adaptive_widths_meet_a_measured_latency_budget(trained_resnet8, grating_data, tmp_path,
                                                          monkeypatch):
    """Under ``target_latency`` the damage-optimal allocation is the knob the measured-latency
    search moves: the result is within its budget by its own measurement, its widths are not a
    uniform ratio, and it keeps the accuracy."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    train, test = grating_data
    res = prunekit.prune(trained_resnet8, data=train, method="reconstruct", evaluate=False,
                         calib_images=128, probe_images=32, target_latency=0.75, runtime="deploy",
                         latency_batch_size=64)  # 64 images of 16x16: compute sets the latency
    lb = res.report["latency_budget"]
    assert lb["reached"] and lb["measured_ratio"] <= 0.75, lb["rounds"]  # the search, in the message
    assert res.report["method_widths_source"] == "adaptive, measured-latency search"
    kept = {n: w / c for n, (c, w) in res.report["method_widths"].items()}
    assert max(kept.values()) - min(kept.values()) > 0.2, kept
    assert top1(res.model, test) >= 95.0


def test_reconstruct_never_reads_labels(trained_resnet8, grating_data):
    train, _ = grating_data
    res = _prune(trained_resnet8, _NoLabels(train), calib_images=64)
    assert res.report["macs_fraction"] <= 0.5


def test_reconstruct_is_deterministic_for_a_seed(trained_resnet8, grating_data):
    train, _ = grating_data
    x = train.example_input(8)
    a = _prune(trained_resnet8, train, calib_images=64, seed=3).model
    b = _prune(trained_resnet8, train, calib_images=64, seed=3).model
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    assert torch.equal(a(x), b(x))


def test_refit_lowers_every_consumers_error(trained_resnet8, grating_data):
    """The least-squares refit lowers each pruned layer's output error against the plain
    selection (the same channels, the weights just dropped)."""
    train, _ = grating_data
    res = _prune(trained_resnet8, train, calib_images=64, recalibrate_bn=False)
    layers = res.report["method_layers"]
    assert layers
    assert any(rec["kept"] < rec["size"] for rec in layers)
    for rec in layers:
        if rec["kept"] < rec["size"]:
            assert rec["err_reconstructed"] < rec["err_removed"], rec["group"]
        else:  # a group kept whole is refit on its drifted inputs: never worse
            assert rec["err_reconstructed"] <= rec["err_removed"] + 1e-9, rec["group"]


@pytest.mark.parametrize("selection", ["lasso", "thinet", "clusters"])
def test_other_selections_run(trained_resnet8, grating_data, selection):
    train, test = grating_data
    res = _prune(trained_resnet8, train, calib_images=64, selection=selection)
    assert res.report["macs_fraction"] <= 0.5
    assert top1(res.model, test) >= 50.0


def test_distillation_uses_no_labels_and_lowers_its_loss(trained_resnet8, grating_data):
    train, _ = grating_data
    res = _prune(trained_resnet8, _ImagesOnly(train), calib_images=64, distill_steps=30)
    d = res.report["method_distill"]
    assert d["steps"] == 30
    assert d["loss_last"] < d["loss_first"]


def test_bn_reestimation_matches_a_hand_average(trained_resnet8, grating_data):
    """After the recipe, every BatchNorm's running mean is the average of its input over the
    calibration images (computed here with hooks on a copy of the pruned model run in training
    mode, as during the re-estimation: every BatchNorm normalises with the batch's statistics)."""
    train, _ = grating_data
    res = _prune(trained_resnet8, train, calib_images=64, batch_size=64, seed=0, recalibrate_bn=True)
    model = res.model
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=gen)[:64]
    x, _ = train.batch(idx)
    seen = {}
    probe = copy.deepcopy(model).train()
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].mean((0, 2, 3))))
             for n, m in probe.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.allclose(m.running_mean, seen[n], atol=1e-5), n


def test_bad_input(trained_resnet8, grating_data):
    train, _ = grating_data
    with pytest.raises(DataError):
        prunekit.prune(trained_resnet8, torch.randn(1, 1, 16, 16), method="reconstruct",
                       target_macs=0.5, evaluate=False)
    with pytest.raises(ConfigError, match="selection"):
        _prune(trained_resnet8, train, selection="lassoo")
    with pytest.raises(ConfigError):
        _prune(trained_resnet8, train, target_macs=0.0001)


def test_cli_reconstruct(tmp_path, capsys):
    """``prunekit prune --method reconstruct`` from a checkpoint and an image folder; the
    report holds no accuracy on labels it did not read, only MACs and the method's fields."""
    import json

    from prunekit import cli

    folder = f"folder:{write_image_folder(tmp_path / 'imgs', {'train': 8, 'test': 2})}"
    ck = tmp_path / "base.pt"
    assert cli.main(["train", "--model", "resnet8", "--data", folder, "--epochs", "1",
                     "--batch-size", "8", "--out", str(ck), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "p.pt"
    code, stdout, _ = run(capsys, "prune", str(ck), "--data", folder, "--method", "reconstruct",
                          "--target-macs", "0.5", "--calib-images", "16", "--probe-images", "8",
                          "--out", out, "--json")
    assert code == 0
    rep = json.loads(stdout)
    assert rep["macs_fraction"] <= 0.5
    assert out.is_file()
    # unlabeled images (no class folders needed; nothing to score them on)
    flat = write_image_folder(tmp_path / "flat", {"train": 8})
    code, stdout, stderr = run(capsys, "prune", str(ck), "--data", f"images:{flat}/train/dark", "--method",
                               "reconstruct", "--target-macs", "0.5", "--calib-images", "8",
                               "--probe-images", "8", "--out", tmp_path / "u.pt", "--json")
    assert code == 0
    rep = json.loads(stdout)
    assert rep["macs_fraction"] <= 0.5 and "acc_final" not in rep
    # 8 images are too few for the wider refits: said once, in one line
    warned = [ln for ln in stderr.splitlines() if ln.startswith("prunekit: warning:")]
    assert len(warned) == 1 and "calibration images" in warned[0]
    # bad input: one line, exit 2, no output file
    bad = [(["--selection", "lass"], "lasso"),
           (["--target-macs", "0.001"], "below what pruning"),
           (["--data", f"images:{tmp_path / 'none'}"], "not found"),
           (["--probe-widths", "1.5"], "probe_widths")]
    for extra, match in bad:
        args = ["prune", str(ck), "--data", folder, "--method", "reconstruct", "--target-macs", "0.5",
                "--calib-images", "8", "--out", tmp_path / "q.pt"]
        for k in range(0, len(extra), 2):  # the later value of a repeated option wins
            i = args.index(extra[k]) if extra[k] in args else None
            if i is not None:
                args[i + 1] = extra[k + 1]
            else:
                args += extra[k:k + 2]
        assert_one_line_error(*run(capsys, *args), match=match)
        assert not (tmp_path / "q.pt").exists()


def test_all_combinations_meet_the_budget(trained_resnet8, grating_data):
    train, _ = grating_data
    for widths, trunk in itertools.product(("adaptive", "uniform"), (True, False)):
        res = _prune(copy.deepcopy(trained_resnet8), train, calib_images=64, widths=widths,
                     prune_trunk=trunk)
        assert res.report["macs_fraction"] <= 0.5, (widths, trunk)


def test_unlabeled_image_folder(tmp_path):
    """``images:PATH``: every image below the folder (nested, hidden skipped), resized,
    normalised by its own statistics, image tensors only; bad folders are DataErrors."""
    import numpy as np
    from PIL import Image

    from prunekit.data import load

    rng = np.random.default_rng(0)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, sub in enumerate(["", "a", "a/b", "a", ""]):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / sub / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images, test = load(f"images:{tmp_path}", image_size=8)
    assert test is None and len(images) == 5
    x = torch.stack([images[i] for i in range(5)])
    assert x.shape == (5, 3, 8, 8) and images.in_channels == 3
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-4)
    with pytest.raises(DataError, match="not found"):
        load(f"images:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load(f"images:{tmp_path / 'empty'}")


def test_plan_replays_the_pure_result_exactly(trained_resnet8, grating_data):
    """Without BatchNorm re-estimation or distillation, the returned plan (selection + refit
    weights) applied to a fresh copy of the original gives the same network (1e-5)."""
    from prunekit.engine import apply_plan

    train, _ = grating_data
    res = _prune(trained_resnet8, train, calib_images=64)
    assert res.report["method_plan_reproduces_model"] is True
    x = train.example_input(16)
    replay = apply_plan(trained_resnet8, x[:1], res.plan).eval()
    with torch.no_grad():
        assert torch.allclose(replay(x), res.model(x), atol=1e-5)
