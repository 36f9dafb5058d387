"""MACs/params counting, latency timing and the profile report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit import models
from prunekit.errors import ConfigError
from prunekit.measure import LAYOUTS, compare_latency, count, latency, profile
from prunekit.measure.deploy import fold_batchnorm
from prunekit.testing import randomise_bn

# one thread: on a busy 2-core machine two OpenMP threads stall each other, and timings explode
QUICK = {"warmup": 1, "min_repeats": 3, "max_seconds": 0.05, "threads": 1}




class TinyNet(nn.Module):
    """conv(bias) -> BN -> ReLU -> maxpool -> depthwise conv(no bias) -> F.relu -> avgpool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # with bias
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.dw(x))  # functional: not counted
        return self.fc(torch.flatten(self.gap(x), 1))


def hand_count_tiny(h: int = 16, w: int = 16) -> tuple[int, int]:
    """MACs per image in torch-pruning's convention, written out layer by layer."""
    conv1 = 8 * 3 * 3 * 3 * h * w           # Cout * Cin/groups * kh * kw * Hout * Wout
    conv1_bias = 8 * h * w                  # tp adds Cout * Hout * Wout for a conv bias
    bn1 = 2 * 8 * h * w                     # affine BN: 2 ops per input element
    relu = 8 * h * w                        # ReLU module: 1 op per output element
    maxpool = 8 * h * w                     # pooling module: 1 op per *input* element
    h2, w2 = h // 2, w // 2
    dw = 8 * (8 // 8) * 3 * 3 * h2 * w2     # depthwise: Cin/groups = 1
    functional_relu = 0                     # torch.relu is not a module: not counted
    gap = 8 * h2 * w2                       # adaptive avg pool: input elements
    fc = 8 * 5 + 5                          # in * out + bias (per sample)
    macs = conv1 + conv1_bias + bn1 + relu + maxpool + dw + functional_relu + gap + fc
    params = (8 * 3 * 9 + 8) + (8 + 8) + (8 * 9) + (8 * 5 + 5)
    return macs, params


def test_count_matches_hand_count() -> None:
    net = TinyNet()
    assert count(net, torch.randn(1, 3, 16, 16)) == hand_count_tiny()


def test_count_is_per_image_and_leaves_model_alone() -> None:
    net = TinyNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert count(net, torch.randn(7, 3, 16, 16)) == hand_count_tiny()
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_count_plain_conv_linear() -> None:
    hout, wout = (10 - 3) // 2 + 1, (11 - 5) // 2 + 1  # 4 x 4
    net = nn.Sequential(nn.Conv2d(4, 6, (3, 5), stride=2, bias=False), nn.Flatten(),
                        nn.Linear(6 * hout * wout, 2, bias=False))
    macs = 6 * 4 * 3 * 5 * hout * wout + (6 * hout * wout) * 2
    params = 6 * 4 * 3 * 5 + (6 * hout * wout) * 2
    assert count(net, torch.randn(1, 4, 10, 11)) == (macs, params)


def test_count_rejects_non_module() -> None:
    with pytest.raises(ConfigError):
        count("resnet", torch.randn(1, 3, 8, 8))  # type: ignore[arg-type]


def test_latency_dict_and_model_untouched() -> None:
    net = TinyNet().train()
    before_threads = torch.get_num_threads()
    x = torch.randn(2, 3, 16, 16)
    r = latency(net, x, 5, **QUICK)
    assert {"median_ms", "p90_ms", "throughput_per_s", "repeats"} <= set(r)
    assert r["batch_size"] == 5 and r["layout"] == "nchw"
    assert r["repeats"] >= 3
    assert 0 < r["median_ms"] <= r["p90_ms"]
    assert r["throughput_per_s"] == pytest.approx(5 / (r["median_ms"] / 1e3))
    assert net.training  # the caller's mode is kept
    cl = latency(net, x[0], 3, channels_last=True, threads=1, repeats=4, warmup=0)
    assert torch.get_num_threads() == before_threads
    assert cl["layout"] == "channels_last" and cl["repeats"] == 4 and cl["threads"] == 1
    assert net.conv1.weight.is_contiguous()  # memory format of the caller's model untouched


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"batch_size": 2, "repeats": 0},
                                 {"batch_size": 2, "threads": 0}])
def test_latency_rejects_bad_options(bad: dict) -> None:
    b = bad.pop("batch_size")
    with pytest.raises(ConfigError):
        latency(TinyNet(), torch.randn(1, 3, 8, 8), b, **bad)


def test_compare_latency_ratio() -> None:
    big, small = TinyNet(), nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1))
    r = compare_latency(big, small, torch.randn(1, 3, 16, 16), 4, "channels_last", **QUICK)
    assert r["layout"] == "channels_last" and r["repeats"] >= 3
    assert r["ratio"] == pytest.approx(r["median_ms_b"] / r["median_ms_a"])
    with pytest.raises(ConfigError):
        compare_latency(big, small, torch.randn(1, 3, 8, 8), 2, "nhwc")


def test_profile_structure(tmp_path) -> None:
    net = TinyNet()
    report = profile(net, torch.randn(1, 3, 16, 16), batch_sizes=(1, 4), **QUICK)
    assert (report["macs"], report["params"]) == hand_count_tiny()
    assert report["input_shape"] == [3, 16, 16]
    assert set(report["latency"]) == {"b1", "b4"}
    for per in report["latency"].values():
        assert set(per) == {"nchw", "channels_last", "deploy", "best"}
        assert per["best"] == min(LAYOUTS, key=lambda k: per[k]["median_ms"])
        for layout in LAYOUTS:
            assert {"median_ms", "p90_ms", "throughput_per_s"} <= set(per[layout])
    assert report["file_size_bytes"] > 0 and "onnx" not in report
    ckpt = tmp_path / "some.bin"
    ckpt.write_bytes(b"x" * 1234)
    r2 = profile(net, torch.randn(3, 16, 16), batch_sizes=(2,), layouts=("nchw",),
                 checkpoint_path=ckpt, **QUICK)
    assert r2["file_size_bytes"] == 1234 and set(r2["latency"]["b2"]) == {"nchw", "best"}


def test_profile_onnx() -> None:
    report = profile(TinyNet(), torch.randn(1, 3, 16, 16), batch_sizes=(1, 3), onnx=True,
                     layouts=("nchw",), **QUICK)
    onnx = report["onnx"]
    assert onnx["max_abs_diff"] <= 1e-4
    assert set(onnx["latency"]) == {"b1", "b3"}
    assert onnx["latency"]["b3"]["median_ms"] > 0


@pytest.mark.parametrize("kwargs", [{"batch_sizes": ()}, {"batch_sizes": (0,)},
                                    {"layouts": ("nhwc",)}])
def test_profile_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        profile(TinyNet(), torch.randn(1, 3, 8, 8), **kwargs)


def test_profile_zoo_resnet20_is_quick() -> None:
    net = models.create("resnet20", num_classes=10, in_channels=3)
    report = profile(net, torch.randn(1, 3, 32, 32), batch_sizes=(1,), layouts=("nchw",), **QUICK)
    # ResNet-20 for CIFAR: about 41 M MACs and 0.27 M parameters.
    assert 39e6 < report["macs"] < 43e6
    assert 0.26e6 < report["params"] < 0.28e6


# ----------------------------------------------------------------------------- deploy: BN folding
def _fuse_by_hand(conv: nn.Conv2d, bn: nn.BatchNorm2d, eps: bool = True, shift: bool = True) -> nn.Conv2d:
    """conv -> BN folded into one conv: ``w' = w * g / sqrt(var + eps)``,
    ``b' = (b - mean) * g / sqrt(var + eps) + beta``; ``eps=False`` / ``shift=False`` write the
    two classic mistakes (no epsilon, no BN shift beta)."""
    fused = copy.deepcopy(conv)
    scale = bn.weight / torch.sqrt(bn.running_var + (bn.eps if eps else 0.0))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight = nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).detach())
    fused.bias = nn.Parameter(((bias - bn.running_mean) * scale + (bn.bias if shift else 0.0)).detach())
    return fused


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


FOLD_TOL = 1e-10  # float64: any real mistake is orders of magnitude larger


def _fold_case(arch: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = randomise_bn(models.create(arch, num_classes=10, in_channels=3)).double().eval()
    for i, m in enumerate(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        m.eps = (1e-5, 1e-3, 0.1)[i % 3]       # the module's own eps must be used
    return net, torch.randn(2, 3, 16, 16, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["resnet20", "densenet40", "mobilenetv2"])
def test_fold_batchnorm_is_exact_and_removes_conv_bn_pairs(arch: str) -> None:
    net, x = _fold_case(arch)
    folded = fold_batchnorm(net)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    left = [n for n in folded.graph.nodes
            if n.op == "call_module" and isinstance(folded.get_submodule(n.target), nn.BatchNorm2d)]
    if arch == "densenet40":  # pre-activation: every BN reads a concatenation (or a conv output
        assert len(left) == len(bns)  # that a concatenation reads too): nothing may fold
    else:
        assert not left and bns
    with torch.no_grad():
        assert _rel_err(folded(x), net(x)) <= FOLD_TOL
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2"])
@pytest.mark.parametrize("mistake", [{}, {"eps": False}, {"shift": False}])
def test_fold_comparison_rejects_a_wrong_fold(arch: str, mistake: dict, monkeypatch) -> None:
    """The comparison above is sharp enough: the fold written by hand passes it, the same fold
    without the epsilon or without the BN shift fails it (the epsilon alone changes the output
    by about 1e-5 relative: a 1e-4 tolerance would have let it through)."""
    import prunekit.measure.deploy as deploy

    net, x = _fold_case(arch)
    monkeypatch.setattr(deploy, "fuse_conv_bn_eval", lambda c, b: _fuse_by_hand(c, b, **mistake))
    with torch.no_grad():
        err = _rel_err(deploy.fold_batchnorm(net)(x), net(x))
    if mistake:
        assert err > 1e3 * FOLD_TOL, err
    else:
        assert err <= FOLD_TOL


def test_fold_batchnorm_leaves_shared_and_untraceable_models_alone() -> None:
    class Shared(nn.Module):  # one conv called twice: folding one BN would change the other call
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x))

    class Branchy(TinyNet):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 2
            return super().forward(x)

    shared = randomise_bn(Shared()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(shared)(x), shared(x))
    with pytest.warns(RuntimeWarning, match="cannot be traced"):
        plain = fold_batchnorm(Branchy())
    assert not isinstance(plain, torch.fx.GraphModule)
