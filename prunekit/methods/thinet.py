"""ThiNet: greedy channel selection by the next layer's reconstruction error, then scaling.

The steps of Luo et al. (ICCV 2017), for a consumer layer reading ``C`` channels:

1. **Contributions.** With the bias removed, every sampled output value of the consumer is a sum
   of per-channel contributions, ``y_hat = y - b = sum_c x_c``. ``m`` sampled values (a random
   image, output position and output channel each) give ``X [m, C]`` and ``y [m]``
   (:mod:`prunekit.methods.reconstruct` builds them).
2. **Greedy selection (optimisation target 1).** Find ``S``, ``|S| = keep``, minimising
   ``sum_i (y_i - sum_{j in S} X_ij)^2``. ThiNet grows the *removed* set ``T``: at each step the
   channel whose removal adds the least error joins ``T`` (:func:`select_channels`).
3. **Channel scaling (optimisation target 2).** Least squares ``w = (X_S^T X_S)^-1 X_S^T y`` on the
   kept channels (:func:`scale`), folded into the consumer's weights: ``W[:, j] *= w_j``.

The whole network is pruned layer by layer by :func:`prunekit.methods.reconstruct.prune_network`
(inputs from the partially pruned network, targets from the original one).

References
----------
Luo, J.-H., Wu, J. and Lin, W. (2017). ThiNet: a filter level pruning method for deep neural
network compression. ICCV, 5058-5066.

Luo, J.-H., Zhang, H., Zhou, H.-Y., Xie, C.-W., Wu, J. and Lin, W. (2019). ThiNet: pruning CNN
filters for a thinner net. IEEE TPAMI 41(10), 2525-2538.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from . import MethodOutput, PruneContext
from .reconstruct import ReconstructOptions
from .registry import register_method

__all__ = ["run", "scale", "select_channels"]


def _as_tensor(a: torch.Tensor | np.ndarray, name: str, dims: int) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dim() != dims:
        raise ConfigError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    return t


def _check(X: torch.Tensor, y: torch.Tensor, keep: int) -> int:
    if X.shape[0] != y.shape[0]:
        raise ConfigError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    if isinstance(keep, bool) or int(keep) != keep or not 1 <= int(keep) <= X.shape[1]:
        raise ConfigError(f"keep must be an integer in [1, {X.shape[1]}], got {keep!r}")
    return int(keep)


def gram(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X^T X, X^T y)`` in float64 on the CPU (the products run in X's own precision and on
    X's device)."""
    y = y.to(device=X.device, dtype=X.dtype)
    return (X.T @ X).double().cpu(), (X.T @ y).double().cpu()


def greedy_from_gram(G: torch.Tensor, Xty: torch.Tensor, keep: int) -> list[int]:
    """ThiNet's greedy removal, given ``G = X^T X`` and ``X^T y``.

    Removing the set ``T`` leaves the error ``||r + s_T||^2`` with ``r = y - X 1`` (what the
    full channel set misses) and ``s_T = sum_{j in T} X_j``. Adding channel ``j`` to ``T`` gives
    ``||r + s_T||^2 + 2 (r + s_T) . X_j + G_jj``; the vector ``h = X^T (r + s_T)`` starts at
    ``X^T y - G 1`` and gains the row ``G[j]`` when ``j`` is removed, so a step costs O(C).
    When ``y = X 1`` exactly (ThiNet's setting) ``r = 0`` and the score of ``j`` is
    ``2 sum_{i in T} G_ij + G_jj``, the seed's formula.

    Returns
    -------
    list of int
        The kept channels, ascending.
    """
    C = G.shape[0]
    h = Xty - G.sum(1)
    diag = G.diagonal().clone()
    removed = torch.zeros(C, dtype=torch.bool)
    inf = torch.tensor(float("inf"), dtype=G.dtype)
    for _ in range(C - keep):
        cost = torch.where(removed, inf, 2.0 * h + diag)
        j = int(torch.argmin(cost))  # ties: the lowest index
        removed[j] = True
        h += G[j]
    return torch.nonzero(~removed).flatten().tolist()


def select_channels(X: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, keep: int) -> list[int]:
    """Seed 002, optimisation target 1: greedily choose ``keep`` of the ``C`` channels.

    Grows the removed set ``T`` one channel at a time, each time adding the channel that keeps
    ``||y - sum_{j not in T} X_j||^2`` smallest, until ``|T| = C - keep``. Everything goes
    through the Gram matrix ``X^T X``, so after that product (O(n C^2), the dominant cost) the
    search is O(C^2): C = 512 channels and 50,000 samples take about a second on two cores.

    Parameters
    ----------
    X : Tensor or ndarray, shape [n, C]
        ``X[i, c]``: contribution of input channel ``c`` to sampled output value ``i``.
    y : Tensor or ndarray, shape [n]
        The sampled output values (bias removed). With ``y = X.sum(1)`` this is exactly ThiNet's
        ``min ||sum_{j in T} X_j||^2``; otherwise what the full channel set already misses is
        taken into account (see :func:`greedy_from_gram`).
    keep : int
        Number of channels to keep, ``1 <= keep <= C``.

    Returns
    -------
    list of int
        Kept channel indices, ascending.

    References
    ----------
    Luo, Wu and Lin (2017), ThiNet, ICCV, Algorithm 1.

    Examples
    --------
    >>> X = torch.randn(1000, 8); X[:, 3] *= 0.01
    >>> 3 in select_channels(X, X.sum(1), keep=7)
    False
    """
    X = _as_tensor(X, "X", 2)
    y = _as_tensor(y, "y", 1)
    keep = _check(X, y, keep)
    if keep == X.shape[1]:
        return list(range(keep))
    G, Xty = gram(X, y)
    return greedy_from_gram(G, Xty, keep)


def scale(X: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, kept: list[int]) -> torch.Tensor:
    """Seed 002, optimisation target 2: least-squares channel scales ``w = (X_S^T X_S)^-1 X_S^T y``.

    Parameters
    ----------
    X : Tensor or ndarray, shape [n, C]
    y : Tensor or ndarray, shape [n]
    kept : list of int
        The selected channels ``S``.

    Returns
    -------
    Tensor, shape [len(kept)], float64
        ``w_j`` for each kept channel, in the order of ``kept``; fold into the consumer with
        ``W[:, j] *= w_j``. Solved with ``torch.linalg.lstsq`` (rank-deficient columns get the
        minimum-norm solution).
    """
    X = _as_tensor(X, "X", 2)
    y = _as_tensor(y, "y", 1)
    if X.shape[0] != y.shape[0]:
        raise ConfigError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    if not kept:
        raise ConfigError("kept must name at least one channel")
    A = X[:, list(kept)].double().cpu()
    return torch.linalg.lstsq(A, y.double().cpu().unsqueeze(1), driver="gelsd").solution.squeeze(1)


def _reconstruct(samples, keep: list[int]):
    """Per consumer: scale the kept channels by least squares on that consumer's own rows."""
    from .reconstruct import scaled_weights

    return scaled_weights(samples, keep, scale)


@register_method("thinet", ReconstructOptions, needs_data=True,
                 summary="ThiNet: greedy selection by the next layer's reconstruction error, "
                         "then least-squares scaling (Luo et al., ICCV 2017)")
def run(ctx: PruneContext) -> MethodOutput:
    """Prune ``ctx.model`` with ThiNet, layer by layer (see
    :func:`prunekit.methods.reconstruct.prune_network`); options:
    :class:`~prunekit.methods.reconstruct.ReconstructOptions`.
    """
    from .reconstruct import prune_network

    return prune_network(ctx, "thinet", select_channels, _reconstruct,
                         ctx.parse(ReconstructOptions, "thinet"))
