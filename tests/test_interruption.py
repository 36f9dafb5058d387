"""Interruption and repeatability.

* ``prunekit train`` killed with SIGKILL right after its first training-state file appears,
  its state file then changed (``conv1.weight`` x1.5, history records marked), and resumed with
  ``--resume``: it trains exactly the remaining epochs and ends with the weights of an
  uninterrupted run that got the same change in memory at that epoch boundary. A seeded
  restart would end with the unchanged run's weights, so this tells the two apart (CPU, one
  thread, tiny data: a few seconds per run).
* The same for the centripetal phase of ``prunekit prune --method csgd``.
* The same seed gives the same plan and the same weights, for every method tried, whatever the
  global RNG state is in between.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume import chain_epoch_hook, edit_state

import prunekit
from prunekit import cli
from prunekit.data.dataset import ImageDataset
from prunekit.methods import available
from prunekit.models import create


def _write_idx(path: Path, array: np.ndarray) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    """A Fashion-MNIST folder of 320 training and 32 test images whose classes are learnable
    (class-dependent brightness), so training moves the weights."""
    d = tmp_path_factory.mktemp("fm")
    rng = np.random.default_rng(0)
    for split, n in (("train", 320), ("t10k", 32)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 100, (n, 28, 28)) + 15 * labels[:, None, None]
        _write_idx(d / f"{split}-images-idx3-ubyte", images)
        _write_idx(d / f"{split}-labels-idx1-ubyte", labels)
    return d


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PRUNEKIT_PROGRESS": "0"}


# The real entry point, in a fresh interpreter. `prunekit train --seed N` seeds the initial
# weights itself (test_cli_train_twice_same_seed), so a subprocess run and an in-process run of
# the same command start from the same weights; the global seed here only pins anything else.
LAUNCH = [sys.executable, "-c",
          "import sys, torch; torch.manual_seed(0); from prunekit.cli import main; sys.exit(main())"]


def _train_argv(fm: Path, out: Path, *extra: str) -> list[str]:
    return [*LAUNCH, "train", "--model", "resnet8", "--data",
            "fashion-mnist", "--data-dir", str(fm), "--train-samples", "256", "--epochs", "3",
            "--batch-size", "32", "--max-steps-per-epoch", "4", "--seed", "7", "--device", "cpu",
            "--out", str(out), *extra]


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300.0) -> bool:
    """SIGKILL ``proc`` as soon as ``path`` exists; False if it finished first."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def _bar_epochs(stderr: str, total: int) -> list[int]:
    """The epochs whose progress bar (``epoch e/total``) a run showed: the epochs it trained."""
    return sorted({int(e) for e in re.findall(rf"epoch (\d+)/{total}\b", stderr)})


def _kill_perturb_resume(argv, out: Path, total: int) -> tuple[int, subprocess.CompletedProcess]:
    """Start ``argv`` in a fresh interpreter, SIGKILL it when ``<out>.state`` appears, scale
    ``conv1.weight`` in that file by 1.5 and mark its history records, resume with
    ``--resume --json``; check the resumed run trained exactly the remaining epochs and kept
    the marked records. Returns (epochs done at the kill, the resumed process)."""
    state = Path(f"{out}.state")
    proc = subprocess.Popen(argv(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    if not _kill_when(proc, state):
        pytest.fail(f"the run finished before it could be killed (rc {proc.returncode}); "
                    "the test needs slower epochs on this machine")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the checkpoint is written at the end only
    k = torch.load(state, map_location="cpu", weights_only=True)["epoch"]
    assert 1 <= k < total

    def perturb(s: dict) -> None:
        s["model"]["conv1.weight"].mul_(1.5)
        for record in s["history"]:
            record["from_file"] = True

    edit_state(state, perturb)
    resumed = subprocess.run(argv(out, "--resume", "--json"), capture_output=True, text=True,
                             env={**ENV, "PRUNEKIT_PROGRESS": "1"}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _bar_epochs(resumed.stderr, total) == list(range(k + 1, total + 1))  # N - k epochs
    history = torch.load(state, map_location="cpu", weights_only=True)["history"]
    assert [(r["epoch"], r.get("from_file", False)) for r in history] == \
        [(e, e <= k) for e in range(1, total + 1)]
    return k, resumed


def _scale_conv1_after(k: int):
    def hook(epoch, model, _record):
        if epoch == k:
            with torch.no_grad():
                model.conv1.weight.mul_(1.5)
    return hook


def _assert_follows(out: Path, expected: Path, plain: Path) -> None:
    got, want, base = _state_dict(out), _state_dict(expected), _state_dict(plain)
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(got[k], want[k])]
    assert not changed, f"weights differ from the run changed in memory: {changed[:5]}"
    assert any(not torch.equal(want[k], base[k]) for k in base)  # and the change mattered


def test_train_killed_then_resumed_continues_from_the_state_file(fm, tmp_path, monkeypatch,
                                                                 capsys) -> None:
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "m.pt"
    k, resumed = _kill_perturb_resume(lambda o, *extra: _train_argv(fm, o, *extra), out, 3)
    assert json.loads(resumed.stdout)["epochs"] == 3

    # References in this process: the same command, uninterrupted, with and without the change
    # made in memory at the end of epoch k (the CLI seeds the initial weights with --seed).
    expected, plain = tmp_path / "expected.pt", tmp_path / "plain.pt"
    with monkeypatch.context() as m:
        chain_epoch_hook(m, _scale_conv1_after(k))
        assert cli.main(_train_argv(fm, expected)[len(LAUNCH):]) == 0
    assert cli.main(_train_argv(fm, plain)[len(LAUNCH):]) == 0
    capsys.readouterr()
    _assert_follows(out, expected, plain)
    assert json.loads(resumed.stdout)["test_acc"] == prunekit.load(expected)[1]["test_acc"]
    # a SIGKILL can strand the temporary file of an atomic write; never the real outputs
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in ("m.pt", "m.pt.state")]
    assert all(p.endswith(".tmp") for p in leftovers), leftovers


def test_cli_train_twice_same_seed(fm, tmp_path, capsys) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"m{i}.pt"
        argv = _train_argv(fm, out)[len(LAUNCH):]
        argv[argv.index("--epochs") + 1] = "1"
        torch.manual_seed(100 + i)  # whatever ran before in this process
        assert cli.main(argv) == 0
        capsys.readouterr()
        outs.append(_state_dict(out))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_csgd_killed_then_resumed_continues_from_the_state_file(fm, tmp_path, monkeypatch,
                                                                capsys) -> None:
    """S1 (survey) and S2 (clustering) are seeded, so the resumed run rebuilds the same clusters
    and continues S3 (centripetal training) from ``<out>.state``."""
    base = tmp_path / "base.pt"
    torch.manual_seed(0)
    prunekit.save(create("resnet8", num_classes=10, in_channels=1), base,
                  meta={"data": "fashion-mnist", "input_shape": [1, 28, 28]})

    def prune_argv(out: Path, *extra: str) -> list[str]:
        return ["prune", str(base), "--method", "csgd", "--ratio", "0.5", "--data-dir", str(fm),
                "--train-samples", "256", "--centripetal-epochs", "3", "--survey-samples", "64",
                "--seed", "3", "--device", "cpu", "--out", str(out), *extra]

    out = tmp_path / "csgd.pt"
    k, resumed = _kill_perturb_resume(lambda o, *extra: [*LAUNCH, *prune_argv(o, *extra)], out, 3)
    assert json.loads(resumed.stdout)["method_centripetal_epochs_run"] == 3

    expected, plain = tmp_path / "expected.pt", tmp_path / "plain.pt"
    with monkeypatch.context() as m:
        chain_epoch_hook(m, _scale_conv1_after(k))
        assert cli.main(prune_argv(expected)) == 0
    assert cli.main(prune_argv(plain)) == 0
    capsys.readouterr()
    _assert_follows(out, expected, plain)


# --------------------------------------------------------------------------- repeatability

def _calib(n: int = 32, size: int = 16) -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(n) % 4
    images = (torch.randint(0, 120, (n, 1, size, size), generator=g) + 30 * labels.view(-1, 1, 1, 1))
    return ImageDataset(images.to(torch.uint8), labels, mean=(0.5,), std=(0.25,), num_classes=4,
                        name="calib")


TINY = {
    "l1": {}, "random": {}, "apoz": {"calib_images": 16},
    "taylor": {"steps": 2, "calib_images": 16, "finetune_epochs_per_step": 1, "batch_size": 16,
               "max_steps_per_epoch": 2},
    "csgd": {"centripetal_epochs": 1, "survey_samples": 16, "batch_size": 16,
             "max_steps_per_epoch": 2, "recalibrate_samples": 16},
    "thinet": {"calib_images": 16, "samples_per_image": 4, "batch_size": 16},
}


def _prune(method: str, seed: int, **extra):
    torch.manual_seed(0)
    model = create("resnet8", num_classes=4, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1234 + seed * 7 + len(extra))  # a different global RNG state every call
    return prunekit.prune(model, x, method=method, ratio=0.5, data=_calib(), seed=seed,
                          evaluate=False, **TINY[method], **extra)


@pytest.mark.parametrize("method", list(TINY))
def test_same_seed_same_plan_and_weights(method) -> None:
    assert method in available(), f"{method} is not registered"  # never skip silently
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # csgd: "clusters did not converge" at one tiny epoch
        a, b = _prune(method, seed=3), _prune(method, seed=3)
    assert a.plan.to_json() == b.plan.to_json()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    if method == "random":  # and the seed matters
        assert _prune(method, seed=4).plan.to_json() != a.plan.to_json()


def test_fine_tuning_is_repeatable() -> None:
    a = _prune("l1", seed=2, finetune_epochs=1)
    b = _prune("l1", seed=2, finetune_epochs=1)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _prune("l1", seed=3, finetune_epochs=1)  # another seed: another data order
    assert any(not torch.equal(sa[k], c.model.state_dict()[k]) for k in sa)


def test_cli_prune_twice_same_seed_same_file_contents(fm, tmp_path, capsys) -> None:
    base = tmp_path / "base.pt"
    torch.manual_seed(0)
    prunekit.save(create("resnet8", num_classes=10, in_channels=1), base,
                  meta={"data": "fashion-mnist", "input_shape": [1, 28, 28]})
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}.pt"
        torch.manual_seed(100 + i)
        code = cli.main(["prune", str(base), "--method", "random", "--ratio", "0.4", "--seed", "9",
                         "--data-dir", str(fm), "--train-samples", "64", "--finetune-epochs", "1",
                         "--out", str(out)])
        capsys.readouterr()
        assert code == 0
        outs.append(_state_dict(out))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
