"""Channel selection by backward elimination on the consumers' least-squares refit error.

ThiNet scores a removal with the consumers' weights frozen (then rescales), LASSO relaxes the
choice to an L1 penalty (then refits). Both stop short of the quantity the final refit actually
minimises: the residual of the consumer's output when its weights on the kept channels are
*refit* by least squares. Backward elimination minimises it greedily and exactly:

1. **Normal equations.** For a consumer with sampled input windows ``D [S, K]`` (the group's
   ``K = C * kh * kw`` columns) and targets ``T [S, out]``, ``G = D^T D + lambda I`` and
   ``B = D^T T``; the refit weights are ``W = G^-1 B`` and the residual is
   ``||T||^2 - tr(B^T G^-1 B)``.
2. **Cost of removing a channel.** Dropping the columns ``J`` of channel ``c`` from the active
   set raises the refit residual by exactly ``tr(W_J^T (G^-1_JJ)^-1 W_J)`` (the block version of
   the classical t-statistic identity of stepwise regression); summed over the consumers that
   read the group, each divided by its own ``||Y||^2`` so that every consumer counts alike.
3. **Eliminate.** Remove the cheapest channel; update ``G^-1`` and ``W`` of the remaining
   columns by the Schur complement (``G^-1 <- G^-1_RR - G^-1_RJ (G^-1_JJ)^-1 G^-1_JR``,
   ``W <- W_R - G^-1_RJ (G^-1_JJ)^-1 W_J``), no refactorisation; repeat down to one channel.

The order of removal gives, for every width ``k``, the kept set *and* its relative refit error:
the whole error curve of the group in one pass, which the layer-adaptive allocation
(:func:`prunekit.engine.allocate.allocate_widths`) reads.

References
----------
Couvreur, C. and Bresler, Y. (2000). On the optimality of the backward greedy algorithm for the
subset selection problem. SIAM J. Matrix Anal. Appl. 21(3), 797-808.

He, Y., Zhang, X. and Sun, J. (2017). Channel pruning for accelerating very deep neural
networks. ICCV, 1389-1397 (the least-squares reconstruction this selection is scored by).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import ConsumerSamples

__all__ = ["EliminationPath", "eliminate"]


@dataclass
class EliminationPath:
    """The result of :func:`eliminate` on one group.

    Attributes
    ----------
    order : list of int
        Group channels in the order they were removed (the first is the cheapest); the channel
        never removed is last.
    errors : Tensor, shape [C + 1], float64
        ``errors[k]``: the consumers' summed relative squared refit error
        ``sum ||Y - Y_hat||^2 / ||Y||^2`` when ``k`` channels are kept (``errors[0]`` is the
        error with no channel, i.e. the number of consumers when no other input remains).
    """

    order: list[int]
    errors: torch.Tensor

    def keep(self, k: int) -> list[int]:
        """The ``k`` kept channels at width ``k``, ascending."""
        C = len(self.order)
        return sorted(self.order[C - k:])


class _Consumer:
    """``G^-1`` and the refit weights of one consumer over its active columns."""

    def __init__(self, cs: ConsumerSamples, ridge: float) -> None:
        D = cs.U.double().cpu()
        T = cs.T.double().cpu()
        if cs.bias is not None:  # the bias stays as it is: fit what the columns must produce
            T = T - cs.bias.double().cpu()
        G = D.T @ D
        k = G.shape[0]
        lam = ridge * float(G.diagonal().sum()) / max(k, 1)
        G += lam * torch.eye(k, dtype=G.dtype)
        self.Ginv = torch.linalg.inv(G)
        self.B = D.T @ T
        self.W = self.Ginv @ self.B                       # [K, out]
        self.t_sq = float((T ** 2).sum())
        self.scale = 1.0 / max(cs.y_sq, 1e-30)
        self.chan = cs.chan.clone()                       # group channel of each active column

    def residual(self) -> float:
        """``||T||^2 - tr(B^T G^-1 B)`` of the current active set (never below zero)."""
        return max(self.t_sq - float((self.B * self.W).sum()), 0.0)

    def costs(self, channels: list[int]) -> torch.Tensor:
        """``tr(W_J^T (G^-1_JJ)^-1 W_J)`` for each channel's columns ``J`` (batched when every
        channel has the same number of columns, the usual case)."""
        cols = [torch.nonzero(self.chan == c).flatten() for c in channels]
        sizes = {len(j) for j in cols}
        out = torch.zeros(len(channels), dtype=torch.float64)
        if len(sizes) == 1 and 0 not in sizes:
            idx = torch.stack(cols)                                   # [n, k]
            M = self.Ginv[idx[:, :, None], idx[:, None, :]]           # [n, k, k]
            WJ = self.W[idx]                                          # [n, k, out]
            return (WJ * torch.linalg.solve(M, WJ)).sum((1, 2))
        for i, J in enumerate(cols):
            if J.numel():
                M = self.Ginv[J][:, J]
                out[i] = (self.W[J] * torch.linalg.solve(M, self.W[J])).sum()
        return out

    def remove(self, c: int) -> None:
        """Drop channel ``c``'s columns: a rank-``|J|`` Schur update of ``G^-1`` and ``W`` in
        place (the removed rows and columns become zero and are marked ``-1`` in ``chan``);
        the matrices are compacted once less than half of their columns are active, so a step
        costs one pass over them instead of copying them (a K = 4608 group: ~30x faster)."""
        J = torch.nonzero(self.chan == c).flatten()
        if J.numel() == 0:
            return
        GJ = self.Ginv[:, J]                              # [K, |J|]
        MJ = torch.linalg.inv(GJ[J])
        self.W.sub_(GJ @ (MJ @ self.W[J]))
        self.Ginv.addmm_(GJ, MJ @ GJ.T, alpha=-1.0)
        self.Ginv[J, :] = 0.0
        self.Ginv[:, J] = 0.0
        self.W[J] = 0.0
        self.chan[J] = -1
        active = torch.nonzero(self.chan >= 0).flatten()
        if 2 * active.numel() < self.chan.numel():
            self.Ginv = self.Ginv[active][:, active].contiguous()
            self.W, self.B, self.chan = self.W[active], self.B[active], self.chan[active]


def eliminate(samples: list[ConsumerSamples], *, ridge: float = 1e-6) -> EliminationPath:
    """Backward elimination of a group's channels by the consumers' refit error.

    Parameters
    ----------
    samples : list of ConsumerSamples
        Every consumer of the group (:func:`prunekit.methods.sampling.sample_group`).
    ridge : float
        Relative Tikhonov term on ``D^T D`` (times the mean of its diagonal), as in
        :func:`prunekit.methods.reconstruct.least_squares_weights`.

    Returns
    -------
    EliminationPath
        The removal order and the error at every width.

    """
    C = samples[0].group_size
    cons = [_Consumer(cs, ridge) for cs in samples]
    errors = torch.zeros(C + 1, dtype=torch.float64)
    errors[C] = sum(c.residual() * c.scale for c in cons)
    alive = list(range(C))
    order: list[int] = []
    while len(alive) > 1:
        costs = sum(cn.costs(alive) * cn.scale for cn in cons)
        j = int(torch.argmin(costs))  # ties: the lowest channel
        c = alive.pop(j)
        for cn in cons:
            cn.remove(c)
        order.append(c)
        errors[len(alive)] = sum(cn.residual() * cn.scale for cn in cons)
    order.append(alive[0])
    errors[0] = sum(cn.t_sq * cn.scale for cn in cons)
    return EliminationPath(order, errors)
