"""Channel pruning by LASSO regression and least-squares reconstruction (He et al., 2017).

The steps of He et al. (ICCV 2017), for a layer C reading channels of B (made by the
filters of A):

1. **Sample** feature-map points: C's input windows from the network pruned so far and C's
   original outputs (:func:`prunekit.methods.reconstruct.sample_group`).
2. **Channel selection (LASSO).** With ``X[:, c]`` the contribution of channel ``c`` to a sampled
   output value, solve ``min_beta (1/2n) ||y - X beta||^2 + alpha ||beta||_1`` and raise the
   penalty ``alpha`` until exactly ``keep`` coefficients are non-zero (:func:`select_channels`;
   scikit-learn's coordinate descent on the precomputed Gram matrix).
3. **Reconstruction (least squares).** Refit C's weights on the kept channels (and its bias,
   where it has one) so that C's original outputs are reproduced
   (:func:`prunekit.methods.reconstruct.least_squares_weights`).
4. Remove the matching filters of A (and of everything coupled to them); move to the next layer.
   Inputs come from the pruned network, targets from the original one, so errors do not
   accumulate (the paper's multi-layer variant).

References
----------
He, Y., Zhang, X. and Sun, J. (2017). Channel pruning for accelerating very deep neural networks.
ICCV, 1389-1397.

Tibshirani, R. (1996). Regression shrinkage and selection via the lasso. JRSS B 58(1), 267-288.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from . import MethodOutput, PruneContext
from .options import option
from .reconstruct import ReconstructOptions
from .registry import register_method

__all__ = ["LassoSearch", "run", "select_channels"]


@dataclass
class LassoSearch:
    """How the penalty search ended (returned by :func:`select_channels` with ``return_search``).

    Attributes
    ----------
    alpha : float
        The penalty whose support was used (on ``X, y`` divided by the RMS of ``y``).
    nonzero : int
        Non-zero coefficients at ``alpha``.
    exact : bool
        Whether ``nonzero == keep``; otherwise the ``keep`` largest ``|beta|`` were taken (or the
        support was filled up, see :func:`select_channels`).
    fits : int
        LASSO fits run.
    path : list of (alpha, nonzero)
        Every penalty tried, in order.
    """

    alpha: float
    nonzero: int
    exact: bool
    fits: int
    path: list[tuple[float, int]] = field(default_factory=list)


def _to_numpy(a, name: str, dims: int) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != dims:
        raise ConfigError(f"{name} must have {dims} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def select_channels(X: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, keep: int, *,
                    alpha0: float = 1e-3, max_fits: int = 60, max_samples: int | None = 20000,
                    tol: float = 1e-6, seed: int = 0, return_search: bool = False
                    ) -> list[int] | tuple[list[int], LassoSearch]:
    """Channel selection (He et al., 2017, eq. 3): LASSO on channel coefficients until ``keep``
    are non-zero.

    Solves ``min_beta (1/2n) ||y - X beta||^2 + alpha ||beta||_1`` (``y ~ sum_c beta_c X[:, c]``,
    no intercept) with :class:`sklearn.linear_model.Lasso` on the precomputed Gram matrix, after
    dividing ``X`` and ``y`` by the RMS of ``y`` so that ``alpha`` is scale-free. The penalty is
    searched as the authors did: from ``alpha0`` doubling until at most ``keep`` coefficients
    are non-zero, then bisection (geometric) between the last two penalties until exactly
    ``keep`` are; warm starts make each fit cheap.

    If the search cannot hit ``keep`` exactly (the support size jumps over it, or ``max_fits``
    runs out), the fit at the largest penalty that still had *more* than ``keep`` non-zeros (the
    closest from above) is used and its ``keep`` largest ``|beta|`` are kept. If even the
    smallest penalty tried leaves fewer than ``keep`` non-zeros (collinear or all-zero columns),
    the support is filled up with the remaining channels of largest column norm ``||X[:, c]||``.
    Either way exactly ``keep`` channels are returned.

    Parameters
    ----------
    X : Tensor or ndarray, shape [n, C]
        Per-channel contributions to the sampled output values.
    y : Tensor or ndarray, shape [n]
        The sampled output values (the reconstruction target).
    keep : int
        Channels to keep, ``1 <= keep <= C``.
    alpha0 : float
        First penalty tried.
    max_fits : int
        Upper bound on LASSO fits.
    max_samples : int or None
        Fit on a seeded random subset of this many rows (the authors fitted the LASSO on a
        subsample); ``None``: all rows.
    tol : float
        Coordinate-descent tolerance.
    seed : int
        Seeds the row subsample.
    return_search : bool
        Also return a :class:`LassoSearch`.

    Returns
    -------
    list of int
        Kept channels, ascending (and the :class:`LassoSearch` when asked).

    References
    ----------
    He, Zhang and Sun (2017), Channel pruning for accelerating very deep neural networks, ICCV,
    Section 3.1, eq. (3).

    Examples
    --------
    >>> X = torch.randn(2000, 6); y = X[:, [0, 2, 5]].sum(1)
    >>> select_channels(X, y, keep=3)
    [0, 2, 5]
    """
    Xn = _to_numpy(X, "X", 2)
    yn = _to_numpy(y, "y", 1)
    n, C = Xn.shape
    if yn.shape[0] != n:
        raise ConfigError(f"X has {n} rows but y has {yn.shape[0]}")
    if isinstance(keep, bool) or int(keep) != keep or not 1 <= int(keep) <= C:
        raise ConfigError(f"keep must be an integer in [1, {C}], got {keep!r}")
    if not (alpha0 > 0 and math.isfinite(alpha0)):
        raise ConfigError(f"alpha0 must be a positive number, got {alpha0!r}")
    keep = int(keep)
    if keep == C:
        result = list(range(C))
        return (result, LassoSearch(0.0, C, True, 0)) if return_search else result
    if max_samples is not None and n > max_samples:
        rows = np.random.default_rng(seed).choice(n, size=int(max_samples), replace=False)
        Xn, yn = Xn[np.sort(rows)], yn[np.sort(rows)]
        n = Xn.shape[0]
    s = math.sqrt(float(np.mean(yn * yn)))
    if s <= 0:
        s = math.sqrt(float(np.mean(Xn * Xn))) or 1.0
    Xn = np.asfortranarray(Xn / s)
    yn = np.ascontiguousarray(yn / s)
    G = np.ascontiguousarray(Xn.T @ Xn)
    from sklearn.exceptions import ConvergenceWarning  # optional package: see the registration
    from sklearn.linear_model import Lasso

    model = Lasso(alpha=alpha0, fit_intercept=False, precompute=G, warm_start=True, max_iter=10000,
                  tol=tol, selection="cyclic")
    path: list[tuple[float, int]] = []
    fits: dict[float, np.ndarray] = {}

    def fit(alpha: float) -> int:
        model.alpha = alpha
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Xn, yn, check_input=False)
        coef = model.coef_.copy()
        nz = int(np.count_nonzero(coef))
        path.append((alpha, nz))
        fits[alpha] = coef
        return nz

    alpha, exact = _search_penalty(fit, path, keep, alpha0, max_fits)
    coef = fits[alpha]
    chosen = _top_support(coef, keep, np.linalg.norm(Xn, axis=0))
    search = LassoSearch(float(alpha), int(np.count_nonzero(coef)), exact, len(path), path)
    return (chosen, search) if return_search else chosen


def _search_penalty(fit: Callable[[float], int], path: list[tuple[float, int]], keep: int,
                    alpha0: float, max_fits: int) -> tuple[float, bool]:
    """The authors' penalty search: from ``alpha0`` double until at most ``keep`` coefficients
    are non-zero (or halve while too few are), then bisect geometrically between the last two
    penalties until exactly ``keep`` are. ``fit(alpha)`` fits and returns the non-zero count,
    appending ``(alpha, count)`` to ``path``. Returns the penalty to use and whether it has
    exactly ``keep`` non-zeros (else: the closest fit from above, or the weakest penalty)."""
    alpha = alpha0
    nz = fit(alpha)
    lo = hi = None  # lo: penalty with nz > keep, hi: penalty with nz < keep
    while nz > keep and len(path) < max_fits:
        lo = alpha
        alpha *= 2.0  # reaches alpha_max (all zero) after log2(alpha_max / alpha0) steps
        nz = fit(alpha)
    if nz < keep:
        hi = alpha
        while lo is None and len(path) < max_fits:  # alpha0 was already too strong: walk down
            alpha /= 2.0
            nz = fit(alpha)
            if nz >= keep:
                lo = alpha
                break
            hi = alpha
    if nz != keep and lo is not None and hi is not None:
        while len(path) < max_fits:
            alpha = math.sqrt(lo * hi)
            nz = fit(alpha)
            if nz == keep:
                break
            if nz > keep:
                lo = alpha
            else:
                hi = alpha
            if hi / lo < 1 + 1e-9:
                break
    if nz == keep:
        return alpha, True
    above = [a for a, k in path if k > keep]  # the closest fit from above, else the weakest penalty
    return (max(above) if above else min(a for a, _ in path)), False


def _top_support(coef: np.ndarray, keep: int, col_norms: np.ndarray) -> list[int]:
    """The ``keep`` largest ``|beta|``; ties and the zero part ordered by column norm, then index."""
    order = np.lexsort((np.arange(coef.size), -col_norms, -np.abs(coef)))
    return sorted(int(i) for i in order[:keep])


def _reconstruct(samples, keep: list[int], fit_bias: bool | str = "auto"):
    from .reconstruct import least_squares_weights

    return least_squares_weights(samples, keep, fit_bias=fit_bias)


@dataclass
class LassoOptions(ReconstructOptions):
    """Options of LASSO channel pruning: those of
    :class:`~prunekit.methods.reconstruct.ReconstructOptions` and the LASSO's own."""

    alpha0: float = option(1e-3, "first LASSO penalty of the search", above=0)
    lasso_samples: int | None = option(20000, "rows the LASSO is fitted on (None: all)", min=1,
                                       none=True)
    fit_bias: bool | str = option("auto", "refit the consumer's bias: auto (only where it has "
                                  "one), true (add one to bias-free convs) or false", kind="any")

    def validate(self) -> None:
        words = {"true": True, "false": False}
        if isinstance(self.fit_bias, str) and self.fit_bias.lower() in words:
            self.fit_bias = words[self.fit_bias.lower()]
        if self.fit_bias not in ("auto", True, False):
            raise ConfigError(f"option fit_bias of method 'lasso' must be 'auto', true or false, "
                              f"got {self.fit_bias!r}")


@register_method("lasso", LassoOptions, needs_data=True, requires=(("sklearn", "scikit-learn"),),
                 summary="LASSO channel selection and least-squares reconstruction "
                         "(He et al., ICCV 2017)")
def run(ctx: PruneContext) -> MethodOutput:
    """Prune ``ctx.model`` by LASSO channel selection and least-squares reconstruction, layer by
    layer (see :func:`prunekit.methods.reconstruct.prune_network`); options:
    :class:`LassoOptions`.
    """
    from .reconstruct import prune_network

    opts = ctx.parse(LassoOptions, "lasso")

    def select(X: torch.Tensor, y: torch.Tensor, keep: int) -> list[int]:
        return select_channels(X, y, keep, alpha0=opts.alpha0, max_samples=opts.lasso_samples,
                               seed=ctx.seed)

    return prune_network(ctx, "lasso", select, lambda s, k: _reconstruct(s, k, opts.fit_bias), opts)
