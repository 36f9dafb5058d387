"""The training-state file: written atomically after every epoch, read back on resume.

The file holds only tensors, numbers, strings and plain containers, so it loads with
``torch.load(path, weights_only=True)``::

    {"format": "prunekit.train_state", "version": 1, "epoch": <epochs completed>,
     "stopped_early": bool, "model": state_dict, "optimizer": state_dict,
     "scheduler": state_dict, "scaler": state_dict, "history": [record, ...],
     "cfg": dataclasses.asdict(TrainConfig), "rng": {"torch": ByteTensor, "cuda": [...]}}
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..utils import atomic_path
from .config import TrainConfig

FORMAT = "prunekit.train_state"
VERSION = 1
# Settings whose change makes a resumed run differ from an uninterrupted one.
_RUN_DEFINING = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                 "milestones", "gamma", "warmup_epochs", "label_smoothing", "augment", "padding",
                 "flip", "seed", "distill_alpha", "distill_temperature", "max_steps_per_epoch")


def save_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, scaler: Any, epoch: int, history: list[dict], cfg: TrainConfig,
               stopped_early: bool) -> None:
    """Write the training state to ``path`` atomically (an old file survives a failure)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {
        "format": FORMAT, "version": VERSION, "epoch": epoch, "stopped_early": stopped_early,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "history": history, "cfg": dataclasses.asdict(cfg), "rng": rng,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check a training-state file; :class:`CheckpointError` if unusable."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"cannot resume: training state file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or carries code
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot resume: {p} is not a readable training state ({reason})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"cannot resume: {p} is not a prunekit training state")
    if state.get("version") != VERSION:
        raise CheckpointError(f"cannot resume: {p} has training-state version {state.get('version')}, "
                              f"this prunekit reads version {VERSION}")
    return state


def restore_state(state: dict[str, Any], path: str | os.PathLike, *, model: nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                  cfg: TrainConfig) -> None:
    """Load ``state`` into the run's objects and RNGs; warn when run-defining settings changed."""
    saved = state.get("cfg", {})
    changed = [k for k in _RUN_DEFINING if k in saved and _norm(saved[k]) != _norm(getattr(cfg, k))]
    if changed:
        warnings.warn(f"resuming {path} with changed settings {changed}: the result will differ "
                      "from an uninterrupted run", stacklevel=3)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot resume: {path} does not match this model/optimizer ({first})") from exc
    rng = state.get("rng", {})
    if isinstance(rng.get("torch"), torch.Tensor):
        torch.set_rng_state(rng["torch"])
    cuda_states = rng.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
