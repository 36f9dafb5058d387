"""AutoPruner: end-to-end trainable channel gates that binarise, then prune.

The method (Luo and Wu, Pattern Recognition 2020), step by step:

S1 **gates.** Every prunable group of channels gets one gate layer. From a batch of its feature
   maps ``x [N, C, H, W]`` the gate computes ``v = sigmoid(alpha * FC(pool(x)))`` where
   ``pool`` is the batch mean followed by max pooling (adaptive, to ``pool_size x pool_size``,
   so the FC's input size ``C * pool_size**2`` does not depend on the image size), and the
   group's channels are multiplied by ``v`` (one value per channel, shared by the batch).
S2 **training.** The network and the gates are trained together on
   ``L = L_CE + sum_g lambda_g * (||v_g||_1 / C_g - r_g)^2`` where ``r_g`` is the group's keep
   rate (``prunekit.train.Hooks.regularizer``).
S3 **binarisation.** ``alpha`` starts at ``alpha0 = 1`` and grows adaptively towards
   ``alpha_max = 100`` whenever a group's gates stop moving, so ``v`` turns from real-valued to
   binary (see :class:`GateController` for the exact schedule).
S4 **pruning.** The gates are removed; channels whose (calibration-averaged) gate value is
   ``<= 0.5`` are removed by the engine, the kept channels' gate values are folded into the
   layers that read them (exact for any constant ``v``, so exact once ``v`` is binary).

Where the gate multiplies
-------------------------
The gate multiplies the group's channels **at the input of every consumer of the group** (the
convs / linears that read the channels, through a forward pre-hook), not at the producers'
outputs. Removing channel ``c`` from the engine's point of view deletes it from the producers,
the channel-wise ops (BN, depthwise conv) and the consumers' input columns; the channel's
values reach the network's output *only* through those consumers, so "channel ``c`` is
removed" is exactly "every consumer sees zero at channel ``c``". Multiplying the consumers'
inputs by ``v`` therefore equals removal when ``v_c = 0`` for every architecture the engine
supports, and a constant ``v_c`` can be folded into the consumers' input columns exactly
(``W[:, c] <- v_c * W[:, c]``) because they are linear in their input.

Gating at the producers (after their BN/ReLU, as in the paper's plain chains) is the same thing
for conv-BN-ReLU-conv stacks and for post-activation ResNet trunks (``relu`` is positively
homogeneous: ``relu(v*a + v*b) = v*relu(a + b)``, so a trunk whose every producer is scaled by
``v`` is scaled by ``v`` everywhere), but not where a BN sits between the trunk and its
consumer (pre-activation ResNets, DenseNet): ``BN(0) != 0``. For a residual trunk the one gate
of the stage-wide group is computed once per forward from the input of the first consumer that
runs (the stem's / stage's first block input: the paper's block output) and applied to every
consumer of the stage. Depthwise convs are channel-wise members of their group (the gate acts
after them, at the projection conv). A grouped conv (ResNeXt, RegNet) reads a channel only in
the rows of its own group, so a gate value is folded there (:func:`fold_gates`); a Linear in a
channel-last block (ConvNeXt's ``[N, H, W, C]``) has its gate applied on the last axis.

References
----------
J.-H. Luo and J. Wu. "AutoPruner: An end-to-end trainable filter pruning method for efficient
deep model inference". Pattern Recognition 107, 2020 (arXiv:1805.08941, 2018).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batches import count, is_empty, iter_batches
from ..engine import ChannelGroup, DependencyInfo, GroupPlan, PruningPlan, Slot, analyse, apply_plan
from ..engine.budget import Widths, budget_widths
from ..engine.graph import input_columns, is_grouped
from ..engine.ranking import channel_multiplier, consumer_index, feature_index
from ..errors import ConfigError, DataError, UnsupportedLayerError
from ..utils import eval_mode, resolve_device
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .registry import register_method

__all__ = ["AutoPrunerOptions", "ChannelGate", "GateController", "GatedModel", "consumer_index",
           "fold_gates", "gate_plan", "run", "train_gates"]


# ----------------------------------------------------------------------------- channel indexing
# ----------------------------------------------------------------------------- the gate layer
class ChannelGate(nn.Module):
    """S1: ``v = sigmoid(alpha * FC(maxpool(mean_batch(x))))`` for one group of ``C`` channels.

    Parameters
    ----------
    channels : int
        ``C``.
    pool_size : int
        Side of the adaptive max pooling after the batch mean; the FC maps
        ``C * pool_size**2 -> C``. The authors' code used a fixed 2x2 max pool (so the FC's size
        depended on the feature-map size); an adaptive pool makes it work for any input size.

    Notes
    -----
    Input: the group's feature maps ``[N, C, H, W]`` (``H = W = 1`` after global pooling or for a
    linear layer's features). Output: ``v [C]`` in (0, 1), also kept in ``self.v`` until the
    next forward (the regulariser reads it). The FC starts with small weights and zero bias, so
    every gate starts near 0.5 (as in the authors' code).
    """

    def __init__(self, channels: int, pool_size: int = 2) -> None:
        super().__init__()
        if pool_size < 1:
            raise ConfigError(f"pool_size must be >= 1, got {pool_size}")
        self.channels, self.pool_size = int(channels), int(pool_size)
        self.fc = nn.Linear(self.channels * self.pool_size ** 2, self.channels)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.alpha = 1.0
        self.v: torch.Tensor | None = None

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        pooled = feat.mean(0, keepdim=True).to(self.fc.weight.dtype)       # batch-mean pooling
        pooled = F.adaptive_max_pool2d(pooled, self.pool_size)             # max pooling
        v = torch.sigmoid(self.alpha * self.fc(pooled.flatten(1)))[0]      # scaled sigmoid
        self.v = v
        return v


class GatedModel:
    """Gates attached to a model through forward pre-hooks on the groups' consumers.

    While attached, the gates live in ``model.autopruner_gates`` (an ``nn.ModuleDict``) so the
    trainer's optimizer sees their parameters; :meth:`detach` removes every hook and the
    submodule, leaving the original module structure.

    Parameters
    ----------
    model : nn.Module
        The network (its layers must be the ones ``groups`` refer to).
    groups : sequence of ChannelGroup
        Groups to gate (traced on ``model``).
    example_inputs : Tensor
        A batch used once to find, for each group, the consumer that runs first.
    pool_size : int
        See :class:`ChannelGate`.
    """

    ATTR = "autopruner_gates"

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], example_inputs: torch.Tensor,
                 pool_size: int = 2) -> None:
        self.model = model
        self.groups = [g for g in groups if g.consumers]
        self.skipped = [g.name for g in groups if not g.consumers]
        self.gates = nn.ModuleDict({f"g{i}": ChannelGate(g.size, pool_size)
                                    for i, g in enumerate(self.groups)})
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        first = _first_consumers(model, self.groups, example_inputs)
        self.source: dict[str, tuple[str, torch.Tensor]] = {}
        for i, g in enumerate(self.groups):
            slot = first[g.name]
            idx = feature_index(slot, g.size)
            if idx is None:
                raise UnsupportedLayerError(
                    f"the first layer reading group {g.name!r} ({slot.name!r}) sees only part of its "
                    "channels; AutoPruner cannot gate it. Pass the group's producer in ignored_layers")
            self.source[f"g{i}"] = (slot.name, idx)
        model.add_module(self.ATTR, self.gates.to(_device_of(model)))
        self.handles.append(model.register_forward_pre_hook(self._reset))
        for i, g in enumerate(self.groups):
            key = f"g{i}"
            for slot in g.consumers:
                cols, chans = consumer_index(slot, g.size)
                self.handles.append(slot.module.register_forward_pre_hook(
                    self._make_hook(key, slot.name, cols, chans)))

    def items(self) -> Iterator[tuple[ChannelGroup, ChannelGate]]:
        for i, g in enumerate(self.groups):
            yield g, self.gates[f"g{i}"]

    def _reset(self, _module, _args) -> None:
        for gate in self.gates.values():
            gate.v = None

    def _make_hook(self, key: str, name: str, cols: torch.Tensor, chans: torch.Tensor):
        def hook(module, args):
            x = args[0]
            last = isinstance(module, nn.Linear) and x.dim() > 2  # channel-last [N, H, W, C]
            if last:
                x = x.movedim(-1, 1)
            gate = self.gates[key]
            if gate.v is None:
                src_name, idx = self.source[key]
                if src_name != name:  # only happens if the execution order changed
                    raise UnsupportedLayerError(
                        f"layer {name!r} ran before {src_name!r}, which computes the gate of its group")
                gate(_gathered(x, idx.to(x.device)))
            y = channel_multiplier(x, cols, gate.v[chans.to(gate.v.device)])
            return (y.movedim(1, -1) if last else y, *args[1:])
        return hook

    def detach(self) -> None:
        """Remove every hook and the gate submodule from the model."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if hasattr(self.model, self.ATTR):
            delattr(self.model, self.ATTR)
        for gate in self.gates.values():
            gate.v = None


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _gathered(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The group's channels from a consumer's input: ``[N, C, H, W]`` (positions averaged; a
    flattened linear input becomes ``[N, C, P, 1]``)."""
    c, p = idx.shape
    g = x.index_select(1, idx.flatten())
    if x.dim() == 4:
        return g.reshape(x.shape[0], c, p, *x.shape[2:]).mean(2)
    return g.reshape(x.shape[0], c, p, -1)


def _first_consumers(model: nn.Module, groups: Sequence[ChannelGroup],
                     example_inputs: torch.Tensor) -> dict[str, Slot]:
    """For each group, the consumer slot whose module runs first in a forward pass."""
    order: dict[int, int] = {}
    handles = []
    modules = {id(s.module): s.module for g in groups for s in g.consumers}

    def recorder(key: int):
        def hook(_m, _a) -> None:
            order.setdefault(key, len(order))
        return hook

    for key, m in modules.items():
        handles.append(m.register_forward_pre_hook(recorder(key)))
    with eval_mode(model, handles), torch.no_grad():
        model(example_inputs.to(_device_of(model)))
    out = {}
    for g in groups:
        ran = [s for s in g.consumers if id(s.module) in order]
        if not ran:
            raise UnsupportedLayerError(f"no layer reading group {g.name!r} runs in a forward pass")
        out[g.name] = min(ran, key=lambda s: order[id(s.module)])
    return out


# ----------------------------------------------------------------------------- training (S2, S3)
@dataclass
class AutoPrunerOptions(MethodOptions):
    """Options of :func:`run` (CLI/API names in parentheses where they differ).

    Attributes
    ----------
    epochs : int
        Epochs of joint gate + network training (S2-S3).
    lam : float  (``lambda``)
        Initial weight ``lambda`` of the rate penalty, per group.
    lr : float
        Learning rate of the gate layers (SGD, Nesterov momentum 0.9, cosine schedule).
    base_lr : float or None
        Learning rate of the network's own weights during gate training (default ``lr / 10``:
        the authors trained the pruning layers with a larger rate than the pre-trained net).
    weight_decay : float
        Weight decay of the network's weights (the gates get none).
    batch_size : int
    alpha0, alpha_max, alpha_growth : float
        Start, cap and multiplicative step of the sigmoid scale (see :class:`GateController`).
    window : int or None
        Optimizer steps between two controller checks (default: a quarter epoch, >= 5 steps).
    move_tol : float
        Gates "stopped moving" when the mean absolute change of a group's window-averaged gate
        values is below this.
    rate_tol : float
        A group's keep rate is on target within this; further off, ``lambda`` grows.
    pool_size : int
        See :class:`ChannelGate`.
    calib_images : int
        Training images whose gate values are averaged for the final decision (S4).
    enforce_budget : bool
        Keep exactly the budget's width per group: the channels with the highest gate values
        (those above 0.5 first). When the gates reached their targets this changes nothing;
        otherwise the number of overridden channels is reported. ``False``: keep exactly the
        channels with ``v > 0.5`` (at least one per group).
    max_steps_per_epoch : int or None
        Cap on optimizer steps per epoch (quick runs).
    augment : bool
        Random crop and flip during gate training (the trainer's augmentation).
    """

    epochs: int = option(2, "epochs of joint gate + network training (S2-S3)", min=1)
    lam: float = option(4.0, "initial weight lambda of the rate penalty, per group", min=0,
                        aliases=("lambda", "lambda_"), cli="--lambda")
    lr: float = option(0.05, "learning rate of the gate layers", above=0)
    base_lr: float | None = option(None, "learning rate of the network's weights during gate "
                                   "training (None: lr / 10)", kind="float", min=0)
    weight_decay: float = option(5e-4, "weight decay of the network's weights", min=0)
    batch_size: int = option(64, "batch size of gate training", min=1)
    alpha0: float = option(1.0, "start of the sigmoid scale alpha", above=0)
    alpha_max: float = option(100.0, "cap of alpha", above=0)
    alpha_growth: float = option(1.5, "multiplicative step of alpha", above=1)
    window: int | None = option(None, "optimizer steps between two controller checks (None: a "
                                "quarter epoch, >= 5 steps)", kind="int", min=1)
    move_tol: float = option(0.01, "gates stopped moving below this mean absolute change", min=0)
    rate_tol: float = option(0.01, "a group's keep rate is on target within this", min=0)
    pool_size: int = option(2, "pooling of the gate's input (see ChannelGate)", min=1)
    calib_images: int = option(512, "images whose gate values decide the cut (S4)", min=1)
    enforce_budget: bool = option(True, "keep exactly the budget's width per group")
    max_steps_per_epoch: int | None = option(None, "cap on optimizer steps per epoch",
                                             kind="int", min=1)
    augment: bool = option(True, "random crop and flip during gate training")
    device: str = option("auto", "device of gate training")

    def validate(self) -> None:
        if self.alpha0 > self.alpha_max:
            raise ConfigError(f"need alpha0 <= alpha_max, got {self.alpha0}, {self.alpha_max}")


@dataclass
class GateController:
    """S2-S3 schedule of ``alpha`` (binarisation) and ``lambda`` (rate penalty), per group.

    Every ``window`` optimizer steps it compares each group's window-averaged gate vector
    ``vbar`` with the previous window's (``C``: the group's channels, ``r``: its keep rate):

    * **alpha** -- if ``mean |vbar - vbar_prev| < move_tol`` (the gates stopped moving), the
      group's rate is on target (``|mean(vbar) - r| <= max(rate_tol, 0.5 / C)``, i.e. within
      half a channel) and the gates are not yet binary, ``alpha <- min(alpha_max,
      alpha * alpha_growth)``. Growing alpha while the rate is off would freeze a wrong count of
      open gates (a saturated sigmoid has no gradient). So that the gates are binary by the end
      of a short run whatever happens, alpha is also kept above a geometric ramp from
      ``alpha0`` (at 25% of the steps) to ``alpha_max`` (at 90%):
      ``alpha >= alpha0 * (alpha_max / alpha0) ** clip((t / T - 0.25) / 0.65, 0, 1)``.
    * **lambda** -- "re-set from the gap to the target": if the rate is off target, the
      group's ``lambda <- 2 * lambda`` (an integral action: a persistent gap is pushed harder,
      capped at ``1e4 * lambda0``), else it relaxes back, ``lambda <- max(lambda0, lambda / 2)``.

    A group counts as binary when every window-averaged gate value is below 0.05 or above 0.95.
    """

    targets: list[float]
    total_steps: int
    window: int
    lam0: float
    alpha0: float = 1.0
    alpha_max: float = 100.0
    alpha_growth: float = 1.5
    move_tol: float = 0.01
    rate_tol: float = 0.01
    alphas: list[float] = field(default_factory=list)
    lams: list[float] = field(default_factory=list)
    step: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.targets)
        self.alphas = [self.alpha0] * n
        self.lams = [self.lam0] * n
        self._sums: list[torch.Tensor | None] = [None] * n
        self._count = 0
        self._prev: list[torch.Tensor | None] = [None] * n

    def ramp(self) -> float:
        t = (self.step / max(1, self.total_steps) - 0.25) / 0.65
        return self.alpha0 * (self.alpha_max / self.alpha0) ** min(1.0, max(0.0, t))

    def observe(self, values: Sequence[torch.Tensor | None]) -> None:
        """Record one step's gate vectors (detached); update alpha / lambda at window ends."""
        self.step += 1
        for i, v in enumerate(values):
            if v is None:
                continue
            v = v.detach().float().cpu()
            self._sums[i] = v if self._sums[i] is None else self._sums[i] + v
        self._count += 1
        if self._count < self.window:
            self.alphas = [max(a, self.ramp()) for a in self.alphas]
            return
        record = {"step": self.step, "groups": []}
        for i, s in enumerate(self._sums):
            if s is None:
                continue
            vbar = s / self._count
            prev = self._prev[i]
            move = float((vbar - prev).abs().mean()) if prev is not None else math.inf
            binary = bool(((vbar < 0.05) | (vbar > 0.95)).all())
            gap = float(vbar.mean()) - self.targets[i]
            on_target = abs(gap) <= max(self.rate_tol, 0.5 / len(vbar))
            if move < self.move_tol and on_target and not binary:
                self.alphas[i] = min(self.alpha_max, self.alphas[i] * self.alpha_growth)
            if on_target:
                self.lams[i] = max(self.lam0, self.lams[i] / 2)
            else:
                self.lams[i] = min(1e4 * self.lam0, self.lams[i] * 2)
            self._prev[i] = vbar
            record["groups"].append({"rate": float(vbar.mean()), "target": self.targets[i],
                                     "move": move, "binary": binary, "alpha": self.alphas[i],
                                     "lambda": self.lams[i]})
        self.history.append(record)
        self._sums = [None] * len(self._sums)
        self._count = 0
        self.alphas = [max(a, self.ramp()) for a in self.alphas]


def train_gates(model: nn.Module, gated: GatedModel, targets: Sequence[float], train_set,
                opts: AutoPrunerOptions, seed: int = 0) -> GateController:
    """S2-S3: train network and gates with ``prunekit.train.fit`` until the gates binarise.

    Parameters
    ----------
    model : nn.Module
        The network with ``gated`` attached (trained in place).
    gated : GatedModel
    targets : sequence of float
        Keep rate ``r_g`` per gated group (same order as ``gated.groups``).
    train_set : ImageDataset, Dataset or DataLoader
        Labelled training data (:func:`prunekit.train.fit`; a DataLoader keeps its own batch
        size).
    opts : AutoPrunerOptions
    seed : int

    Returns
    -------
    GateController
        The schedule's final state and per-window history (rates, alphas, lambdas).
    """
    from ..train import Hooks, TrainConfig, epoch_steps, fit

    batch = min(opts.batch_size, count(train_set))
    steps = epoch_steps(train_set, batch, opts.max_steps_per_epoch)
    total = steps * opts.epochs
    window = opts.window or max(5, steps // 4)
    ctl = GateController(list(targets), total, window, opts.lam, opts.alpha0, opts.alpha_max,
                         opts.alpha_growth, opts.move_tol, opts.rate_tol)
    gates = [gate for _, gate in gated.items()]
    for gate, a in zip(gates, ctl.alphas, strict=True):
        gate.alpha = a
    gate_params = {id(p) for p in gated.gates.parameters()}
    base_scale = (opts.base_lr if opts.base_lr is not None else opts.lr / 10) / opts.lr
    wd = opts.weight_decay

    def regularizer(_model: nn.Module) -> torch.Tensor:
        terms = []
        for gate, r, lam in zip(gates, ctl.targets, ctl.lams, strict=True):
            if gate.v is not None:
                terms.append(lam * (gate.v.mean() - r) ** 2)
        ctl.observe([gate.v for gate in gates])
        for gate, a in zip(gates, ctl.alphas, strict=True):
            gate.alpha = a
        if not terms:
            return torch.zeros((), device=_device_of(_model))
        return torch.stack(terms).sum()

    @torch.no_grad()
    def grad_transform(m: nn.Module) -> None:
        # Per-group learning rates through one optimizer: the network's gradients (with their
        # weight decay, applied here) are scaled by base_lr / lr; the gates' are left as they are.
        for p in m.parameters():
            if p.grad is None or id(p) in gate_params:
                continue
            if wd:
                p.grad.add_(p, alpha=wd)
            p.grad.mul_(base_scale)

    def postfix() -> dict[str, float]:
        rates = [float(g.v.detach().mean()) for g in gates if g.v is not None]
        return {"keep": sum(rates) / max(1, len(rates)), "alpha": min(ctl.alphas) if ctl.alphas else 0.0}

    cfg = TrainConfig(epochs=opts.epochs, batch_size=batch, lr=opts.lr, weight_decay=wd,
                      augment=opts.augment, padding=2, seed=seed, device=opts.device,
                      max_steps_per_epoch=opts.max_steps_per_epoch, eval_every=0)
    hooks = Hooks(grad_transform=grad_transform, regularizer=regularizer, postfix=postfix,
                  no_weight_decay=list(model.parameters()))
    fit(model, train_set, cfg, hooks=hooks)
    return ctl


# ----------------------------------------------------------------------------- S4: prune, fold
@torch.no_grad()
def gate_values(model: nn.Module, gated: GatedModel, data, images: int = 512,
                batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Gate vector of every gated group averaged over the first ``images`` images of ``data``
    (any source :func:`prunekit.data.batches.iter_batches` reads; labels unused; eval mode, no
    augmentation), weighted by batch size."""
    dev = _device_of(model)
    sums: dict[str, torch.Tensor] = {}
    n = count(data, images)
    with eval_mode(model):
        for x, _ in iter_batches(data, n, batch_size):
            model(x.to(dev))
            for g, gate in gated.items():
                v = gate.v.double().cpu() * len(x)
                sums[g.name] = sums[g.name] + v if g.name in sums else v
    return {k: v / n for k, v in sums.items()}


def gate_plan(info: DependencyInfo, values: dict[str, torch.Tensor],
              widths: Widths | None = None) -> tuple[PruningPlan, dict]:
    """S4 decision: per group keep the channels with ``v > 0.5`` (never none: at least the
    highest gate), or, with ``widths``, exactly ``widths[g]`` channels by descending ``v``.

    Returns
    -------
    plan, stats
        ``stats``: ``{"forced": channels whose keep/remove decision the budget overrode,
        "gate_keep": channels with v > 0.5, "channels": total}``.
    """
    groups, forced, above, total = [], 0, 0, 0
    for g in info.groups:
        v = values.get(g.name)
        total += g.size
        if v is None:
            above += g.size
            continue
        on = v > 0.5
        above += int(on.sum())
        if widths is not None:
            n = max(1, widths.get(g.name, g.size))
            keep = torch.argsort(-v, stable=True)[:n]
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[keep] = True
            forced += int((mask != on).sum())
        else:
            keep = on.nonzero().flatten() if bool(on.any()) else v.argmax().view(1)
        if len(keep) < g.size:
            groups.append(GroupPlan(g.name, g.size, keep.tolist()))
    return PruningPlan(groups), {"forced": forced, "gate_keep": above, "channels": total}


@torch.no_grad()
def fold_gates(info: DependencyInfo, values: dict[str, torch.Tensor]) -> None:
    """Fold constant gate values into every consumer's input columns: ``W[:, col] *= v_c``
    (for a grouped conv, the rows of the column's group at its column within the group, see
    :func:`~prunekit.engine.input_columns`).

    Exact for a constant gate (consumers are linear in their input); with binary gates the kept
    channels' columns are multiplied by 1 and the removed ones are deleted afterwards anyway.
    """
    for g in info.groups:
        v = values.get(g.name)
        if v is None:
            continue
        for slot in g.consumers:
            w = slot.module.weight
            cols, chans = consumer_index(slot, g.size)
            scale = v[chans].to(w.dtype).to(w.device)
            if is_grouped(slot.module):  # a grouped conv: each column is read by its group's rows
                for (rows, col), s in zip(input_columns(slot.module, cols.tolist()), scale, strict=True):
                    w.data[rows, col] *= s
                continue
            shape = [1, -1] + [1] * (w.dim() - 2)
            w.data.index_copy_(1, cols.to(w.device), w.data.index_select(1, cols.to(w.device))
                               * scale.view(shape))


def _budget(ctx: PruneContext, info: DependencyInfo) -> tuple[Widths, float, float | None]:
    ratio, widths, frac = budget_widths(info, ctx.ratio, ctx.target_macs, round_to=ctx.round_to)
    return widths, ratio, frac


@register_method("autopruner", AutoPrunerOptions, own_training=("epochs", 1), needs_data=True,
                 summary="AutoPruner: trainable channel gates that binarise, then cut "
                         "(Luo and Wu, Pattern Recognition 2020)")
def run(ctx: PruneContext) -> MethodOutput:
    """Prune ``ctx.model`` with AutoPruner (S1-S4) to ``ctx.ratio`` or ``ctx.target_macs``.

    The keep rate of group ``g`` is ``r_g = w_g / C_g`` with ``w_g`` the budget's width: with
    ``ratio``, ``w_g = C_g - round(ratio * C_g)`` (keep ``1 - ratio``); with ``target_macs`` the
    uniform ratio found by :func:`~prunekit.engine.budget.solve_budget`. Options: see
    :class:`AutoPrunerOptions` (``epochs``, ``lambda``, ``lr`` ...).

    Returns
    -------
    MethodOutput
        The pruned model (no gates, no hooks), its plan and ``extra`` with the achieved gate
        keep rate, overridden channels and the alpha/lambda history summary.
    """
    opts = ctx.parse(AutoPrunerOptions, "autopruner")
    if is_empty(ctx.train_set):
        raise DataError("AutoPruner trains its gates and needs training data (data=...)")
    if opts.device == "auto" and ctx.device != "auto":
        opts.device = ctx.device
    torch.manual_seed(ctx.seed)
    model = ctx.model
    x = ctx.example_inputs
    info = analyse(model, x, ignored_layers=ctx.ignored_layers)
    widths, ratio, frac = _budget(ctx, info)
    dev = resolve_device(opts.device)
    model.to(dev)
    gated = GatedModel(model, info.groups, x, opts.pool_size)
    targets = [widths[g.name] / g.size for g in gated.groups]
    try:
        ctl = train_gates(model, gated, targets, ctx.train_set, opts, ctx.seed)
        values = gate_values(model, gated, ctx.train_set, opts.calib_images)
    finally:
        gated.detach()
    model.cpu()
    plan, stats = gate_plan(info, values, widths if opts.enforce_budget else None)
    fold_gates(info, values)
    pruned = apply_plan(model, x, plan, inplace=True)
    vals = torch.cat([v for v in values.values()]) if values else torch.zeros(0)
    binary = float(((vals < 0.05) | (vals > 0.95)).double().mean()) if len(vals) else 1.0
    extra = {"ratio": ratio, "searched_macs_fraction": frac,
             "target_keep": sum(widths.values()) / max(1, sum(g.size for g in info.groups)),
             "gate_keep": stats["gate_keep"] / max(1, stats["channels"]),
             "forced_channels": stats["forced"], "binary_fraction": binary,
             "final_alpha": min(ctl.alphas) if ctl.alphas else None,
             "ungated_groups": gated.skipped}
    plan.meta = {"method": "autopruner", **{k: v for k, v in extra.items() if k != "ungated_groups"}}
    return MethodOutput(pruned, plan, extra, train_epochs=float(opts.epochs))
