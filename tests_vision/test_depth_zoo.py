"""Residual branches removed whole (``engine/depth.py``) on library models: which branches can
vanish, and that removing them is exact (the last layer of each branch reading zeros), the
MACs fall by what PyTorch's own counter sees, and the result reloads."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import close, flops
from torch import nn

import prunekit
from prunekit.engine import GroupPlan, PruningPlan, analyse, apply_plan
from prunekit.engine.depth import BranchConstant, vanishable
from prunekit.models import build

# model spec -> (number of branches that can vanish, the layer each branch ends in)
CASES = {
    "torchvision:resnet18": (8, "conv2"),           # basic blocks: conv1's group, ends in conv2
    "torchvision:resnet50": (16, "conv3"),          # bottlenecks: conv1 -> conv2 chain
    "torchvision:mobilenet_v2": (10, "conv.2"),     # expansions of the blocks with a shortcut
    "timm:convnext_atto": (12, "mlp.fc2"),          # channel-last MLP, layer scale after it
}


def _last_layer(model: nn.Module, group: str, suffix: str) -> str:
    """The name of the branch's last layer: ``suffix`` within the block of ``group``."""
    names = [n for n, _ in model.named_modules()]
    block = group
    while block and not any(n == f"{block}.{suffix}" for n in names):
        block = block.rpartition(".")[0]
    return f"{block}.{suffix}"


@pytest.mark.parametrize("spec", list(CASES))
def test_library_branches_vanish_exactly(spec, tmp_path, seeded):
    count, suffix = CASES[spec]
    model = build(spec, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    info = analyse(model, x[:1])
    names = vanishable(info)
    assert len(names) == count, names
    sizes = {g.name: g.size for g in info.groups}
    drop = names[::3]
    pruned = apply_plan(model, x[:1], PruningPlan([GroupPlan(n, sizes[n], []) for n in drop]))
    ref = copy.deepcopy(model)
    for n in drop:
        last = _last_layer(ref, n, suffix)
        ref.get_submodule(last).weight.data.zero_()
        assert isinstance(pruned.get_submodule(last), BranchConstant), last
    with torch.no_grad():
        assert close(pruned(x), ref(x))
    assert flops(pruned, x[:1]) < flops(ref, x[:1])
    prunekit.save(pruned, tmp_path / "p.pt")
    back, _ = prunekit.load(tmp_path / "p.pt")
    with torch.no_grad():
        assert close(back(x), pruned(x))
