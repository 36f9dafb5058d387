"""The torchvision classification zoo, random weights, l1 at ratio 0.3 (data-free): every family,
every model up to ~30 s on the 2-core CI machine (bench/compat.py runs all 80).

A model the engine refuses today must refuse cleanly (a typed one-line PrunekitError); any
other model must prune, run, count fewer MACs and reload exactly from its file alone.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import prune_and_check

from prunekit.models import build

ALL = torchvision.models.list_models(module=torchvision.models)
# over ~150M parameters: several GB per copy, minutes per model on the CI's 2 cores
TOO_LARGE = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "convnext_large"}
# the larger members of families tested here through a smaller one: over ~30 s each on the
# 2-core machine (bench/compat.py runs every one of them, with times)
SLOW = {"efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
        "efficientnet_v2_m", "efficientnet_v2_l", "regnet_x_8gf", "regnet_x_16gf",
        "regnet_x_32gf", "regnet_y_8gf", "regnet_y_16gf", "regnet_y_32gf", "resnet152",
        "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "vgg11", "vgg13",
        "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "swin_s", "swin_b", "swin_v2_s",
        "swin_v2_b", "convnext_base", "densenet161", "densenet169", "densenet201"}
# refused by the engine when these tests were written (a clean typed refusal is accepted;
# success is better): attention blocks (window reshapes), channel shuffles
MAY_REFUSE = {"vit_b_16", "vit_b_32", "swin_t", "swin_v2_t", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
              "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "maxvit_t"}
FIXED_224 = ("vit", "swin", "maxvit")
TESTED = [n for n in ALL if n not in TOO_LARGE | SLOW]


def size_of(name: str) -> int:
    if name.startswith(FIXED_224):
        return 224
    return 96 if name == "inception_v3" else 64


def test_the_large_ones_are_the_ones_over_150m_parameters():
    """TOO_LARGE is not a convenient skip list: it is exactly the models above the cap."""
    big = set()
    for name in ALL:
        builder = torchvision.models.get_model_builder(name)
        weights = torchvision.models.get_model_weights(builder)
        params = max(w.meta["num_params"] for w in weights)
        if params > 150e6:
            big.add(name)
    assert big == TOO_LARGE


def test_every_family_is_tested_through_at_least_one_member():
    def family(name: str) -> str:
        return name.split("_")[0].rstrip("0123456789") if not name.startswith("wide") else "resnet"

    assert {family(n) for n in ALL} == {family(n) for n in TESTED}
    assert len(TESTED) >= 35


@pytest.mark.parametrize("name", TESTED)
def test_torchvision_model_prunes_or_refuses_cleanly(name, tmp_path, seeded):
    model = build(f"torchvision:{name}")
    size = size_of(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    status = prune_and_check(model, x, tmp_path, may_refuse=name in MAY_REFUSE)
    assert status in ("ok", "refused")


def test_maxvit_refusal_is_quick_and_lists_every_layer(seeded):
    """MaxViT's window / grid partitions make Torch-Pruning's index lists explode (10-16 s and
    millions of indices per attention group before the index budget): the refusal must name
    every attention layer in one message, quickly (8.7 s on the 2-core machine; the bound
    leaves room for a loaded CI)."""
    import time

    import prunekit

    model = build("torchvision:maxvit_t")
    t0 = time.perf_counter()
    with pytest.raises(prunekit.UnsupportedLayerError) as info:
        prunekit.prune(model, torch.randn(1, 3, 224, 224), method="l1", ratio=0.3, evaluate=False)
    elapsed = time.perf_counter() - t0
    qkv = {n for n, _ in model.named_modules() if n.endswith("to_qkv")}
    assert len(qkv) == 22  # window and grid attention of each of the 11 blocks
    refused = {r.layer for r in info.value.refused}
    assert qkv <= refused
    assert str(info.value).startswith(f"{len(refused)} unsupported layers")
    assert elapsed < 30, elapsed


def test_large_model_refusal_comes_from_the_weightless_twin(seeded, monkeypatch):
    """ViT-B/16 (86M parameters, over STRUCTURE_CHECK_PARAMS) is refused from its meta-device
    twin: the same refusals as the full analysis of the model's copy, every attention layer
    named, and no forward pass on the real weights."""
    import prunekit
    import prunekit.engine.graph as graph

    model, x = build("torchvision:vit_b_16"), torch.randn(1, 3, 224, 224)
    devices: list[str] = []
    hook = model.conv_proj.register_forward_pre_hook(
        lambda m, args: devices.append(args[0].device.type))

    def refused() -> set[str]:
        devices.clear()
        with pytest.raises(prunekit.UnsupportedLayerError) as info:
            prunekit.prune(model, x, method="l1", ratio=0.3, evaluate=False)
        return {r.layer for r in info.value.refused}

    try:
        twin = refused()
        assert devices == ["meta"]
        monkeypatch.setattr(graph, "STRUCTURE_CHECK_PARAMS", 10**12)
        full = refused()
        assert devices == ["cpu"]
    finally:
        hook.remove()
    attention = {f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(12)}
    assert twin == full and attention <= twin
