"""Bring your own model: model specs (prunekit.models.spec), --model/--weights on the CLI, and
checkpoints that rebuild a factory model from the file alone."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run, write_image_folder
from torch import nn

import prunekit
from prunekit.errors import CheckpointError, ConfigError, ModelError
from prunekit.models.spec import build, load_weights

NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, in_channels=1, num_classes=2):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.body(x))
            return self.fc(x.mean((2, 3)))


    def make_net(num_classes=2):
        return Net(num_classes=num_classes)


    def make_plain():
        return Net()


    def broken():
        raise RuntimeError("the GPU is on fire")


    def not_a_model():
        return 42
''')





class Evil:  # pickled by reference: a weights_only load must refuse it
    pass


@pytest.fixture()
def net_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynet" / "net.py"
    path.parent.mkdir()
    path.write_text(NET)
    return path


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> str:
    root = write_image_folder(tmp_path_factory.mktemp("imgs"), {"train": 8, "test": 2})
    return f"folder:{root}"


def _weights(net_file: Path, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build(f"{net_file}:make_net")
    with torch.no_grad():  # non-trivial BN statistics, so a wrong rebuild shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------

def test_build_zoo_and_bare_name():
    assert build("zoo:resnet20", num_classes=3).prunekit_arch["num_classes"] == 3
    assert build("simplecnn").prunekit_arch["name"] == "simplecnn"
    with pytest.raises(ModelError, match="unknown model"):
        build("zoo:nope")


def test_build_factory_passes_num_classes_only_when_accepted(net_file):
    assert build(f"{net_file}:make_net", num_classes=5).fc.out_features == 5
    assert build(f"{net_file}:make_plain", num_classes=5).fc.out_features == 2
    model = build(f"{net_file}:make_net")
    assert model.prunekit_spec["spec"] == f"{net_file.resolve()}:make_net"


def test_build_module_factory(net_file, monkeypatch):
    monkeypatch.syspath_prepend(str(net_file.parent))
    assert isinstance(build("net:make_net"), nn.Module)
    with pytest.raises(ConfigError, match="not found"):
        build("no_such_module_xyz:make_net")


def test_build_errors(net_file, tmp_path):
    with pytest.raises(ConfigError, match="model file not found"):
        build(f"{tmp_path / 'missing.py'}:make_net")
    with pytest.raises(ConfigError, match="has no 'nope'"):
        build(f"{net_file}:nope")
    with pytest.raises(ModelError, match="RuntimeError: the GPU is on fire"):
        build(f"{net_file}:broken")
    with pytest.raises(ModelError, match="returned a value of type int"):
        build(f"{net_file}:not_a_model")


@pytest.mark.parametrize("spec,package", [("torchvision:resnet18", "torchvision"),
                                          ("timm:resnet18", "timm"), ("hf:resnet", "transformers")])
def test_library_spec_without_its_package_names_it_and_the_vision_env(monkeypatch, spec, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=f"needs the '{package}' package.*make test-vision"):
        build(spec)


def test_unknown_library_model_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="unknown hf model 'convnxt'; did you mean hf:convnext"):
        build("hf:convnxt")
    with pytest.raises(ConfigError, match="unknown hf model 'bert'"):  # not an image classifier
        build("hf:bert")
    with pytest.raises(ConfigError, match="expected hf:NAME"):
        build("hf:")
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        build("hf:resnet", num_classes=0)


def test_output_adapter_returns_the_logits():
    from prunekit.models import OutputAdapter, logits_of

    t = torch.ones(2, 3)
    assert logits_of(t) is t
    assert logits_of({"loss": None, "logits": t}) is t
    assert logits_of((t, torch.zeros(1))) is t
    with pytest.raises(ModelError, match="holding no tensor"):
        logits_of({"a": 1})

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"features": x, "logits": self.fc(x)}

    inner = DictNet()
    x = torch.randn(2, 4)
    wrapped = OutputAdapter(inner)
    assert torch.equal(wrapped(x), inner(x)["logits"])
    assert set(wrapped.state_dict()) == {"model.fc.weight", "model.fc.bias"}


# Hugging Face vision models built from their config class (no download): small configs keep
# the default suite fast; the full-size ones run in tests_vision/ and bench/compat.py.
TINY_HF = {
    "resnet": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
    "convnext": dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
}


@pytest.mark.parametrize("model_type", sorted(TINY_HF))
def test_hf_model_prunes_and_reloads_from_the_path_alone(tmp_path, model_type):
    torch.manual_seed(0)
    model = build(f"hf:{model_type}", num_classes=3, **TINY_HF[model_type]).eval()
    assert type(model.model).__name__ == {"resnet": "ResNetForImageClassification",
                                          "convnext": "ConvNextForImageClassification"}[model_type]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3)
    with torch.no_grad():  # the adapter returns the library model's own logits
        assert torch.equal(y, model.model(pixel_values=x).logits)
    res = prunekit.prune(model, x[:1], method="l1", ratio=0.3)
    assert res.report["macs_after"] < res.report["macs_before"]
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert widths != [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    path = tmp_path / "p.pt"
    prunekit.save(res.model, path)
    loaded, meta = prunekit.load(path)  # a library spec: no trust_code needed, no code from the file
    assert meta["model_spec"] == {"spec": f"hf:{model_type}", "num_classes": 3,
                                  "kwargs": TINY_HF[model_type], "output_adapter": True}
    res.model.eval()
    with torch.no_grad():
        out = loaded(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        assert torch.allclose(out, res.model(x), atol=1e-5)


def test_safetensors_weights_of_the_library_model_load_into_its_adapter(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    a = build("hf:resnet", num_classes=2, **TINY_HF["resnet"]).eval()
    path = tmp_path / "w.safetensors"
    # what a Hugging Face user has: the library model's own state dict (no "model." prefix)
    safetensors_torch.save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, path)
    torch.manual_seed(1)
    b = load_weights(build("hf:resnet", num_classes=2, **TINY_HF["resnet"]), path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(b, bad)


def test_load_weights_errors(net_file, tmp_path):
    model = build(f"{net_file}:make_net")
    with pytest.raises(CheckpointError, match="weights not found"):
        load_weights(model, tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(model, bad)
    evil = tmp_path / "evil.pt"
    torch.save(Evil(), evil)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_weights(model, evil)


def test_prune_factory_model_through_the_api_and_load_from_file_alone(net_file, tmp_path):
    model = load_weights(build(f"{net_file}:make_net"), _weights(net_file, tmp_path)).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    res = prunekit.prune(model, x[:1], method="l1", ratio=0.5)
    assert res.report["params_after"] < res.report["params_before"]
    out = tmp_path / "p.pt"
    prunekit.save(res.model, out)
    with pytest.raises(CheckpointError, match="trust_code=True"):
        prunekit.load(out)  # the file names code: never run without the caller's consent
    loaded, meta = prunekit.load(out, trust_code=True)
    assert meta["model_spec"]["spec"].endswith("net.py:make_net")
    res.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), res.model(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------

def test_cli_prune_own_model_then_load_alone(capsys, net_file, tmp_path, folder_data):
    weights = _weights(net_file, tmp_path)
    out = tmp_path / "o.pt"
    code, stdout, err = run(capsys, "prune", "--model", f"{net_file}:make_net", "--weights", weights,
                            "--input-shape", "1,8,8", "--data", folder_data, "--method", "l1",
                            "--ratio", "0.5", "--out", out, "--device", "cpu")
    assert code == 0, err
    assert f"saved {out}" in stdout
    code, stdout, err = run(capsys, "eval", out, "--data", folder_data)
    assert code == 2 and "--trust-code" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run(capsys, "eval", out, "--data", folder_data, "--trust-code")
    assert code == 0, err
    loaded, meta = prunekit.load(out, trust_code=True)
    assert meta["model_spec"]["spec"] == f"{net_file.resolve()}:make_net"
    assert meta["input_shape"] == [1, 8, 8]
    original = load_weights(build(f"{net_file}:make_net"), weights).eval()
    assert loaded.body[0].out_channels < original.body[0].out_channels
    # the same pruning through the API gives the same model
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    res = prunekit.prune(original, torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                         method="l1", ratio=0.5)
    res.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), res.model(x), atol=1e-5)
    # the pruned file is used like any checkpoint
    code, stdout, err = run(capsys, "eval", out, "--device", "cpu", "--json", "--trust-code")
    assert code == 0, err
    code, stdout, err = run(capsys, "profile", "--model", f"{net_file}:make_net", "--input-shape",
                            "1,8,8", "--batch-sizes", "1", "--max-seconds", "0.01", "--json")
    assert code == 0, err


def test_cli_eval_own_model(capsys, net_file, tmp_path, folder_data):
    code, stdout, err = run(capsys, "eval", "--model", f"{net_file}:make_net", "--weights",
                            _weights(net_file, tmp_path), "--input-shape", "1,8,8",
                            "--data", folder_data, "--device", "cpu")
    assert code == 0, err
    assert "test accuracy" in stdout


@pytest.mark.parametrize("case", ["raises", "missing_file", "missing_function", "not_a_model",
                                  "weights_do_not_fit", "weights_with_code", "both", "neither",
                                  "no_input_shape"])
def test_cli_bad_own_model(capsys, net_file, tmp_path, folder_data, case):
    spec, weights = f"{net_file}:make_net", None
    if case == "raises":
        spec = f"{net_file}:broken"
    elif case == "missing_file":
        spec = f"{tmp_path / 'nope.py'}:make_net"
    elif case == "missing_function":
        spec = f"{net_file}:make_nett"
    elif case == "not_a_model":
        spec = f"{net_file}:not_a_model"
    elif case == "weights_do_not_fit":
        weights = tmp_path / "w.pt"
        torch.save({"fc.weight": torch.zeros(3, 3)}, weights)
    elif case == "weights_with_code":
        weights = tmp_path / "w.pt"
        torch.save(Evil(), weights)
    out = tmp_path / "o.pt"
    argv = ["prune", "--model", spec, "--data", folder_data, "--method", "l1", "--ratio", "0.5",
            "--out", out, "--device", "cpu"]
    if case != "no_input_shape":
        argv += ["--input-shape", "1,8,8"]
    if weights is not None:
        argv += ["--weights", weights]
    if case == "both":
        ckpt = tmp_path / "c.pt"
        prunekit.save(build("simplecnn", in_channels=1), ckpt)
        argv.insert(1, ckpt)
    if case == "neither":
        argv.remove("--model")
        argv.remove(spec)
    code, stdout, err = run(capsys, *argv)
    assert_one_line_error(code, stdout, err)
    assert not out.exists()
    if case == "raises":
        assert "the GPU is on fire" in err
    if case == "weights_with_code":
        assert "refused" in err


def _write_rgb_folder(root: Path, per_class: int, size: tuple[int, int] = (96, 64)) -> Path:
    """Colour PNGs of another size and aspect ratio than the model's input: classes "red" and
    "blue", ``per_class`` images each (every fifth goes to the test split)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, cls in enumerate(("blue", "red")):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size[1], size[0], 3))
            pixels[..., 2 if label == 0 else 0] += 150
            Image.fromarray(pixels.astype(np.uint8), mode="RGB").save(d / f"{i}.png")
    return root


def test_cli_hf_model_on_an_image_folder_at_224(capsys, tmp_path):
    """prune -> eval -> export of a library model (hf:mobilenet_v2, full size) on colour images
    read at 3x224x224; the pruned file rebuilds from its path alone (no --trust-code)."""
    data = f"folder:{_write_rgb_folder(tmp_path / 'imgs', 5)}"
    out = tmp_path / "o.pt"
    code, stdout, err = run(capsys, "prune", "--model", "hf:mobilenet_v2", "--num-classes", "2",
                            "--input-shape", "3,224,224", "--data", data, "--method", "l1",
                            "--ratio", "0.3", "--out", out, "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert 0 < report["macs_fraction"] < 1 and report["macs_after"] < report["macs_before"]
    loaded, meta = prunekit.load(out)
    assert meta["input_shape"] == [3, 224, 224]
    assert meta["model_spec"]["spec"] == "hf:mobilenet_v2" and meta["model_spec"]["num_classes"] == 2
    with torch.no_grad():
        y = loaded(torch.randn(2, 3, 224, 224))
    assert y.shape == (2, 2) and torch.isfinite(y).all()
    code, stdout, err = run(capsys, "eval", out, "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["samples"] == 2 and result["data"] == data
    assert result["test_acc"] == pytest.approx(report["acc_final"])
    onnx_path = tmp_path / "o.onnx"
    code, stdout, err = run(capsys, "export", out, "--onnx", onnx_path, "--json")
    assert code == 0, err
    assert onnx_path.is_file() and json.loads(stdout)["max_abs_diff"] < 1e-3


@pytest.mark.parametrize("argv,match", [
    (["profile", "--model", "hf:mobilenetv2", "--input-shape", "3,32,32"], "did you mean hf:mobilenet_v2"),
    (["export", "--model", "hf:resnet", "--onnx", "{tmp}/o.onnx"], "--input-shape"),
    (["profile", "{ckpt}", "--num-classes", "3"], "--num-classes applies to --model"),
    (["compare", "--model", "hf:resnet", "--methods", "l1", "--ratio", "0.3", "--report", "{tmp}/r"],
     "--input-shape"),
    (["train", "--model", "resnet8", "--weights", "{tmp}/w.pt", "--data", "fashion-mnist",
      "--out", "{tmp}/o.pt"], "--weights applies to a --model spec"),
    (["compare", "--model", "simplecnn", "--input-shape", "3,32,32", "--methods", "l1", "--ratio",
      "0.3", "--report", "{tmp}/r"], "--model needs --data"),
    (["eval", "--model", "simplecnn", "--input-shape", "3,32,32"], "--model needs --data"),
    (["eval", "{ckpt}"], "does not record its dataset"),
])
def test_cli_library_spec_errors(capsys, tmp_path, argv, match):
    ckpt = tmp_path / "c.pt"
    prunekit.save(build("simplecnn", in_channels=1), ckpt)
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    code, stdout, err = run(capsys, *argv)
    assert_one_line_error(code, stdout, err, match)
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.pt").exists()


def test_every_command_takes_the_model_options():
    import typer

    from prunekit import cli

    commands = typer.main.get_command(cli.app).commands
    for name in ("train", "eval", "profile", "export", "prune", "compare"):
        flags = {o for p in commands[name].params for o in p.opts}
        assert {"--model", "--weights", "--input-shape", "--num-classes"} <= flags, name


def test_cli_train_fine_tunes_a_factory_model_from_its_weights(capsys, net_file, tmp_path, folder_data):
    weights = _weights(net_file, tmp_path)
    out = tmp_path / "t.pt"
    code, stdout, err = run(capsys, "train", "--model", f"{net_file}:make_net", "--weights", weights,
                            "--num-classes", "2", "--input-shape", "1,8,8", "--data", folder_data,
                            "--epochs", "1", "--lr", "0", "--out", out, "--device", "cpu", "--json")
    assert code == 0, err
    loaded, meta = prunekit.load(out, trust_code=True)
    assert meta["model_spec"]["spec"] == f"{net_file.resolve()}:make_net"
    assert meta["input_shape"] == [1, 8, 8]
    # lr 0: the trained weights are the given ones (BatchNorm statistics aside)
    original = load_weights(build(f"{net_file}:make_net"), weights)
    for (k, a), b in zip(original.state_dict().items(), loaded.state_dict().values(), strict=True):
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(a, b), k


def test_cli_compare_own_model(capsys, net_file, tmp_path, folder_data):
    report = tmp_path / "r"
    code, stdout, err = run(capsys, "compare", "--model", f"{net_file}:make_net", "--weights",
                            _weights(net_file, tmp_path), "--input-shape", "1,8,8", "--data", folder_data,
                            "--methods", "l1", "--ratio", "0.5", "--report", report, "--no-onnx",
                            "--latency-seconds", "0.01", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert [m["method"] for m in result["methods"]] == ["l1"]
    assert (report / "report.md").is_file()
