"""The method: options, and ``run`` composing S1-S4 (Ding et al., CVPR 2019)."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...data.batches import is_empty
from ...engine import DependencyInfo, analyse, apply_plan
from ...engine.budget import budget_widths
from ...errors import ConfigError, DataError, PrunekitWarning, UnsupportedLayerError
from ...train.bn import recalibrate_bn
from ...utils import module_device, resolve_device
from .. import MethodOutput, PruneContext
from ..options import MethodOptions, option
from ..registry import register_method
from .centripetal import GRADIENTS, CentripetalTransform
from .clustering import CLUSTERING_METHODS, Clusters, cluster, merge_tree
from .epsilon import _simulate_difference, auto_epsilon
from .merge import merge_plan
from .survey import STATISTICS, survey

log = logging.getLogger(__name__)



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



# the method
# =============================================================================================

def _train_config(o: CsgdOptions, ctx: PruneContext):
    from ...train import TrainConfig

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


def _planned_lrs(cfg, train_set: Any) -> list[float]:
    """The learning rate of every optimizer step S3's trainer will take on ``train_set``."""
    from ...train import epoch_steps
    from ...train.schedule import lr_factor

    steps = epoch_steps(train_set, cfg.batch_size, cfg.max_steps_per_epoch)
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
    if is_empty(ctx.train_set):
        raise DataError("csgd needs training data (survey and centripetal training)")
    teacher = ctx.reference() if o.centripetal_distill else None  # read before S3 trains ctx.model
    model, x = ctx.model, ctx.example_inputs
    info, normalised = _analyse_mergeable(model, x, _ignored_names(ctx))
    widths, extra = _budget_widths(ctx, info)
    extra["normalised_groups_left_out"] = normalised
    targets = {g.name: widths[g.name] for g in info.groups if widths.get(g.name, g.size) < g.size}
    if not targets:
        raise ConfigError("the budget removes no channel; nothing to prune")
    device = resolve_device(ctx.device)
    model.to(device)
    s_stats: dict[str, Any] = {}
    vectors = survey(model, ctx.train_set, list(targets), samples=o.survey_samples,          # S1
                     batch_size=o.batch_size, info=info, statistic=o.survey_statistic,
                     device=device, stats=s_stats)
    clusters, seconds = _cluster_groups(vectors, targets, o.clustering, ctx.seed)           # S2
    cfg = _train_config(o, ctx)                                                              # S3
    transform = CentripetalTransform(info, clusters, cfg.weight_decay, 0.0, o.bn_epsilon_scale,
                                     gradient=o.gradient)
    d0 = transform.max_distance()
    epsilon, reachable = resolve_epsilon(o, cfg, d0, ctx.train_set)
    transform.epsilon = epsilon
    epochs_run, history = _train_centripetal(model, ctx.train_set, cfg, transform, o, teacher, d0)
    if o.recalibrate_bn and o.recalibrate_samples > 0:
        recalibrate_bn(model, ctx.train_set, o.recalibrate_samples, o.batch_size,
                       device=module_device(model))
    model.to(x.device).eval()
    distance = _check_converged(transform, o.tolerance)
    acc_before = _accuracy(model, ctx.test_set)                                              # S4
    plan = merge_plan(info, clusters)
    pruned = apply_plan(model, x, plan)
    plan.meta.update({"clustering": o.clustering, **extra})
    extra.update(acc_before_merge=acc_before, acc_after_merge=_accuracy(pruned, ctx.test_set),
                 max_intra_distance=distance, initial_max_intra_distance=d0,
                 max_bn_stat_distance=transform.max_buffer_distance(),
                 converged=bool(distance < o.tolerance), epsilon=epsilon,
                 epsilon_bn=epsilon * o.bn_epsilon_scale, epsilon_reachable=reachable,
                 centripetal_epochs_run=epochs_run,
                 distance_history=[r.get("max_intra_distance") for r in history],
                 **_cluster_report(vectors, clusters, seconds, s_stats, o))
    return MethodOutput(pruned, plan, extra, train_epochs=float(epochs_run),
                        figures={"dendrogram": _dendrogram(vectors, clusters, o)})


def _analyse_mergeable(model: nn.Module, x: torch.Tensor, ignored: list[str | Any]
                       ) -> tuple[DependencyInfo, list[str]]:
    """The model's groups without those normalised over their channels, and those left out.

    A group whose channels a LayerNorm or GroupNorm normalises together
    (:attr:`~prunekit.engine.graph.ChannelGroup.normalised`: ConvNeXt's residual stream, a
    GroupNorm block) cannot be merged exactly: removing a member changes the mean and variance
    every other channel is normalised with, even when the members are identical. Such groups
    are left out of S1-S4 (their producing layers are ignored, so a ``target_macs`` budget is
    solved over the other groups), reported as ``normalised_groups_left_out`` and noted in one
    warning. When no other group is left the method refuses with
    :class:`~prunekit.errors.UnsupportedLayerError` naming the normalisation layers.
    """
    info = analyse(model, x, ignored_layers=ignored)
    normalised = [g for g in info.groups if g.normalised]
    if not normalised:
        return info, []
    names = [g.name for g in normalised]
    norms = sorted({s.name for g in normalised for s in g.channelwise
                    if isinstance(s.module, (nn.LayerNorm, nn.GroupNorm))})
    if len(normalised) == len(info.groups):
        raise UnsupportedLayerError(
            "csgd: every prunable group is normalised over its channels by "
            f"{', '.join(map(repr, norms))} (LayerNorm / GroupNorm); merging such channels is "
            "never exact. Use another method")
    message = (f"csgd: left {len(names)} group(s) normalised over their channels by a LayerNorm / "
               f"GroupNorm ({', '.join(map(repr, norms))}) out of the clustering: merging them "
               f"would not be exact; groups: {', '.join(names)}")
    warnings.warn(message, PrunekitWarning, stacklevel=3)
    log.warning(message)
    return analyse(model, x, ignored_layers=list(ignored) + [g.root for g in normalised]), names


def _ignored_names(ctx: PruneContext) -> list[str | Any]:
    """Ignored layers as names (module references of ``ctx.model`` mapped to their names)."""
    names = {m: n for n, m in ctx.model.named_modules()}
    return [names.get(layer, layer) if isinstance(layer, nn.Module) else layer
            for layer in ctx.ignored_layers]


def _cluster_groups(vectors: Mapping[str, torch.Tensor], targets: Mapping[str, int], method: str,
                    seed: int) -> tuple[dict[str, Clusters], dict[str, float]]:
    """S2 for every group: ``targets[g]`` clusters of its survey vectors, and the seconds each took."""
    clusters: dict[str, Clusters] = {}
    seconds: dict[str, float] = {}
    for name, n in targets.items():
        t0 = time.perf_counter()
        clusters[name] = cluster(vectors[name], n, method, seed=seed)
        seconds[name] = time.perf_counter() - t0
    return clusters, seconds


def resolve_epsilon(o: CsgdOptions, cfg: Any, d0: float, train_set: Any) -> tuple[float, bool]:
    """S3's centripetal strength: the option's number, or for ``"auto"`` the smallest epsilon
    that shrinks the initial distance ``d0`` below the tolerance on the planned schedule
    (:func:`auto_epsilon`); also whether the schedule can converge at all (a warning if not)."""
    if o.epsilon != "auto":
        return float(o.epsilon), True
    lrs = _planned_lrs(cfg, train_set)
    nesterov = cfg.nesterov and cfg.momentum > 0
    target = 0.1 * o.tolerance / max(d0, o.tolerance)
    epsilon, reachable = auto_epsilon(lrs, momentum=cfg.momentum, nesterov=nesterov,
                                      weight_decay=cfg.weight_decay,
                                      bn_epsilon_scale=o.bn_epsilon_scale, shrink=target)
    if not reachable:  # the margin was not met; can the whole schedule reach the tolerance?
        k = cfg.weight_decay + o.bn_epsilon_scale * epsilon
        reachable = bool(_simulate_difference(np.asarray(lrs), np.array([k]), cfg.momentum,
                                              nesterov)[0] <= o.tolerance / max(d0, 1e-30))
    if not reachable and o.centripetal_epochs > 0:
        warnings.warn("csgd: the centripetal schedule is too short for the clusters to converge "
                      f"even at the strongest stable epsilon ({epsilon:.3g}); use more "
                      "centripetal_epochs or steps", PrunekitWarning, stacklevel=3)
    return float(epsilon), reachable


def _train_centripetal(model: nn.Module, train_set: Any, cfg: Any, transform: CentripetalTransform,
                       o: CsgdOptions, teacher: nn.Module | None, d0: float) -> tuple[int, list[dict]]:
    """S3: train with the centripetal gradient transform; returns (epochs run, history).

    Members that converged stay identical (they share one mean gradient), so by default the
    whole budget is spent training the clustered network; ``stop_when_converged`` stops early.
    S1-S2 are deterministic (seeded), so a resumed run rebuilds the same clusters and continues
    S3 from the trainer's state file.
    """
    if o.centripetal_epochs <= 0 or d0 <= o.tolerance:
        return 0, []
    from ...train import Hooks, fit

    def on_epoch_end(_epoch: int, _model: nn.Module, record: dict) -> bool:
        record["max_intra_distance"] = transform.max_distance()
        return bool(o.stop_when_converged) and record["max_intra_distance"] < o.tolerance

    hooks = Hooks(grad_transform=transform, no_weight_decay=transform.parameters(),
                  postfix=lambda: {"dist": transform.max_distance()}, on_epoch_end=on_epoch_end,
                  teacher=teacher)
    result = fit(model, train_set, cfg, hooks=hooks, checkpoint_path=o.state_path, resume=bool(o.resume))
    return result.epochs_run, result.history


def _check_converged(transform: CentripetalTransform, tolerance: float) -> float:
    """The largest intra-cluster distance left; one warning when it is not below ``tolerance``."""
    distance = transform.max_distance()
    if distance >= tolerance:
        message = (f"csgd: clusters did not converge (max intra-cluster distance {distance:.3g} >= "
                   f"tolerance {tolerance:.3g}); the merge will change the network's outputs")
        warnings.warn(message, PrunekitWarning, stacklevel=3)
        log.warning(message)
    return distance


def _accuracy(model: nn.Module, test_set: Any) -> float | None:
    if test_set is None:
        return None
    from ...train import evaluate

    return evaluate(model, test_set)


def _cluster_report(vectors: Mapping[str, torch.Tensor], clusters: Mapping[str, Clusters],
                    seconds: Mapping[str, float], s_stats: Mapping[str, Any], o: CsgdOptions
                    ) -> dict[str, Any]:
    """The S1-S2 facts of the report: cluster sizes, survey and clustering cost."""
    largest = max(clusters, key=lambda name: vectors[name].shape[0] * vectors[name].shape[1])
    return {"clusters_per_group": {k: len(v) for k, v in clusters.items()},
            "cluster_sizes": {k: [len(c) for c in v] for k, v in clusters.items()},
            "survey_bytes": s_stats.get("bytes"), "survey_seconds": s_stats.get("seconds"),
            "survey_samples": s_stats.get("samples"), "survey_statistic": o.survey_statistic,
            "clustering": o.clustering, "clustering_seconds": float(sum(seconds.values())),
            "largest_group": largest, "largest_group_channels": int(vectors[largest].shape[0]),
            "largest_group_clustering_seconds": seconds[largest],
            "largest_group_survey_bytes": int(vectors[largest].numel() * 4)}


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
