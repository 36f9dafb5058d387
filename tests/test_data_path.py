"""One data path, streamed (issue #16, item 3): every data-driven method reads an ImageDataset,
any map-style Dataset, a DataLoader or a streamed image folder, with labels only where it needs
them, and gives the in-memory result exactly when it reads the same images in the same batches."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import write_image_folder
from torch.utils.data import DataLoader, Dataset, TensorDataset

import prunekit
from prunekit import cli
from prunekit.criteria import data_scores
from prunekit.data import ImageDataset, ImageFolderStream, load
from prunekit.data.batches import count, iter_batches, select
from prunekit.data.stream import stream_image_folder
from prunekit.engine import analyse
from prunekit.errors import ConfigError, DataError
from prunekit.io import save
from prunekit.models import create
from prunekit.train import TrainConfig, evaluate, fit
from prunekit.train import loop as train_loop

ACTIVATION = ["apoz", "mean-mean", "mean-std", "mean-l1", "mean-l2", "var-l2"]
#: every data-driven method with options small enough for a unit test
OPTIONS = {
    "csgd": dict(survey_samples=64, recalibrate_samples=64, centripetal_epochs=1,
                 max_steps_per_epoch=2),
    "thinet": dict(calib_images=32, samples_per_image=4),
    "lasso": dict(calib_images=32, samples_per_image=4),
    "taylor": dict(calib_images=32, steps=2, finetune_epochs_per_step=1, max_steps_per_epoch=2),
    **{c: dict(calib_images=32) for c in ACTIVATION},
    "slimming": dict(sparsity_epochs=1, max_steps_per_epoch=2),
    "mrts": dict(sparsity_epochs=1, max_steps_per_epoch=2),
    "autopruner": dict(epochs=1, max_steps_per_epoch=2, calib_images=32),
    "curl": dict(calib_images=16, channel_batch=8, steps=1),
    "tp:taylor": dict(calib_images=32),
}


def _model(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("resnet8", num_classes=num_classes, in_channels=1, width=0.5).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # spread the BatchNorm factors (all 1 in a fresh network)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.05
    return model


def _tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


class ImagesOnly(Dataset):
    """A map-style dataset of images without labels."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """48 training and 8 test grayscale PNGs in two classes."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"), {"train": 24, "test": 4})


@pytest.fixture(scope="module")
def in_memory(folder) -> tuple[ImageDataset, ImageDataset]:
    return load(f"folder:{folder}", image_size=16, stream=False)


@pytest.fixture(scope="module")
def streamed(folder, in_memory) -> tuple[ImageFolderStream, ImageFolderStream]:
    """The same folder streamed with the in-memory mean/std: the same inputs bit for bit."""
    train, _ = in_memory
    return stream_image_folder(folder, 16, mean=train.mean, std=train.std, num_workers=1)


# ------------------------------------------------------------------ every method, every source
@pytest.mark.parametrize("method", list(OPTIONS))
def test_method_runs_from_a_dataloader(method: str) -> None:
    model = _model(4)
    x, y = _tensors(96, 0)
    xt, yt = _tensors(32, 1)
    data = (DataLoader(TensorDataset(x, y), batch_size=16),
            DataLoader(TensorDataset(xt, yt), batch_size=16))
    res = prunekit.prune(model, x[:1], method=method, ratio=0.5, data=data, **OPTIONS[method])
    assert 0.0 < res.report["macs_fraction"] < 1.0
    assert 0.0 <= res.report["acc_before"] <= 100.0 and 0.0 <= res.report["acc_final"] <= 100.0
    assert res.model(x[:2]).shape == (2, 4)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_method_runs_from_a_streamed_folder(method: str, folder) -> None:
    train, test = load(f"folder+stream:{folder}", image_size=16)
    assert isinstance(train, ImageFolderStream) and not hasattr(train, "images")
    model = _model(2)
    res = prunekit.prune(model, None, method=method, ratio=0.5, data=(train, test), **OPTIONS[method])
    assert 0.0 < res.report["macs_fraction"] < 1.0
    assert res.model(train.example_input(2)).shape == (2, 2)


# ------------------------------------------------------------------ identical results
def test_thinet_identical_in_memory_streamed_and_dataloader(in_memory, streamed) -> None:
    """ThiNet's seeded random calibration subset: the ImageDataset, the streamed folder (read by
    index through worker processes) and a DataLoader whose sampler yields that same subset give
    the same channels and the same weights."""
    mem, st = in_memory[0], streamed[0]
    model = _model(2)
    opts = dict(calib_images=24, samples_per_image=4, batch_size=8)
    a = prunekit.prune(model, None, method="thinet", ratio=0.5, data=mem, **opts)
    b = prunekit.prune(model, None, method="thinet", ratio=0.5, data=st, **opts)
    chosen = torch.randperm(len(mem), generator=torch.Generator().manual_seed(0))[:24]
    loader = DataLoader(st, batch_size=8, sampler=chosen.tolist(), num_workers=1)
    c = prunekit.prune(model, None, method="thinet", ratio=0.5, data=loader, **opts)
    assert a.report["method_calib_images"] == c.report["method_calib_images"] == 24
    for other in (b, c):
        assert [g.keep for g in other.plan] == [g.keep for g in a.plan]
        sa, so = a.model.state_dict(), other.model.state_dict()
        assert sa.keys() == so.keys() and all(torch.equal(sa[k], so[k]) for k in sa)


def test_csgd_survey_identical_in_memory_and_streamed(in_memory, streamed) -> None:
    from prunekit.methods import csgd

    model = _model(2)
    a = csgd.survey(model, in_memory[0], samples=40, batch_size=8)
    b = csgd.survey(model, DataLoader(streamed[0], batch_size=8, num_workers=1), samples=40)
    c = csgd.survey(model, streamed[0], samples=40, batch_size=8)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("criterion", ["apoz", "mean-l2", "var-l2", "taylor"])
def test_data_criteria_identical_in_memory_and_streamed(criterion: str, in_memory, streamed) -> None:
    model = _model(2)
    info = analyse(model, in_memory[0].example_input(1))
    a = data_scores(info, criterion, in_memory[0], samples=40, batch_size=8)
    b = data_scores(info, criterion, DataLoader(streamed[0], batch_size=8, num_workers=1), samples=40)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apoz_plan_identical_in_memory_and_streamed(in_memory, streamed) -> None:
    model = _model(2)
    a = prunekit.prune(model, None, method="apoz", ratio=0.5, data=in_memory, calib_images=40)
    b = prunekit.prune(model, None, method="apoz", ratio=0.5, data=streamed, calib_images=40)
    assert [g.keep for g in a.plan] == [g.keep for g in b.plan]
    assert a.report["acc_before"] == b.report["acc_before"]


def test_fit_identical_in_memory_and_streamed(in_memory, streamed) -> None:
    """Indexable data keeps the seeded order and augmentation: training on the streamed folder
    (decoded in a worker process) gives the in-memory run's weights exactly."""
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3, device="cpu", eval_every=0,
                      max_steps_per_epoch=3)
    a, b = _model(2), _model(2)
    ra = fit(a, in_memory[0], cfg, test_set=in_memory[1])
    rb = fit(b, streamed[0], cfg, test_set=streamed[1])
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra.test_acc == rb.test_acc == evaluate(b, DataLoader(streamed[1], batch_size=8))


# ------------------------------------------------------------------ DataLoader in the trainer
def test_fit_iterates_a_dataloader_each_epoch() -> None:
    x, y = _tensors(40, 0)
    seen: list[int] = []

    class Counting(TensorDataset):
        def __getitem__(self, i):
            seen.append(int(i))
            return super().__getitem__(i)

    loader = DataLoader(Counting(x, y), batch_size=16)  # 3 batches, the last of 8
    model = _model(4)
    before = copy.deepcopy(model.state_dict())
    res = fit(model, loader, TrainConfig(epochs=2, batch_size=128, lr=0.05, device="cpu",
                                         eval_every=0, augment=True))
    assert res.epochs_run == 2 and sorted(seen) == sorted(list(range(40)) * 2)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    seen.clear()
    fit(model, loader, TrainConfig(epochs=1, lr=0.05, device="cpu", eval_every=0,
                                   max_steps_per_epoch=2))
    assert len(seen) == 32  # two batches, and the third is never read
    assert evaluate(model, DataLoader(TensorDataset(x, y), batch_size=40)) == evaluate(
        model, TensorDataset(x, y), batch_size=40)


def test_fit_dataloader_under_ddp_needs_a_distributed_sampler(monkeypatch) -> None:
    fake = train_loop.DistContext(torch.device("cpu"), rank=0, world=2)
    monkeypatch.setattr(train_loop.DistContext, "setup", classmethod(lambda cls, device="auto": fake))
    x, y = _tensors(16, 0)
    with pytest.raises(ConfigError, match="DistributedSampler"):
        fit(_model(4), DataLoader(TensorDataset(x, y), batch_size=8), TrainConfig(epochs=1))


# ------------------------------------------------------------------ labels only where needed
def test_images_only_data_for_methods_that_need_no_labels() -> None:
    model = _model(4)
    x, _ = _tensors(64, 0)
    data = ImagesOnly(x)
    for method, opts in (("csgd", dict(survey_samples=64, recalibrate_samples=64,
                                       centripetal_epochs=0)),
                         ("thinet", dict(calib_images=32, samples_per_image=4)),
                         ("lasso", dict(calib_images=32, samples_per_image=4)),
                         ("apoz", dict(calib_images=32)), ("mean-l2", dict(calib_images=32)),
                         ("curl", dict(calib_images=8, channel_batch=8))):
        res = prunekit.prune(model, x[:1], method=method, ratio=0.5,
                             data=DataLoader(data, batch_size=16) if method == "lasso" else data,
                             **opts)
        assert res.report["macs_fraction"] < 1.0, method


@pytest.mark.parametrize("method", ["taylor", "tp:taylor", "slimming", "autopruner"])
def test_images_only_data_for_methods_that_need_labels(method: str) -> None:
    x, _ = _tensors(64, 0)
    with pytest.raises(DataError, match="needs labels"):
        prunekit.prune(_model(4), x[:1], method=method, ratio=0.5, data=ImagesOnly(x),
                       **OPTIONS[method])


# ------------------------------------------------------------------ the helpers
def test_select_freezes_a_shuffling_loader_and_counts_its_sampler() -> None:
    x, y = _tensors(50, 0)
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=8, shuffle=True)
    sel = select(loader, 20)
    first = [b for b in sel]
    second = [b for b in sel]
    assert len(sel) == 20 and sum(len(b[0]) for b in first) == 20
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, second, strict=True))
    subset = DataLoader(ds, batch_size=8, sampler=list(range(10, 30)))
    assert count(subset) == 20 and count(subset, 5) == 5
    got = torch.cat([xb for xb, _ in iter_batches(subset)])
    assert torch.equal(got, x[10:30])
    # an indexable dataset: the seeded random subset ThiNet always drew
    g = torch.Generator().manual_seed(4)
    sel = select(ds, 12, 5, generator=g)
    assert torch.equal(sel.indices, torch.randperm(50, generator=torch.Generator().manual_seed(4))[:12])
    assert [len(b[0]) for b in sel] == [5, 5, 2]


# ------------------------------------------------------------------ the streamed folder
def test_streamed_folder_matches_the_in_memory_one(folder, in_memory) -> None:
    mem_train, mem_test = in_memory
    train, test = stream_image_folder(folder, 16, num_workers=0)
    assert (len(train), len(test)) == (len(mem_train), len(mem_test))
    assert train.num_classes == mem_train.num_classes and train.classes == mem_train.classes
    assert train.in_channels == 1 and train.image_size == (16, 16) and train.name == mem_train.name
    assert train.mean == pytest.approx(mem_train.mean, abs=1e-12)
    assert train.std == pytest.approx(mem_train.std, abs=1e-12)
    assert torch.equal(train.targets, mem_train.targets)
    x, _ = mem_train.batch(torch.arange(len(mem_train)))
    got = torch.stack([train[i][0] for i in range(len(train))])
    assert torch.allclose(got, x, atol=1e-5)
    assert train.example_input(3).shape == (3, 1, 16, 16)
    sub = train.subset(5)
    assert len(sub) == 5 and torch.equal(sub[4][0], train[4][0]) and sub.mean == train.mean
    # a bounded statistics sample still gives the folder's neighbourhood
    small, _ = stream_image_folder(folder, 16, stats_samples=6, num_workers=0)
    assert small.mean[0] == pytest.approx(train.mean[0], abs=0.1)


def test_load_streams_large_folders_and_on_request(folder, monkeypatch) -> None:
    assert isinstance(load(f"folder:{folder}", image_size=16)[0], ImageDataset)
    assert isinstance(load(f"folder+stream:{folder}", image_size=16)[0], ImageFolderStream)
    assert isinstance(load(f"folder:{folder}", image_size=16, stream=True)[0], ImageFolderStream)
    train, _ = load(f"folder+stream:{folder}", image_size=16, train_samples=7)
    assert len(train) == 7
    monkeypatch.setenv("PRUNEKIT_IN_MEMORY_LIMIT", "20K")  # 56 images x 3 x 16 x 16 > 20 KiB
    assert isinstance(load(f"folder:{folder}", image_size=16)[0], ImageFolderStream)
    assert isinstance(load(f"folder:{folder}", image_size=8)[0], ImageDataset)  # 10.5 KiB fits
    assert isinstance(load(f"folder:{folder}", image_size=16, stream=False)[0], ImageDataset)
    monkeypatch.setenv("PRUNEKIT_IN_MEMORY_LIMIT", "lots")
    with pytest.raises(ConfigError, match="PRUNEKIT_IN_MEMORY_LIMIT"):
        load(f"folder:{folder}")
    monkeypatch.delenv("PRUNEKIT_IN_MEMORY_LIMIT")
    with pytest.raises(ConfigError, match="built-in"):
        load("fashion-mnist", stream=True)
    with pytest.raises(ConfigError, match="stream=False"):
        load(f"folder+stream:{folder}", stream=False)


def test_streamed_folder_reports_an_undecodable_file(tmp_path) -> None:
    root = write_image_folder(tmp_path / "imgs", {"train": 6, "test": 2})
    (root / "train" / "dark" / "5.png").write_bytes(b"not a png")
    train, _ = stream_image_folder(root, 8, stats_samples=2, num_workers=0)
    with pytest.raises(DataError, match="5.png"):
        list(iter_batches(train))


def test_cli_prunes_and_evaluates_a_streamed_folder(folder, tmp_path, capsys) -> None:
    ckpt = tmp_path / "m.pt"
    save(_model(2), ckpt, meta={"input_shape": [1, 16, 16], "data": f"folder+stream:{folder}"})
    out = tmp_path / "p.pt"
    code = cli.main(["prune", str(ckpt), "--method", "thinet", "--ratio", "0.5", "--out", str(out),
                     "--calib-images", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and out.is_file() and report["macs_fraction"] < 1.0
    code = cli.main(["eval", str(out), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["samples"] == 8


def _stripes(tmp_path, size_wh: tuple[int, int]):
    """A folder of RGB images ``size_wh`` (width, height) whose pixel columns encode x and rows
    encode y (red = 255 x / (w - 1), green = 255 y / (h - 1)), in two classes."""
    import numpy as np
    from PIL import Image

    w, h = size_wh
    xs = np.round(np.linspace(0, 255, w)).astype(np.uint8)
    ys = np.round(np.linspace(0, 255, h)).astype(np.uint8)
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0], a[..., 1] = xs[None, :], ys[:, None]
    for cls in ("a", "b"):
        d = tmp_path / "train" / cls
        d.mkdir(parents=True)
        for i in range(5):  # the fifth is the test image
            Image.fromarray(a).save(d / f"{i}.png")
    return tmp_path


def test_folder_images_keep_their_aspect_ratio_and_are_centre_cropped(tmp_path) -> None:
    """A 64x32 (w x h) image fitted to 16x16 is resized to 32x16 (not squashed to 16x16) and its
    centre cropped: the kept columns span the middle half of the x range, the rows all of y.
    The in-memory, streamed and unlabeled readers agree, also at a non-square (H, W)."""
    from prunekit.data.unlabeled import UnlabeledImages

    root = _stripes(tmp_path, (64, 32))
    train, _ = load(f"folder:{root}", image_size=16, stream=False)
    img = train.images[0].float()  # [3, 16, 16]
    red_row, green_col = img[0, 8], img[1, :, 8]
    assert 60 <= red_row[0] <= 72 and 183 <= red_row[-1] <= 195  # x from ~1/4 to ~3/4: cropped
    assert green_col[0] <= 12 and green_col[-1] >= 243  # y: all of it
    streamed, _ = load(f"folder+stream:{root}", image_size=16)
    assert torch.equal(streamed.raw(0), train.images[0])
    # a non-square target of the image's own aspect ratio: resized only, nothing cropped
    wide, _ = load(f"folder:{root}", image_size=(8, 16), stream=False)
    assert wide.image_size == (8, 16)
    row = wide.images[0, 0, 4].float()
    assert row[0] <= 12 and row[-1] >= 243
    flat = UnlabeledImages(root, image_size=(8, 16))
    assert flat[0].shape == (3, 8, 16) and flat.image_size == (8, 16)
    with pytest.raises(ConfigError, match="height, width"):
        load(f"folder:{root}", image_size=(8, 0))
    with pytest.raises(ConfigError, match="square"):
        load("fashion-mnist", image_size=(8, 16))


def test_cli_reads_a_folder_at_a_non_square_input_shape(tmp_path, capsys) -> None:
    """``--input-shape 3,24,40`` on a factory model reads the folder at 24x40 (aspect kept,
    centre crop) and evaluates it: the model flattens its 24x40 map into a Linear, so any other
    size fails."""
    root = _stripes(tmp_path / "data", (80, 40))
    factory = tmp_path / "net.py"
    factory.write_text("import torch.nn as nn\n\n"
                       "def make(num_classes=2):\n"
                       "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),\n"
                       "                         nn.ReLU(), nn.Flatten(),\n"
                       "                         nn.Linear(8 * 24 * 40, num_classes))\n")
    args = ["eval", "--model", f"{factory}:make", "--data", f"folder:{root}", "--num-classes", "2",
            "--json"]
    assert cli.main(args + ["--input-shape", "3,24,40"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["samples"] == 2 and 0 <= rep["test_acc"] <= 100
    assert cli.main(args + ["--input-shape", "3,24,24"]) == 2  # the model does not fit 24x24
