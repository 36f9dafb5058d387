"""Checkpoints (round trip, pruned widths, unsafe/corrupt files) and ONNX export."""

from __future__ import annotations

import os
import pickle

import onnxruntime as ort
import pytest
import torch
from torch import nn

import prunekit
from prunekit import models
from prunekit.errors import CheckpointError, ConfigError, PrunekitError
from prunekit.io import export_onnx, layer_shapes, load, read, save


class SmallNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12, eps=1e-3), nn.ReLU(),
        )
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(self.features(x)))
        return self.head(x.mean((2, 3)))


def trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-trivial BN statistics, so a round trip checks buffers too."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


def narrow_by_hand(net: SmallNet, keep: list[int]) -> SmallNet:
    """Remove filters of the first conv (and its BN, and the next conv's inputs) by hand."""
    idx = torch.tensor(keep)
    c1, bn1, c2 = net.features[0], net.features[1], net.features[3]
    new_c1 = nn.Conv2d(3, len(keep), 3, padding=1, bias=False)
    new_c1.weight.data = c1.weight.data[idx].clone()
    new_bn = nn.BatchNorm2d(len(keep))
    for name in ("weight", "bias"):
        getattr(new_bn, name).data = getattr(bn1, name).data[idx].clone()
    new_bn.running_mean = bn1.running_mean[idx].clone()
    new_bn.running_var = bn1.running_var[idx].clone()
    new_c2 = nn.Conv2d(len(keep), 12, 3, stride=2, padding=1)
    new_c2.weight.data = c2.weight.data[:, idx].clone()
    new_c2.bias.data = c2.bias.data.clone()
    net.features[0], net.features[1], net.features[3] = new_c1, new_bn, new_c2
    return net.eval()


X = torch.randn(2, 3, 12, 12)


def test_round_trip_identical_outputs(tmp_path) -> None:
    net = trained_like(SmallNet())
    path = tmp_path / "m.pt"
    save(net, path, meta={"data": "toy", "acc": 91.5, "input_shape": [3, 12, 12]}, plan={"a": [1]})
    model, meta = load(path, model=SmallNet())
    assert meta == {"data": "toy", "acc": 91.5, "input_shape": [3, 12, 12]}
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(X), net(X))
    raw = read(path)
    assert raw["format"] == "prunekit" and raw["version"] == 1 and raw["plan"] == {"a": [1]}
    assert raw["shapes"]["features.0"] == {"type": "Conv2d", "in_channels": 3, "out_channels": 8,
                                           "groups": 1, "bias": net.features[0].bias is not None}
    assert raw["shapes"]["head"] == {"type": "Linear", "in_features": 12, "out_features": 4,
                                     "bias": True}
    assert raw["shapes"]["features.4"] == {"type": "BatchNorm2d", "num_features": 12}


def test_pruned_model_rebuilt_from_unpruned_instance(tmp_path) -> None:
    net = narrow_by_hand(trained_like(SmallNet()), keep=[0, 2, 5])
    path = tmp_path / "pruned.pt"
    save(net, path)
    fresh = SmallNet()
    model, meta = load(path, model=fresh)
    assert meta == {}
    assert model is fresh  # the instance is narrowed in place
    conv, bn, nxt = model.features[0], model.features[1], model.features[3]
    assert (conv.out_channels, tuple(conv.weight.shape)) == (3, (3, 3, 3, 3))
    assert (bn.num_features, tuple(bn.running_var.shape)) == (3, (3,))
    assert (nxt.in_channels, tuple(nxt.weight.shape)) == (3, (12, 3, 3, 3))
    assert bn.eps == 1e-5 and model.features[4].eps == 1e-3 and nxt.stride == (2, 2)
    assert conv.bias is None and nxt.bias is not None
    with torch.no_grad():
        assert torch.equal(model(X), net(X))


def test_pruned_depthwise_and_linear(tmp_path) -> None:
    net = trained_like(SmallNet())
    # narrow the depthwise conv's group count and the head together (a hand-made "pruning")
    net.dw = nn.Conv2d(12, 12, 3, padding=1, groups=6)
    net.head = nn.Linear(12, 3)
    save(net.eval(), tmp_path / "dw.pt")
    model, _ = load(tmp_path / "dw.pt", model=SmallNet())
    assert model.dw.groups == 6 and model.head.out_features == 3
    with torch.no_grad():
        assert torch.equal(model(X), net(X))


def test_zoo_model_rebuilds_without_instance(tmp_path) -> None:
    net = trained_like(models.create("resnet8", num_classes=10, in_channels=1))
    save(net, tmp_path / "r8.pt", meta={"input_shape": [1, 28, 28]})
    model, meta = load(tmp_path / "r8.pt")
    assert model.prunekit_arch == net.prunekit_arch
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


def test_zoo_model_pruned_by_hand_rebuilds(tmp_path) -> None:
    net = trained_like(models.create("vgg16_bn", num_classes=10, in_channels=3))
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    bns = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # halve the first conv's filters, its BN and the second conv's inputs
    (n1, c1), (n2, c2), (nb, b1) = convs[0], convs[1], bns[0]
    keep = torch.arange(0, c1.out_channels, 2)
    new1 = nn.Conv2d(c1.in_channels, len(keep), 3, padding=1, bias=c1.bias is not None)
    new1.weight.data = c1.weight.data[keep].clone()
    if c1.bias is not None:
        new1.bias.data = c1.bias.data[keep].clone()
    newb = nn.BatchNorm2d(len(keep))
    newb.load_state_dict({k: (v[keep] if v.dim() else v) for k, v in b1.state_dict().items()})
    new2 = nn.Conv2d(len(keep), c2.out_channels, 3, padding=1, bias=c2.bias is not None)
    new2.weight.data = c2.weight.data[:, keep].clone()
    if c2.bias is not None:
        new2.bias.data = c2.bias.data.clone()
    for name, mod in ((n1, new1), (nb, newb), (n2, new2)):
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, mod)
    net.eval()
    save(net, tmp_path / "vgg.pt")
    model, _ = load(tmp_path / "vgg.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-6)


def test_no_arch_needs_instance(tmp_path) -> None:
    save(SmallNet(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="pass the unpruned model instance"):
        load(tmp_path / "m.pt")


def test_mismatched_instance(tmp_path) -> None:
    save(SmallNet(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="m.pt"):
        load(tmp_path / "m.pt", model=nn.Sequential(nn.Conv2d(3, 4, 1)))


def test_meta_must_be_json(tmp_path) -> None:
    with pytest.raises(ConfigError, match="meta"):
        save(SmallNet(), tmp_path / "m.pt", meta={"f": object()})
    with pytest.raises(ConfigError):
        save(SmallNet(), tmp_path / "nodir" / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_existing_file(tmp_path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"old")
    with pytest.raises(ConfigError):
        save(SmallNet(), path, meta={"x": {1, 2}})
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_missing_corrupt_truncated_foreign(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "absent.pt", model=SmallNet())
    with pytest.raises(CheckpointError, match="not a file"):
        load(tmp_path, model=SmallNet())
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load(tmp_path / "junk.pt", model=SmallNet())
    save(SmallNet(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load(tmp_path / "cut.pt", model=SmallNet())
    torch.save(SmallNet().state_dict(), tmp_path / "raw.pt")  # a plain state dict
    with pytest.raises(CheckpointError, match="not a prunekit checkpoint"):
        load(tmp_path / "raw.pt", model=SmallNet())
    torch.save({"format": "prunekit", "version": 99, "state_dict": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version"):
        load(tmp_path / "future.pt", model=SmallNet())


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_code_carrying_checkpoint_is_refused(tmp_path, writer: str) -> None:
    marker = tmp_path / "MARKER"
    payload = {"format": "prunekit", "version": 1, "state_dict": {}, "evil": _Payload(str(marker))}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load(path, model=SmallNet())
    assert not marker.exists()


def test_export_onnx_matches_pytorch(tmp_path) -> None:
    net = trained_like(SmallNet())
    info = export_onnx(net, X, tmp_path / "m.onnx")
    assert info["max_abs_diff"] <= 1e-4 and info["dynamic_batch"] and info["output_scale"] > 0
    assert info["file_size_bytes"] == (tmp_path / "m.onnx").stat().st_size
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 12, 12)
    out = sess.run(None, {sess.get_inputs()[0].name: x5.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), net(x5), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.slow
def test_export_onnx_dynamo_exporter(tmp_path, capsys) -> None:
    import onnxscript  # noqa: F401  (a dependency of prunekit: a missing one fails, never skips)

    net = trained_like(SmallNet())
    info = export_onnx(net, X[0], tmp_path / "d.onnx", exporter="dynamo", opset=18)
    assert info["exporter"] == "dynamo" and info["opset"] == 18 and info["max_abs_diff"] <= 1e-4
    assert capsys.readouterr().out == ""  # its progress messages do not reach stdout


def test_export_onnx_failure_leaves_existing_file(tmp_path) -> None:
    class Unexportable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(x.numpy() * 2)  # leaves the traced graph

    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(PrunekitError):
        export_onnx(Unexportable(), X, path, exporter="torchscript", atol=0.0)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    with pytest.raises(ConfigError):
        export_onnx(SmallNet(), X, path, exporter="tflite")


def test_layer_shapes_lists_prunable_layers() -> None:
    shapes = layer_shapes(SmallNet())
    assert set(shapes) == {"features.0", "features.1", "features.3", "features.4", "dw", "head"}


def test_engine_pruned_zoo_model_round_trip(tmp_path) -> None:
    net = trained_like(models.create("resnet8", num_classes=10, in_channels=3))
    x = torch.randn(2, 3, 32, 32)
    result = prunekit.prune(net, x, method="l1", ratio=0.4, evaluate=False)
    pruned = result.model.eval()
    plan = result.plan.to_dict() if hasattr(result.plan, "to_dict") else None
    prunekit.save(pruned, tmp_path / "p.pt", meta={"ratio": 0.4}, plan=plan)
    model, meta = prunekit.load(tmp_path / "p.pt")  # no instance: zoo + recorded widths
    assert meta == {"ratio": 0.4}
    assert layer_shapes(model) == layer_shapes(pruned) != layer_shapes(net)
    with torch.no_grad():
        assert torch.equal(model(x), pruned(x))


def test_a_bias_added_by_reconstruction_survives_save_and_load(tmp_path):
    """Least-squares reconstruction may give a bias to a conv built without one; the checkpoint
    records it and the rebuilt model gets it back."""
    torch.manual_seed(0)
    model = models.create("simplecnn", num_classes=10, in_channels=1, input_size=16).eval()
    conv = model.features[3] if isinstance(model.features[3], nn.Conv2d) else next(
        m for m in list(model.modules())[3:] if isinstance(m, nn.Conv2d))
    assert conv.bias is None
    conv.bias = nn.Parameter(torch.randn(conv.out_channels))
    path = tmp_path / "b.pt"
    prunekit.save(model, path)
    loaded, _ = prunekit.load(path)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
