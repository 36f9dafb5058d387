"""Similarity-learning (centripetal) filter pruning — seed 000, ``../shared/METHODS.md`` §1.

The method reads like the document's four steps:

S1 survey
    :func:`survey` streams a survey set through the network and keeps, for every channel,
    the global average pool (GAP) of its output for each image: a survey vector
    ``g^(p)`` in R^N. Only ``N x C`` numbers per layer are stored, never a feature map.
S2 clustering
    :func:`similarity` is the Pearson correlation of two survey vectors,
    ``SIM(p, q) = (E[g_p g_q] - E[g_p] E[g_q]) / sqrt(Var g_p Var g_q)``, and
    :func:`cluster` merges clusters bottom-up (most similar pair first, the merged cluster's
    vector being the mean of all its members' vectors) until the requested number is left.
S3 centripetal training
    :class:`CentripetalTransform` rewrites the gradients of every filter ``F_j`` of a
    cluster ``H(j)`` so that one SGD step performs::

        F_j <- F_j - tau * ( mean_{k in H(j)} dL/dF_k + eta * F_j
                             + eps * (F_j - mean_{k in H(j)} F_k) )

    (tau: learning rate, eta: weight decay, eps: centripetal strength). All members get the
    same increment and are pulled to the cluster centre until they are identical.
S4 merge
    :func:`merge` keeps the lowest-numbered member of each cluster, adds the other members'
    input slices to its slice in every consumer, ``K[:, k] <- sum_{m in H(k)} K[:, m]``, and
    deletes the rest (through the engine's :class:`~prunekit.engine.GroupPlan` ``merge``).
    Exact once the members are identical: no fine-tuning.

:func:`run` is the method behind ``prunekit.prune(..., method="csgd")``. Decisions taken
where the document is silent are listed in ``docs/csgd.md``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data.batches import count, first_input, iter_batches
from ..engine import DependencyInfo, GroupPlan, PruningPlan, analyse, apply_plan
from ..engine.budget import budget_widths
from ..engine.graph import ChannelGroup, Slot
from ..errors import ConfigError, DataError, ModelError
from ..utils import eval_mode, module_device, progress, resolve_device
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .registry import register_method

__all__ = [
    "CLUSTERING_METHODS", "GRADIENTS", "STATISTICS", "CentripetalTransform", "auto_epsilon",
    "centripetal_gradient", "centripetal_step", "cluster", "max_intra_distance", "merge",
    "merge_plan", "merge_tree", "recalibrate_bn", "run", "similarity", "survey",
]

log = logging.getLogger(__name__)

CLUSTERING_METHODS = ("agglomerative", "even", "kmeans")
#: S1's statistic of a channel's map: the GAP of the map itself (before the non-linearity; the
#: document's reading and the default) or of the rectified map ``max(0, x)``
STATISTICS = ("gap", "relu-gap")
#: S3's shared gradient: the document's cluster mean, or (an ablation) the cluster sum, which is
#: the gradient the merged filter would get in the pruned network
GRADIENTS = ("mean", "sum")

@dataclass
class CsgdOptions(MethodOptions):
    """Options of :func:`run` (centripetal SGD, S1-S4)."""

    # one epoch: measured best wherever training continues after the merge (docs/csgd.md)
    centripetal_epochs: int = option(1, "centripetal training epochs (S3); --finetune-epochs adds "
                                     "plain fine-tuning after the exact merge", min=0)
    epsilon: float | str = option("auto", "centripetal strength: a number or auto (the smallest "
                                  "value that converges on the planned schedule)", kind="float",
                                  min=0, words=("auto",))
    bn_epsilon_scale: float = option(1.0, "centripetal strength of the BN parameters relative "
                                     "to epsilon", above=0)
    gradient: str = option("mean", "S3's shared gradient: the cluster mean (the paper) or sum "
                           "(an ablation)", choices=GRADIENTS)
    centripetal_distill: bool = option(False, "train S3 with distillation from the original "
                                       "model (a recipe, not the paper's)")
    survey_samples: int | None = option(None, "survey images (S1); None: calib_images, else 1000",
                                        kind="int", min=1)
    calib_images: int | None = option(None, "the generic calibration images: stands for "
                                      "survey_samples when that is not given", kind="int", min=1)
    # "relu-gap": better right after the merge, worse after fine-tuning (docs/csgd.md)
    survey_statistic: str = option("gap", "S1 statistic: gap (GAP of each channel's map before "
                                   "the non-linearity) or relu-gap (of the rectified map)",
                                   choices=STATISTICS)
    clustering: str = option("agglomerative", "S2 clustering", choices=CLUSTERING_METHODS)
    lr: float = option(0.01, "learning rate of S3 (cosine schedule)", above=0)
    batch_size: int = option(128, "batch size of S1 and S3", min=1)
    momentum: float = option(0.9, "momentum of S3 (Nesterov)", min=0, below=1)
    weight_decay: float = option(5e-4, "weight decay eta of S3", min=0)
    tolerance: float = option(1e-5, "clusters count as converged below this intra-cluster "
                              "distance", above=0)
    stop_when_converged: bool = option(False, "stop S3 once the clusters converged")
    recalibrate_bn: bool = option(True, "re-estimate BN statistics after S3")
    recalibrate_samples: int = option(2048, "images for that re-estimate", min=0)
    max_steps_per_epoch: int | None = option(None, "cap on optimizer steps per epoch",
                                             kind="int", min=1)
    train_config: Any = option(None, "base TrainConfig of S3 (everything not set here)")
    state_path: Any = option(None, "training-state file written after every centripetal epoch "
                             "(a path)")
    resume: bool = option(False, "continue S3 from state_path (equals an uninterrupted run)")

    def validate(self) -> None:
        if self.survey_samples is None:
            self.survey_samples = self.calib_images or 1000


#: Default options of :func:`run`.
DEFAULTS: dict[str, Any] = CsgdOptions.defaults()

Clusters = list[list[int]]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


# =============================================================================================
# S1: survey
# =============================================================================================

def _as_batches(data: Any, samples: int, batch_size: int) -> tuple[int, Iterable[torch.Tensor]]:
    """The first ``samples`` inputs of ``data`` (see :func:`prunekit.data.batches.iter_batches`:
    an ImageDataset, a map-style dataset, a DataLoader or a tensor), batch by batch."""
    if data is None:
        raise DataError("the survey (S1) needs data: pass a dataset, a DataLoader or a tensor of inputs")
    n = count(data, samples)
    if n <= 0:
        raise DataError("the survey set is empty")
    return n, (x for x, _ in iter_batches(data, n, batch_size))


def _resolve_groups(info: DependencyInfo, layers: Iterable[Any] | None) -> list[ChannelGroup]:
    if layers is None:
        return list(info.groups)
    out: list[ChannelGroup] = []
    for layer in layers:
        g = _group_of_key(info, layer)
        if all(g.name != h.name for h in out):
            out.append(g)
    return out


def _following_bn(model: nn.Module, example_inputs: torch.Tensor,
                  producers: Sequence[nn.Module]) -> dict[nn.Module, nn.Module]:
    """Producer -> the BatchNorm whose input is exactly that producer's output tensor.

    Found by one traced forward pass with hooks (the tensor objects are compared), so it
    works for any wiring: ``conv -> bn`` gives a pair, a conv whose output first goes through
    a concatenation or an add (DenseNet, pre-activation blocks) gives none.
    """
    outputs: dict[int, nn.Module] = {}
    found: dict[nn.Module, nn.Module] = {}
    handles = []

    def after_producer(module, _inp, out):
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = module
            keep_alive.append(out)

    def before_bn(module, inp):
        if inp and isinstance(inp[0], torch.Tensor):
            producer = outputs.get(id(inp[0]))
            if producer is not None and producer not in found:
                found[producer] = module

    keep_alive: list[torch.Tensor] = []  # ids stay unique while the tensors live
    for p in producers:
        handles.append(p.register_forward_hook(after_producer))
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            handles.append(m.register_forward_pre_hook(before_bn))
    with eval_mode(model, handles), torch.no_grad():
        model(example_inputs.to(module_device(model)))
    return found


@dataclass
class _SurveySource:
    group: str
    producer: Slot
    module: nn.Module     # the hooked layer: the producer's BatchNorm, else the producer
    rows: list[list[int]]  # per root channel, the hooked layer's channel indices


def _standardise(block: torch.Tensor) -> torch.Tensor:
    """Rows to zero mean and unit variance over the samples (constant rows -> zeros)."""
    b = block.double()
    centred = b - b.mean(1, keepdim=True)
    std = centred.pow(2).mean(1, keepdim=True).sqrt()
    scale = b.abs().amax(1, keepdim=True)
    const = std <= 64 * torch.finfo(torch.float64).eps * scale
    return torch.where(const, torch.zeros_like(centred), centred / std.clamp_min(1e-300)).float()


def survey(model: nn.Module, data: Any, layers: Iterable[Any] | None = None, samples: int = 1000,
           batch_size: int = 128, *, example_inputs: torch.Tensor | None = None,
           info: DependencyInfo | None = None, standardize: bool = True,
           statistic: str = "gap", device: str | torch.device | None = None,
           stats: dict[str, Any] | None = None
           ) -> dict[str, torch.Tensor]:
    """S1: the survey vectors of every channel group (GAP of each channel per survey image).

    The images are streamed batch by batch; forward hooks reduce each hooked layer's output
    ``[B, C, H, W]`` to its global average pool ``[B, C]`` at once, so memory is ``O(N * C)``
    floats per layer and no feature map is ever stored (seed 000, S1: the document's
    ResNet-50 example would need 41 GB of feature maps).

    Which tensor: the output of the BatchNorm that directly follows each producer (what the
    rest of the network sees, before the non-linearity), else the producer's own output (a
    DenseNet conv, whose BatchNorms sit behind concatenations). Pearson correlation is
    invariant to a per-channel affine map with positive scale, so the two choices differ only
    where a BatchNorm scale ``gamma`` is negative.

    Which statistic: ``"gap"`` (default) averages that map; ``"relu-gap"`` averages the
    rectified map ``max(0, x)``, the feature a following ReLU passes on. Before the
    non-linearity the GAP of a convolution is, up to the zero padding at the borders, a linear
    function of its input channels' GAPs weighted by the kernels' spatial sums, so filters that
    differ only in their spatial pattern get similar vectors; the rectified statistic tells
    them apart. Measured on the ResNet-20 benchmark (docs/csgd.md): its clusters cost less at
    the merge, but the network ends lower after fine-tuning.

    Coupled groups (several producers tied by residual adds or concatenations) are clustered
    once: their vector is the concatenation, along the sample axis, of each producer's
    vectors, each producer's block standardised per channel (zero mean, unit variance over the
    ``N`` images). The Pearson correlation of two such concatenations is exactly the mean,
    over the producers, of the per-producer correlations, so every producer counts equally and
    differences of scale or offset between producers do not create spurious correlation.

    Parameters
    ----------
    model : nn.Module
        The network (run in eval mode, without gradients; its mode is restored).
    data : ImageDataset, map-style dataset of ``(x, y)`` or Tensor ``[N, C, H, W]``
        The survey set X; its first ``samples`` inputs are used.
    layers : iterable of modules / names, optional
        Groups to survey, named by any producing layer (or the group name). Default: every
        prunable group.
    samples : int
        ``N = |X|``, the survey vectors' length.
    batch_size : int
        Images per forward pass.
    example_inputs : Tensor, optional
        For tracing the groups (default: the first survey input).
    info : DependencyInfo, optional
        A ready analysis of ``model`` (skips tracing).
    standardize : bool
        Standardise each producer's block as described above (default). With ``False`` the
        raw GAP values are returned (concatenated for coupled groups).
    statistic : {"gap", "relu-gap"}
        GAP of the map itself (default) or of the rectified map (see above).
    device : str or torch.device, optional
        Where to run (default: where the model is).
    stats : dict, optional
        Filled with ``bytes`` (memory of the stored GAP vectors), ``seconds`` and ``samples``.

    Returns
    -------
    dict[str, Tensor]
        Group name -> ``float32 [C, P * N]`` (``P``: producers of the group; ``[C, N]`` for a
        plain layer).

    Examples
    --------
    >>> vectors = survey(model, train_set, samples=512)          # doctest: +SKIP
    >>> vectors["layer1.0.conv1"].shape                          # doctest: +SKIP
    torch.Size([16, 512])
    """
    t0 = time.perf_counter()
    samples, batch_size = int(samples), int(batch_size)
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    if statistic not in STATISTICS:
        raise ConfigError(f"unknown survey statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
    rectify = statistic == "relu-gap"
    if info is None:
        x0 = example_inputs if example_inputs is not None else first_input(data)
        info = analyse(model, x0)
    groups = _resolve_groups(info, layers)
    dev = torch.device(device) if device is not None else module_device(model)
    bn_after = _following_bn(model, info.example_inputs,
                             [s.module for g in groups for s in g.producers])
    sources: list[_SurveySource] = []
    for g in groups:
        for slot in g.producers:
            hooked = bn_after.get(slot.module, slot.module)
            sources.append(_SurveySource(g.name, slot, hooked,
                                         [slot.positions[c] for c in range(g.size)]))

    n, batches = _as_batches(data, samples, batch_size)
    store: dict[nn.Module, torch.Tensor] = {}
    cursor = {"at": 0}
    handles = []

    def hook(module, _inp, out):
        o = out.detach().clamp_min(0) if rectify else out.detach()
        gap = o.flatten(2).mean(2) if o.dim() > 2 else o
        buf = store.get(module)
        if buf is None:
            buf = store[module] = torch.empty(gap.shape[1], n, dtype=torch.float32)
        lo = cursor["at"]
        buf[:, lo:lo + gap.shape[0]] = gap.float().t().cpu()

    for m in {s.module for s in sources}:
        handles.append(m.register_forward_hook(hook))
    with eval_mode(model, handles), torch.no_grad():
        n_batches = math.ceil(n / batch_size)
        for x in progress(batches, desc="S1 survey", total=n_batches):
            model(x.to(dev))
            cursor["at"] += x.shape[0]

    out: dict[str, torch.Tensor] = {}
    for g in groups:
        blocks = []
        for s in (s for s in sources if s.group == g.name):
            gap = store[s.module]
            block = torch.stack([gap[rows].mean(0) for rows in s.rows])
            blocks.append(_standardise(block) if standardize else block)
        out[g.name] = torch.cat(blocks, dim=1)
    if stats is not None:
        stats.update(bytes=int(sum(t.numel() * t.element_size() for t in store.values())),
                     seconds=time.perf_counter() - t0, samples=n)
    return out


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

    ``SIM(p, q) = (E[g_p * g_q] - E[g_p] E[g_q]) / sqrt(Var(g_p) Var(g_q))`` (seed 000,
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
        ``"agglomerative"`` (default, seed 000 S2): start from singletons; repeatedly merge the
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

def _group_of_key(info: DependencyInfo, key: Any) -> ChannelGroup:
    """The group named ``key`` or produced (output rows) by layer ``key`` (module or name)."""
    if isinstance(key, str):
        for g in info.groups:
            if g.name == key:
                return g
        named = dict(info.model.named_modules())
        if key not in named:
            raise ConfigError(f"no layer or group named {key!r} in the model")
        module = named[key]
    elif isinstance(key, nn.Module):
        module = key
    else:
        raise ConfigError(f"clusters must be keyed by a producing layer (module or name), got {key!r}")
    for g in info.groups:
        if any(s.module is module for s in g.producers):
            return g
    name = info.names.get(module, type(module).__name__)
    raise ConfigError(f"layer {name!r} does not produce the channels of any prunable group "
                      "(key clusters by a conv/linear producer, e.g. the conv before a BatchNorm)")


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
        g = _group_of_key(info, key)
        label = info.names.get(key, key) if isinstance(key, nn.Module) else key
        canon = _check_partition(value, g.size, f"clusters of {label!r} (group {g.name!r})")
        if g.name in out and out[g.name] != canon:
            raise ConfigError(f"layers of the coupled group {g.name!r} were given different "
                              f"clusterings (e.g. {label!r}); coupled producers share one clustering")
        out[g.name] = canon
    return out


# =============================================================================================
# S3: centripetal training
# =============================================================================================

def centripetal_gradient(weight: torch.Tensor, grad: torch.Tensor, clusters: Sequence[Sequence[int]],
                         weight_decay: float, epsilon: float) -> torch.Tensor:
    """S3 on one tensor whose rows (dim 0) are filters: the rewritten gradient.

    ``g_i' = mean_{k in H(i)} g_k + eta * w_i + eps * (w_i - mean_{k in H(i)} w_k)``, so that a
    plain SGD step ``w <- w - tau * g'`` is the document's update. Rows in no cluster get
    ``g_i + eta * w_i`` (ordinary weight decay).

    Parameters
    ----------
    weight, grad : Tensor ``[C, ...]``
    clusters : sequence of sequences of int
        Disjoint row indices.
    weight_decay, epsilon : float
        ``eta`` and ``eps``.

    Returns
    -------
    Tensor, same shape as ``grad``.
    """
    out = grad + weight_decay * weight
    for members in clusters:
        idx = torch.as_tensor(list(members), dtype=torch.long, device=weight.device)
        if len(idx) == 0:
            continue
        w, g = weight.index_select(0, idx), grad.index_select(0, idx)
        out[idx] = g.mean(0, keepdim=True) + weight_decay * w + epsilon * (w - w.mean(0, keepdim=True))
    return out


@dataclass
class _Entry:
    """One per-channel tensor of a clustered layer and how its rows are clustered."""

    name: str
    tensor: torch.Tensor   # a Parameter (trained) or a buffer (running statistics)
    rows: torch.Tensor     # rows belonging to clustered channels
    labels: torch.Tensor   # row -> cluster-and-position id, 0..n_labels-1
    members: torch.Tensor  # row -> global channel id (for distances)
    n_labels: int
    eps_scale: float       # 1 for conv/linear kernels, ``bn_epsilon_scale`` otherwise

    def on(self, device: torch.device) -> _Entry:
        if self.rows.device != device:
            self.rows, self.labels, self.members = (t.to(device) for t in (self.rows, self.labels,
                                                                          self.members))
        return self


def _is_kernel(module: nn.Module, attr: str) -> bool:
    return attr == "weight" and isinstance(module, (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d))


def _layout(info: DependencyInfo, clusters: Mapping[str, Clusters], *, buffers: bool = False,
            bn_epsilon_scale: float = 0.1) -> tuple[list[_Entry], int]:
    """Every per-channel parameter (or running statistic) of every producer and channel-wise
    layer of the clustered groups: the conv/linear rows, their biases, BatchNorm gamma/beta,
    depthwise kernels (a channel that a layer carries at several positions is clustered
    position by position)."""
    rows: dict[int, list[int]] = {}
    labels: dict[int, list[int]] = {}
    members: dict[int, list[int]] = {}
    n_labels: dict[int, int] = {}
    meta: dict[int, tuple[str, torch.Tensor, float]] = {}
    base = 0
    for g in info.groups:
        if g.name not in clusters:
            continue
        for slot in g.producers + g.channelwise:
            attrs = ("running_mean", "running_var") if buffers else ("weight", "bias")
            for attr in attrs:
                t = getattr(slot.module, attr, None)
                if not isinstance(t, torch.Tensor) or t.dim() < 1:
                    continue
                if buffers == isinstance(t, nn.Parameter):
                    continue
                top = max(p for ps in slot.positions.values() for p in ps)
                if t.shape[0] <= top or (isinstance(slot.module, nn.PReLU) and t.numel() == 1):
                    continue  # a shared (not per-channel) value
                key = id(t)
                if key not in meta:
                    scale = 1.0 if _is_kernel(slot.module, attr) else bn_epsilon_scale
                    meta[key] = (f"{slot.name}.{attr}", t, scale)
                    rows[key], labels[key], members[key], n_labels[key] = [], [], [], 0
                for cl in clusters[g.name]:
                    depth = len(slot.positions[cl[0]])
                    for pos in range(depth):
                        lab = n_labels[key]
                        n_labels[key] += 1
                        for ch in cl:
                            ps = slot.positions[ch]
                            if len(ps) != depth:
                                raise ModelError(f"layer {slot.name!r} carries channels {cl[0]} and {ch} "
                                                 f"of group {g.name!r} at different numbers of positions")
                            rows[key].append(ps[pos])
                            labels[key].append(lab)
                            members[key].append(base + ch)
        base += g.size
    entries = []
    for key, (name, t, scale) in meta.items():
        if len(set(rows[key])) != len(rows[key]):
            raise ModelError(f"{name}: a row is claimed by two groups; cannot cluster it")
        entries.append(_Entry(name, t, torch.tensor(rows[key], dtype=torch.long),
                              torch.tensor(labels[key], dtype=torch.long),
                              torch.tensor(members[key], dtype=torch.long), n_labels[key], scale))
    return entries, base


def _label_mean(x: torch.Tensor, e: _Entry, total: bool = False) -> torch.Tensor:
    """Mean (or with ``total`` the sum) of ``x`` (rows already gathered) over each label,
    shape ``[n_labels, ...]``."""
    sums = torch.zeros((e.n_labels, *x.shape[1:]), dtype=x.dtype, device=x.device)
    sums.index_add_(0, e.labels, x)
    if total:
        return sums
    counts = torch.bincount(e.labels, minlength=e.n_labels).to(x.dtype)
    return sums / counts.view(-1, *([1] * (x.dim() - 1)))


def _distances(entries: Sequence[_Entry], n_members: int) -> torch.Tensor:
    """Per channel: L2 distance of its per-channel tensors to its cluster's mean."""
    sq = torch.zeros(max(n_members, 1), dtype=torch.float64)
    with torch.no_grad():
        for e in entries:
            t = e.tensor.detach()
            e.on(t.device)
            x = t.index_select(0, e.rows)
            d = (x - _label_mean(x, e).index_select(0, e.labels)).double()
            sq.index_add_(0, e.members.cpu(), d.pow(2).reshape(len(d), -1).sum(1).cpu())
    return sq.sqrt()


def _info_for(model: nn.Module, example_inputs: torch.Tensor | None,
              info: DependencyInfo | None) -> DependencyInfo:
    if info is not None:
        return info
    if example_inputs is None:
        raise ConfigError("example_inputs are needed to trace the model's channel groups")
    return analyse(model, example_inputs)


class CentripetalTransform:
    """S3 as a gradient transform for :func:`prunekit.train.fit`.

    Called after ``backward`` and before ``optimizer.step``, it rewrites ``p.grad`` of every
    per-channel parameter of every producer and channel-wise layer of the clustered groups
    (conv/linear rows, biases, BatchNorm gamma/beta, depthwise kernels)::

        g_i' = mean_{k in H(i)} g_k + eta * w_i + eps_p * (w_i - mean_{k in H(i)} w_k)

    with ``eps_p = epsilon`` for conv/linear kernels and ``bn_epsilon_scale * epsilon`` for
    biases and BatchNorm gamma/beta (the published C-SGD code's 10x smaller value). Plain SGD
    then performs the update of seed 000 S3; with momentum the differences between members
    still decay geometrically (they see identical mean gradients). Because ``eta * w`` is
    applied here, the optimizer's own weight decay must be off for these tensors: pass
    ``no_weight_decay=transform.parameters()`` (rows of those tensors outside any cluster
    get ``eta * w`` here too). Parameters outside the groups train normally.

    Parameters
    ----------
    info_or_model : DependencyInfo or nn.Module
        The model's analysis (or the model, traced with ``example_inputs``).
    clusters : mapping
        Producing layer (module, name) or group name -> clusters (a partition of the group's
        channels). Coupled producers share one clustering.
    weight_decay : float
        ``eta``, the network's own L2 factor.
    epsilon : float
        ``eps``, the centripetal strength.
    bn_epsilon_scale : float
        Factor on ``epsilon`` for biases and normalisation parameters.
    gradient : {"mean", "sum"}
        The shared gradient: the document's ``mean_{k in H(i)} g_k`` (default) or, as an
        ablation, the cluster sum ``|H(i)| * mean`` (what the merged filter's gradient would be
        in the pruned network, where it feeds all the members' consumer slices).
    example_inputs : Tensor, optional
        Needed when a model is passed.

    Examples
    --------
    >>> t = CentripetalTransform(info, {"layer1.0.conv1": clusters}, 5e-4, 0.3)  # doctest: +SKIP
    >>> fit(model, train, cfg, hooks=Hooks(grad_transform=t,                     # doctest: +SKIP
    ...                                    no_weight_decay=t.parameters()))
    """

    def __init__(self, info_or_model: DependencyInfo | nn.Module, clusters: Mapping[Any, Any],
                 weight_decay: float, epsilon: float, bn_epsilon_scale: float = 0.1, *,
                 gradient: str = "mean", example_inputs: torch.Tensor | None = None) -> None:
        if gradient not in GRADIENTS:
            raise ConfigError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        self.gradient = gradient
        for label, value in (("weight_decay", weight_decay), ("epsilon", epsilon),
                             ("bn_epsilon_scale", bn_epsilon_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{label} must be a finite number >= 0, got {value!r}")
        info = (info_or_model if isinstance(info_or_model, DependencyInfo)
                else _info_for(info_or_model, example_inputs, None))
        self.info = info
        self.clusters = group_clusters(info, clusters)
        self.weight_decay = float(weight_decay)
        self.epsilon = float(epsilon)
        self.bn_epsilon_scale = float(bn_epsilon_scale)
        self.entries, self.n_channels = _layout(info, self.clusters, bn_epsilon_scale=bn_epsilon_scale)
        self.buffer_entries, _ = _layout(info, self.clusters, buffers=True)

    def parameters(self) -> list[nn.Parameter]:
        """The tensors whose gradient is rewritten (give them to ``Hooks.no_weight_decay``)."""
        return [e.tensor for e in self.entries]

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None) -> None:
        """Rewrite the gradients in place (``model`` is accepted for the trainer's hook API;
        the transform acts on the parameters it was built for)."""
        wd = self.weight_decay
        for e in self.entries:
            p = e.tensor
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            e.on(p.device)
            w, g = p.detach(), p.grad
            w_rows, g_rows = w.index_select(0, e.rows), g.index_select(0, e.rows)
            mean_g = _label_mean(g_rows, e, self.gradient == "sum").index_select(0, e.labels)
            mean_w = _label_mean(w_rows, e).index_select(0, e.labels)
            eps = self.epsilon * e.eps_scale
            new_rows = mean_g + wd * w_rows + eps * (w_rows - mean_w)
            if wd:
                g.add_(w, alpha=wd)  # rows outside any cluster: ordinary weight decay
            g.index_copy_(0, e.rows, new_rows.to(g.dtype))

    def max_distance(self) -> float:
        """Largest L2 distance of a channel's parameters to its cluster mean (0 = converged)."""
        return float(_distances(self.entries, self.n_channels).max())

    def max_buffer_distance(self) -> float:
        """Like :meth:`max_distance` for the BatchNorm running statistics."""
        return float(_distances(self.buffer_entries, self.n_channels).max()) if self.buffer_entries else 0.0


def centripetal_step(model: nn.Module, clusters: Mapping[Any, Any], weight_decay: float,
                     epsilon: float, *, example_inputs: torch.Tensor | None = None,
                     info: DependencyInfo | None = None, bn_epsilon_scale: float = 0.1
                     ) -> CentripetalTransform:
    """S3 kernel: rewrite the current gradients of ``model`` in place (call between
    ``loss.backward()`` and ``optimizer.step()``; turn the optimizer's weight decay off for
    the returned transform's ``parameters()``).

    Builds a :class:`CentripetalTransform`, applies it once and returns it, so later steps
    can call the returned object directly without tracing again.
    """
    transform = CentripetalTransform(_info_for(model, example_inputs, info), clusters, weight_decay,
                                     epsilon, bn_epsilon_scale)
    transform(model)
    return transform


def max_intra_distance(model: nn.Module, clusters: Mapping[Any, Any],
                       example_inputs: torch.Tensor | None = None, *,
                       info: DependencyInfo | None = None) -> float:
    """Largest L2 distance, over all clusters, of a member's parameters (its conv/linear row,
    bias, BatchNorm gamma/beta, depthwise kernel, concatenated) to its cluster's mean.

    0 means every cluster's members are identical and the S4 merge is exact (given equal
    BatchNorm running statistics, see :func:`recalibrate_bn`).
    """
    info = _info_for(model, example_inputs, info)
    entries, n = _layout(info, group_clusters(info, clusters))
    return float(_distances(entries, n).max())


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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Any, samples: int = 2048, batch_size: int = 128,
                   device: str | torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics as the exact average over ``samples``
    training inputs (no augmentation, no gradients, weights untouched).

    Used at the end of S3: once a cluster's filters are identical their channels are
    identical, so recalibrated statistics are identical too and the S4 merge is exact even
    when training was too short for the running averages (momentum 0.1) to forget the
    pre-training values. Returns the number of images used.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not bns:
        return 0
    dev = torch.device(device) if device is not None else module_device(model)
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        n, batches = _as_batches(data, samples, batch_size)
        for x in batches:
            model(x.to(dev))
    finally:
        for m, (mom, tr) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.train(tr)
        model.train(was_training)
    return n


# =============================================================================================
# S4: merge
# =============================================================================================

def merge_plan(info: DependencyInfo, clusters: Mapping[Any, Any]) -> PruningPlan:
    """S4 as a :class:`PruningPlan`: per group keep each cluster's lowest member and merge the
    others into it (their consumers' input slices are summed into its slice)."""
    by_group = group_clusters(info, clusters)
    plans = []
    for g in info.groups:
        cl = by_group.get(g.name)
        if cl is None or len(cl) == g.size:
            continue
        plans.append(GroupPlan(g.name, g.size, [c[0] for c in cl], {c[0]: c[1:] for c in cl if len(c) > 1}))
    return PruningPlan(plans, {"method": "csgd"})


def merge(model: nn.Module, example_inputs: torch.Tensor, clusters: Mapping[Any, Any], *,
          info: DependencyInfo | None = None) -> nn.Module:
    """S4: merge every cluster into its lowest-numbered filter and return the smaller model.

    For each cluster ``H(k)`` (``k`` its lowest member) every consumer's input slice becomes
    ``K[:, k] <- sum_{m in H(k)} K[:, m]`` and the other members are deleted from every
    producer, channel-wise layer and consumer; ``k`` keeps its own kernel, bias and BatchNorm
    (running statistics included). Exact when the members are identical (after S3).

    Parameters
    ----------
    model : nn.Module
        Not modified (a pruned copy is returned).
    example_inputs : Tensor
        An input batch for tracing.
    clusters : mapping
        Producing layer (module or name; any producer of a coupled group) or group name ->
        a partition of the group's channels. Groups not named are left as they are.
    info : DependencyInfo, optional
        A ready analysis of ``model`` (skips tracing).

    Returns
    -------
    nn.Module
        The merged, smaller copy.

    Raises
    ------
    ConfigError
        A key that produces no prunable group, clusters that are not a partition, or two
        producers of one coupled group with different clusterings.
    """
    info = info if info is not None else analyse(model, example_inputs)
    return apply_plan(model, example_inputs, merge_plan(info, clusters))


# =============================================================================================
# the method
# =============================================================================================

def _train_config(o: CsgdOptions, ctx: PruneContext):
    from ..train import TrainConfig

    base = o.train_config
    cfg = copy.copy(base) if base is not None else TrainConfig()
    cfg.epochs = max(1, o.centripetal_epochs)
    if base is None or "lr" in ctx.options:
        cfg.lr = o.lr
    if base is None or "batch_size" in ctx.options:
        cfg.batch_size = o.batch_size
    if base is None or "momentum" in ctx.options:
        cfg.momentum = o.momentum
    if base is None or "weight_decay" in ctx.options:
        cfg.weight_decay = o.weight_decay
    if base is None or "max_steps_per_epoch" in ctx.options:
        cfg.max_steps_per_epoch = o.max_steps_per_epoch
    cfg.seed = ctx.seed
    cfg.device = ctx.device
    cfg.eval_every = 0
    cfg.validate()
    return cfg


def _planned_lrs(cfg, n_train: int) -> list[float]:
    from ..train.schedule import lr_factor

    steps = max(1, n_train // min(cfg.batch_size, n_train))
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    return [cfg.lr * lr_factor(s, cfg, steps) for s in range(cfg.epochs * steps)]


def _budget_widths(ctx: PruneContext, info: DependencyInfo) -> tuple[dict[str, int], dict[str, Any]]:
    ratio, widths, frac = budget_widths(info, ctx.ratio, ctx.target_macs, round_to=ctx.round_to)
    if ctx.target_macs is None:
        return widths, {"ratio": ratio}
    return widths, {"ratio": ratio, "searched_macs_fraction": frac}


@register_method("csgd", CsgdOptions, own_training=("centripetal_epochs", 0), needs_data=True,
                 resumable=True,
                 summary="centripetal SGD: cluster similar filters, train them together, merge "
                         "exactly (Ding et al., CVPR 2019)")
def run(ctx: PruneContext) -> MethodOutput:
    """Centripetal SGD (Ding et al., CVPR 2019; S1-S4) of ``ctx.model``.

    1. clusters per group: ``C - round(r C)`` for ``ratio=r``; for ``target_macs`` the widths
       found by :func:`~prunekit.engine.budget.solve_budget` (both rounded down to multiples
       of ``ctx.round_to`` when it is set);
    2. S1 :func:`survey` on the first ``survey_samples`` training images;
    3. S2 :func:`cluster` (``clustering``);
    4. S3 centripetal training with :func:`prunekit.train.fit` and a
       :class:`CentripetalTransform` for ``centripetal_epochs`` epochs (converged members stay
       identical, so training goes on for the whole budget unless ``stop_when_converged``, which
       stops once :func:`max_intra_distance` < ``tolerance``); then :func:`recalibrate_bn`;
    5. accuracy right before the merge (with a test set), S4 :func:`merge`, accuracy after.

    Options (``ctx.options``): ``centripetal_epochs`` (1), ``epsilon`` ("auto": the smallest
    value that converges on the planned schedule, :func:`auto_epsilon`; or a number),
    ``bn_epsilon_scale`` (1.0), ``gradient`` ("mean"; "sum" is an ablation, see
    :class:`CentripetalTransform`), ``centripetal_distill`` (False; True trains S3 with
    knowledge distillation from the original model, ``TrainConfig.distill_alpha`` /
    ``distill_temperature``: a recipe, not the document's), ``survey_samples`` (1000),
    ``survey_statistic`` ("gap"; "relu-gap": the rectified map, see :func:`survey`),
    ``clustering`` ("agglomerative"),
    ``lr`` (0.01, cosine schedule), ``batch_size`` (128), ``momentum`` (0.9, Nesterov),
    ``weight_decay`` (5e-4, eta), ``tolerance`` (1e-5), ``stop_when_converged`` (False),
    ``recalibrate_bn`` (True),
    ``recalibrate_samples`` (2048), ``max_steps_per_epoch`` (None), ``train_config`` (a
    :class:`~prunekit.train.TrainConfig` for everything else), ``state_path`` (a training-state
    file written after every centripetal epoch) and ``resume`` (continue S3 from it; the result
    equals an uninterrupted run's). The generic ``calib_images``
    stands for ``survey_samples`` when that is not given.
    """
    o = ctx.parse(CsgdOptions, "csgd")
    if ctx.train_set is None or len(ctx.train_set) == 0:
        raise DataError("csgd needs training data (survey and centripetal training)")
    names = {m: n for n, m in ctx.model.named_modules()}
    ignored = [names.get(layer, layer) if isinstance(layer, nn.Module) else layer
               for layer in ctx.ignored_layers]
    # S3 trains ctx.model in place; the unpruned network stays the distillation teacher
    teacher = ctx.reference() if o.centripetal_distill else None
    model = ctx.model
    x = ctx.example_inputs
    info = analyse(model, x, ignored_layers=ignored)
    widths, extra = _budget_widths(ctx, info)
    targets = {g.name: widths[g.name] for g in info.groups if widths.get(g.name, g.size) < g.size}
    if not targets:
        raise ConfigError("the budget removes no channel; nothing to prune")

    # S1
    device = resolve_device(ctx.device)
    model.to(device)
    s_stats: dict[str, Any] = {}
    vectors = survey(model, ctx.train_set, list(targets), samples=o.survey_samples,
                     batch_size=o.batch_size, info=info, statistic=o.survey_statistic,
                     device=device, stats=s_stats)
    # S2
    clusters: dict[str, Clusters] = {}
    seconds: dict[str, float] = {}
    for name, n in targets.items():
        t0 = time.perf_counter()
        clusters[name] = cluster(vectors[name], n, o.clustering, seed=ctx.seed)
        seconds[name] = time.perf_counter() - t0
    largest = max(targets, key=lambda name: vectors[name].shape[0] * vectors[name].shape[1])

    # S3
    cfg = _train_config(o, ctx)
    transform = CentripetalTransform(info, clusters, cfg.weight_decay, 0.0, o.bn_epsilon_scale,
                                     gradient=o.gradient)
    d0 = transform.max_distance()
    epsilon, reachable = o.epsilon, True
    if epsilon == "auto":
        lrs = _planned_lrs(cfg, len(ctx.train_set))
        nesterov = cfg.nesterov and cfg.momentum > 0
        target = 0.1 * o.tolerance / max(d0, o.tolerance)
        epsilon, reachable = auto_epsilon(
            lrs, momentum=cfg.momentum, nesterov=nesterov, weight_decay=cfg.weight_decay,
            bn_epsilon_scale=o.bn_epsilon_scale, shrink=target)
        if not reachable:  # the margin was not met; can the whole schedule reach the tolerance?
            k = cfg.weight_decay + o.bn_epsilon_scale * epsilon
            reachable = bool(_simulate_difference(np.asarray(lrs), np.array([k]), cfg.momentum,
                                                  nesterov)[0] <= o.tolerance / max(d0, 1e-30))
        if not reachable and o.centripetal_epochs > 0:
            warnings.warn("csgd: the centripetal schedule is too short for the clusters to converge "
                          f"even at the strongest stable epsilon ({epsilon:.3g}); use more "
                          "centripetal_epochs or steps", RuntimeWarning, stacklevel=2)
    transform.epsilon = float(epsilon)
    epochs_run, history = 0, []
    if o.centripetal_epochs > 0 and d0 > o.tolerance:
        from ..train import Hooks, fit

        def on_epoch_end(_epoch: int, _model: nn.Module, record: dict) -> bool:
            # Members that converged stay identical (they share one mean gradient), so by
            # default the whole budget is spent training the clustered network; stopping at
            # convergence is an option.
            record["max_intra_distance"] = transform.max_distance()
            return bool(o.stop_when_converged) and record["max_intra_distance"] < o.tolerance

        hooks = Hooks(grad_transform=transform, no_weight_decay=transform.parameters(),
                      postfix=lambda: {"dist": transform.max_distance()}, on_epoch_end=on_epoch_end,
                      teacher=teacher)
        # S1-S2 are deterministic (seeded), so a resumed run rebuilds the same clusters and
        # continues S3 from the trainer's state file
        result = fit(model, ctx.train_set, cfg, hooks=hooks, checkpoint_path=o.state_path,
                     resume=bool(o.resume))
        epochs_run, history = result.epochs_run, result.history
    if o.recalibrate_bn and o.recalibrate_samples > 0:
        recalibrate_bn(model, ctx.train_set, o.recalibrate_samples, o.batch_size,
                       device=module_device(model))
    model.to(x.device).eval()
    distance = transform.max_distance()
    converged = distance < o.tolerance
    if not converged:
        message = (f"csgd: clusters did not converge (max intra-cluster distance {distance:.3g} >= "
                   f"tolerance {o.tolerance:.3g}); the merge will change the network's outputs")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)

    # S4
    acc_before = acc_after = None
    if ctx.test_set is not None:
        from ..train import evaluate
        acc_before = evaluate(model, ctx.test_set)
    plan = merge_plan(info, clusters)
    pruned = apply_plan(model, x, plan)
    if ctx.test_set is not None:
        from ..train import evaluate
        acc_after = evaluate(pruned, ctx.test_set)
    plan.meta.update({"clustering": o.clustering, **extra})
    extra.update({
        "acc_before_merge": acc_before, "acc_after_merge": acc_after,
        "max_intra_distance": distance, "initial_max_intra_distance": d0,
        "max_bn_stat_distance": transform.max_buffer_distance(),
        "converged": bool(converged), "epsilon": float(epsilon),
        "epsilon_bn": float(epsilon) * o.bn_epsilon_scale, "epsilon_reachable": bool(reachable),
        "centripetal_epochs_run": epochs_run,
        "distance_history": [r.get("max_intra_distance") for r in history],
        "clusters_per_group": {k: len(v) for k, v in clusters.items()},
        "cluster_sizes": {k: [len(c) for c in v] for k, v in clusters.items()},
        "survey_bytes": s_stats.get("bytes"), "survey_seconds": s_stats.get("seconds"),
        "survey_samples": s_stats.get("samples"), "survey_statistic": o.survey_statistic,
        "clustering": o.clustering, "clustering_seconds": float(sum(seconds.values())),
        "largest_group": largest, "largest_group_channels": int(vectors[largest].shape[0]),
        "largest_group_clustering_seconds": seconds[largest],
        "largest_group_survey_bytes": int(vectors[largest].numel() * 4),
    })
    return MethodOutput(pruned, plan, extra, train_epochs=float(epochs_run),
                        figures={"dendrogram": _dendrogram(vectors, clusters, o)})


def _dendrogram(vectors: dict[str, torch.Tensor], clusters: dict[str, Clusters],
                o: CsgdOptions) -> dict[str, Any]:
    """The S2 merge tree of one clustered layer, for the report's dendrogram: the largest
    layer of 8-64 channels (else the smallest), from the survey S2 clustered."""
    sizes = {n: int(vectors[n].shape[0]) for n in clusters}
    small = [n for n, c in sizes.items() if 8 <= c <= 64]
    layer = max(small, key=lambda n: sizes[n]) if small else min(sizes, key=lambda n: sizes[n])
    v = vectors[layer]
    return {"layer": layer, "channels": sizes[layer], "clusters": len(clusters[layer]),
            "survey_samples": int(v.shape[1]), "linkage": merge_tree(v).tolist(),
            "clustering": o.clustering}
