"""S2 (clustering): Pearson similarity of survey vectors and the clusterings, and the
lookup of a group's clusters."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...engine import DependencyInfo
from ...errors import ConfigError

CLUSTERING_METHODS = ("agglomerative", "even", "kmeans")

Clusters = list[list[int]]

# =============================================================================================
# S2: similarity and clustering
# =============================================================================================

def _to_numpy(vectors: Any) -> np.ndarray:
    v = vectors.detach().cpu().double().numpy() if isinstance(vectors, torch.Tensor) \
        else np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ConfigError(f"survey vectors must be a 2-D [C, N] array, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ConfigError("survey vectors contain NaN or Inf")
    return v


def _unit_rows(v: np.ndarray) -> np.ndarray:
    """Rows centred and scaled so that ``Z @ Z.T`` is the Pearson correlation; a constant row
    (zero variance up to round-off) becomes zeros."""
    centred = v - v.mean(axis=1, keepdims=True)
    norm = np.sqrt((centred * centred).sum(axis=1, keepdims=True))
    scale = np.abs(v).max(axis=1, keepdims=True) * math.sqrt(v.shape[1])
    const = norm <= 64 * np.finfo(np.float64).eps * scale
    return np.where(const, 0.0, centred / np.where(const, 1.0, norm))


def similarity(vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
    """S1/S2: Pearson correlation of every pair of survey vectors.

    ``SIM(p, q) = (E[g_p * g_q] - E[g_p] E[g_q]) / sqrt(Var(g_p) Var(g_q))`` (Ding et al., 2019,
    claim 3), with expectations over the ``N`` survey images. It is evaluated in float64 in
    the algebraically identical centred form ``E[(g_p - E g_p)(g_q - E g_q)] / ...``, which
    avoids the cancellation of the raw form.

    A constant vector (zero variance) has no defined correlation; here it has similarity 0
    with every other vector and 1 with itself, so the matrix never holds NaN.

    Parameters
    ----------
    vectors : Tensor or ndarray ``[C, N]``

    Returns
    -------
    Tensor ``float64 [C, C]``, symmetric, ones on the diagonal, values in [-1, 1].
    """
    z = _unit_rows(_to_numpy(vectors))
    sim = np.clip(z @ z.T, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return torch.from_numpy(sim)


def _check_n_clusters(n_clusters: Any, c: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise ConfigError(f"n_clusters must be an integer, got {n_clusters!r}")
    if not 1 <= int(n_clusters) <= c:
        raise ConfigError(f"n_clusters must be in [1, {c}] for {c} channels, got {n_clusters}")
    return int(n_clusters)


def _canonical(clusters: Iterable[Iterable[int]]) -> Clusters:
    return sorted((sorted(int(i) for i in c) for c in clusters), key=lambda c: c[0])


def _agglomerative(v: np.ndarray, n_clusters: int) -> Clusters:
    """Seed 000, S2 (claim 4): bottom-up merging of the two most similar clusters.

    The similarity matrix is computed once, then kept up to date: after merging clusters
    ``a < b`` into ``a`` only ``a``'s row and column are recomputed, from the new mean vector
    (``O(C N)``); each row's best partner is cached and rescanned only when it was ``a`` or
    ``b``. Ties go to the lowest row, then the lowest column (row-major order).
    """
    with _one_blas_thread():  # a matrix-vector product per merge: threads only add overhead
        return _agglomerative_loop(v, n_clusters)


def merge_tree(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """The whole S2 merge sequence (down to one cluster) as a SciPy linkage matrix.

    Row ``t`` is ``[cluster_a, cluster_b, 1 - SIM, size]``: the ``t``-th merge of
    :func:`cluster`'s agglomerative method, with SciPy's numbering (leaves ``0..C-1``, the
    cluster made by merge ``t`` is ``C + t``). Feed it to ``scipy.cluster.hierarchy.dendrogram``.
    Heights need not be monotone (a merged cluster's mean can correlate better with a third
    cluster than its parts did).
    """
    v = _to_numpy(vectors)
    if v.shape[0] < 2:
        raise ConfigError("a merge tree needs at least two channels")
    record: list[tuple[int, int, float, int]] = []
    with _one_blas_thread():
        _agglomerative_loop(v, 1, record)
    return np.array(record, dtype=np.float64)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _agglomerative_loop(v: np.ndarray, n_clusters: int,
                        record: list[tuple[int, int, float, int]] | None = None) -> Clusters:
    c = v.shape[0]
    ids = list(range(c))  # SciPy linkage numbering of the cluster in each slot
    sums = v.copy()
    counts = np.ones(c)
    members: list[list[int]] = [[i] for i in range(c)]
    z = _unit_rows(v)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    active = np.ones(c, dtype=bool)
    best = sim.argmax(axis=1)
    best_val = sim[np.arange(c), best]
    for _ in range(c - n_clusters):
        i = int(best_val.argmax())
        j = int(best[i])
        a, b = min(i, j), max(i, j)
        if record is not None:
            record.append((ids[a], ids[b], max(0.0, 1.0 - float(best_val[i])),
                           len(members[a]) + len(members[b])))
            ids[a] = c + len(record) - 1
        sums[a] += sums[b]
        counts[a] += counts[b]
        members[a] += members[b]
        members[b] = []
        active[b] = False
        sim[b, :] = -np.inf
        sim[:, b] = -np.inf
        best_val[b] = -np.inf
        # the merged cluster's vector: the arithmetic mean of ALL its members' vectors
        z[a] = _unit_rows((sums[a] / counts[a])[None, :])[0]
        z[b] = 0.0
        row = z @ z[a]
        row[~active] = -np.inf
        row[a] = -np.inf
        sim[a, :] = row
        sim[:, a] = row
        # rows whose best partner was a or b: a is their best again if its new similarity is
        # at least the old best value (every other entry is below or equal, and a < b);
        # otherwise rescan the row
        lost = active & ((best == a) | (best == b))
        lost[a] = False
        stale = lost & (row < best_val)
        idx = np.flatnonzero(stale)
        if len(idx):
            best[idx] = sim[idx].argmax(axis=1)
            best_val[idx] = sim[idx, best[idx]]
        better = active & ~stale & ((row > best_val) | ((row == best_val) & (a <= best)))
        better[a] = False
        best[better] = a
        best_val[better] = row[better]
        best[a] = int(row.argmax())
        best_val[a] = row[best[a]] if active.sum() > 1 else -np.inf
    return _canonical(m for m in members if m)


def _even(c: int, n_clusters: int) -> Clusters:
    """Consecutive chunks by channel index, sizes differing by at most one, the larger chunks
    first (the even split of the published C-SGD code)."""
    return [chunk.tolist() for chunk in np.array_split(np.arange(c), n_clusters)]


def _kmeans(v: np.ndarray, n_clusters: int, seed: int) -> Clusters:
    """k-means (scikit-learn, seeded) on the standardised survey vectors: for those, squared
    Euclidean distance is ``2 N (1 - Pearson)``, so k-means groups correlated channels."""
    from sklearn.cluster import KMeans

    z = _unit_rows(v)
    c = z.shape[0]
    if n_clusters == c:
        return [[i] for i in range(c)]
    if n_clusters == 1:
        return [list(range(c))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points: fewer distinct clusters, fixed below
        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(z)
    labels = km.labels_.copy()
    centres = km.cluster_centers_
    # exactly n_clusters non-empty clusters: split the largest cluster by moving out its member
    # farthest from the centre, until every label is used
    while len(np.unique(labels)) < n_clusters:
        used = np.unique(labels)
        free = next(k for k in range(n_clusters) if k not in set(used.tolist()))
        sizes = np.bincount(labels, minlength=n_clusters)
        big = int(sizes.argmax())
        idx = np.flatnonzero(labels == big)
        far = idx[int(((z[idx] - centres[big]) ** 2).sum(1).argmax())]
        labels[far] = free
    return _canonical([np.flatnonzero(labels == k).tolist() for k in range(n_clusters)])


def cluster(vectors: torch.Tensor | np.ndarray, n_clusters: int, method: str = "agglomerative", *,
            seed: int = 0) -> Clusters:
    """S2: partition the ``C`` channels into ``n_clusters`` clusters of similar filters.

    Parameters
    ----------
    vectors : Tensor or ndarray ``[C, N]``
        Survey vectors (:func:`survey`).
    n_clusters : int
        In ``[1, C]``.
    method : {"agglomerative", "even", "kmeans"}
        ``"agglomerative"`` (default, the paper's S2): start from singletons; repeatedly merge the
        two clusters whose vectors have the highest Pearson correlation (:func:`similarity`);
        the merged cluster's vector is the arithmetic mean of all its members' vectors; stop
        at ``n_clusters``. ``"even"``: consecutive equal chunks of channel indices (the
        published C-SGD code's even split; ignores the vectors). ``"kmeans"``: scikit-learn's
        k-means (k-means++ start, ``random_state=seed``) on the standardised vectors.
    seed : int
        Seeds k-means.

    Returns
    -------
    list of list of int
        A partition of ``range(C)`` into exactly ``n_clusters`` non-empty clusters, each
        sorted ascending, clusters ordered by their first (lowest) member.

    Raises
    ------
    ConfigError
        ``n_clusters`` outside ``[1, C]``, an unknown method, or malformed vectors.
    """
    v = _to_numpy(vectors)
    c = v.shape[0]
    if c == 0:
        raise ConfigError("cannot cluster zero channels")
    n = _check_n_clusters(n_clusters, c)
    if method == "agglomerative":
        return _agglomerative(v, n)
    if method == "even":
        return _even(c, n)
    if method == "kmeans":
        return _kmeans(v, n, seed)
    raise ConfigError(f"unknown clustering method {method!r}; choose from {', '.join(CLUSTERING_METHODS)}")


# =============================================================================================
# clusters <-> groups
# =============================================================================================

def _check_partition(clusters: Any, size: int, where: str) -> Clusters:
    try:
        canon = _canonical(clusters)
    except (TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{where}: clusters must be lists of channel indices ({exc})") from None
    flat = sorted(i for c in canon for i in c)
    if any(not c for c in clusters) or flat != list(range(size)):
        raise ConfigError(f"{where}: clusters must partition the {size} channels 0..{size - 1} "
                          "into non-empty, disjoint lists")
    return canon


def group_clusters(info: DependencyInfo, clusters: Mapping[Any, Any]) -> dict[str, Clusters]:
    """Normalise ``{producer module / name / group name: clusters}`` to ``{group name:
    canonical clusters}``; coupled producers must agree (else :class:`ConfigError`)."""
    out: dict[str, Clusters] = {}
    for key, value in clusters.items():
        g = info.producer_group(key)
        label = info.names.get(key, key) if isinstance(key, nn.Module) else key
        canon = _check_partition(value, g.size, f"clusters of {label!r} (group {g.name!r})")
        if g.name in out and out[g.name] != canon:
            raise ConfigError(f"layers of the coupled group {g.name!r} were given different "
                              f"clusterings (e.g. {label!r}); coupled producers share one clustering")
        out[g.name] = canon
    return out
