"""Tests of the model zoo: registry, published parameter counts, shapes, traceability."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch_pruning as tp
from torch import nn

from prunekit.errors import ConfigError, ModelError
from prunekit.models import create, list_models, register
from prunekit.models import registry as _registry

ALL = ["resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet164",
       "vgg16_bn", "densenet40", "mobilenetv2", "simplecnn", "mlpcnn"]
DEEP = {"resnet110", "resnet164"}   # slow on CPU: one full-width forward each, below
FAST = [n for n in ALL if n not in DEEP]

# Published parameter counts (3x32x32 input, 10 classes, width 1.0). Each model must be
# within 2% of the reference.
PUBLISHED = {
    # He et al. (2016a), CVPR, Table 6 (option A shortcuts; our option-B projections add
    # 2,752 parameters, about 1% of ResNet-20).
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    # He et al. (2016b), ECCV, "Identity mappings in deep residual networks": ResNet-164 1.7M.
    "resnet164": 1.70e6,
    # CIFAR VGG-16-BN with a single Linear(512, 10) classifier: the figure usually quoted
    # for it is 14.73M (13 conv + 13 BN + one linear layer); Simonyan & Zisserman (2015)
    # configuration D without the 4096-wide FC layers.
    "vgg16_bn": 14.73e6,
    # Huang et al. (2017), CVPR, Table 2 prints "1.0M" for DenseNet (L=40, k=12); the
    # unrounded count of that configuration (stem 24, transitions keep the width, no
    # bottleneck) is 1.06M, which is what re-implementations report.
    "densenet40": 1.06e6,
    # Sandler et al. (2018) MobileNetV2 with 1280-wide last conv and a 10-class head:
    # 2.24M (the ImageNet model's 3.47M minus its 1000-class classifier, 1.28M).
    "mobilenetv2": 2.24e6,
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _extra(name: str, side: int) -> dict:
    return {"input_size": side} if name == "simplecnn" else {}


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# --------------------------------------------------------------------------- registry


def test_list_models_has_the_zoo():
    names = list_models()
    assert names == sorted(names)
    assert set(ALL) <= set(names)


def test_unknown_model_lists_available_names():
    with pytest.raises(ModelError) as info:
        create("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message
    for name in ("resnet20", "vgg16_bn", "densenet40", "mobilenetv2"):
        assert name in message


def test_name_is_case_insensitive_and_canonical():
    model = create(" ResNet8 ")
    assert model.prunekit_arch["name"] == "resnet8"


@pytest.mark.parametrize("kw", [
    {"num_classes": 0}, {"num_classes": -3}, {"num_classes": 2.5}, {"num_classes": True},
    {"in_channels": 0}, {"in_channels": "3"},
])
def test_bad_num_classes_or_in_channels(kw):
    with pytest.raises(ConfigError):
        create("resnet8", **kw)


@pytest.mark.parametrize("width", [0, -1.0, math.nan, math.inf, "1"])
def test_bad_width(width):
    with pytest.raises(ConfigError, match="width"):
        create("resnet8", width=width)


def test_bad_options():
    with pytest.raises(ConfigError, match="depth"):
        create("resnet8", depth=20)                      # unknown option, names it
    with pytest.raises(ConfigError, match="input_size"):
        create("simplecnn", input_size=2)
    with pytest.raises(ConfigError, match="input_size"):
        create("mlpcnn", input_size=28)                  # only simplecnn takes it
    with pytest.raises(ConfigError, match="JSON"):
        create("resnet8", width=torch.tensor(0.5))


def test_register_custom_model():
    @register("_test_tiny")
    def tiny(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, num_classes))

    try:
        assert "_test_tiny" in list_models()
        model = create("_test_tiny", num_classes=3, in_channels=2)
        assert model(torch.zeros(1, 2, 8, 8)).shape == (1, 3)
        with pytest.raises(ValueError, match="already registered"):
            register("_test_tiny")(tiny)
    finally:
        _registry._REGISTRY.pop("_test_tiny", None)


@pytest.mark.parametrize("name, kw", [
    ("resnet20", {}), ("resnet164", {"width": 0.25}), ("vgg16_bn", {"width": 0.25}),
    ("densenet40", {"width": 0.5}), ("mobilenetv2", {"width": 0.5}),
    ("simplecnn", {"input_size": 28}), ("mlpcnn", {"width": 2.0}),
])
def test_prunekit_arch_rebuilds(name, kw):
    model = create(name, num_classes=7, in_channels=1, **kw)
    arch = model.prunekit_arch
    assert arch == {"name": name, "num_classes": 7, "in_channels": 1, "kwargs": kw}
    arch = json.loads(json.dumps(arch))                   # survives a JSON round trip
    for again in (create(**arch),
                  create(arch["name"], arch["num_classes"], arch["in_channels"], **arch["kwargs"])):
        assert str(again) == str(model)
        assert {k: v.shape for k, v in again.state_dict().items()} == \
               {k: v.shape for k, v in model.state_dict().items()}
        assert again.prunekit_arch == model.prunekit_arch


# ------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    count = _count(create(name))
    reference = PUBLISHED[name]
    assert abs(count - reference) / reference < 0.02, f"{name}: {count:,} vs published {reference:,.0f}"


def test_resnet_option_b_shortcuts():
    model = create("resnet20")
    projections = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in projections] == \
           [(16, 32, (2, 2)), (32, 64, (2, 2))]


# -------------------------------------------------------------------- forward shapes


@pytest.mark.parametrize("name", FAST)
def test_forward_shapes(name):
    with torch.no_grad():
        model = create(name, **_extra(name, 32)).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        model = create(name, num_classes=7, in_channels=1, **_extra(name, 28)).eval()
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_deep_resnets_forward_once():
    with torch.no_grad():
        model = create("resnet110", num_classes=5, in_channels=1).eval()
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
        model = create("resnet164", num_classes=100).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", ["resnet20", "densenet40", "mobilenetv2", "mlpcnn"])
def test_width_multiplier(name):
    half = create(name, width=0.5)
    assert _first_conv(half).out_channels == _first_conv(create(name)).out_channels // 2
    tiny = create(name, in_channels=1, width=0.01).eval()      # every width clamps to 1
    assert _first_conv(tiny).out_channels == 1
    with torch.no_grad():
        assert tiny(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_simplecnn_flattens_without_pooling():
    model = create("simplecnn", in_channels=1, input_size=28)
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) for m in model.modules())
    assert model.classifier.in_features == 64 * 7 * 7
    assert create("simplecnn").classifier.in_features == 64 * 8 * 8


def test_standard_init():
    model = create("resnet8")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = model.layer3[0].conv2                                 # 64 -> 64, 3x3
    expected_std = math.sqrt(2.0 / (conv.out_channels * 9))      # Kaiming normal, fan_out
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


def test_no_inplace_activations():
    # Inplace activations break full backward hooks and activation-capturing hooks.
    for name in FAST:
        for m in create(name, width=0.25).modules():
            assert not getattr(m, "inplace", False), f"{name}: {m}"


# ------------------------------------------------------- torch-pruning traceability


@pytest.mark.parametrize("name", ALL)
def test_torch_pruning_traces_and_prunes(name):
    width = 0.25 if name in DEEP else 0.5
    model = create(name, width=width).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    conv = _first_conv(model)
    before = conv.out_channels
    idxs = list(range(0, before, 2))
    graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs).prune()
    assert conv.out_channels == before - len(idxs)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def _prune_zeroed_filters(model: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> None:
    """Zero half of ``conv``'s filters, prune them, and check the output does not change.

    With fresh BatchNorm statistics (mean 0, var 1, bias 0) in eval mode a zero filter
    stays zero through BN-ReLU, so removing it, and the matching input channels of every
    consumer, must leave the logits unchanged if the dependency tracing was right.
    """
    model.eval()
    idxs = list(range(0, conv.out_channels, 2))
    with torch.no_grad():
        conv.weight[idxs] = 0
        reference = model(x)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs).prune()
    with torch.no_grad():
        out = model(x)
    scale = reference.abs().max().item()
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_flatten_linear_pruning_is_exact():
    model = create("simplecnn", in_channels=1, input_size=28)
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    _prune_zeroed_filters(model, last_conv, torch.randn(2, 1, 28, 28))
    assert model.classifier.in_features == 32 * 7 * 7


@pytest.mark.parametrize("where", ["stem", "block1", "transition"])
def test_densenet_concat_pruning_is_exact(where):
    model = create("densenet40", width=0.5)
    conv = {"stem": model.conv1, "block1": model.block1[4].conv, "transition": model.trans1[2]}[where]
    _prune_zeroed_filters(model, conv, torch.randn(2, 3, 32, 32))
