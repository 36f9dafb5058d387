"""A saved state dict keeps its modules' versions (``_metadata``), which some architectures
read when loading (torchvision's MNASNet raised a raw ValueError without them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.errors import CheckpointError


class VersionedBN(nn.BatchNorm2d):
    """Reads its saved version when loading, like torchvision's MNASNet does."""

    _version = 7

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        if local_metadata.get("version") != 7:
            raise ValueError(f"version should be 7, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), VersionedBN(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_pruned_model_with_versioned_modules_reloads_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(2, 3, 12, 12)
    res = prunekit.prune(model, x[:1], method="l1", ratio=0.5)
    path = tmp_path / "p.pt"
    prunekit.save(res.model, path, plan=res.plan.to_json())
    again, _ = prunekit.load(path, model=net())
    assert torch.allclose(again(x), res.model(x), atol=1e-6)


def test_missing_versions_are_a_checkpoint_error(tmp_path) -> None:
    """A file without the versions (as written before) is a typed error, not a raw ValueError."""
    path = tmp_path / "old.pt"
    prunekit.save(net(), path)
    payload = torch.load(path, weights_only=True)
    payload.pop("state_metadata")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="version should be 7"):
        prunekit.load(path, model=net())
