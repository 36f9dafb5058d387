"""Label-free distillation: a few optimizer steps matching the original model's logits on
unlabeled calibration images."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.augment import random_crop_flip
from ..errors import DataError
from ..utils import module_device, progress


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (Hinton et al.)."""
    T = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                    reduction="batchmean", log_target=True) * T * T


def distill_on_inputs(student: nn.Module, teacher: nn.Module, inputs: Any, steps: int, *,
                      lr: float = 1e-3, batch_size: int = 64, temperature: float = 2.0,
                      augment: bool = True, seed: int = 0) -> dict[str, float]:
    """Train ``student`` for ``steps`` Adam steps to match ``teacher``'s logits on ``inputs``.

    No label is read: the only target is the teacher's output on the same (augmented) batch.
    BatchNorm layers keep their running statistics (they run in eval mode) so that a few
    hundred steps on a few hundred images move the weights, not the statistics.

    Parameters
    ----------
    student, teacher : nn.Module
        The pruned network (trained in place) and the original (only read).
    inputs : Tensor [N, C, H, W]
        The calibration images.
    steps : int
        Optimizer steps (each on a random batch of ``batch_size`` images).
    lr : float
        Adam learning rate, cosine-decayed to zero.
    temperature : float
        Softmax temperature of the soft targets.
    augment : bool
        Random crop (padding 1/8 of the side) and horizontal flip per image.

    Returns
    -------
    dict
        ``steps``, ``loss_first``, ``loss_last`` (mean of the first / last tenth of the steps)
        and ``seconds``.

    References
    ----------
    Hinton, G., Vinyals, O. and Dean, J. (2015). Distilling the knowledge in a neural network.
    NIPS Deep Learning Workshop.
    """
    if inputs.shape[0] == 0:
        raise DataError("distillation needs at least one calibration image")
    t0 = time.perf_counter()
    dev = module_device(student)
    x_all = inputs.to(dev)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    teacher.eval()
    student.eval()  # BatchNorm statistics stay; weights are trained
    losses = []
    pad = max(1, x_all.shape[-1] // 8)
    for _ in progress(range(steps), desc="reconstruct: distill", total=steps):
        idx = torch.randint(x_all.shape[0], (min(batch_size, x_all.shape[0]),), generator=gen)
        x = x_all[idx.to(dev)]
        if augment:
            x = random_crop_flip(x, padding=pad, generator=gen)
        with torch.no_grad():
            t = teacher(x)
        loss = soft_kl(student(x), t, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    tenth = max(1, steps // 10)
    return {"steps": steps, "loss_first": sum(losses[:tenth]) / tenth,
            "loss_last": sum(losses[-tenth:]) / tenth, "seconds": time.perf_counter() - t0}
