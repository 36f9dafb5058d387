"""``prunekit.report.compare`` and ``prunekit compare``: results, reports, resuming, budgets,
config files and bad input. Tiny model (ResNet-8 at half width) on tiny random images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, random_images, run, write_image_folder

import prunekit
from prunekit.data import ImageDataset
from prunekit.models import create
from prunekit.report import compare, finetune_epochs_left, fit_budget

METHODS = ["l1", "tp:l1", "csgd"]
TARGET = 0.5
FAST = {"latency_seconds": 0.01, "batch_sizes": (1, 8), "progress": False}
CSGD = {"survey_samples": 64, "recalibrate_samples": 64}




@pytest.fixture(scope="module")
def data() -> tuple[ImageDataset, ImageDataset]:
    return random_images(160, 0), random_images(64, 1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("resnet8", num_classes=4, in_channels=1, width=0.5).eval()


@pytest.fixture(scope="module")
def first_run(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "report"
    results = compare(model, None, METHODS, target_macs=TARGET, data=data, finetune_epochs=0,
                      out_dir=out, method_options={"csgd": CSGD}, onnx=True, **FAST)
    return results, out


def test_results_json(first_run) -> None:
    results, out = first_run
    stored = json.loads((out / "results.json").read_text())
    assert [e["method"] for e in stored["methods"]] == METHODS
    assert stored["settings"]["target_macs"] == TARGET and stored["machine"]["torch"]
    assert stored["original"]["macs"] > 0 and stored["skipped"] == [] and stored["failed"] == {}
    for e in stored["methods"]:
        assert e["status"] == "ok", e
        assert 0 < e["macs_fraction"] <= TARGET + 1e-9
        assert e["macs_after"] <= TARGET * e["macs_before"] * (1 + 1e-9)
        assert e["budget"] == {**e["budget"], "epochs": 0, "finetune_epochs": 0, "over_budget": False}
        for key in ("b1", "b8"):
            lat = e["latency"][key]
            assert lat["best"] in ("nchw", "channels_last", "deploy") and lat[lat["best"]]["ratio"] > 0
            assert e["onnx"]["latency"][key]["pruned_ms"] > 0
        assert (out / e["onnx"]["file"]).is_file()
        ckpt = out / e["checkpoint"]["file"]
        assert ckpt.stat().st_size == e["checkpoint"]["file_size_bytes"]
        pruned, meta = prunekit.load(ckpt)  # weights_only, rebuilds the narrower model
        assert meta["method"] == e["method"] and pruned(torch.zeros(2, 1, 16, 16)).shape == (2, 4)
        assert (out / "methods" / f"{e['slug']}.json").is_file()
    csgd = stored["methods"][2]
    assert csgd["budget"]["fitted_options"] == {"centripetal_epochs": 0}
    assert csgd["figures"]["dendrogram"]["channels"] - 1 == len(csgd["figures"]["dendrogram"]["linkage"])


def test_report_md_has_one_row_per_method(first_run) -> None:
    _, out = first_run
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == METHODS  # after the header row
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / png).is_file()
    assert "accuracy_vs_macs.png" in md and "dendrogram_csgd.png" in md


def test_report_html_is_self_contained(first_run) -> None:
    _, out = first_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # accuracy, widths, dendrogram
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page
    for method in METHODS:
        assert f"<td>{method}</td>" in page


def test_rerun_skips_finished_and_redoes_changed(first_run, model, data) -> None:
    _, out = first_run
    files = sorted((out / "methods").glob("*.json")) + sorted(out.glob("*.pt"))
    before = {p: p.stat().st_mtime_ns for p in files}
    again = compare(model, None, METHODS, target_macs=TARGET, data=data, finetune_epochs=0,
                    out_dir=out, method_options={"csgd": CSGD}, onnx=True, **FAST)
    assert again["skipped"] == METHODS and again["redone"] == {}
    assert {p: p.stat().st_mtime_ns for p in files if p.name != "original.pt"} == \
        {p: t for p, t in before.items() if p.name != "original.pt"}
    # a changed option of one method redoes that method only, and says why
    changed = compare(model, None, METHODS, target_macs=TARGET, data=data, finetune_epochs=0,
                      out_dir=out, method_options={"csgd": CSGD, "l1": {"calib_images": 16}},
                      onnx=True, **FAST)
    assert changed["skipped"] == ["tp:l1", "csgd"]
    assert "options" in changed["redone"]["l1"]
    assert (out / "methods" / "l1.json").stat().st_mtime_ns != before[out / "methods" / "l1.json"]


def test_budget_rule() -> None:
    assert fit_budget("csgd", 2, {}) == {"centripetal_epochs": 1}   # the method's default
    assert fit_budget("csgd", 0, {}) == {"centripetal_epochs": 0}   # no budget: merge at once
    assert fit_budget("csgd", 2, {"centripetal_epochs": 5}) == {}    # the caller's value wins
    assert fit_budget("taylor", 2, {}) == {"finetune_epochs_per_step": 0}  # 4 gaps, 2 epochs
    assert fit_budget("taylor", 8, {}) == {"finetune_epochs_per_step": 1}
    assert fit_budget("autopruner", 0, {}) == {"epochs": 1}  # cannot train less than one epoch
    assert fit_budget("l1", 3, {}) == {}
    assert finetune_epochs_left(3, 1.0) == (2, False)
    assert finetune_epochs_left(2, 0.5) == (1, False)
    assert finetune_epochs_left(1, 2.0) == (0, True)


def test_budget_shared_and_overrun_recorded(model, data, tmp_path, monkeypatch) -> None:
    import importlib

    from prunekit.train import TrainConfig

    compare_module = importlib.import_module("prunekit.report.compare")  # not the function

    tuned = []
    real_finetune = compare_module.finetune

    def spy(pruned, train_set, epochs, **kw):
        tuned.append((epochs, train_set is data[0]))
        return real_finetune(pruned, train_set, epochs, **kw)

    monkeypatch.setattr(compare_module, "finetune", spy)
    res = compare(model, None, ["l1", "csgd"], target_macs=TARGET, data=data, finetune_epochs=1,
                  out_dir=tmp_path, onnx=False, train_config=TrainConfig(lr=0.01, batch_size=64),
                  method_options={"csgd": {**CSGD, "centripetal_epochs": 2}}, **FAST)
    l1, csgd = res["methods"]
    assert l1["budget"] == {**l1["budget"], "method_epochs": 0, "finetune_epochs": 1,
                            "total_epochs": 1, "over_budget": False}
    assert tuned == [(1, True)]   # l1 fine-tuned its one epoch; csgd, over budget, not at all
    assert csgd["budget"]["method_epochs"] == 2 and csgd["budget"]["finetune_epochs"] == 0
    assert csgd["budget"]["over_budget"] is True
    assert "more than the budget" in (tmp_path / "report.md").read_text()


def test_failing_method_is_recorded_and_others_continue(model, data, tmp_path) -> None:
    args = dict(target_macs=TARGET, data=data, finetune_epochs=0, out_dir=tmp_path, onnx=False,
                method_options={"csgd": {"bogus_option": 1}}, **FAST)
    res = compare(model, None, ["csgd", "l1"], **args)
    csgd, l1 = res["methods"]
    assert csgd["status"] == "failed" and "bogus_option" in csgd["error"]
    assert l1["status"] == "ok" and set(res["failed"]) == {"csgd"}
    assert "csgd FAILED" in (tmp_path / "report.md").read_text()
    again = compare(model, None, ["csgd", "l1"], **args)  # a failed method is retried
    assert again["skipped"] == ["l1"] and "failed" in again["redone"]["csgd"]


def test_unknown_method_fails_before_any_work(model, data, tmp_path) -> None:
    with pytest.raises(prunekit.ConfigError, match="nosuch"):
        compare(model, None, ["l1", "nosuch"], target_macs=TARGET, data=data,
                out_dir=tmp_path / "r", **FAST)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny grayscale image folder (2 classes) and an untrained ResNet-8 checkpoint on it."""
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), {"train": 8, "test": 4})
    torch.manual_seed(0)
    net = create("resnet8", num_classes=2, in_channels=1, width=0.5)
    path = root / "base.pt"
    prunekit.save(net, path, meta={"data": f"folder:{root}", "input_shape": [1, 32, 32],
                                   "model": "resnet8"})
    return path





def test_cli_config_file_and_flag_override(checkpoint, tmp_path, capsys) -> None:
    report = tmp_path / "rep"
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(f"methods: [l1, tp:l1]\ntarget-macs: {TARGET}\nfinetune_epochs: 0\nonnx: false\n"
                   f"latency_seconds: 0.01\nreport: {report}\n")
    code, out, err = run(capsys, "compare", checkpoint, "--config", cfg, "--methods", "l1", "--json")
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object on stdout
    assert [e["method"] for e in result["methods"]] == ["l1"]  # the flag overrides the file
    assert result["settings"]["onnx"] is False and result["settings"]["target_macs"] == TARGET
    assert (report / "results.json").is_file() and (report / "report.html").is_file()
    code, out, err = run(capsys, "compare", checkpoint, "--config", cfg, "--methods", "l1")
    assert code == 0 and "l1" in out and "report.html" in out


@pytest.mark.parametrize("body, words", [
    ("methds: [l1]\nfintune_epochs: 2\n", ["fintune_epochs", "methds"]),
    ("methods: 3\n", ["methods"]),
    ("- l1\n- l2\n", ["mapping"]),
])
def test_cli_bad_config(checkpoint, tmp_path, capsys, body, words) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body)
    line = assert_one_line_error(*run(capsys, "compare", checkpoint, "--config", cfg,
                                      "--target-macs", "0.5", "--report", tmp_path / "r"))
    assert all(w in line for w in words), line


@pytest.mark.parametrize("args, word", [
    (["--methods", "l1,nosuch", "--target-macs", "0.5"], "nosuch"),
    (["--methods", "l1,l1", "--target-macs", "0.5"], "twice"),
    (["--methods", "l1", "--target-macs", "0.5", "--ratio", "0.3"], "exactly one"),
    (["--methods", "l1"], "exactly one"),
    (["--methods", "l1", "--target-macs", "1.5"], "target"),
    (["--target-macs", "0.5"], "--methods"),
])
def test_cli_bad_input_before_any_work(tmp_path, capsys, args, word) -> None:
    missing = tmp_path / "missing.pt"  # never read: the options are checked first
    line = assert_one_line_error(*run(capsys, "compare", missing, *args, "--report", tmp_path / "r"))
    assert word in line
    assert not (tmp_path / "r").exists()


def test_cli_bad_report_dir_and_checkpoint(checkpoint, tmp_path, capsys) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("x")
    line = assert_one_line_error(*run(capsys, "compare", checkpoint, "--methods", "l1",
                                      "--target-macs", "0.5", "--report", a_file))
    assert "not a directory" in line
    line = assert_one_line_error(*run(capsys, "compare", tmp_path / "missing.pt", "--methods", "l1",
                                      "--target-macs", "0.5"))
    assert "--report" in line
    assert_one_line_error(*run(capsys, "compare", tmp_path / "missing.pt", "--methods", "l1",
                               "--target-macs", "0.5", "--report", tmp_path / "r"))


def test_demo_bad_input_before_training(tmp_path, capsys) -> None:
    line = assert_one_line_error(*run(capsys, "demo", "--out-dir", tmp_path / "d", "--methods",
                                      "l1,nosuch"))
    assert "nosuch" in line and not (tmp_path / "d").exists()
    a_file = tmp_path / "f"
    a_file.write_text("x")
    line = assert_one_line_error(*run(capsys, "demo", "--out-dir", a_file))
    assert "not a directory" in line


def test_round_to_for_every_method_via_star_options(model, data, tmp_path) -> None:
    res = compare(model, None, ["l1", "curl"], target_macs=TARGET, data=data, finetune_epochs=0,
                  out_dir=tmp_path, onnx=False, method_options={"*": {"round_to": 4}}, **FAST)
    l1, curl = res["methods"]
    assert l1["status"] == "ok"
    after = [w[1] for w in l1["widths"].values()]
    assert all(w % 4 == 0 for w in after) and l1["macs_fraction"] <= TARGET
    assert curl["status"] == "failed" and "round_to" in curl["error"]


def test_threads_fix_every_latency_measurement_and_the_report_says_how_many(model, data,
                                                                          tmp_path) -> None:
    """``threads=1``: the eager, ONNX Runtime and deployment-runtime timings all run on one
    thread whatever torch's setting, the settings record it, the report's runtime lines say
    so, and torch's own setting is left as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that a timing which ignored ``threads`` would show 2
    try:
        res = compare(model, None, ["l1"], target_macs=TARGET, data=data, out_dir=tmp_path,
                      runtimes=["onnxruntime"], threads=1, **FAST)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    e = res["methods"][0]
    assert res["settings"]["threads"] == 1 and e["runtimes"]["threads"] == 1
    assert {per["threads"] for b in e["latency"].values() for lay, per in b.items()
            if lay != "best"} == {1}
    assert "(1 thread, interleaved)" in (tmp_path / "report.md").read_text()
    with pytest.raises(prunekit.ConfigError, match="threads"):
        compare(model, None, ["l1"], target_macs=TARGET, data=data, out_dir=tmp_path / "b",
                threads=0, **FAST)
