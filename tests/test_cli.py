"""The ``prunekit`` command: JSON output, one-line errors with exit code 2, real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run, write_image_folder
from test_resume import Crash, chain_epoch_hook, edit_state

from prunekit import cli
from prunekit.io import load


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> str:
    """A tiny grayscale image folder: 2 classes, 8 training and 2 test images each."""
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), {"train": 8, "test": 2})
    return f"folder:{root}"


@pytest.fixture(scope="module")
def checkpoint(folder_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "base.pt"
    code = cli.main(["train", "--model", "resnet8", "--data", folder_data, "--epochs", "1",
                     "--batch-size", "8", "--out", str(out), "--json"])
    assert code == 0 and out.is_file()
    return out


def test_train_json_and_checkpoint(folder_data, tmp_path, capsys) -> None:
    out = tmp_path / "m.pt"
    code, stdout, _ = run(capsys, "train", "--model", "resnet8", "--data", folder_data, "--epochs",
                          "1", "--batch-size", "8", "--seed", "3", "--out", out, "--json")
    assert code == 0
    result = json.loads(stdout)  # exactly one JSON object
    assert stdout.count("\n") == 1
    assert result["out"] == str(out) and result["epochs"] == 1 and result["input_shape"] == [1, 32, 32]
    assert Path(result["state"]).is_file()
    model, meta = load(out)
    assert meta["data"] == folder_data and meta["seed"] == 3 and meta["train_samples"] == 16
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_train_resume(folder_data, tmp_path, monkeypatch, capsys) -> None:
    """``train --resume`` continues from ``<out>.state``, not from a seeded restart.

    A run of 2 epochs is interrupted after epoch 1 (an exception in an epoch hook, in process),
    its state file's ``conv1.weight`` is scaled by 1.5 and its history record marked; the resumed
    run trains epoch 2 only, keeps the marked record, and writes the weights of an uninterrupted
    run that got the same change in memory after epoch 1 (which differ from the plain run's)."""

    def argv(out: Path, *extra: str) -> list:
        return ["train", "--model", "resnet8", "--data", folder_data, "--epochs", "2",
                "--batch-size", "8", "--seed", "3", "--out", out, "--json", *extra]

    def scale_after_epoch_1(epoch, model, _record):
        if epoch == 1:
            with torch.no_grad():
                model.conv1.weight.mul_(1.5)

    def crash_in_epoch_2(epoch, _model, _record):
        if epoch == 2:
            raise Crash

    plain, expected, out = tmp_path / "plain.pt", tmp_path / "expected.pt", tmp_path / "m.pt"
    assert run(capsys, *argv(plain))[0] == 0
    with monkeypatch.context() as m:
        chain_epoch_hook(m, scale_after_epoch_1)
        assert run(capsys, *argv(expected))[0] == 0
    with monkeypatch.context() as m:
        chain_epoch_hook(m, crash_in_epoch_2)
        code, _, err = run(capsys, *argv(out))
    assert code == 1 and "Crash" in err and not out.exists()
    state_path = Path(f"{out}.state")

    def perturb(state):
        assert state["epoch"] == 1
        state["model"]["conv1.weight"].mul_(1.5)
        state["history"][0]["from_file"] = True

    edit_state(state_path, perturb)
    trained: list[int] = []
    with monkeypatch.context() as m:
        chain_epoch_hook(m, lambda epoch, _m, _r: trained.append(epoch))
        code, stdout, _ = run(capsys, *argv(out, "--resume"))
    assert code == 0 and json.loads(stdout)["epochs"] == 2
    assert trained == [2]
    history = torch.load(state_path, weights_only=True)["history"]
    assert [(r["epoch"], r.get("from_file", False)) for r in history] == [(1, True), (2, False)]
    got, want, base = (load(p)[0].state_dict() for p in (out, expected, plain))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], base[k]) for k in base)
    assert load(out)[1]["test_acc"] == load(expected)[1]["test_acc"]


def test_eval(checkpoint, capsys) -> None:
    code, stdout, _ = run(capsys, "eval", checkpoint, "--json")  # dataset taken from the meta
    assert code == 0
    result = json.loads(stdout)
    assert 0 <= result["test_acc"] <= 100 and result["samples"] == 4
    code, stdout, _ = run(capsys, "eval", checkpoint)
    assert code == 0 and "test accuracy" in stdout


def test_profile(checkpoint, capsys) -> None:
    code, stdout, _ = run(capsys, "profile", checkpoint, "--batch-sizes", "1,2", "--max-seconds",
                          "0.02", "--threads", "1", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["macs"] > 0 and report["file_size_bytes"] == checkpoint.stat().st_size
    assert set(report["latency"]) == {"b1", "b2"}
    assert report["latency"]["b2"]["best"] in ("nchw", "channels_last", "deploy")
    code, stdout, _ = run(capsys, "profile", checkpoint, "--batch-sizes", "1", "--max-seconds",
                          "0.02", "--threads", "1", "--input-shape", "1,20,20")
    assert code == 0 and "MACs" in stdout and "batch 1" in stdout


def test_export(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "m.onnx"
    code, stdout, _ = run(capsys, "export", checkpoint, "--onnx", out, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert out.is_file() and info["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("make_args", [
    lambda d, ck, tmp: ["eval", tmp / "missing.pt", "--data", d, "--json"],
    lambda d, ck, tmp: ["profile", tmp / "missing.pt"],
    lambda d, ck, tmp: ["train", "--model", "resnet8", "--data", d, "--train-samples", "0",
                        "--out", tmp / "out.pt", "--json"],
    lambda d, ck, tmp: ["train", "--model", "resnet8", "--data", d, "--out",
                        tmp / "no" / "such" / "dir" / "out.pt", "--json"],
    lambda d, ck, tmp: ["train", "--model", "nosuchnet", "--data", d, "--out", tmp / "out.pt"],
    lambda d, ck, tmp: ["train", "--model", "resnet8", "--data", "nosuchdata", "--out",
                        tmp / "out.pt", "--json"],
    lambda d, ck, tmp: ["train", "--model", "resnet8", "--data", d, "--out", tmp / "out.pt",
                        "--device", "tpu9"],
    lambda d, ck, tmp: ["train", "--model", "resnet8", "--data", d, "--out", tmp / "out.pt",
                        "--resume"],
    lambda d, ck, tmp: ["train", "--model", "resnet8", "--data", d, "--out", tmp / "out.pt",
                        "--epochs", "many"],
    lambda d, ck, tmp: ["train", "--model", "resnet8", "--data", d],
    lambda d, ck, tmp: ["profile", ck, "--batch-sizes", "1,x"],
    lambda d, ck, tmp: ["export", ck, "--onnx", tmp / "no" / "dir" / "m.onnx", "--json"],
    lambda d, ck, tmp: ["eval", ck, "--data", "folder:/no/such/folder"],
    lambda d, ck, tmp: ["frobnicate"],
    lambda d, ck, tmp: ["eval", ck, "--bogus-option"],
], ids=["eval-missing-ckpt", "profile-missing-ckpt", "train-samples-0", "unwritable-out",
        "unknown-model", "unknown-dataset", "bad-device", "resume-without-state", "epochs-not-int",
        "missing-option", "bad-batch-sizes", "export-bad-dir", "missing-folder", "unknown-command",
        "unknown-option"])
def test_bad_input_one_line_exit_2(make_args, folder_data, checkpoint, tmp_path, capsys) -> None:
    code, out, err = run(capsys, *make_args(folder_data, checkpoint, tmp_path))
    assert_one_line_error(code, out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no (partial) output file


def test_corrupt_checkpoint_and_existing_output_untouched(folder_data, checkpoint, tmp_path,
                                                           capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    assert_one_line_error(*run(capsys, "profile", bad, "--json"))
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    assert_one_line_error(*run(capsys, "train", "--model", "resnet8", "--data", "nosuchdata",
                               "--out", out))
    assert out.read_bytes() == b"precious"
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"precious")
    assert_one_line_error(*run(capsys, "export", bad, "--onnx", onnx))
    assert onnx.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "m.onnx", "out.pt"]


def test_profile_needs_input_shape(tmp_path, capsys) -> None:
    from prunekit.io import save
    from prunekit.models import create

    path = tmp_path / "nometa.pt"
    save(create("resnet8", num_classes=10, in_channels=3), path)
    code, out, err = run(capsys, "profile", path, "--json")
    assert_one_line_error(code, out, err)
    assert "--input-shape" in err


def test_unexpected_error(monkeypatch, checkpoint, capsys) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr("prunekit.measure.profile", boom)
    code, out, err = run(capsys, "profile", checkpoint, "--json")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        "prunekit: error: unexpected RuntimeError: kaboom second line "
        "(set PRUNEKIT_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("PRUNEKIT_DEBUG", "1")
    code, _, err = run(capsys, "profile", checkpoint, "--json")
    assert code == 1 and "Traceback" in err


def test_help_and_no_args(capsys) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "train" in out and "profile" in out
    assert cli.main([]) == 0


def test_real_entry_point_json(checkpoint) -> None:
    """A separate process (warnings enabled): stdout holds exactly the JSON object."""
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli", "profile", str(checkpoint),
                           "--batch-sizes", "1", "--max-seconds", "0.02", "--threads", "1", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["macs"] > 0 and set(report["latency"]) == {"b1"}


@pytest.mark.slow
def test_train_fashion_mnist_quick(fashion_mnist_root, tmp_path, capsys) -> None:
    out = tmp_path / "fm.pt"
    code, stdout, _ = run(capsys, "train", "--model", "resnet8", "--data", "fashion-mnist",
                          "--data-dir", fashion_mnist_root,
                          "--train-samples", "500", "--epochs", "1", "--batch-size", "100",
                          "--out", out, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["train_samples"] == 500 and result["input_shape"] == [1, 28, 28]
    model, meta = load(out)
    assert meta["data"] == "fashion-mnist" and meta["test_acc"] == result["test_acc"]
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_parse_sparsity_accepts_words_and_numbers() -> None:
    from prunekit.cli import parse_sparsity
    from prunekit.errors import ConfigError

    assert parse_sparsity("liu") == "liu" and parse_sparsity("auto") == "auto"
    assert parse_sparsity("1e-4") == pytest.approx(1e-4) and parse_sparsity(None) is None
    for bad in ("nan", "-0.1", "lots"):
        with pytest.raises(ConfigError, match="--sparsity"):
            parse_sparsity(bad)
