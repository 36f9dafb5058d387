"""The optimizer (SGD with parameter groups) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig,
                   no_weight_decay: Sequence[nn.Parameter] = ()) -> torch.optim.SGD:
    """SGD over every parameter of ``model``; those in ``no_weight_decay`` get no decay."""
    skip = {id(p) for p in no_weight_decay}
    decay = [p for p in model.parameters() if id(p) not in skip]
    plain = [p for p in model.parameters() if id(p) in skip]
    groups = [g for g in ({"params": decay}, {"params": plain, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The multiplier of ``cfg.lr`` for the 0-based optimizer step ``step``.

    Linear warm-up over ``cfg.warmup_epochs``, then cosine to 0 over the remaining steps,
    ``gamma`` per milestone passed (milestones are fractions of the whole run), or constant.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= round(m * total) for m in cfg.milestones)
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimizer step, following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))
