"""Helpers every method shares: keep each group's best channels, rank all channels of the
network at once (global ranking with a per-group normalisation), and find which input columns
of a consumer carry which channel of a group."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .budget import Widths
from .graph import DependencyInfo, Slot
from .plan import GroupPlan, PruningPlan

#: group name -> per-channel scores (higher = more important)
Scores = dict[str, torch.Tensor]

__all__ = ["NORMALIZE", "channel_multiplier", "consumer_index", "feature_index", "global_widths",
           "keep_top"]


def keep_top(info: DependencyInfo, scores: Scores, widths: Widths) -> PruningPlan:
    """Keep the ``widths[g]`` highest-scoring channels of each group (ties: lower index)."""
    groups = []
    for g in info.groups:
        n = widths.get(g.name, g.size)
        if n >= g.size:
            continue
        order = torch.argsort(-scores[g.name], stable=True)
        groups.append(GroupPlan(g.name, g.size, order[:n].tolist()))
    return PruningPlan(groups)


NORMALIZE = ("l2", "max", "none")


def global_widths(scores: Scores, ratio: float, normalize: str = "l2") -> Widths:
    """Widths after removing the ``round(ratio * N)`` least important of all ``N`` channels,
    ranked network-wide; every group keeps at least one channel (the next channel elsewhere is
    taken instead).

    Parameters
    ----------
    scores : dict[str, Tensor]
        Group name -> per-channel scores.
    ratio : float
        Fraction of all channels to remove.
    normalize : {"l2", "max", "none"}
        Per-group rescaling before the ranking: by the scores' L2 norm (default; Taylor-FO's
        layer normalisation, Molchanov et al., ICLR 2017), by their maximum, or none (scores
        that already compare
        across layers, such as BN factors after sparsity training).
    """
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    entries: list[tuple[float, str, int]] = []
    for name, s in scores.items():
        s = s.double()
        if normalize == "l2":
            s = s / s.norm().clamp_min(1e-30)
        elif normalize == "max":
            s = s / s.max().clamp_min(1e-30)
        entries += [(float(v), name, i) for i, v in enumerate(s)]
    entries.sort()
    widths = {name: len(s) for name, s in scores.items()}
    to_remove = int(round(ratio * len(entries)))
    for _, name, _ in entries:
        if to_remove == 0:
            break
        if widths[name] > 1:
            widths[name] -= 1
            to_remove -= 1
    return widths


def consumer_index(slot: Slot, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a consumer slot's positions: ``(cols, chans)`` with ``cols[i]`` the consumer's
    input column that carries the group's root channel ``chans[i]``.

    Parameters
    ----------
    slot : Slot
        A consumer slot of a group (``slot.positions``: root channel -> input columns).
    size : int
        Channels of the group.

    Returns
    -------
    cols, chans : LongTensor [M]
    """
    cols: list[int] = []
    chans: list[int] = []
    for c in range(size):
        for p in slot.positions.get(c, ()):
            cols.append(p)
            chans.append(c)
    return torch.tensor(cols, dtype=torch.long), torch.tensor(chans, dtype=torch.long)


def feature_index(slot: Slot, size: int) -> torch.Tensor | None:
    """``[C, P]`` input columns of a consumer that carries all ``size`` channels (``P`` positions
    per channel, truncated to the smallest count), or ``None`` when some channel is missing."""
    if any(not slot.positions.get(c) for c in range(size)):
        return None
    p = min(len(slot.positions[c]) for c in range(size))
    return torch.tensor([slot.positions[c][:p] for c in range(size)], dtype=torch.long)


def channel_multiplier(x: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x`` with its input columns ``cols`` (dim 1) multiplied by ``values`` (out of place,
    differentiable in ``values``). ``x`` is ``[N, C_in, ...]``."""
    mult = torch.ones(x.shape[1], dtype=values.dtype, device=x.device)
    mult = mult.index_put((cols.to(x.device),), values)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return x * mult.view(shape).to(x.dtype)
