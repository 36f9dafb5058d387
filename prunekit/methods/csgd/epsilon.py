"""S3: the centripetal strength epsilon that converges on a given learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _simulate_difference(lrs: np.ndarray, k: np.ndarray, momentum: float, nesterov: bool) -> np.ndarray:
    """How two members of a cluster approach each other under S3: they share the mean
    gradient, so only ``(eta + eps) * d`` acts on their difference ``d``. Runs PyTorch's SGD
    (momentum / Nesterov form) on ``d`` from ``d = 1`` for each curvature in ``k`` and returns
    the largest ``|d|`` over the last fifth of the steps (an envelope: robust to a zero
    crossing of an oscillating difference at the last step)."""
    d = np.ones_like(k)
    buf = np.zeros_like(k)
    env = np.zeros_like(k)
    tail = len(lrs) - max(1, len(lrs) // 5)
    for t, lr in enumerate(lrs):
        g = k * d
        buf = momentum * buf + g
        d = d - lr * (g + momentum * buf if nesterov else buf)
        if t >= tail:
            env = np.maximum(env, np.abs(d))
    return env


def auto_epsilon(lrs: Sequence[float], *, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, bn_epsilon_scale: float = 0.1,
                 shrink: float = 1e-7, within: float = 0.6) -> tuple[float, bool]:
    """The smallest ``epsilon`` that makes cluster members converge on a given schedule.

    Two members of a cluster receive the same mean gradient, so under S3 their difference
    obeys the linear recurrence of SGD on ``(eta + eps_p) * d`` alone. This simulates it on
    the learning rates ``lrs`` (one per optimizer step) and returns the smallest ``epsilon``
    whose slowest tensors (``eps_p = bn_epsilon_scale * epsilon``) shrink their difference by
    ``shrink`` within the first ``within`` of the steps, capped so that the kernels'
    ``lr_max * (eta + epsilon)`` stays at most 1 (stable, and with Nesterov momentum a
    near-one-step collapse).

    Returns
    -------
    (epsilon, reachable)
        ``reachable`` is False when even the cap does not reach ``shrink`` (schedule too short).
    """
    lrs_a = np.asarray(list(lrs), dtype=np.float64)
    if len(lrs_a) == 0 or lrs_a.max() <= 0:
        return 0.0, False
    upto = lrs_a[: max(1, int(math.ceil(within * len(lrs_a))))]
    cap = max(1.0 / lrs_a.max() - weight_decay, 0.0)
    slow = bn_epsilon_scale if bn_epsilon_scale > 0 else 1.0

    def reached(eps: np.ndarray) -> np.ndarray:
        return _simulate_difference(upto, weight_decay + slow * eps, momentum, nesterov) <= shrink

    if not reached(np.array([cap]))[0]:
        return cap, False
    lo, hi = 0.0, cap
    for _ in range(6):  # 6 rounds of a 16-way grid: relative precision ~ 16^-6
        grid = np.linspace(lo, hi, 17)[1:]
        ok = reached(grid)
        first = int(np.argmax(ok))
        hi = float(grid[first])
        lo = float(grid[first - 1]) if first > 0 else lo
    return hi, True
