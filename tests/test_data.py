"""Tests of prunekit.data: Fashion-MNIST IDX files, CIFAR pickles (restricted), image folders."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FASHION_MNIST_DIR, top1

from prunekit.data import DATASETS, ImageDataset, load, random_crop_flip
from prunekit.data.fashion_mnist import DEFAULT_ROOT, read_idx
from prunekit.data.safe_pickle import load_pickle
from prunekit.errors import ConfigError, DataError
from prunekit.models import create

FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- helpers

def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write a uint8 IDX file (magic 0x0000 08 ndim, big-endian dims, raw bytes)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw, compresslevel=1)
    path.write_bytes(raw)
    return path


def make_fashion(d: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, a in arrays.items():
        write_idx(d / name, a, gz=gz)
    return arrays


def _batch(n: int, rng: np.random.Generator, label_key: bytes, num_classes: int) -> dict:
    return {b"batch_label": b"fake", label_key: [int(v) for v in rng.integers(0, num_classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img%d.png" % i for i in range(n)]}


def _dump(obj: object, path: Path, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(d: Path, protocol: int = pickle.DEFAULT_PROTOCOL, n: int = 3) -> dict[str, dict]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": _batch(n, rng, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _batch(n + 1, rng, b"labels", 10)
    for name, b in batches.items():
        _dump(b, d / name, protocol)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"label_names": names, b"num_cases_per_batch": n}, d / "batches.meta", protocol)
    return batches


def make_cifar100(d: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict[str, dict]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    batches = {}
    for name, n in (("train", 7), ("test", 5)):
        b = _batch(n, rng, b"fine_labels", 100)
        b[b"coarse_labels"] = [v // 5 for v in b[b"fine_labels"]]
        batches[name] = b
        _dump(b, d / name, protocol)
    _dump({b"fine_label_names": [b"c%d" % i for i in range(100)],
           b"coarse_label_names": [b"s%d" % i for i in range(20)]}, d / "meta", protocol)
    return batches


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No PRUNEKIT_DATA, and a HOME without ~/.cache/prunekit."""
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# --------------------------------------------------------------------------- real Fashion-MNIST

@pytest.fixture(scope="module")
def fmnist(fashion_mnist_root) -> tuple[ImageDataset, ImageDataset]:
    """The real files (the fixture fails, never skips, when they are missing)."""
    return load("fashion-mnist", root=fashion_mnist_root)


def test_real_fashion_mnist(fmnist):
    assert DEFAULT_ROOT == FASHION_MNIST_DIR  # the place `make data` installs to
    train, test = fmnist
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and test.images.dtype == torch.uint8
    assert train.targets.dtype == torch.int64
    assert int(train.targets.min()) == 0 and int(train.targets.max()) == 9
    assert int(test.targets.min()) == 0 and int(test.targets.max()) == 9
    assert train.targets.bincount().tolist() == [6000] * 10
    assert int(train.targets[0]) == 9 and int(test.targets[0]) == 9
    assert train.classes[9] == "Ankle boot" and train.num_classes == 10 and train.in_channels == 1


def test_real_fashion_mnist_normalisation(fmnist):
    train, _ = fmnist
    x, y = train.batch(torch.arange(20000))
    assert x.dtype == torch.float32 and x.shape == (20000, 1, 28, 28) and y.shape == (20000,)
    assert abs(float(x.mean())) < 0.02
    assert abs(float(x.std()) - 1.0) < 0.03
    # the raw pixels, normalised by hand with the dataset's constants
    raw = train.images[:1000].double() / 255
    assert torch.allclose(x[:1000].double(), (raw - train.mean[0]) / train.std[0], atol=1e-5)


def test_real_fashion_mnist_train_samples(fmnist, fashion_mnist_root):
    full, _ = fmnist
    train, test = load("fashion-mnist", root=fashion_mnist_root, train_samples=5000)
    assert len(train) == 5000 and len(test) == 10000
    assert torch.equal(train.images, full.images[:5000])    # the first 5000, as documented
    assert torch.equal(train.targets, full.targets[:5000])


# --------------------------------------------------------------------------- synthetic data

def test_synthetic_gratings_are_learnable(trained_resnet8, grating_data):
    """The stand-in for real images in the quality tests is a task a small CNN really learns:
    >= 90 % on held-out images (chance is 10 %), so those tests are not vacuous."""
    train, test = grating_data
    assert train.targets.bincount().tolist() == [len(train) // 10 + (k < len(train) % 10)
                                                 for k in range(10)]
    assert not torch.equal(train.images[:100], test.images[:100])
    assert top1(trained_resnet8, test) >= 90.0
    untrained = create("resnet8", num_classes=10, in_channels=1).eval()
    assert top1(untrained, test) < 40.0


# --------------------------------------------------------------------------- Fashion-MNIST format

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_format_roundtrip(tmp_path, gz):
    arrays = make_fashion(tmp_path / "fm", gz=gz)
    train, test = load("fashion-mnist", root=tmp_path / "fm")
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (6, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert train.targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.targets.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert train.mean == pytest.approx((0.2860,)) and train.std == pytest.approx((0.3530,))


def test_prunekit_data_env_var(tmp_path, monkeypatch):
    make_fashion(tmp_path / "store" / "fashion-mnist", n_train=7)
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "store"))
    assert len(load("fashion-mnist")[0]) == 7
    # $PRUNEKIT_DATA may also point straight at the files.
    make_fashion(tmp_path / "direct", n_train=5, gz=False)
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "direct"))
    assert len(load("fashion-mnist")[0]) == 5


def test_image_size_and_train_samples(tmp_path):
    make_fashion(tmp_path)
    train, test = load("fashion-mnist", root=tmp_path, train_samples=4, image_size=32)
    assert train.images.shape == (4, 1, 32, 32) and test.images.shape == (6, 1, 32, 32)
    assert train.images.dtype == torch.uint8


def test_idx_truncated(tmp_path):
    make_fashion(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load("fashion-mnist", root=tmp_path)


def test_idx_truncated_gzip(tmp_path):
    make_fashion(tmp_path, gz=True)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load("fashion-mnist", root=tmp_path)


def test_idx_wrong_magic_and_size(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(5))
    with pytest.raises(DataError, match=r"labels: magic number 2049, expected 2051"):
        read_idx(tmp_path / "labels", 2051)
    make_fashion(tmp_path / "fm", gz=False)
    write_idx(tmp_path / "fm" / "t10k-images-idx3-ubyte", np.zeros((6, 27, 27)))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*28x28"):
        load("fashion-mnist", root=tmp_path / "fm")
    write_idx(tmp_path / "fm" / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)))
    with pytest.raises(DataError, match="6 labels for 5 images"):
        load("fashion-mnist", root=tmp_path / "fm")


def test_missing_fashion_names_searched_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load("fashion-mnist", root=missing)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(missing / "fashion-mnist") in msg and str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_partial_folder_says_what_is_missing(tmp_path):
    make_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=f"{tmp_path} lacks t10k-labels-idx1-ubyte"):
        load("fashion-mnist", root=tmp_path)


def test_missing_cifar_names_env_and_default(tmp_path, monkeypatch, no_data_env):
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "store"))
    with pytest.raises(DataError) as info:
        load("cifar10")
    msg = str(info.value)
    assert "\n" not in msg
    for p in (tmp_path / "store" / "cifar-10-batches-py", tmp_path / "store",
              tmp_path / "home" / ".cache" / "prunekit" / "cifar-10-batches-py"):
        assert str(p) in msg
    assert "cifar-10-batches-py" in msg and "--data-dir" in msg


# --------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar10_format(tmp_path, protocol):
    batches = make_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train, test = load("cifar10", root=tmp_path)  # the parent of cifar-10-batches-py
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    expect = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert torch.equal(train.images, torch.from_numpy(expect.reshape(-1, 3, 32, 32)))
    # channel planes: the first 1024 bytes of a row are the red plane, row-major
    assert int(train.images[0, 0, 0, 1]) == int(batches["data_batch_1"][b"data"][0, 1])
    assert int(train.images[0, 2, 31, 31]) == int(batches["data_batch_1"][b"data"][0, 3071])
    assert train.targets.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert test.targets.tolist() == batches["test_batch"][b"labels"]
    assert train.classes[1] == "car"
    assert train.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar10_default_cache_location(tmp_path, no_data_env):
    make_cifar10(tmp_path / "home" / ".cache" / "prunekit" / "cifar-10-batches-py")
    train, _ = load("CIFAR-10", train_samples=2)
    assert len(train) == 2


def test_cifar100_format(tmp_path, monkeypatch, no_data_env):
    batches = make_cifar100(tmp_path / "cifar-100-python", protocol=2)
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    train, test = load("cifar100")
    assert train.images.shape == (7, 3, 32, 32) and test.images.shape == (5, 3, 32, 32)
    assert torch.equal(test.images, torch.from_numpy(batches["test"][b"data"].reshape(-1, 3, 32, 32)))
    assert train.targets.tolist() == batches["train"][b"fine_labels"]
    assert train.num_classes == 100 and train.classes[99] == "c99"


def test_cifar_bad_batch(tmp_path):
    make_cifar10(tmp_path)
    _dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, tmp_path / "data_batch_3", 4)
    with pytest.raises(DataError, match="data_batch_3.*uint8"):
        load("cifar10", root=tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load("cifar10", root=tmp_path)


class _Payload:
    """Pickles as a call of ``func(arg)``: what a malicious "dataset" file would do."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_restricted_unpickler_refuses_code(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Payload(os.system, f"touch {marker}")
    else:
        payload = _Payload(exec, f"open({str(marker)!r}, 'w').close()")
    d = tmp_path / "cifar-10-batches-py"
    make_cifar10(d)
    _dump({b"data": payload, b"labels": [0]}, d / "data_batch_2", pickle.DEFAULT_PROTOCOL)
    with pytest.raises(DataError, match=r"refusing to unpickle \S+ from .*data_batch_2"):
        load("cifar10", root=d)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_pickle(d / "data_batch_2")
    assert not marker.exists()


def test_restricted_unpickler_numpy_names(tmp_path):
    """NumPy 1 pickles (``numpy.core.multiarray``) load; other NumPy callables are refused."""
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    blob = pickle.dumps({b"data": arr, b"n": np.int64(7), b"s": {1, 2}}, protocol=2)
    # as Python 2 / NumPy 1 wrote them: old module path, dtype byte order as a byte string
    old = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    old = old.replace(b"X\x01\x00\x00\x00|", b"U\x01|")
    assert b"numpy.core.multiarray" in old and b"U\x01|" in old
    (tmp_path / "old.pkl").write_bytes(old)
    got = load_pickle(tmp_path / "old.pkl")
    assert np.array_equal(got[b"data"], arr) and got[b"n"] == 7 and got[b"s"] == {1, 2}
    (tmp_path / "np.pkl").write_bytes(b"cnumpy\nload\n(S'/etc/passwd'\ntR.")
    with pytest.raises(DataError, match="refusing to unpickle numpy.load from"):
        load_pickle(tmp_path / "np.pkl")


def test_payload_is_real(tmp_path):
    """The crafted pickle does run code under the ordinary unpickler (so the test above means something)."""
    marker = tmp_path / "ran"
    blob = pickle.dumps({b"data": _Payload(exec, f"open({str(marker)!r}, 'w').close()")})
    pickle.loads(blob)
    assert marker.exists()


# --------------------------------------------------------------------------- image folders

def _png(path: Path, color, mode: str = "RGB", size=(20, 12)) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_with_split(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", color)
    train, test = load(f"folder:{tmp_path}", image_size=16)
    assert train.images.shape == (6, 3, 16, 16) and test.images.shape == (4, 3, 16, 16)
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1] and test.targets.tolist() == [0, 0, 1, 1]
    assert train.images[0, :, 5, 5].tolist() == [255, 0, 0]
    assert train.images[3, :, 5, 5].tolist() == [0, 0, 255]
    assert train.mean == pytest.approx([0.5, 0.0, 0.5], abs=1e-6)
    assert train.std == pytest.approx([0.5, 1.0, 0.5], abs=1e-6)  # constant green -> std 1


def test_folder_grayscale_without_split(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _png(tmp_path / cls / f"{i:02d}.png", 10 * i, mode="L")
    train, test = load(f"folder:{tmp_path}")
    assert train.images.shape == (16, 1, 32, 32) and test.images.shape == (4, 1, 32, 32)
    # every fifth image of each class (04.png and 09.png) is held out
    assert sorted(test.images[:, 0, 0, 0].tolist()) == [40, 40, 90, 90]
    assert 40 not in train.images[:, 0, 0, 0].tolist()


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load(f"folder:{tmp_path / 'empty'}")
    for i in range(5):
        _png(tmp_path / "bad" / "x" / f"{i}.png", (1, 2, 3))
    (tmp_path / "bad" / "x" / "5.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"5\.png"):
        load(f"folder:{tmp_path / 'bad'}")


# --------------------------------------------------------------------------- API

def test_bad_names_and_options(tmp_path):
    with pytest.raises(ConfigError, match="fashion-mnist, cifar10, cifar100, folder:PATH, images:PATH"):
        load("imagenet")
    with pytest.raises(ConfigError, match="must be positive"):
        load("fashion-mnist", train_samples=0)
    with pytest.raises(ConfigError, match="must be positive"):
        load("cifar10", train_samples=-3)
    assert DATASETS == ["fashion-mnist", "cifar10", "cifar100", "folder:PATH", "images:PATH"]


def _shift_of(src: torch.Tensor, out: torch.Tensor, padding: int) -> set[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) with ``out == crop(pad(src), dy, dx)``, flipped or not."""
    h, w = src.shape[-2:]
    padded = torch.nn.functional.pad(src, (padding,) * 4)
    found = set()
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if torch.equal(out, crop.flip(-1) if flipped else crop):
                    found.add((dy, dx, flipped))
    return found


def test_random_crop_flip_is_a_padded_shift_possibly_flipped():
    """Each output image is its own input, zero-padded by ``padding``, cropped back to size at
    one offset and possibly mirrored left-right; offsets and flips vary across the batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 12, 10, generator=g) + 3.0   # no zeros inside: padding is visible
    out = random_crop_flip(x, padding=3, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.stride() == x.contiguous().stride()      # plain NCHW
    seen = []
    for src, dst in zip(x, out, strict=True):
        found = _shift_of(src, dst, 3)
        assert len(found) == 1, found                    # exactly one shift (and flip) explains it
        seen.append(found.pop())
    assert len({(dy, dx) for dy, dx, _ in seen}) > 20    # many of the 49 offsets
    assert {dy for dy, _, _ in seen} == set(range(7)) and {dx for _, dx, _ in seen} == set(range(7))
    assert 16 < sum(f for _, _, f in seen) < 48          # about half flipped
    # seeded: the same generator state gives the same batch
    assert torch.equal(out, random_crop_flip(x, padding=3, generator=torch.Generator().manual_seed(1)))
    # no padding, no flip: unchanged; flip only: each image either unchanged or mirrored
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    only_flip = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(2))
    flipped = [not torch.equal(a, b) for a, b in zip(only_flip, x, strict=True)]
    assert all(torch.equal(a, b.flip(-1)) for a, b, f in zip(only_flip, x, flipped, strict=True) if f)
    assert 16 < sum(flipped) < 48
    # padding only: shifted, never mirrored
    shifted = random_crop_flip(x, padding=2, flip=False, generator=torch.Generator().manual_seed(3))
    found = [_shift_of(a, b, 2) for a, b in zip(x, shifted, strict=True)]
    assert all(len(f) == 1 and not next(iter(f))[2] for f in found)
