"""Bad inputs, end to end: every one gives a typed error from the library and, from the CLI,
exactly one ``prunekit: error: ...`` line on stderr, exit code 2, no traceback, nothing on
stdout, no new (partial) file, and an existing output file left byte-identical.

Complements ``tests/test_cli.py`` (train/eval/profile/export basics), ``tests/test_io.py``
(checkpoint files at the library level) and ``tests/test_data.py`` (dataset files at the
library level): here the ``prune`` command gets the full treatment, and the other commands the
cases those files do not cover (code-carrying files, truncated data through ``--data-dir``,
outputs under a regular file, diverging training, corrupt or malicious training states).
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run

import prunekit
from prunekit.data.dataset import ImageDataset
from prunekit.errors import CheckpointError, ConfigError, DataError, TrainingError
from prunekit.models import create

FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")




# --------------------------------------------------------------------------- helpers

def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 IDX file: magic 0x0000 08 ndim, big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def make_fashion(d: Path, n_train: int = 48, n_test: int = 16) -> Path:
    """A tiny Fashion-MNIST folder (uncompressed IDX files, random pixels)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(d / FMNIST_FILES[0], rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(d / FMNIST_FILES[1], np.arange(n_train) % 10)
    write_idx(d / FMNIST_FILES[2], rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(d / FMNIST_FILES[3], np.arange(n_test) % 10)
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative name -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}





class Payload:
    """Unpickling this would run ``touch MARKER``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path, payload: dict | None = None, writer: str = "torch") -> Path:
    obj = {"format": "prunekit", "version": 1, "state_dict": {}, "shapes": {},
           **(payload or {}), "evil": Payload(marker)}
    if writer == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return path


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    return make_fashion(tmp_path_factory.mktemp("fm"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A zoo checkpoint (simplecnn, width 0.25, 1x28x28) recording its dataset and input shape."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "base.pt"
    model = create("simplecnn", num_classes=10, in_channels=1, input_size=28, width=0.25)
    prunekit.save(model, path, meta={"data": "fashion-mnist", "input_shape": [1, 28, 28]})
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    """An output directory holding one precious existing output file."""
    (tmp_path / "out.pt").write_bytes(b"precious")
    return tmp_path


# --------------------------------------------------------------------------- prune: the CLI

def _bad_files(d: Path, ckpt: Path) -> dict[str, Path]:
    """Broken checkpoints of every kind, written into ``d`` (outside the output directory)."""
    data = ckpt.read_bytes()
    files = {
        "truncated": (d / "truncated.pt", data[: len(data) // 2]),
        "truncated-tail": (d / "tail.pt", data[:-10]),
        "empty": (d / "empty.pt", b""),
        "garbage": (d / "garbage.pt", os.urandom(256)),
        "text": (d / "text.pt", b"not a checkpoint at all\n"),
    }
    for path, content in files.values():
        path.write_bytes(content)
    out = {k: v[0] for k, v in files.items()}
    torch.save(create("simplecnn", num_classes=10, in_channels=1, input_size=28).state_dict(),
               d / "state_dict.pt")
    out["plain-state-dict"] = d / "state_dict.pt"
    torch.save({"format": "prunekit", "version": 1, "arch": {"name": "nosuchnet"}, "shapes": {},
                "state_dict": {}, "meta": {"data": "fashion-mnist", "input_shape": [1, 28, 28]}},
               d / "unknown_arch.pt")
    out["unknown-arch"] = d / "unknown_arch.pt"
    raw = torch.load(ckpt, weights_only=True)
    raw["shapes"]["features.0"]["out_channels"] = 3  # a conv narrowed with no matching weights
    torch.save(raw, d / "mismatch.pt")
    out["shapes-do-not-fit"] = d / "mismatch.pt"
    (d / "dir.pt").mkdir(exist_ok=True)
    out["a-directory"] = d / "dir.pt"
    out["missing"] = d / "missing.pt"
    return out


CKPT_CASES = {
    "missing": "not found", "a-directory": "not a file", "truncated": "cannot read checkpoint",
    "truncated-tail": "cannot read checkpoint", "empty": "cannot read checkpoint",
    "garbage": "cannot read checkpoint", "text": "cannot read checkpoint",
    "plain-state-dict": "not a prunekit checkpoint", "unknown-arch": "nosuchnet",
    "shapes-do-not-fit": "do not fit",
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_prune_bad_checkpoint(case, ckpt, fm, work, tmp_path_factory, capsys) -> None:
    bad = _bad_files(tmp_path_factory.mktemp("in"), ckpt)[case]
    before = snapshot(work)
    code, out, err = run(capsys, "prune", bad, "--method", "l1", "--ratio", "0.5", "--data-dir", fm,
                         "--out", work / "out.pt")
    assert_one_line_error(code, out, err, CKPT_CASES[case])
    assert snapshot(work) == before


BUDGET_CASES = {
    "ratio-0": (["--ratio", "0"], "ratio"), "ratio-1": (["--ratio", "1"], "ratio"),
    "ratio-negative": (["--ratio", "-0.2"], "ratio"), "ratio-above-1": (["--ratio", "1.5"], "ratio"),
    "ratio-nan": (["--ratio", "nan"], "ratio"), "ratio-inf": (["--ratio", "inf"], "ratio"),
    "ratio-not-a-number": (["--ratio", "half"], "--ratio"),
    "target-0": (["--target-macs", "0"], "target macs"),
    "target-1": (["--target-macs", "1"], "target macs"),
    "target-above-1": (["--target-macs", "2.5"], "target macs"),
    "target-negative": (["--target-macs", "-0.4"], "target macs"),
    "target-nan": (["--target-macs", "nan"], "target macs"),
    "both": (["--ratio", "0.5", "--target-macs", "0.5"], "exactly one"),
    "neither": ([], "exactly one"),
}


@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_prune_bad_budget(case, ckpt, fm, work, capsys) -> None:
    flags, match = BUDGET_CASES[case]
    before = snapshot(work)
    code, out, err = run(capsys, "prune", ckpt, "--method", "l1", *flags, "--data-dir", fm,
                         "--out", work / "out.pt")
    assert_one_line_error(code, out, err, match)
    assert snapshot(work) == before


def _option_cases(fm: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    """(extra prune arguments, expected text) for bad options, data and output paths."""
    regular = tmp / "a_file"
    regular.write_text("I am a file, not a directory")
    trunc = make_fashion(tmp / "fm_truncated")
    p = trunc / FMNIST_FILES[0]
    p.write_bytes(p.read_bytes()[:-100])
    wrong = make_fashion(tmp / "fm_wrong_size")
    write_idx(wrong / FMNIST_FILES[1], np.arange(47) % 10)  # 47 labels for 48 images
    partial = make_fashion(tmp / "fm_partial")
    (partial / FMNIST_FILES[3]).unlink()
    header_only = make_fashion(tmp / "fm_header_only")
    (header_only / FMNIST_FILES[2]).write_bytes(b"\x00\x00\x08")
    return {
        "unknown-method": (["--method", "l7", "--ratio", "0.5"], "unknown method"),
        "sparsity-word": (["--method", "slimming", "--ratio", "0.5", "--sparsity", "lots"], "--sparsity"),
        "sparsity-negative": (["--method", "slimming", "--ratio", "0.5", "--sparsity", "-1"], "--sparsity"),
        "unknown-dataset": (["--method", "l1", "--ratio", "0.5", "--data", "imagenet"], "unknown dataset"),
        "data-dir-missing": (["--method", "l1", "--ratio", "0.5", "--data-dir", tmp / "nowhere"],
                             "nowhere"),
        "data-dir-is-a-file": (["--method", "l1", "--ratio", "0.5", "--data-dir", regular], "a_file"),
        "idx-truncated": (["--method", "l1", "--ratio", "0.5", "--data-dir", trunc], "truncated"),
        "idx-wrong-count": (["--method", "l1", "--ratio", "0.5", "--data-dir", wrong],
                            "47 labels for 48 images"),
        "idx-file-missing": (["--method", "l1", "--ratio", "0.5", "--data-dir", partial], "lacks"),
        "idx-header-only": (["--method", "l1", "--ratio", "0.5", "--data-dir", header_only],
                            "too short"),
        "folder-missing": (["--method", "l1", "--ratio", "0.5", "--data", f"folder:{tmp / 'nope'}"],
                           "nope"),
        "train-samples-0": (["--method", "l1", "--ratio", "0.5", "--train-samples", "0"],
                            "--train-samples"),
        "train-samples-negative": (["--method", "l1", "--ratio", "0.5", "--train-samples", "-4"],
                                   "--train-samples"),
        "calib-images-0": (["--method", "apoz", "--ratio", "0.5", "--calib-images", "0"],
                           "--calib-images"),
        "finetune-epochs-negative": (["--method", "l1", "--ratio", "0.5", "--finetune-epochs", "-1"],
                                     "--finetune-epochs"),
        "bad-device": (["--method", "l1", "--ratio", "0.5", "--device", "tpu"], "device"),
        "out-under-a-file": (["--method", "l1", "--ratio", "0.5", "--out", regular / "out.pt"],
                             "does not exist"),
        "out-dir-missing": (["--method", "l1", "--ratio", "0.5", "--out", tmp / "no" / "out.pt"],
                            "does not exist"),
        "out-is-a-directory": (["--method", "l1", "--ratio", "0.5", "--out", tmp], "is a directory"),
        "csgd-bad-epsilon": (["--method", "csgd", "--ratio", "0.5", "--epsilon", "-1"], "epsilon"),
        "csgd-bad-clustering": (["--method", "csgd", "--ratio", "0.5", "--clustering", "psychic"],
                                "clustering"),
        "csgd-bad-survey-statistic": (["--method", "csgd", "--ratio", "0.5", "--survey-statistic",
                                       "median"], "survey_statistic"),
        "round-to-0": (["--method", "l1", "--ratio", "0.5", "--round-to", "0"], "--round-to"),
        "round-to-curl": (["--method", "curl", "--ratio", "0.5", "--round-to", "8"], "--round-to"),
    }


OPTION_CASES = ["unknown-method", "unknown-dataset", "data-dir-missing", "data-dir-is-a-file",
                "idx-truncated", "idx-wrong-count", "idx-file-missing", "idx-header-only",
                "folder-missing", "train-samples-0", "train-samples-negative", "calib-images-0",
                "finetune-epochs-negative", "bad-device", "out-under-a-file", "out-dir-missing",
                "out-is-a-directory", "csgd-bad-epsilon", "csgd-bad-clustering",
                "csgd-bad-survey-statistic", "sparsity-word",
                "sparsity-negative", "round-to-0", "round-to-curl"]


@pytest.mark.parametrize("case", OPTION_CASES)
def test_prune_bad_options_data_and_outputs(case, ckpt, fm, work, tmp_path_factory, capsys) -> None:
    side = tmp_path_factory.mktemp("side")
    flags, match = _option_cases(fm, side)[case]
    argv = ["prune", ckpt, *flags]
    if "--data-dir" not in flags and "--data" not in flags:
        argv += ["--data-dir", fm]
    if "--out" not in flags:
        argv += ["--out", work / "out.pt"]
    before, side_before = snapshot(work), snapshot(side)
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, match)
    assert snapshot(work) == before and snapshot(side) == side_before


def test_prune_out_in_unwritable_directory(ckpt, fm, tmp_path, capsys, monkeypatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # permission bits do not stop root: deny it the way they deny others
        real_access = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).resolve() == locked.resolve():
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    try:
        code, out, err = run(capsys, "prune", ckpt, "--method", "l1", "--ratio", "0.5", "--data-dir",
                             fm, "--out", locked / "out.pt")
        assert_one_line_error(code, out, err, "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_prune_checkpoint_without_dataset_or_shape(fm, work, capsys) -> None:
    bare = work.parent / f"{work.name}_bare.pt"
    prunekit.save(create("simplecnn", num_classes=10, in_channels=1, input_size=28, width=0.25), bare,
                  meta={"input_shape": [1, 28, 28]})
    before = snapshot(work)
    assert_one_line_error(*run(capsys, "prune", bare, "--method", "l1", "--ratio", "0.5", "--out",
                               work / "out.pt"), "--data")
    noshape = work.parent / f"{work.name}_noshape.pt"
    prunekit.save(create("simplecnn", num_classes=10, in_channels=1, input_size=28, width=0.25),
                  noshape, meta={"data": "fashion-mnist"})
    assert_one_line_error(*run(capsys, "prune", noshape, "--method", "l1", "--ratio", "0.5",
                               "--data-dir", fm, "--out", work / "out.pt"), "input shape")
    assert snapshot(work) == before


def test_prune_succeeds_and_replaces_the_output_atomically(ckpt, fm, work, capsys) -> None:
    """The control case: the same arguments, valid, do write the output (so the tests above
    fail for the reason they name)."""
    code, out, _ = run(capsys, "prune", ckpt, "--method", "l1", "--ratio", "0.5", "--data-dir", fm,
                       "--out", work / "out.pt", "--json")
    assert code == 0 and '"macs_after"' in out
    model, meta = prunekit.load(work / "out.pt")
    assert meta["method"] == "l1" and model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert sorted(p.name for p in work.iterdir()) == ["out.pt"]  # no temporary left behind


# --------------------------------------------------------------------------- code-carrying files

@pytest.mark.parametrize("command", ["prune", "eval", "profile", "export"])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_code_carrying_checkpoint_never_runs(command, writer, fm, work, capsys) -> None:
    marker = work.parent / f"{work.name}_MARKER"
    evil = write_evil(work.parent / f"{work.name}_evil.pt", marker,
                      {"meta": {"data": "fashion-mnist", "input_shape": [1, 28, 28]}}, writer)
    argv = {"prune": ["prune", evil, "--method", "l1", "--ratio", "0.5", "--data-dir", fm, "--out",
                      work / "out.pt"],
            "eval": ["eval", evil, "--data-dir", fm],
            "profile": ["profile", evil, "--input-shape", "1,28,28"],
            "export": ["export", evil, "--onnx", work / "out.pt"]}[command]
    before = snapshot(work)
    assert_one_line_error(*run(capsys, *argv), "refused for safety")
    assert not marker.exists()
    assert snapshot(work) == before


def test_code_carrying_checkpoint_in_a_fresh_process(fm, tmp_path) -> None:
    """The real entry point, in its own interpreter: the payload would `touch` the marker."""
    marker = tmp_path / "MARKER"
    evil = write_evil(tmp_path / "evil.pt", marker,
                      {"meta": {"data": "fashion-mnist", "input_shape": [1, 28, 28]}})
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", str(evil), "--method", "l1",
                           "--ratio", "0.5", "--data-dir", str(fm), "--out", str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_library_refuses_code_carrying_files(tmp_path) -> None:
    """prunekit.load and the training-state reader refuse the pickle without running it."""
    from prunekit.train.state import read_state

    marker = tmp_path / "MARKER"
    with pytest.raises(CheckpointError, match="refused for safety"):
        prunekit.load(write_evil(tmp_path / "evil.pt", marker))
    state = write_evil(tmp_path / "evil.state", marker, {"format": "prunekit.train_state"})
    with pytest.raises(CheckpointError, match="not a readable training state"):
        read_state(state)
    assert not marker.exists()


def test_train_resume_from_bad_state_files(fm, tmp_path, capsys) -> None:
    """--resume with a training state that is truncated, foreign, or carries code."""
    out = tmp_path / "m.pt"
    code, _, _ = run(capsys, "train", "--model", "resnet8", "--data", "fashion-mnist", "--data-dir", fm,
                     "--epochs", "1", "--batch-size", "16", "--max-steps-per-epoch", "1", "--out", out)
    assert code == 0
    state = Path(f"{out}.state")
    good = state.read_bytes()
    marker = tmp_path / "MARKER"
    variants = {"truncated": good[: len(good) // 3], "garbage": os.urandom(300)}
    for name, content in variants.items():
        state.write_bytes(content)
        before = snapshot(tmp_path)
        assert_one_line_error(*run(capsys, "train", "--model", "resnet8", "--data", "fashion-mnist",
                                   "--data-dir", fm, "--epochs", "2", "--out", out, "--resume"),
                              "cannot resume")
        assert snapshot(tmp_path) == before, name
    write_evil(state, marker, {"format": "prunekit.train_state"})
    before = snapshot(tmp_path)
    assert_one_line_error(*run(capsys, "train", "--model", "resnet8", "--data", "fashion-mnist",
                               "--data-dir", fm, "--epochs", "2", "--out", out, "--resume"),
                          "cannot resume")
    assert not marker.exists() and snapshot(tmp_path) == before
    torch.save({"format": "something.else"}, state)
    assert_one_line_error(*run(capsys, "train", "--model", "resnet8", "--data", "fashion-mnist",
                               "--data-dir", fm, "--epochs", "2", "--out", out, "--resume"),
                          "not a prunekit training state")


# --------------------------------------------------------------------------- other commands

def test_other_commands_bad_data_and_outputs(ckpt, fm, tmp_path, capsys) -> None:
    regular = tmp_path / "a_file"
    regular.write_text("x")
    trunc = make_fashion(tmp_path / "fm_trunc")
    p = trunc / FMNIST_FILES[2]
    p.write_bytes(p.read_bytes()[:40])
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"precious")
    cases = [
        (["train", "--model", "resnet8", "--data", "fashion-mnist", "--data-dir", trunc, "--out",
          existing], "t10k-images"),
        (["train", "--model", "resnet8", "--data", "fashion-mnist", "--data-dir", fm,
          "--train-samples", "-3", "--out", existing], "--train-samples"),
        (["train", "--model", "resnet8", "--data", "fashion-mnist", "--data-dir", fm, "--out",
          regular / "m.pt"], "does not exist"),
        (["eval", ckpt, "--data-dir", trunc], "t10k-images"),
        (["export", ckpt, "--onnx", regular / "m.onnx"], "does not exist"),
        (["compare", ckpt, "--methods", "l1", "--ratio", "0.5", "--data-dir", fm, "--report",
          regular], "not a directory"),
        (["compare", ckpt, "--methods", "l1,nosuch", "--ratio", "0.5", "--data-dir", fm, "--report",
          tmp_path / "rep"], "nosuch"),
        (["compare", ckpt, "--methods", "l1", "--ratio", "1.0", "--data-dir", fm, "--report",
          tmp_path / "rep"], "ratio"),
    ]
    for argv, match in cases:
        before = snapshot(tmp_path)
        assert_one_line_error(*run(capsys, *argv), match)
        assert snapshot(tmp_path) == before, argv


# --------------------------------------------------------------------------- NaN / Inf

def test_diverging_training_stops_and_keeps_the_last_good_files(fm, tmp_path, capsys) -> None:
    """A run that diverges (huge learning rate) stops with one clear line; the checkpoint and
    training state of the previous good run stay byte-identical, nothing else is written."""
    out = tmp_path / "m.pt"
    base = ["train", "--model", "resnet8", "--data", "fashion-mnist", "--data-dir", fm, "--epochs",
            "1", "--batch-size", "16", "--max-steps-per-epoch", "2", "--out", out]
    assert run(capsys, *base)[0] == 0
    before = snapshot(tmp_path)
    assert set(before) == {"m.pt", "m.pt.state"}
    line = assert_one_line_error(*run(capsys, *base, "--lr", "1e30"), "non-finite")
    assert "last good checkpoint kept at" in line and "m.pt.state" in line
    assert snapshot(tmp_path) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    line = assert_one_line_error(*run(capsys, *base[:-1], fresh / "m.pt", "--lr", "1e30"), "non-finite")
    assert "no good checkpoint was written" in line and list(fresh.iterdir()) == []


def test_non_finite_weights_are_refused(ckpt, fm, work, capsys) -> None:
    """A checkpoint with an Inf (here where pruning cannot remove it: the classifier's bias) is
    refused before any work, with one line naming the tensor, and nothing is written."""
    model, meta = prunekit.load(ckpt)
    with torch.no_grad():
        model.classifier.bias[0] = math.inf
    bad = work.parent / f"{work.name}_inf.pt"
    prunekit.save(model, bad, meta=meta)
    before = snapshot(work)
    assert_one_line_error(*run(capsys, "prune", bad, "--method", "l1", "--ratio", "0.5", "--data-dir",
                               fm, "--finetune-epochs", "1", "--out", work / "out.pt"),
                          "classifier.bias holds NaN or Inf")
    assert snapshot(work) == before


def test_library_fit_stops_on_non_finite_weights(tmp_path) -> None:
    from prunekit.train import TrainConfig, fit

    torch.manual_seed(0)
    model = create("simplecnn", num_classes=4, in_channels=1, input_size=8, width=0.25)
    with torch.no_grad():
        model.classifier.weight.fill_(math.nan)
    data = ImageDataset(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 4,
                        mean=(0.5,), std=(0.25,), num_classes=4, name="tiny")
    state = tmp_path / "s.state"
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1 step 1; no good checkpoint"):
        fit(model, data, TrainConfig(epochs=2, batch_size=8, device="cpu"), checkpoint_path=state)
    assert not state.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- library: typed errors

@pytest.mark.parametrize("kw", [{"ratio": -0.1}, {"ratio": math.nan}, {"ratio": math.inf},
                                {"ratio": "0.5x"}, {"ratio": None, "target_macs": 0.0},
                                {"ratio": None, "target_macs": 1.0}, {"ratio": None, "target_macs": -2},
                                {"ratio": None, "target_macs": math.nan}])
def test_library_bad_budgets(kw) -> None:
    model = create("simplecnn", num_classes=10, in_channels=1, input_size=8, width=0.25)
    args = {"ratio": kw.get("ratio"), "target_macs": kw.get("target_macs")}
    with pytest.raises(ConfigError):
        prunekit.prune(model, torch.randn(1, 1, 8, 8), method="l1", **args)


@pytest.mark.parametrize("method", ["apoz", "taylor", "mean-l2"])
def test_library_empty_calibration_set(method) -> None:
    model = create("simplecnn", num_classes=10, in_channels=1, input_size=8, width=0.25)
    x = torch.randn(1, 1, 8, 8)
    empty = ImageDataset(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                         mean=(0.5,), std=(0.25,), num_classes=10, name="empty")
    with pytest.raises(DataError):
        prunekit.prune(model, x, method=method, ratio=0.5, data=empty)
    one = ImageDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                       mean=(0.5,), std=(0.25,), num_classes=10, name="two")
    with pytest.raises((DataError, ConfigError)):
        prunekit.prune(model, x, method=method, ratio=0.5, data=one, calib_images=0)


def test_library_save_under_a_regular_file(tmp_path) -> None:
    regular = tmp_path / "f"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="does not exist"):
        prunekit.save(create("resnet8"), regular / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
