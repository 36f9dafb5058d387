"""Options, plug-in hooks and the result of :func:`prunekit.train.fit`."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a training run; the defaults are the usual CIFAR recipe.

    Parameters
    ----------
    epochs : int
        Passes over the training set.
    batch_size : int
        The GLOBAL batch: under torchrun every rank takes ``batch_size // world_size`` of it.
    lr, momentum, nesterov, weight_decay : float, float, bool, float
        SGD settings. ``nesterov`` is ignored when ``momentum`` is 0.
    schedule : {"cosine", "step", "constant"}
        Learning-rate factor over the run, updated every step: cosine from ``lr`` to 0 over
        all steps after the warm-up; ``"step"`` multiplies by ``gamma`` at each milestone.
    milestones : tuple of float
        For ``"step"``: fractions of the run (0.5 = half of ``epochs``).
    gamma : float
        For ``"step"``: the factor applied at each milestone.
    warmup_epochs : int
        Linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many epochs.
    label_smoothing : float
        Passed to the cross-entropy (also the hard-label part of distillation).
    augment, padding, flip : bool, int, bool
        Random crop after ``padding`` pixels of zero padding, and random horizontal flip
        (:func:`prunekit.data.augment.random_crop_flip`), applied to each training batch.
    seed : int
        Seeds the global RNGs at the start and, with the epoch number, the data order and
        the augmentation: a run is repeatable and can be resumed exactly.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... Under
        torchrun on CUDA, ``"auto"``/``"cuda"`` mean ``cuda:LOCAL_RANK``.
    amp : bool or None
        Mixed precision: float16 with a gradient scaler on CUDA, bfloat16 on CPU.
        ``None``: on for CUDA only.
    distill_alpha, distill_temperature : float
        Weight of the soft-target term and the temperature, when ``Hooks.teacher`` is set.
    max_steps_per_epoch : int or None
        Cap on the optimizer steps per epoch (quick runs); the schedule follows the cap.
    eval_every : int
        Evaluate the test set every this many epochs; 0: only once, at the end.
    eval_batch_size : int
        Batch size for evaluation.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = True
    padding: int = 4
    flip: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    distill_alpha: float = 0.9
    distill_temperature: float = 4.0
    max_steps_per_epoch: int | None = None
    eval_every: int = 1
    eval_batch_size: int = 512

    def validate(self) -> None:
        """Raise :class:`~prunekit.errors.ConfigError` naming the first bad value."""
        checks: list[tuple[bool, str]] = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr >= 0, f"lr must be a finite number >= 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (all(0 < m <= 1 for m in self.milestones),
             f"milestones must be fractions of the run in (0, 1], got {tuple(self.milestones)}"),
            (self.gamma > 0, f"gamma must be > 0, got {self.gamma}"),
            (0 <= self.warmup_epochs < self.epochs,
             f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs} with epochs={self.epochs}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.padding >= 0, f"padding must be >= 0, got {self.padding}"),
            (0 <= self.distill_alpha <= 1, f"distill_alpha must be in [0, 1], got {self.distill_alpha}"),
            (self.distill_temperature > 0,
             f"distill_temperature must be > 0, got {self.distill_temperature}"),
            (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             f"max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch}"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class Hooks:
    """The method-specific parts of a training run, plugged into :func:`fit` as callables.

    Parameters
    ----------
    grad_transform : callable(model) or None
        Called every step after ``backward`` (so after DDP's gradient all-reduce, and after
        AMP's unscaling) and before ``optimizer.step``, with the unwrapped model. It may
        rewrite ``p.grad`` in place (e.g. the centripetal update of C-SGD).
    regularizer : callable(model) -> Tensor or None
        A scalar added to the loss every step (e.g. an L1 penalty on BN scales).
    teacher : nn.Module or None
        When set, the loss is :func:`distillation_loss` between the student's logits and the
        teacher's (computed without gradients, in eval mode, on the same augmented batch).
        ``fit`` moves the teacher to the training device.
    postfix : callable() -> dict[str, float] or None
        Extra numbers shown on the progress bar and stored in each epoch's history record.
    on_epoch_end : callable(epoch, model, record) -> bool or None
        Called after every epoch with the 1-based epoch number, the unwrapped model and the
        epoch's history record (it may add fields to it). Return ``True`` to stop early.
        Under torchrun, rank 0's answer is the one that counts.
    no_weight_decay : sequence of nn.Parameter
        Parameters the optimizer must not weight-decay (a grad_transform that applies its
        own decay, for instance).
    post_step : callable(model) or None
        Called after every optimizer step with the unwrapped model (e.g. a projection such as
        MRTS's clamp of BN factors to ``[0, max]``).
    """

    grad_transform: Callable[[nn.Module], None] | None = None
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None
    teacher: nn.Module | None = None
    postfix: Callable[[], dict[str, float]] | None = None
    on_epoch_end: Callable[[int, nn.Module, dict], bool | None] | None = None
    no_weight_decay: Sequence[nn.Parameter] = ()
    post_step: Callable[[nn.Module], None] | None = None


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    history : list of dict
        One record per epoch: ``epoch`` (1-based), ``loss`` (mean training loss, regulariser
        included), ``train_acc`` (percent, on the augmented batches), ``test_acc`` (percent,
        or None when not evaluated that epoch), ``lr`` (at the epoch's first step),
        ``seconds`` (training time of the epoch, evaluation excluded), plus the postfix
        fields. A resumed run's history includes the epochs before the interruption.
    test_acc : float or None
        Final test accuracy in percent (None without a test set).
    epochs_run : int
        Epochs completed, counting those before a resume.
    stopped_early : bool
        Whether ``on_epoch_end`` asked to stop.
    seconds_per_epoch : float
        Mean of the history's ``seconds``.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    test_acc: float | None = None
    epochs_run: int = 0
    stopped_early: bool = False
    seconds_per_epoch: float = 0.0


def phase_config(opts: Any, epochs: int, seed: int, explicit: Mapping[str, Any]) -> Any:
    """The :class:`~prunekit.train.TrainConfig` of a method's own training phase.

    ``opts.train_config`` (when given) is the base; ``lr``, ``batch_size`` and
    ``max_steps_per_epoch`` of ``opts`` override it when they were passed explicitly
    (``explicit``) or when there is no base. No evaluation happens inside.
    """
    base = opts.train_config
    if base is not None and not isinstance(base, TrainConfig):
        raise ConfigError(f"train_config must be a prunekit.train.TrainConfig, got {type(base).__name__}")
    cfg = copy.copy(base) if base is not None else TrainConfig()
    for name in ("lr", "batch_size", "max_steps_per_epoch"):
        if base is None or name in explicit:
            setattr(cfg, name, getattr(opts, name))
    cfg.epochs, cfg.seed, cfg.eval_every = int(epochs), int(seed), 0
    return cfg
