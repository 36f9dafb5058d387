"""Network slimming and MRTS: sparsity training of the BatchNorm scale factors, then thresholds.

Both methods share three steps (``../shared/METHODS.md`` section 4, ``docs/sparsity.md``):

S1 sparsity training
    train the network with ``loss + lambda * R(gamma)`` over every BatchNorm scale factor
    ``gamma`` that belongs to a prunable group (eq. 1-3 of seed 003). The penalty enters as a
    subgradient added to ``gamma.grad`` after ``backward`` (:class:`ScaleRegulariser`, plugged
    into :func:`prunekit.train.fit` as ``Hooks.grad_transform``).

    * slimming [1]_: ``R(gamma) = ||gamma||_1`` (eq. 2);
    * MRTS [3]_: the mutual regulariser of eq. 4, ``tau * ||gamma||_1 - sum_i I(gamma_i; z_i)``,
      implemented as the polarisation regulariser of [2]_,
      ``R(gamma) = tau * ||gamma||_1 - ||gamma - mean(gamma)||_1``, with the mean taken over
      each layer (default) or over the whole network (as in [2]_), and the factors kept in
      ``[0, eps]`` (eq. 4 and 6) by a clamp after every optimizer step.

S2 channel factors
    a group of coupled channels (a residual stage, a DenseNet concatenation) is judged as one:
    the factor of channel ``c`` is the mean of ``|gamma|`` over the group's BatchNorm layers
    (the rule of :mod:`prunekit.criteria`, criterion ``bn-scale``). Groups with no BatchNorm
    have no factor and are never pruned by these methods.

S3 thresholds
    * slimming: ONE global threshold on the raw factors removes the requested fraction of
      channels network-wide (:func:`global_threshold_widths`); no group is ever emptied;
    * MRTS: a threshold per layer (eq. 11, :func:`layer_thresholds`): sort the layer's factors
      ascending and cut below the first factor at which the cut factors' share of the
      layer's total factor mass reaches ``delta``.

Fine-tuning after the cut is :func:`prunekit.prune`'s ``finetune_epochs``.

References
----------
.. [1] Z. Liu, J. Li, Z. Shen, G. Huang, S. Yan, C. Zhang. Learning efficient convolutional
   networks through network slimming. ICCV 2017.
.. [2] T. Zhuang, Z. Zhang, Y. Huang, X. Zeng, K. Shuang, X. Li. Neuron-level structured
   pruning using polarization regularizer. NeurIPS 2020.
.. [3] 陈震, 杨娟. 利用互信息的自适应阈值通道剪枝方法 (MRTS: mutual regularisation and
   threshold selection). 智能计算机与应用, 2023 (``seeds/003_*.txt``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ..criteria import Scores
from ..engine import ChannelGroup, DependencyInfo, Slot, analyse, apply_plan
from ..engine.budget import Widths, check_fraction, count_macs_params, macs_of_widths, solve_budget
from ..engine.ranking import global_widths, keep_top
from ..errors import ConfigError, DataError
from ..train.config import phase_config
from ..utils import module_device
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .registry import register_method

Kind = Literal["l1", "polarization"]
Scope = Literal["layer", "network"]

#: Liu et al.'s sparsity for plain chains (VGG) and for residual / concatenating nets.
LAMBDA_CHAIN, LAMBDA_COUPLED = 1e-4, 1e-5
#: ``sparsity="auto"``: total movement of a factor under the penalty over the sparsity phase
#: (calibrated on ResNet-8 / Fashion-MNIST, docs/sparsity.md), and the largest lambda it picks.
AUTO_PUSH, AUTO_MAX = 0.6, 2e-2
_DELTA_MAX = 0.999  # bisection range of delta for budgets (delta -> 1 keeps one channel per layer)


# ----------------------------------------------------------------------------------- options
@dataclass
class SparsityOptions(MethodOptions):
    """Options of ``slimming`` and ``mrts`` (``prunekit.prune(..., method="mrts", **options)``).

    ``sparsity`` is ``lambda``, the weight of the penalty. ``"auto"`` (default, also ``None``):
    :func:`auto_sparsity`, the ``lambda`` that moves a factor by ``AUTO_PUSH`` over the whole
    sparsity phase (so a short phase on a trained network still opens a zero mode; about Liu et
    al.'s values for their 160-epoch schedule). ``"liu"``: Liu et al.'s values, ``1e-4`` for a
    plain chain (VGG), ``1e-5`` when channels are coupled (ResNet, DenseNet, MobileNetV2), see
    :func:`liu_sparsity`.

    MRTS with a budget: ``max_delta`` is the largest ``delta`` still regarded as cutting at the
    gap between the two modes (a budget that needs more falls back to one global ranking of the
    polarised factors, reported in ``extra``); ``adaptive=False`` takes the smallest ``delta``
    that meets the budget (equal-budget comparisons), ``True`` keeps the paper's thresholds at
    ``delta`` whenever they prune at least as much as asked. Without a budget MRTS cuts at its
    thresholds for ``delta`` and slimming at the global ``threshold``.
    """

    sparsity_epochs: int = option(2, "epochs of sparsity training (S1) before the cut; 0 cuts "
                                  "on the factors as they are", min=0)
    sparsity: float | str | None = option("auto", "regulariser strength lambda: a number >= 0, "
                                          "auto (calibrated to the sparsity phase) or liu "
                                          "(Liu et al.'s values)", kind="float", min=0,
                                          words=("auto", "liu"), none=True)
    tau: float = option(1.5, "MRTS: weight of the L1 part of eq. 4", min=0)
    scope: str = option("layer", "MRTS: mean of the polarisation term per layer or over the "
                        "network", choices=("layer", "network"))
    delta: float = option(1e-3, "MRTS: share of a layer's factor mass its threshold may cut "
                          "(eq. 11)", min=0, below=1)
    max_delta: float = option(0.05, "MRTS with a budget: the largest delta still cutting at the "
                              "gap between the modes", min=0, below=1)
    adaptive: bool = option(False, "MRTS with a budget: keep the paper's thresholds whenever "
                            "they prune at least as much as asked")
    clamp: bool = option(True, "MRTS: keep every factor in [0, clamp_max] after each step")
    clamp_max: float | None = option(None, "MRTS: the clamp's upper end (None: max(1, largest "
                                     "|gamma| at the start))", kind="float", above=0)
    threshold: float | None = option(None, "slimming without a budget: remove the channels "
                                     "whose |gamma| is below this (at least one per group)",
                                     kind="float", min=0)
    lr: float = option(0.01, "learning rate of the sparsity training", min=0)
    batch_size: int = option(128, "batch of the sparsity training", min=1)
    max_steps_per_epoch: int | None = option(None, "cap on optimizer steps per epoch (quick runs)",
                                             kind="int", min=1)
    train_config: Any = option(None, "base TrainConfig of the sparsity training (its epochs are "
                               "replaced)")
    record_factors: bool = option(False, "also put every group's factors after S1 in extra")

    def validate(self) -> None:
        if self.sparsity is None:
            self.sparsity = "auto"


# ------------------------------------------------------------------------- scale factors
def bn_slots(group: ChannelGroup) -> list[Slot]:
    """The affine BatchNorm layers of ``group`` (its scale factors live there)."""
    return [s for s in group.channelwise
            if isinstance(s.module, nn.modules.batchnorm._BatchNorm) and s.module.weight is not None]


def has_coupling(info: DependencyInfo) -> bool:
    """Whether channels are coupled across layers (residual adds, concatenations)."""
    for g in info.groups:
        if len(g.producers) > 1:
            return True
        if any(s.module.num_features != g.size for s in bn_slots(g)):
            return True
    return False


def liu_sparsity(info: DependencyInfo) -> float:
    """Liu et al.'s ``lambda``: 1e-4 for plain chains, 1e-5 for residual / concatenating nets."""
    return LAMBDA_COUPLED if has_coupling(info) else LAMBDA_CHAIN


def auto_sparsity(cfg: Any, n_train: int, push: float = AUTO_PUSH, cap: float = AUTO_MAX) -> float:
    """The ``lambda`` whose penalty alone moves a factor by ``push`` over a training run.

    With SGD and momentum ``mu`` a constant gradient ``g`` moves a parameter by about
    ``g * sum_t lr_t / (1 - mu)``; the L1 subgradient is ``lambda``, so

        lambda = push / (sum_t lr_t / (1 - mu))

    summed over the run's steps and learning-rate schedule (``cfg``: a TrainConfig; ``n_train``:
    training images). The loss gradient holds up the factors that matter; the push decides how
    far the others can travel. ``push = 0.6`` was calibrated so that 4 epochs at lr 0.1 on a
    trained ResNet-8 open a clean zero mode (``lambda`` about 5e-3); for Liu et al.'s schedule
    (160 epochs at 0.1 / 0.01 / 0.001, 391 steps each) it gives about 2e-5, between their 1e-5
    and 1e-4. Capped at ``cap`` (very short runs would otherwise get huge values).
    """
    from ..train.schedule import lr_factor

    batch = max(1, min(int(cfg.batch_size), int(n_train)))
    per_epoch = max(1, int(n_train) // batch)
    if cfg.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, int(cfg.max_steps_per_epoch))
    total = sum(lr_factor(k, cfg, per_epoch) for k in range(int(cfg.epochs) * per_epoch))
    moved = float(cfg.lr) * total / max(1e-12, 1.0 - float(cfg.momentum))
    return min(float(cap), float(push) / moved) if moved > 0 else 0.0


def resolve_sparsity(opts: SparsityOptions, info: DependencyInfo, cfg: Any = None,
                     n_train: int = 0) -> float:
    """``opts.sparsity`` as a number (``"auto"`` needs the run's ``cfg`` and ``n_train``)."""
    if opts.sparsity == "liu":
        return liu_sparsity(info)
    if opts.sparsity in (None, "auto"):
        return auto_sparsity(cfg, n_train) if cfg is not None and n_train > 0 else 0.0
    return float(opts.sparsity)


def group_factors(info: DependencyInfo) -> Scores:
    """S2: per group, the mean over its BatchNorm layers of ``|gamma|`` for each channel.

    Returns
    -------
    dict[str, Tensor[C]]
        float64 factors of every group that has BatchNorm layers (others are absent).
    """
    out: Scores = {}
    for g in info.groups:
        slots = bn_slots(g)
        if not slots:
            continue
        per_slot = []
        for s in slots:
            w = s.module.weight.detach().abs().double().cpu()
            per_slot.append(torch.stack([w[s.positions[c]].mean() for c in range(g.size)]))
        out[g.name] = torch.stack(per_slot).mean(0)
    return out


@dataclass
class _Entries:
    """The scale factors of one BatchNorm layer that belong to prunable groups."""

    param: nn.Parameter
    index: torch.Tensor   # covered channels of the BN layer (int64)
    gid: torch.Tensor     # the group (index into ScaleRegulariser.groups) of each covered channel
    sign: torch.Tensor    # +1 / -1: the sign of the factor when training started


# ----------------------------------------------------------------------------- regulariser
def polarization(gamma: torch.Tensor, tau: float = 1.5, mean: float | torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The polarisation regulariser ``tau * ||g||_1 - ||g - mean||_1`` of a factor vector.

    Our well-defined form of MRTS's mutual regulariser (seed 003, eq. 4): the information a
    factor carries about its layer's output is measured by how far ``|gamma_i|`` stands from the
    mean of its layer, so the term rewards factors that leave the crowd in either direction
    (Zhuang et al. 2020, eq. 2).

    Parameters
    ----------
    gamma : Tensor [n]
        Scale factors.
    tau : float
        Weight of the L1 part (``t`` of Zhuang et al., ``tau`` of eq. 4).
    mean : float or Tensor, optional
        The centre; default ``mean(|gamma|)``.

    Returns
    -------
    Tensor
        A scalar.
    """
    a = gamma.abs()
    m = a.mean() if mean is None else mean
    return tau * a.sum() - (a - m).abs().sum()


class ScaleRegulariser:
    """S1: the sparsity penalty on the BatchNorm scale factors of every prunable group.

    Used as ``Hooks(grad_transform=reg.grad_transform, no_weight_decay=reg.parameters)``; the
    optimizer's weight decay is not applied to the penalised factors, whose only prior is the
    penalty. The subgradient added to ``gamma_i.grad`` is

    * ``l1``: ``lambda * sign(gamma_i)`` (eq. 2);
    * ``polarization``: ``lambda * sign(gamma_i) * (tau - s_i + mean(s))`` with
      ``s_j = sign(|gamma_j| - m)``, ``m`` the mean of ``|gamma|`` and ``mean(s)`` taken over the
      layer (or network): the exact subgradient of ``R`` (the mean depends on every factor, which
      contributes the ``+ mean(s)`` term, as autograd does in Zhuang et al.'s code).

    Parameters
    ----------
    info : DependencyInfo
        The model's groups (a factor belongs to the group whose channel it scales).
    kind : {"l1", "polarization"}
    strength : float
        ``lambda``.
    tau : float
        For ``polarization``.
    scope : {"layer", "network"}
        Where the polarisation mean is taken.
    clamp : bool
        Keep each factor's magnitude in ``[0, clamp_max]`` without changing its sign after every
        optimizer step (through the trainer's ``Hooks.post_step``).
    clamp_max : float, optional
        ``eps`` of eq. 4; default ``max(1, max |gamma|)`` at construction.
    """

    def __init__(self, info: DependencyInfo, kind: Kind = "l1", strength: float = 1e-4, *,
                 tau: float = 1.5, scope: Scope = "layer", clamp: bool = False,
                 clamp_max: float | None = None) -> None:
        if kind not in ("l1", "polarization"):
            raise ConfigError(f"unknown sparsity regulariser {kind!r}; choose 'l1' or 'polarization'")
        if scope not in ("layer", "network"):
            raise ConfigError(f"scope must be 'layer' or 'network', got {scope!r}")
        self.kind, self.strength, self.tau, self.scope = kind, float(strength), float(tau), scope
        self.groups: list[str] = []
        covered: dict[nn.Module, dict[int, int]] = {}
        for g in info.groups:
            slots = bn_slots(g)
            if not slots:
                continue
            gid = len(self.groups)
            self.groups.append(g.name)
            for s in slots:
                cover = covered.setdefault(s.module, {})
                for locals_ in s.positions.values():
                    for i in locals_:
                        cover.setdefault(int(i), gid)
        self.entries: list[_Entries] = []
        for module, cover in covered.items():
            idx = torch.tensor(sorted(cover), dtype=torch.long)
            gids = torch.tensor([cover[int(i)] for i in idx], dtype=torch.long)
            w = module.weight.detach()[idx.to(module.weight.device)].cpu()
            sign = torch.where(w < 0, -1.0, 1.0)
            self.entries.append(_Entries(module.weight, idx, gids, sign))
        self.counts = torch.zeros(len(self.groups), dtype=torch.float64)
        for e in self.entries:
            self.counts.index_add_(0, e.gid, torch.ones(len(e.gid), dtype=torch.float64))
        start_max = max((float(e.param.detach().abs().max()) for e in self.entries), default=1.0)
        self.clamp = bool(clamp)
        self.clamp_max = float(clamp_max) if clamp_max is not None else max(1.0, start_max)
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The BatchNorm weights that carry penalised factors."""
        seen: dict[int, nn.Parameter] = {}
        for e in self.entries:
            seen.setdefault(id(e.param), e.param)
        return list(seen.values())

    def _tensors(self, i: int, e: _Entries) -> tuple[torch.Tensor, ...]:
        key = (i, e.param.device)
        if key not in self._on_device:
            dev = e.param.device
            self._on_device[key] = (e.index.to(dev), e.gid.to(dev), e.sign.to(dev, e.param.dtype))
        return self._on_device[key]

    def factors(self) -> list[torch.Tensor]:
        """Current ``|gamma|`` of the penalised factors, one flat tensor per group."""
        per: list[list[torch.Tensor]] = [[] for _ in self.groups]
        for e in self.entries:
            w = e.param.detach()[e.index.to(e.param.device)].abs().double().cpu()
            for gid in e.gid.unique().tolist():
                per[gid].append(w[e.gid == gid])
        return [torch.cat(p) if p else torch.zeros(0, dtype=torch.float64) for p in per]

    def _group_mean(self, per_entry: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    device: torch.device) -> torch.Tensor:
        """Mean of ``per_entry(group ids, |gamma|)`` over each group (``scope="layer"``) or over all
        factors, broadcast to every group (``scope="network"``)."""
        sums = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        for i, e in enumerate(self.entries):
            index, gid, _ = self._tensors(i, e)
            a = e.param.detach()[index].abs().double()
            sums.index_add_(0, gid.to(device), per_entry(gid, a).to(device))
        counts = self.counts.to(device)
        if self.scope == "network":
            return (sums.sum() / counts.sum().clamp_min(1)).expand(len(self.groups))
        return sums / counts.clamp_min(1)

    def means(self, device: torch.device) -> torch.Tensor:
        """Mean ``|gamma|`` per group (``scope="layer"``) or one network mean broadcast to all."""
        return self._group_mean(lambda gid, a: a, device)

    @torch.no_grad()
    def value(self) -> float:
        """``lambda * R(gamma)`` summed over the network (for progress displays)."""
        if not self.entries:
            return 0.0
        if self.kind == "l1":
            total = sum(float(e.param.detach()[self._tensors(i, e)[0]].abs().sum())
                        for i, e in enumerate(self.entries))
            return self.strength * total
        dev = self.entries[0].param.device
        means = self.means(dev)
        total = 0.0
        for i, e in enumerate(self.entries):
            index, gid, _ = self._tensors(i, e)
            a = e.param.detach()[index].abs().double()
            total += float(self.tau * a.sum() - (a - means[gid.to(dev)].to(a.device)).abs().sum())
        return self.strength * total

    @torch.no_grad()
    def grad_transform(self, model: nn.Module | None = None) -> None:
        """Add the penalty's subgradient to the factors' gradients (``Hooks.grad_transform``)."""
        if self.strength == 0 or not self.entries:
            return
        dev = self.entries[0].param.device
        polar = self.kind == "polarization"
        if polar:
            means = self.means(dev)
            mean_sign = self._group_mean(lambda gid, a: torch.sign(a - means[gid.to(a.device)]), dev)
        for i, e in enumerate(self.entries):
            if e.param.grad is None:
                continue
            index, gid, _ = self._tensors(i, e)
            w = e.param.detach()[index]
            g = torch.sign(w).double()
            if polar:
                gd = gid.to(dev)
                g = g * (self.tau - torch.sign(w.abs().double() - means[gd]) + mean_sign[gd])
            e.param.grad.index_add_(0, index, (self.strength * g).to(e.param.grad.dtype))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep each factor's magnitude in ``[0, clamp_max]``, never flipping its sign."""
        for i, e in enumerate(self.entries):
            index, _, sign = self._tensors(i, e)
            w = e.param.data[index]
            e.param.data[index] = sign * (sign * w).clamp(0.0, self.clamp_max)

    def post_step(self, _model: nn.Module) -> None:
        """The trainer's ``Hooks.post_step``: clamp after every optimizer step (when enabled)."""
        if self.clamp:
            self.clamp_()


def make_regulariser(info: DependencyInfo, kind: Kind, opts: SparsityOptions,
                     strength: float | None = None) -> ScaleRegulariser:
    """The S1 regulariser of a method (``l1`` for slimming, ``polarization`` for MRTS);
    ``strength`` defaults to ``opts.sparsity`` when that is a number."""
    if strength is None:
        strength = resolve_sparsity(opts, info)
    polar = kind == "polarization"
    return ScaleRegulariser(info, kind, strength, tau=opts.tau, scope=opts.scope,  # type: ignore[arg-type]
                            clamp=polar and opts.clamp, clamp_max=opts.clamp_max)


def sparsity_train(model: nn.Module, train_set: Any, regulariser: ScaleRegulariser, cfg: Any, *,
                   test_set: Any = None) -> Any:
    """S1: train ``model`` in place with the penalty (and clamp) of ``regulariser``.

    Parameters
    ----------
    model : nn.Module
        The network whose groups ``regulariser`` was built from.
    train_set : ImageDataset
    regulariser : ScaleRegulariser
    cfg : prunekit.train.TrainConfig
    test_set : ImageDataset, optional

    Returns
    -------
    prunekit.train.TrainResult
        The model is left on the device it started on.
    """
    from ..train import Hooks, fit

    device = module_device(model)
    hooks = Hooks(grad_transform=regulariser.grad_transform,
                  no_weight_decay=regulariser.parameters, post_step=regulariser.post_step,
                  postfix=lambda: {"penalty": regulariser.value()})
    if regulariser.clamp:
        regulariser.clamp_()
    try:
        return fit(model, train_set, cfg, test_set=test_set, hooks=hooks)
    finally:
        model.to(device)


# ------------------------------------------------------------------------------ thresholds
def layer_thresholds(gammas: Sequence[torch.Tensor], delta: float = 1e-3) -> list[float]:
    """MRTS layer-adaptive thresholds (seed 003, eq. 11).

    For each layer, sort ``|gamma|`` ascending and return the first factor ``gamma_t`` at which
    the cumulative sum reaches ``delta`` of the layer's total::

        sum_{gamma in N} |gamma|  <  delta * sum_{all} |gamma|  <=  sum_{gamma in N} |gamma| + gamma_t

    where ``N`` are the factors before ``gamma_t``: the channels with ``|gamma| < gamma_t`` are
    pruned, those at or above it kept. Eq. 7-10 of the paper only bound the exponentials of
    these sums; since ``exp`` is increasing, eq. 11 is this comparison of the sums themselves.
    Because ``gamma_t`` itself is kept, a layer is never cut to zero channels; a bimodal layer
    whose small mode holds less than ``delta`` of the mass is cut exactly at the gap, and a
    layer whose factors are all comparable loses nothing (its smallest factor alone exceeds
    ``delta`` of the total for any sensible ``delta``).

    Parameters
    ----------
    gammas : sequence of Tensor
        One vector of scale factors per layer (signs are ignored).
    delta : float
        Share of the layer's factor mass that may be cut, in ``[0, 1)`` (paper: 0.001).

    Returns
    -------
    list of float
        The threshold of each layer (prune ``|gamma| < threshold``).

    Examples
    --------
    >>> layer_thresholds([torch.tensor([0.0, 0.0005, 0.5, 0.75]),   # cut at the gap
    ...                   torch.tensor([0.25, 0.5, 0.75])])          # nothing to cut
    [0.5, 0.25]
    """
    if not 0.0 <= float(delta) < 1.0:
        raise ConfigError(f"delta must be in [0, 1), got {delta}")
    out = []
    for i, g in enumerate(gammas):
        a = torch.as_tensor(g).detach().abs().double().flatten().cpu()
        if a.numel() == 0:
            raise ConfigError(f"layer {i} has no scale factors")
        if not bool(torch.isfinite(a).all()):
            raise ConfigError(f"layer {i} has non-finite scale factors")
        s = torch.sort(a).values
        cum = torch.cumsum(s, 0)
        limit = float(delta) * float(cum[-1])
        t = int(torch.searchsorted(cum, torch.tensor([limit], dtype=torch.float64))[0])
        out.append(float(s[min(t, len(s) - 1)]))
    return out


def threshold_widths(scores: Scores, delta: float) -> Widths:
    """Channels kept per group by the MRTS thresholds at ``delta`` (always at least one)."""
    names = list(scores)
    thr = layer_thresholds([scores[n] for n in names], delta)
    return {n: max(1, int((scores[n].abs() >= t).sum())) for n, t in zip(names, thr, strict=True)}


def global_threshold_widths(scores: Scores, ratio: float) -> Widths:
    """Slimming: remove the ``round(ratio * N)`` smallest raw factors among all ``N`` channels.

    Unlike :func:`prunekit.methods.oneshot.global_widths` the factors are *not* normalised per
    layer: after batch normalisation every factor multiplies a unit-variance signal, so raw
    factors compare across layers, and that comparison is what the sparsity training creates.
    A group keeps at least one channel (the next smallest factor elsewhere is taken instead).
    """
    return global_widths({n: s.abs() for n, s in scores.items()}, ratio, normalize="none")


def removed_fraction(scores: Scores, widths: Widths) -> float:
    """Fraction of the scored channels that ``widths`` removes."""
    total = sum(len(s) for s in scores.values())
    kept = sum(widths.get(n, len(s)) for n, s in scores.items())
    return 1.0 - kept / max(total, 1)


def separation(values: torch.Tensor | Sequence[float]) -> float:
    """Bimodality of a set of factors: Otsu's between-class share of the variance.

    The best split of the sorted values into a low and a high class maximises
    ``eta = n_lo * n_hi * (mean_hi - mean_lo)^2 / (n^2 * var)``; ``eta`` is 1 for two exact
    values, about 0.64 for a Gaussian and about 0.75 for a uniform spread. Scale-free.
    """
    v = torch.sort(torch.as_tensor(values, dtype=torch.float64).flatten()).values
    n = v.numel()
    var = float(v.var(unbiased=False)) if n > 1 else 0.0
    if n < 2 or var <= 0:
        return 0.0
    cum = torch.cumsum(v, 0)[:-1]
    k = torch.arange(1, n, dtype=torch.float64)
    mean_lo = cum / k
    mean_hi = (v.sum() - cum) / (n - k)
    between = k * (n - k) * (mean_hi - mean_lo) ** 2 / n**2
    return float(between.max() / var)


# --------------------------------------------------------------------------------- methods
def _sparsity_phase(ctx: PruneContext, kind: Kind) -> tuple[DependencyInfo, SparsityOptions, dict, float]:
    """S1 and the bookkeeping both methods share; returns (info, options, extra, epochs)."""
    opts = ctx.parse(SparsityOptions, "slimming" if kind == "l1" else "mrts")
    info = analyse(ctx.model, ctx.example_inputs, ignored_layers=ctx.ignored_layers)
    cfg = phase_config(opts, max(1, opts.sparsity_epochs), ctx.seed, ctx.options)
    n_train = len(ctx.train_set) if ctx.train_set is not None else 0
    strength = resolve_sparsity(opts, info, cfg, n_train) if opts.sparsity_epochs > 0 else 0.0
    reg = make_regulariser(info, kind, opts, strength)
    no_bn = [g.name for g in info.groups if not bn_slots(g)]
    if not reg.groups:
        raise ConfigError("network slimming / MRTS need BatchNorm layers after the prunable "
                          "convolutions; this model has none (use a criterion such as l1)")
    extra: dict[str, Any] = {
        "regulariser": kind, "sparsity": reg.strength if opts.sparsity_epochs else None,
        "sparsity_option": opts.sparsity, "sparsity_epochs": opts.sparsity_epochs,
        "groups_without_bn": no_bn,
    }
    if kind == "polarization":
        extra.update(tau=opts.tau, scope=opts.scope, clamp=opts.clamp,
                     clamp_max=reg.clamp_max if opts.clamp else None)
    epochs = 0.0
    if opts.sparsity_epochs > 0:
        if ctx.train_set is None or len(ctx.train_set) == 0:
            raise DataError(f"sparsity training ({opts.sparsity_epochs} epochs) needs training data; "
                            "pass data=... or sparsity_epochs=0 to cut on the factors as they are")
        torch.manual_seed(ctx.seed)
        result = sparsity_train(ctx.model, ctx.train_set, reg, cfg)
        epochs = float(opts.sparsity_epochs)
        last = result.history[-1] if result.history else {}
        extra.update(sparsity_loss=last.get("loss"), sparsity_train_acc=last.get("train_acc"))
    ctx.model.eval()
    return info, opts, extra, epochs


def _finish(ctx: PruneContext, info: DependencyInfo, scores: Scores, widths: Widths, opts: SparsityOptions,
            extra: dict, epochs: float, method: str) -> MethodOutput:
    plan = keep_top(info, scores, widths)
    base = count_macs_params(ctx.model, ctx.example_inputs)[0]
    extra["reached_macs_fraction"] = macs_of_widths(info, widths) / base
    extra["removed_channel_fraction"] = removed_fraction(scores, widths)
    extra["factor_separation"] = separation(torch.cat([s / s.max().clamp_min(1e-12)
                                                       for s in scores.values()]))
    factors = {n: [round(float(v), 6) for v in s] for n, s in scores.items()}
    if opts.record_factors:
        extra["factors"] = factors
    plan.meta = {"method": method, **{k: v for k, v in extra.items() if k != "factors"}}
    model = apply_plan(ctx.model, ctx.example_inputs, plan)
    figures = {"bn_factors": {"factors": factors, "threshold": extra.get("threshold")}}
    return MethodOutput(model, plan, extra, train_epochs=epochs, figures=figures)


@register_method("slimming", SparsityOptions, own_training=("sparsity_epochs", 0), round_to=False,
                 chooses_widths=True, needs_data=True,
                 summary="network slimming: L1 sparsity training of the BN factors, one global "
                         "threshold (Liu et al., ICCV 2017)")
def run_slimming(ctx: PruneContext) -> MethodOutput:
    """Network slimming [1]_: L1 sparsity training, one global threshold, cut.

    ``ctx.ratio`` removes that fraction of all channels of the BatchNorm groups network-wide
    (one threshold on the raw factors, at least one channel per group); ``ctx.target_macs``
    bisects that fraction until the model keeps at most the target share of the MACs; with
    neither, the ``threshold`` option is the threshold.
    """
    info, opts, extra, epochs = _sparsity_phase(ctx, "l1")
    scores = group_factors(info)
    if ctx.ratio is None and ctx.target_macs is None:
        if opts.threshold is None:
            raise ConfigError("slimming without a budget needs the threshold option (or give "
                              "ratio / target_macs)")
        widths = {n: max(1, int((s >= opts.threshold).sum())) for n, s in scores.items()}
        ratio = removed_fraction(scores, widths)
    elif ctx.target_macs is not None:
        ratio, widths, _ = solve_budget(info, ctx.target_macs,
                                        lambda r: global_threshold_widths(scores, r), iters=20)
    else:
        ratio = check_fraction("ratio", ctx.ratio)
        widths = global_threshold_widths(scores, ratio)
    cut = [float(v) for n, s in scores.items() for v in torch.sort(s).values[: len(s) - widths[n]]]
    if ctx.ratio is None and ctx.target_macs is None:
        extra.update(ratio=ratio, threshold=opts.threshold)
        return _finish(ctx, info, scores, widths, opts, extra, epochs, "slimming")
    extra.update(ratio=ratio, threshold=max(cut) if cut else None)
    return _finish(ctx, info, scores, widths, opts, extra, epochs, "slimming")


def _smallest(ok: Callable[[float], bool], iters: int = 40) -> float | None:
    """Smallest ``r`` in [0, 1] with ``ok(r)`` (``ok`` monotone); ``None`` if ``ok(1)`` fails."""
    if ok(0.0):
        return 0.0
    if not ok(1.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


@register_method("mrts", SparsityOptions, own_training=("sparsity_epochs", 0), round_to=False,
                 chooses_widths=True, needs_data=True,
                 summary="MRTS: polarising sparsity training, layer-adaptive thresholds (eq. 11)")
def run_mrts(ctx: PruneContext) -> MethodOutput:
    """MRTS [3]_: polarising sparsity training, layer-adaptive thresholds (eq. 11), cut.

    Without a budget the cut is at the thresholds for ``delta`` (the paper's method). Budget
    handling (reported in ``extra``):

    * ``delta_used`` is the smallest ``delta`` whose thresholds meet the budget (``ratio``:
      that fraction of the channels removed network-wide; ``target_macs``: at most that share of
      the MACs kept); with ``adaptive=True`` the paper's ``delta`` is kept whenever it already
      prunes enough;
    * ``natural_macs_fraction`` / ``natural_removed_fraction``: what the paper's thresholds at
      ``delta`` alone give;
    * ``delta_needed``: the ``delta`` the thresholds need for the budget. When it exceeds
      ``max_delta`` (the cut would go into the non-zero mode, i.e. the sparsity training did not
      make enough factors vanish), ``budget_met_by_thresholds`` is ``False``, ``delta_used`` is
      ``None`` and the widths come from one global ranking of the polarised factors instead
      (``fallback = "global-ranking"``), so the budget is still met;
    * ``reached_macs_fraction`` and ``removed_channel_fraction``: what the cut reached.
    """
    info, opts, extra, epochs = _sparsity_phase(ctx, "polarization")
    scores = group_factors(info)
    base = count_macs_params(ctx.model, ctx.example_inputs)[0]
    natural = threshold_widths(scores, opts.delta)
    extra.update(delta=opts.delta, max_delta=opts.max_delta, adaptive=opts.adaptive,
                 natural_removed_fraction=removed_fraction(scores, natural),
                 natural_macs_fraction=macs_of_widths(info, natural) / base)
    lo = opts.delta if opts.adaptive else 0.0
    hi = max(_DELTA_MAX, lo)

    def delta_of(r: float) -> float:
        return lo + r * (hi - lo)

    delta_needed: float | None       # None: no delta reaches the budget (flat layers, ties)
    if ctx.ratio is None and ctx.target_macs is None:   # the paper: thresholds at delta
        extra.update(delta_needed=opts.delta, delta_used=opts.delta, budget_met_by_thresholds=True,
                     fallback=None, thresholds=dict(zip(scores, layer_thresholds(
                         list(scores.values()), opts.delta), strict=True)))
        return _finish(ctx, info, scores, natural, opts, extra, epochs, "mrts")
    if ctx.target_macs is not None:
        target = check_fraction("target MACs", ctx.target_macs)
        extra["target_macs"] = target
        if opts.adaptive and extra["natural_macs_fraction"] <= target:
            delta_needed, widths = opts.delta, natural
        elif macs_of_widths(info, threshold_widths(scores, hi)) / base > target:
            delta_needed, widths = None, natural
        else:
            r, widths, _ = solve_budget(info, target, lambda r: threshold_widths(scores, delta_of(r)),
                                        iters=16)
            delta_needed = delta_of(r)
    else:
        ratio = check_fraction("ratio", ctx.ratio)
        extra["ratio"] = ratio
        r = _smallest(lambda r: removed_fraction(scores, threshold_widths(scores, delta_of(r)))
                      >= ratio - 1e-12)
        delta_needed = delta_of(r) if r is not None else None
        widths = threshold_widths(scores, delta_needed) if delta_needed is not None else natural
    at_gap = delta_needed is not None and delta_needed <= opts.max_delta
    extra.update(delta_needed=delta_needed, delta_used=delta_needed if at_gap else None,
                 budget_met_by_thresholds=at_gap, fallback=None if at_gap else "global-ranking")
    if at_gap:
        extra["thresholds"] = dict(zip(scores, layer_thresholds(list(scores.values()), delta_needed),
                                       strict=True))
    elif ctx.target_macs is not None:   # S3 fallback: one global ranking of the polarised factors
        _, widths, _ = solve_budget(info, ctx.target_macs,
                                    lambda r: global_threshold_widths(scores, r), iters=20)
    else:
        widths = global_threshold_widths(scores, ctx.ratio)
    return _finish(ctx, info, scores, widths, opts, extra, epochs, "mrts")


# ----------------------------------------------------------------------------------- plots
def plot_factor_histograms(factors: Mapping[str, torch.Tensor | Sequence[torch.Tensor] | Sequence[float]],
                           path: str | os.PathLike, *, bins: int = 60, log: bool = True,
                           title: str | None = None) -> None:
    """One figure, one panel per method: histogram of the scale factors after S1.

    Parameters
    ----------
    factors : mapping
        Method name -> factors (a tensor, a list of per-layer tensors or a list of floats).
    path : path
        Output image (PNG, PDF, SVG ... by suffix), written atomically.
    bins : int
        Bins over the common range of all methods.
    log : bool
        Logarithmic count axis (the near-zero mode is usually much taller).
    title : str, optional
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    flat = {k: _flatten(v) for k, v in factors.items()}
    if not flat:
        raise ConfigError("no factors to plot")
    top = max(float(v.max()) for v in flat.values() if v.numel()) if any(
        v.numel() for v in flat.values()) else 1.0
    edges = torch.linspace(0.0, max(top, 1e-6), bins + 1).tolist()
    fig, axes = plt.subplots(1, len(flat), figsize=(4.2 * len(flat), 3.4), sharex=True, squeeze=False)
    for i, (ax, (name, v)) in enumerate(zip(axes[0], flat.items(), strict=True)):
        ax.hist(v.numpy(), bins=edges, color=f"C{i}", log=log)
        ax.set_title(f"{name} (n={v.numel()}, sep={separation(v):.2f})")
        ax.set_xlabel("|gamma| (BN scale factor)")
    axes[0][0].set_ylabel("channels")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    plt.close(fig)


def plot_layer_widths(widths: Mapping[str, Mapping[str, Sequence[int]]], path: str | os.PathLike, *,
                      title: str | None = None) -> None:
    """Per-layer widths after pruning, one bar series per method.

    Parameters
    ----------
    widths : mapping
        Method name -> ``{layer: (channels before, channels after)}`` (the ``widths`` of a
        :func:`prunekit.prune` report). Layers are shown in the first method's order; the
        original widths are drawn as a grey outline.
    path : path
        Output image, written atomically.
    title : str, optional
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    if not widths:
        raise ConfigError("no widths to plot")
    first = next(iter(widths.values()))
    layers = [n for n, (before, _) in first.items() if before > 0]
    x = torch.arange(len(layers)).numpy()
    k = len(widths)
    w = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 3.8))
    ax.bar(x, [first[n][0] for n in layers], width=0.9, color="none", edgecolor="0.6", label="original")
    for i, (name, per) in enumerate(widths.items()):
        ax.bar(x - 0.4 + w * (i + 0.5), [per.get(n, (0, 0))[1] for n in layers], width=w, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    plt.close(fig)


def _flatten(v: torch.Tensor | Sequence[torch.Tensor] | Sequence[float]) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().abs().double().flatten().cpu()
    items = list(v)
    if items and isinstance(items[0], torch.Tensor):
        return torch.cat([t.detach().abs().double().flatten().cpu() for t in items])
    return torch.as_tensor(items, dtype=torch.float64).abs()


__all__ = [
    "AUTO_MAX", "AUTO_PUSH", "LAMBDA_CHAIN", "LAMBDA_COUPLED", "ScaleRegulariser", "SparsityOptions",
    "auto_sparsity", "bn_slots", "global_threshold_widths", "group_factors", "has_coupling",
    "liu_sparsity", "resolve_sparsity",
    "layer_thresholds", "make_regulariser", "plot_factor_histograms", "plot_layer_widths",
    "polarization", "removed_fraction", "run_mrts", "run_slimming", "separation", "sparsity_train",
    "threshold_widths",
]
