"""A timm sample across families and the Hugging Face conv classifiers at full size, l1 at 0.3."""

from __future__ import annotations

import pytest
import torch
from conftest import prune_and_check

import prunekit
from prunekit.models import build

TIMM = ["resnet18", "seresnet18", "resnext50_32x4d", "res2net50_14w_8s", "regnetx_002", "regnety_002",
        "efficientnet_lite0", "mobilenetv3_large_100", "convnext_atto", "ghostnet_100", "repvgg_a0",
        "dla34", "dpn68", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]
# refused cleanly when these tests were written (channel splits, attention); ghostnet_100 must
# prune (a conv channel and its depthwise copy are tied into one trunk unit)
MAY_REFUSE = {"res2net50_14w_8s", "dpn68", "deit_tiny_patch16_224",
              "swin_tiny_patch4_window7_224"}


def test_timm_poolformer_refuses_cleanly_naming_the_layer_scale(tmp_path, seeded):
    """PoolFormer's layer scale keeps its own ``shape`` tuple for a ``view``: the pruned model
    would not run, so prune refuses in one typed line naming that module."""
    from prunekit.errors import ModelError

    model = build("timm:poolformer_s12", num_classes=10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ModelError, match=r"does not run in 'stages\.0\.blocks\.0\.layer_scale1'"):
        prunekit.prune(model, x, method="l1", ratio=0.3, evaluate=False)
    assert prune_and_check(model, x, tmp_path, may_refuse=True) == "refused"


@pytest.mark.parametrize("name", TIMM)
def test_timm_model_prunes_or_refuses_cleanly(name, tmp_path, seeded):
    model = build(f"timm:{name}", num_classes=10)
    size = 224 if ("deit" in name or "swin" in name) else 64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert prune_and_check(model, x, tmp_path, may_refuse=name in MAY_REFUSE) in ("ok", "refused")


@pytest.mark.parametrize("model_type", ["resnet", "convnext", "regnet", "mobilenet_v2"])
def test_hf_model_at_full_size_prunes_and_reloads(model_type, tmp_path, seeded):
    model = build(f"hf:{model_type}", num_classes=10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert prune_and_check(model, x, tmp_path) == "ok"
