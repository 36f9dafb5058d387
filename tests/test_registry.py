"""The method contract: the registry, strict typed options (API and CLI), methods that choose
their widths, a method added in one file, missing optional packages, and the data helper."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import random_images, write_image_folder
from torch.utils.data import DataLoader, TensorDataset

import prunekit
from prunekit import cli, methods
from prunekit.data.batches import iter_batches
from prunekit.errors import ConfigError
from prunekit.io import save
from prunekit.models import create

ROOT = Path(__file__).resolve().parents[1]


images = random_images


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("resnet8", num_classes=4, in_channels=1, width=0.5).eval()


@pytest.mark.parametrize("name", methods.available())
def test_misspelt_option_names_the_closest(name: str, model) -> None:
    """Every registered method refuses an unknown key before any work, naming the closest
    option; a misspelt prune keyword is suggested too."""
    spec = methods.spec(name)
    first = spec.options.names()[0]
    with pytest.raises(ConfigError, match=rf"unknown option '{first}x' for method '{name}'; "
                                          rf"did you mean '{first}'\?"):
        prunekit.prune(model, torch.zeros(1, 1, 16, 16), method=name, ratio=0.3, **{first + "x": 1})
    with pytest.raises(ConfigError, match="did you mean 'finetune_epochs'"):
        prunekit.prune(model, torch.zeros(1, 1, 16, 16), method=name, ratio=0.3, finetune_epoch=3)


def test_bad_values_are_typed_errors(model) -> None:
    x = torch.zeros(1, 1, 16, 16)
    for name, opts in [("l1", {"calib_images": 0}), ("l1", {"global_ranking": "yes"}),
                       ("csgd", {"clustering": "bogus"}), ("csgd", {"momentum": 1.0}),
                       ("mrts", {"delta": 1.5}), ("taylor", {"steps": 2.5}),
                       ("lasso", {"fit_bias": "maybe"}), ("autopruner", {"alpha_growth": 1.0})]:
        with pytest.raises(ConfigError, match="must be"):
            prunekit.prune(model, x, method=name, ratio=0.3, **opts)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save(model, path, meta={"input_shape": [1, 16, 16]})
    return path


@pytest.mark.parametrize("name", methods.available())
def test_cli_misspelt_option_one_line_exit_2(name: str, checkpoint, tmp_path, capsys) -> None:
    """``--<option>x`` for every method: one line with the suggestion, exit 2, no output file."""
    spec = methods.spec(name)
    info = spec.options.describe()[0]
    out = tmp_path / "o.pt"
    code = cli.main(["prune", str(checkpoint), "--method", name, "--ratio", "0.3", "--out", str(out),
                     "--data", "folder:/nonexistent", info.flag + "x", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"did you mean {info.flag}?" in err and not out.exists()


@pytest.mark.parametrize("typo", [["--target-latncy", "0.5"], ["--target-latncy=0.5"]],
                         ids=["space", "equals"])
def test_cli_misspelt_option_with_a_model_spec(typo, tmp_path, capsys) -> None:
    """With ``--model`` (no checkpoint) a misspelt option is still an error with the suggestion,
    not taken for the checkpoint or silently dropped."""
    out = tmp_path / "o.pt"
    code = cli.main(["prune", "--model", "resnet8", "--input-shape", "1,16,16", "--method", "l1",
                     "--out", str(out), "--data", "folder:/nonexistent", *typo])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "did you mean --target-latency?" in err and not out.exists()


def test_cli_option_values_reach_the_method(monkeypatch, checkpoint, tmp_path, capsys) -> None:
    """``--name value``, ``--opt name=value`` and bare true/false flags parse into the method's
    options with their kinds."""
    seen = {}
    spec = methods.spec("csgd")

    def spy(ctx):
        seen.update(ctx.parse(spec.options, "csgd").as_dict())
        raise ConfigError("stop here")

    monkeypatch.setitem(methods.registry._REGISTRY, "csgd",
                        methods.MethodSpec("csgd", spy, spec.options, resumable=True, needs_data=True))
    folder = tmp_path / "imgs"
    write_image_folder(folder, {"train": 4, "test": 2})
    code = cli.main(["prune", str(checkpoint), "--method", "csgd", "--ratio", "0.3",
                     "--out", str(tmp_path / "o.pt"), "--data", f"folder:{folder}",
                     "--centripetal-epochs", "3", "--opt", "epsilon=auto", "--stop-when-converged",
                     "--survey-statistic=relu-gap", "--lr", "0.5"])
    assert code == 2 and "stop here" in capsys.readouterr().err
    assert seen["centripetal_epochs"] == 3 and seen["epsilon"] == "auto"
    assert seen["stop_when_converged"] is True and seen["survey_statistic"] == "relu-gap"
    assert seen["lr"] == 0.5 and seen["state_path"].endswith("o.pt.state") and seen["resume"] is False


def test_methods_command_lists_registry(capsys) -> None:
    import json

    assert cli.main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["methods"]
    assert list(table) == methods.available()
    assert cli.main(["methods", "csgd", "--json"]) == 0
    opts = {o["name"]: o for o in json.loads(capsys.readouterr().out)["options"]}
    assert opts["centripetal_epochs"]["default"] == 1 and opts["clustering"]["flag"] == "--clustering"


def test_no_method_name_literal_outside_methods() -> None:
    """api.py, report/ and cli.py read the registry: no string constant equals a method name."""
    names = set(methods.available())
    files = [ROOT / "prunekit/api.py", ROOT / "prunekit/cli.py", *(ROOT / "prunekit/report").glob("*.py")]
    found = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{f.name}:{node.lineno}: {node.value!r}")
    assert found == []


def test_method_in_one_file_registers_and_runs(model, tmp_path, monkeypatch) -> None:
    """The worked example of docs/architecture.md: one file, and prune / compare know it
    (registered into a copy of the registry, so other tests see only prunekit's methods)."""
    import importlib

    monkeypatch.setattr(methods.registry, "_REGISTRY", dict(methods.specs()))
    import example_method

    if "mean-abs" not in methods.registry._REGISTRY:  # imported by an earlier run of this test
        importlib.reload(example_method)
    assert "mean-abs" in methods.available()
    data = (images(64, 0), images(32, 1))
    res = prunekit.prune(model, None, method="mean-abs", ratio=0.5, data=data, calib_images=32)
    assert res.report["macs_fraction"] < 0.5 and res.report["method_scores"] == "mean-abs"
    with pytest.raises(ConfigError, match="did you mean 'calib_images'"):
        prunekit.prune(model, None, method="mean-abs", ratio=0.5, data=data, calib_image=32)
    from prunekit.report import compare
    out = compare(model, None, ["mean-abs"], ratio=0.5, data=data, out_dir=tmp_path, onnx=False,
                  progress=False, report=False, latency_seconds=0.01, batch_sizes=(1,))
    assert out["methods"][0]["status"] == "ok"


def test_missing_optional_package_names_it(monkeypatch, model) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the package 'scikit-learn'.*pip install scikit-learn"):
        prunekit.prune(model, torch.zeros(1, 1, 16, 16), method="lasso", ratio=0.3)


def test_methods_that_choose_widths_run_without_budget(model) -> None:
    """MRTS cuts at its eq. 11 thresholds and slimming at a given threshold when no budget is
    given; a method that needs a budget still refuses to run without one."""
    import copy

    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # spread factors (a fresh BatchNorm has all gammas at 1)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.05
    data = (images(64, 0), images(32, 1))
    res = prunekit.prune(model, None, method="mrts", data=data, sparsity_epochs=0, delta=0.3)
    assert res.report["method_delta_used"] == 0.3 and res.report["macs_fraction"] < 1.0
    gammas = {n: m.weight.detach().abs() for n, m in model.named_modules()
              if isinstance(m, torch.nn.BatchNorm2d)}
    thr = float(torch.cat(list(gammas.values())).median())
    res = prunekit.prune(model, None, method="slimming", data=data, sparsity_epochs=0, threshold=thr)
    assert 0.0 < res.report["method_removed_channel_fraction"] < 1.0
    with pytest.raises(ConfigError, match="threshold"):
        prunekit.prune(model, None, method="slimming", data=data, sparsity_epochs=0)
    with pytest.raises(ConfigError, match="exactly one of ratio or target_macs"):
        prunekit.prune(model, None, method="l1", data=data)


def test_iter_batches_same_inputs_from_every_source() -> None:
    """ImageDataset, map-style Dataset, DataLoader and tensor give the same first N inputs."""
    ds = images(50, 0)
    x_all, y_all = ds.batch(torch.arange(50))
    ref = torch.cat([x for x, _ in iter_batches(ds, 37, 8)])
    assert torch.equal(ref, x_all[:37])
    plain = TensorDataset(x_all, y_all)
    loader = DataLoader(plain, batch_size=16)
    for source in (plain, loader, x_all):
        got = list(iter_batches(source, 37, 8))
        assert torch.equal(torch.cat([x for x, _ in got]), x_all[:37])
        if source is not x_all:
            assert torch.equal(torch.cat([y for _, y in got]), y_all[:37])


def test_csgd_survey_from_a_dataloader(model) -> None:
    """The S1 survey reads a plain DataLoader and gives exactly the in-memory dataset's result."""
    from prunekit.methods import csgd

    ds = images(40, 0)
    x, y = ds.batch(torch.arange(40))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    a = csgd.survey(model, ds, samples=33, batch_size=8)
    b = csgd.survey(model, loader, samples=33, batch_size=8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compare_shared_options_go_to_the_methods_that_take_them(model, tmp_path) -> None:
    """``"*"`` options reach the methods that have them (l1's calib_images; mrts has none);
    a shared key no compared method takes is refused with the closest name."""
    from prunekit.report import compare

    data = (images(64, 0), images(32, 1))
    with pytest.raises(ConfigError, match="did you mean 'calib_images'"):
        compare(model, None, ["l1", "mrts"], ratio=0.5, data=data, out_dir=tmp_path / "a",
                onnx=False, progress=False, report=False, method_options={"*": {"calib_image": 8}})
    out = compare(model, None, ["apoz", "mrts"], ratio=0.5, data=data, out_dir=tmp_path / "b",
                  onnx=False, progress=False, report=False, latency_seconds=0.01, batch_sizes=(1,),
                  method_options={"*": {"calib_images": 8}, "mrts": {"sparsity_epochs": 0}})
    apoz, mrts = out["methods"]
    assert apoz["status"] == mrts["status"] == "ok"
    assert apoz["settings"]["options"] == {"calib_images": 8}
    assert mrts["settings"]["options"] == {"sparsity_epochs": 0}
