"""Deployment runtimes: each one's output check catches a stale export, a missing runtime is
one line naming its package, and the JSON has the documented shape (no timed assertions)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import assert_one_line_error, run
from torch import nn

from prunekit.measure import profile
from prunekit.measure.runtimes import (
    RUNTIMES,
    TOLERANCE,
    RuntimeUnavailable,
    Session,
    check_runtimes,
    installed,
    pair_ratio,
    profile_runtimes,
    slower_warning,
    time_pair,
    verify,
)
from prunekit.models import create

#: torch.compile takes minutes per model on a 2-core CPU: checked in bench/, not here
FAST = [r for r in RUNTIMES if r != "compile"]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = create("resnet8", num_classes=10, in_channels=1).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding has work to do
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("runtime", FAST)
def test_check_passes_then_catches_a_weight_changed_after_export(runtime, tmp_path) -> None:
    if not installed(runtime):
        pytest.fail(f"{runtime} is part of the dev environment (pip install -e '.[dev]')")
    net = _net()
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    session = Session(net, runtime, x, threads=1, workdir=tmp_path)
    good = verify(session, net, x)
    assert good["ok"] and good["max_rel_diff"] <= TOLERANCE and good["argmax_agree"] == 1.0
    with torch.no_grad():
        net.fc.weight[3] += 0.05 * net.fc.weight.abs().max()  # the export no longer matches
    bad = verify(session, net, x)
    assert not bad["ok"] and bad["max_rel_diff"] > TOLERANCE


def test_missing_runtime_is_a_typed_error_naming_the_package(monkeypatch, capsys, tmp_path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(RuntimeUnavailable, match="pip install openvino"):
        check_runtimes("onnxruntime,openvino")
    assert "openvino" not in check_runtimes(None)  # the default: what is installed
    with pytest.raises(RuntimeUnavailable):
        profile(_net(), torch.randn(1, 1, 28, 28), (1,), runtimes=["openvino"])
    path = tmp_path / "m.pt"
    from prunekit.io import save
    save(_net(), path, meta={"input_shape": [1, 28, 28]})
    line = assert_one_line_error(*run(capsys, "profile", path, "--runtime", "openvino", "--json"))
    assert "'openvino'" in line and "pip install openvino" in line


def test_unknown_runtime_exit_2(capsys, tmp_path) -> None:
    with pytest.raises(RuntimeUnavailable.__mro__[1], match="unknown runtime 'tensorrt'"):
        check_runtimes(["tensorrt"])
    with pytest.raises(RuntimeUnavailable.__mro__[1], match="did you mean 'onnxruntime'"):
        check_runtimes(["onnxruntim"])
    path = tmp_path / "m.pt"
    from prunekit.io import save
    save(_net(), path, meta={"input_shape": [1, 28, 28]})
    assert_one_line_error(*run(capsys, "profile", path, "--runtime", "nchw,tensorrt"), match="tensorrt")


def test_profile_json_shape(capsys, tmp_path) -> None:
    from prunekit.io import save

    pruned, original = _net(1), _net(0)
    save(pruned, tmp_path / "p.pt", meta={"input_shape": [1, 28, 28]})
    save(original, tmp_path / "o.pt", meta={"input_shape": [1, 28, 28]})
    code, out, _ = run(capsys, "profile", tmp_path / "p.pt", "--original", tmp_path / "o.pt",
                       "--runtime", "deploy,onnxruntime", "--batch-sizes", "1,3",
                       "--max-seconds", "0.02", "--threads", "1", "--precision", "0.5", "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["threads"] == 1 and list(rep["runtimes"]) == ["deploy", "onnxruntime"]
    for rec in rep["runtimes"].values():
        assert rec["ok"] and rec["original_ok"] and rec["max_rel_diff"] <= TOLERANCE
        assert set(rec["latency_ms"]) == {"1", "3"}
        for b in ("1", "3"):
            lat, ref = rec["latency_ms"][b], rec["original_latency_ms"][b]
            assert 0 < lat["median"] <= lat["p90"]
            assert rec["ratio"][b] > 0 and 0 <= rec["ratio_se"][b] <= 0.5  # --precision 0.5
            assert lat["repeats"] == ref["repeats"]  # interleaved: one call of each per round
    assert isinstance(rep["slower"], list)


def test_profile_precision_without_an_original_is_one_line(capsys, tmp_path) -> None:
    from prunekit.io import save

    save(_net(), tmp_path / "p.pt", meta={"input_shape": [1, 28, 28]})
    assert_one_line_error(*run(capsys, "profile", tmp_path / "p.pt", "--runtime", "deploy",
                               "--precision", "0.01"), match="--precision needs --original")


def test_time_pair_alternates_the_order() -> None:
    calls: list[str] = []
    ta, tb = time_pair(lambda: calls.append("a"), lambda: calls.append("b"), warmup=0,
                       min_repeats=4, max_seconds=1e-9)
    assert calls == list("abbaabba") and len(ta) == len(tb) == 4


def test_pair_ratio_of_rounds_slowed_alike_is_exact() -> None:
    # the machine runs 1x to 3x slow, alike for both calls of a round: every round's ratio is 0.6
    speed = [1.0, 3.0, 1.2, 2.5, 1.0, 1.1, 2.9, 1.0]
    ta = [0.010 * s for s in speed]
    tb = [0.006 * s for s in speed]
    assert pair_ratio(ta, tb) == (pytest.approx(0.6), pytest.approx(0.0))
    assert pair_ratio(ta, tb[1:] + tb[:1])[0] != pytest.approx(0.6)  # rounds paired wrongly: not
    assert pair_ratio(ta[:3], tb[:3])[1] == float("inf")
    with pytest.raises(ValueError):
        pair_ratio(ta, tb[:-1])


def _spread_and_mean_se(ratios: torch.Tensor) -> tuple[float, float]:
    ests = [pair_ratio([1.0] * ratios.shape[1], row.tolist()) for row in ratios]
    return torch.tensor([e for e, _ in ests]).std().item(), sum(se for _, se in ests) / len(ests)


def test_pair_ratio_standard_error_matches_the_spread_of_its_estimates() -> None:
    gen = torch.Generator().manual_seed(0)
    # independent rounds, few of them: the median's large-sample error
    n = 24
    spread, se = _spread_and_mean_se(0.6 + 0.05 * torch.randn(400, n, generator=gen, dtype=torch.float64))
    assert se == pytest.approx(spread, rel=0.2)
    assert se == pytest.approx(1.2533 * 0.05 / n ** 0.5, rel=0.2)
    # rounds that drift together (an AR(1) series, correlation 0.9 from round to round):
    # batch means see the drift, an error computed as if the rounds were independent does not
    n, phi = 400, 0.9
    noise = 0.05 * torch.randn(400, n, generator=gen, dtype=torch.float64)
    drift = torch.zeros_like(noise)
    for i in range(1, n):
        drift[:, i] = phi * drift[:, i - 1] + noise[:, i]
    spread, se = _spread_and_mean_se(0.6 + drift)
    independent = 1.2533 * drift.std().item() / n ** 0.5
    assert se == pytest.approx(spread, rel=0.35) and independent < spread / 2


class _Clock:
    """A fake clock: the timed calls advance it; per-round ratios 0.6 +- 0.05 (seeded)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.gen = torch.Generator().manual_seed(1)

    def a(self) -> None:
        self.now += 1.0

    def b(self) -> None:
        self.now += 0.6 + 0.05 * torch.randn(1, generator=self.gen).item()


def test_time_pair_times_on_until_the_ratio_is_precise(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr("prunekit.measure.runtimes.time.perf_counter", lambda: clock.now)
    ta, tb = time_pair(clock.a, clock.b, warmup=0, min_repeats=7, max_seconds=1.0)
    assert len(ta) == 7  # without a precision: the time budget and the fewest rounds
    ta, tb = time_pair(clock.a, clock.b, warmup=0, min_repeats=7, max_seconds=1.0,
                       precision=0.01, precision_seconds=1e6)
    assert len(ta) > 7 and pair_ratio(ta, tb)[1] <= 0.01 < pair_ratio(ta[:-1], tb[:-1])[1]
    ta, tb = time_pair(clock.a, clock.b, warmup=0, min_repeats=7, max_seconds=1.0,
                       precision=0.001, precision_seconds=20.0)
    spent = sum(ta) + sum(tb)  # stopped by the time cap, not the precision
    assert spent >= 20.0 > spent - ta[-1] - tb[-1] and pair_ratio(ta, tb)[1] > 0.001


def test_slower_warning_is_one_line_naming_runtime_and_batch() -> None:
    result = {"runtimes": {"onnxruntime": {"ratio": {"1": 1.31, "64": 0.6}},
                           "openvino": {"ratio": {"1": 1.01, "64": 1.2}}}}
    line = slower_warning(result)
    assert line == ("warning: the pruned model measured slower than the original on "
                    "onnxruntime batch 1 (1.31x), openvino batch 64 (1.20x)")
    assert slower_warning({"runtimes": {"nchw": {"ratio": {"1": 0.5}}}}) is None


def test_a_model_without_parameters_is_timed_too(tmp_path) -> None:
    class TwoOut(nn.Module):
        def forward(self, x):
            return torch.relu(x).flatten(1)

    rep = profile_runtimes(TwoOut(), torch.randn(1, 1, 4, 4), (1,), ["nchw"], max_seconds=0.01,
                           workdir=tmp_path)
    assert rep["runtimes"]["nchw"]["ok"] and rep["runtimes"]["nchw"]["latency_ms"]["1"]["median"] > 0


def test_cli_prune_rounds_widths_to_8_by_default(tmp_path, capsys) -> None:
    from prunekit.io import save

    path = tmp_path / "m.pt"
    save(_net(), path, meta={"input_shape": [1, 28, 28], "data": "fashion-mnist"})
    widths = {}
    for extra in ([], ["--round-to", "1"]):
        code, out, _ = run(capsys, "prune", path, "--method", "l1", "--target-macs", "0.5",
                           "--train-samples", "16", "--out", tmp_path / "p.pt", "--json", *extra)
        assert code == 0
        rep = json.loads(out)
        assert rep["macs_fraction"] <= 0.5
        widths[bool(extra)] = [after for _, after in rep["widths"].values()]
        assert rep["round_to"] == (None if extra else 8)
    # resnet8's groups have 16, 32 and 64 channels: every pruned width a multiple of 8 by default
    assert all(w % 8 == 0 for w in widths[False][:-1])          # the classifier (10) stays
    assert any(w % 8 for w in widths[True][:-1])                 # exact widths with --round-to 1


def test_slower_result_warns_in_one_line(capsys) -> None:
    from prunekit.cli import Output, _speed_lines

    report = {"speed": {"runtime": "onnxruntime", "batch_size": 16, "ratio": 1.2,
                        "slower": [{"runtime": "onnxruntime", "batch": 16, "ratio": 1.2}]}}
    with Output(False) as o:
        lines = _speed_lines(report, o)
    err = capsys.readouterr().err.strip().splitlines()
    assert lines == ["speed on onnxruntime at batch 16: 1.200x the original's latency"]
    assert err == ["prunekit: warning: the pruned model measured slower than the original on "
                   "onnxruntime batch 16 (1.20x)"]


def test_report_lines_name_each_method_runtime_and_batch() -> None:
    from prunekit.report.render import runtime_lines

    results = {"methods": [
        {"method": "l1", "runtimes": {"runtimes": {
            "onnxruntime": {"ok": True, "ratio": {"1": 0.61, "64": 0.47}},
            "openvino": {"ok": True, "ratio": {"1": 0.8, "64": 0.52}}}}},
        {"method": "csgd", "runtimes": None}]}
    lines = runtime_lines(results)
    assert lines[1].split() == ["l1", "onnxruntime", "batch", "1:", "0.61x,", "batch", "64:", "0.47x"]
    assert lines[-1] == "fastest everywhere it was timed: l1 on onnxruntime (0.61x or less)"
    assert runtime_lines({"methods": [{"method": "l1"}]}) == []
