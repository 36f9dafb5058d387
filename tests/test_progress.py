"""Progress on a stderr that is not a terminal: plain lines at a bounded rate, never on stdout,
and an early failure still leaves exactly one error line."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, run, write_image_folder

from prunekit import utils
from prunekit.utils import PlainProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _reporter(total: int | None, **kw) -> tuple[PlainProgress, FakeClock, io.StringIO]:
    buf = io.StringIO()
    bar = PlainProgress(range(total or 0), desc="epoch 3/10", total=total, file=buf, **kw)
    clock = FakeClock()
    bar._clock = clock
    bar.start = bar._last_time = 0.0
    return bar, clock, buf


def test_lines_every_tenth_and_a_final_line() -> None:
    bar, clock, buf = _reporter(100, min_interval=2.0)
    for i in range(100):
        clock.t = 0.5 * (i + 1)  # 50 s in all: the time limit never binds, the 10 % step does
        bar.set_postfix({"loss": "0.41", "acc": "88.00"})
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10  # 10 %, 20 %, ... 90 %, then the final line from close()
    assert lines[0] == "prunekit: epoch 3/10 10% (10/100) loss 0.41 acc 88.00 [5.0 s]"
    assert lines[-1] == "prunekit: epoch 3/10 100% (100/100) loss 0.41 acc 88.00 [50.0 s]"


def test_fast_steps_are_rate_limited_and_short_loops_silent() -> None:
    bar, clock, buf = _reporter(1000, min_interval=2.0)
    for i in range(1000):
        clock.t = 0.01 * (i + 1)  # 10 s in all, 1000 steps: a line at most every 2 s
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert 4 <= len(lines) <= 6
    short, clock2, buf2 = _reporter(50, min_interval=2.0)
    for i in range(50):
        clock2.t = 0.01 * (i + 1)  # half a second: nothing worth a line
        short.update(1)
    short.close()
    assert buf2.getvalue() == ""


def test_unknown_total_prints_every_max_interval() -> None:
    bar, clock, buf = _reporter(None, min_interval=2.0, max_interval=10.0)
    for i in range(30):
        clock.t = float(i + 1)
        bar.update(1)
    assert [re.search(r"(\d+) done", ln).group(1) for ln in buf.getvalue().splitlines()] == \
        ["10", "20", "30"]


def test_mode_follows_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("PRUNEKIT_PROGRESS", "0")
    assert utils.progress_mode() == "off"
    assert progress(range(3)).disable
    monkeypatch.delenv("PRUNEKIT_PROGRESS")
    # pytest's captured stderr is not a terminal
    assert utils.progress_mode() == "lines"
    assert isinstance(progress(range(3), desc="x"), PlainProgress)
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    assert progress(range(3), disable=True).disable


@pytest.fixture
def folder(tmp_path) -> str:
    return f"folder:{write_image_folder(tmp_path / 'imgs', {'train': 16, 'test': 2})}"


def test_train_to_a_log_file_leaves_progress_lines(folder, tmp_path) -> None:
    """``prunekit train ... --json 2>log``: the log holds plain progress lines, stdout one JSON
    object."""
    log = tmp_path / "log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_PROGRESS_INTERVAL": "0"}
    env.pop("PRUNEKIT_PROGRESS", None)
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "prunekit.cli", "train", "--model", "resnet8",
                               "--data", folder, "--epochs", "2", "--batch-size", "4",
                               "--out", str(tmp_path / "m.pt"), "--json"],
                              stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=300)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["epochs"] == 2  # stdout: the JSON object alone
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text  # plain lines, no bar redraws
    lines = text.splitlines()
    assert any(ln.startswith("prunekit: training resnet8 on folder:") for ln in lines)
    for epoch in (1, 2):
        assert any(re.fullmatch(rf"prunekit: epoch {epoch}/2 100% \(8/8\) loss [\d.]+ acc [\d.]+ "
                                r"lr \S+ \[[\d.]+ s\]", ln) for ln in lines), text
    assert all(ln.startswith("prunekit: ") for ln in lines)


def test_notes_shown_on_success_and_held_back_on_early_failure(folder, tmp_path, capsys) -> None:
    code, out, err = run(capsys, "train", "--model", "resnet8", "--data", folder, "--epochs", "1",
                         "--batch-size", "8", "--out", tmp_path / "m.pt", "--json")
    assert code == 0 and json.loads(out)
    assert "prunekit: training resnet8 on " in err
    (tmp_path / "bad.pt.state").write_bytes(b"not a state file")
    code, out, err = run(capsys, "train", "--model", "resnet8", "--data", folder, "--epochs", "1",
                         "--out", tmp_path / "bad.pt", "--resume")
    assert_one_line_error(code, out, err, "cannot resume")
