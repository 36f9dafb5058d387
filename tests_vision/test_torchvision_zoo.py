"""Every torchvision classification model, random weights, l1 at ratio 0.3 (data-free).

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
# over ~150M parameters: several GB per copy, minutes per model on the CI's 2 cores; their
# families are covered by the smaller members (bench/compat.py lists them too)
TOO_LARGE = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "convnext_large"}
# refused by the engine when these tests were written (a clean typed refusal is accepted;
# success is better): attention blocks and channel shuffles
MAY_REFUSE = {"vit_b_16", "vit_b_32", "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s",
              "swin_v2_b", "maxvit_t", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
              "shufflenet_v2_x2_0"}
FIXED_224 = ("vit", "swin", "maxvit")


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


@pytest.mark.parametrize("name", [n for n in ALL if n not in TOO_LARGE])
def test_torchvision_model_prunes_or_refuses_cleanly(name, tmp_path, seeded):
    model = build(f"torchvision:{name}")
    size = size_of(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    status = prune_and_check(model, x, tmp_path, may_refuse=name in MAY_REFUSE)
    assert status in ("ok", "refused")
