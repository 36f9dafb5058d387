"""Helpers for the model-zoo coverage tests (``make test-vision``, in .venv-vision).

These tests need torchvision, timm and transformers; the default suite (``make test``) does not
collect this directory (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PrunekitError

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

RATIO = 0.3
TOL = 1e-5


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward counted by PyTorch's own FlopCounterMode (convolutions and matrix
    products): an independent check of the MACs prunekit reports (it counts with Torch-Pruning)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to 1e-5 relative to the output's scale (random-weight logits reach 1e3 and more)."""
    return a.shape == b.shape and float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def prune_and_check(model: nn.Module, x: torch.Tensor, tmp_path, method: str = "l1",
                    may_refuse: bool = False, **kw) -> str:
    """Prune ``model`` at ratio 0.3 and check everything a user relies on; returns ``"ok"``, or
    ``"refused"`` when ``may_refuse`` and the engine refused with a typed one-line error.

    Checks: output of the same shape and finite; MACs reported lower, and PyTorch's own FLOP
    count of the pruned model lower than the original's; ``prunekit.save`` ->
    ``prunekit.load(path)`` (the file alone) gives the same outputs (1e-5).
    """
    model.eval()
    with torch.no_grad():
        reference = model(x)
    try:
        res = prunekit.prune(model, x[:1], method=method, ratio=RATIO, **kw)
    except PrunekitError as e:
        if not may_refuse:
            raise
        message = str(e)
        assert message.strip() and "\n" not in message.strip(), message
        return "refused"
    pruned = res.model.eval()
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert res.report["macs_after"] < res.report["macs_before"]
    assert flops(pruned, x[:1]) < flops(model, x[:1])
    path = tmp_path / "p.pt"
    prunekit.save(pruned, path)
    loaded, _ = prunekit.load(path)
    with torch.no_grad():
        assert close(loaded(x), out)
    return "ok"


@pytest.fixture()
def seeded():
    torch.manual_seed(0)
