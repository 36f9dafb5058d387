"""Bring your own model: model specs (prunekit.models.spec), --model/--weights on the CLI, and
checkpoints that rebuild a factory model from the file alone."""

from __future__ import annotations

import textwrap
from pathlib import Path

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


def test_package_specs_are_recognised():
    for spec in ("torchvision:resnet18", "timm:resnet18", "hf:bert"):
        with pytest.raises(ConfigError, match="package|not supported yet"):
            build(spec)


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
