"""The step network slimming and MRTS share: sparsity training of the BatchNorm scale factors
(S1), the channel factors (S2) and the cut at given widths; the thresholds of each paper (S3)
are in :mod:`prunekit.methods.slimming`.

References
----------
Liu, Z., Li, J., Shen, Z., Huang, G., Yan, S. and Zhang, C. (2017). Learning efficient
convolutional networks through network slimming. ICCV, 2736-2744.

Zhuang, T., Zhang, Z., Huang, Y., Zeng, X., Shuang, K. and Li, X. (2020). Neuron-level
structured pruning using polarization regularizer. NeurIPS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ..criteria import Scores
from ..data.batches import count, is_empty, is_loader
from ..engine import ChannelGroup, DependencyInfo, Slot, analyse, apply_plan
from ..engine.budget import Widths, count_macs_params, macs_of_widths
from ..engine.ranking import global_widths, keep_top
from ..errors import ConfigError, DataError
from ..train.config import phase_config
from ..utils import module_device
from . import MethodOutput, PruneContext
from .options import MethodOptions, option

Kind = Literal["l1", "polarization"]
Scope = Literal["layer", "network"]

#: Liu et al.'s sparsity for plain chains (VGG) and for residual / concatenating nets.
LAMBDA_CHAIN, LAMBDA_COUPLED = 1e-4, 1e-5
#: ``sparsity="auto"``: total movement of a factor under the penalty over the sparsity phase
#: (calibrated on ResNet-8 / Fashion-MNIST, docs/sparsity.md), and the largest lambda it picks.
AUTO_PUSH, AUTO_MAX = 0.6, 2e-2



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

    Our well-defined form of MRTS's mutual regulariser (Chen and Yang, 2023, eq. 4): the information a
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
    if is_loader(ctx.train_set) and ctx.train_set.batch_size:  # the trainer uses the loader's batches
        cfg.batch_size = int(ctx.train_set.batch_size)
    n_train = 0 if is_empty(ctx.train_set) else count(ctx.train_set)
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
        if is_empty(ctx.train_set):
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
