"""CURL: compress residual blocks inside and out, ranked by the KL divergence of the output.

The method (Luo and Wu, CVPR 2020), step by step:

S1 **groups.** Channels that must go together are the engine's groups. In a ResNet stage the
   blocks' output channels (the residual "trunk": the stem or projection conv and every block's
   last conv, all added together) form ONE group, so a trunk channel is removed from every block
   of the stage at once and the residual additions stay valid; the blocks' internal channels
   form one group per block. CURL prunes both kinds ("residual inside and outside alike").
S2 **score.** The importance of channel ``c`` (of any group) is
   ``s_c = (1/N) sum_n KL(p_n || q_n^c) = (1/N) sum_n sum_k p_nk log(p_nk / q_nk^c)`` where ``p``
   is the original network's softmax output on calibration image ``n`` and ``q^c`` the output
   with channel ``c`` removed. "Removed" is simulated exactly by zeroing the channel at the input
   of every layer that reads it (forward pre-hooks on the group's consumers; see
   :mod:`prunekit.methods.autopruner` for why that equals physical removal, also where a BN
   follows the trunk). ``channel_batch = K`` channels are scored by one forward: the calibration
   batch is replicated ``K`` times and replica ``k`` has channel ``c_k`` zeroed.
S3 **rank.** One global ranking of all channels by ``s`` (each group's scores divided by their L2
   norm by default, see below); the least important go until the
   model fits the budget (``target_macs``: bisection with
   :func:`~prunekit.engine.budget.solve_budget` over the fraction of channels removed; ``ratio``:
   that fraction directly). Every group keeps at least one channel.
S4 **prune** with the engine (optionally in ``steps`` rounds, re-scoring the smaller model each
   round). Small-data fine-tuning (expansion, distillation, label refinement) is in
   :mod:`prunekit.train.smalldata` and can follow any method.

Grouped convs (ResNeXt, RegNet) need nothing special: a removed channel is zeroed at the input
of every consumer, whatever rows of a grouped conv read it. A Linear in a channel-last block
(ConvNeXt: ``permute -> LayerNorm -> Linear -> GELU -> Linear`` on ``[N, H, W, C]``) reads its
channels on the last axis; its mask hook moves that axis to position 1 and back. A group
normalised over its channels by a LayerNorm / GroupNorm
(:attr:`~prunekit.engine.graph.ChannelGroup.normalised`: ConvNeXt's residual stream) is left
out: removing one of its channels changes the mean and variance every other channel is
normalised with, which zeroing the channel after the normalisation does not simulate, so S2's
KL would not be that of the removal. Such groups are kept whole, reported as
``normalised_groups_left_out`` and noted in one warning; when no other group is left, CURL
refuses with :class:`~prunekit.errors.UnsupportedLayerError` naming the normalisation layers.

Per-group normalisation (option ``normalize``, default ``"l2"``). The paper ranks the raw KL
scores: KL is measured on the network's *output*, in nats, so scores of different layers are on
one scale -- that is what makes it a global criterion. But the KL of removing ONE channel
underrates removing MANY channels of a redundant layer (each alone changes little, together they
matter), and a one-shot raw ranking strips such layers almost bare. Measured here on a ResNet-20
(Fashion-MNIST, 40% of the MACs, 64 calibration images): raw ranking cut a stage-3 block to 4 of
its 64 internal channels and gave 81.0% after one fine-tuning epoch, L2-normalised 83.05%, L1
one-shot 81.95%; on a half-width ResNet-8 the raw ranking emptied a group to one channel and the
network stayed at chance after fine-tuning (l2: 59.3%). So by default each group's scores are
divided by their L2 norm (the convention of the engine's one-shot global ranking): the KL order
inside a group is kept, and the groups compete by their normalised profiles. ``"none"`` is the
paper's literal reading (use it with ``steps > 1``, which re-scores after each partial removal
and measured 81.6% in the same setting); ``"max"`` divides by each group's largest score.

References
----------
J.-H. Luo and J. Wu. "Neural network pruning with residual-connections and limited-data".
CVPR 2020 (arXiv:1911.08114).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..criteria import Scores
from ..data.batches import count, is_empty, iter_batches, num_batches
from ..engine import ChannelGroup, DependencyInfo, PruningPlan, analyse, apply_plan
from ..engine.budget import check_fraction, count_macs_params, solve_budget
from ..engine.ranking import NORMALIZE, consumer_index, global_widths, keep_top
from ..errors import ConfigError, DataError, PrunekitWarning, UnsupportedLayerError
from ..utils import module_device, progress, resolve_device
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .registry import register_method

__all__ = ["NORMALIZE", "global_widths", "kl_scores", "run"]

log = logging.getLogger(__name__)

class _ReplicaMask:
    """Forward pre-hooks that zero, in replica ``k`` of a ``K``-times replicated batch, the
    channel ``chosen[k]`` of ``group`` at the input of every consumer of the group."""

    def __init__(self, group: ChannelGroup) -> None:
        self.group = group
        self.index = [(s, *consumer_index(s, group.size)) for s in group.consumers]
        self.chosen: list[int] = []
        self.handles = []

    def __enter__(self) -> _ReplicaMask:
        for slot, cols, chans in self.index:
            self.handles.append(slot.module.register_forward_pre_hook(self._hook(cols, chans)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, cols: torch.Tensor, chans: torch.Tensor):
        def hook(module, args):
            x = args[0]
            last = isinstance(module, nn.Linear) and x.dim() > 2  # channel-last [N, H, W, C]
            if last:
                x = x.movedim(-1, 1)
            k = len(self.chosen)
            mult = torch.ones(k, x.shape[1], dtype=x.dtype, device=x.device)
            for r, c in enumerate(self.chosen):
                mult[r, cols[chans == c].to(x.device)] = 0
            xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])
            mult = mult.view(k, 1, x.shape[1], *([1] * (x.dim() - 2)))
            out = (xs * mult).reshape(x.shape)
            if last:
                return (out.movedim(1, -1), *args[1:])
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous(memory_format=torch.channels_last)
            return (out, *args[1:])
        return hook


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(p || q)`` from log-probabilities (last dim), in float64."""
    log_p, log_q = log_p.double(), log_q.double()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def kl_scores(info: DependencyInfo, data, *, calib_images: int = 128, channel_batch: int = 16,
              batch_size: int = 64, groups: list[str] | None = None,
              device: str | torch.device | None = None, channels_last: bool | None = None) -> Scores:
    """S2: ``KL(original softmax || softmax with channel c removed)``, averaged over images.

    Parameters
    ----------
    info : DependencyInfo
        The analysed model (scored in eval mode; not modified).
    data : ImageDataset, Dataset, DataLoader or Tensor
        Calibration images (labels are not read): the first ``calib_images`` are used, each
        batch read once (:func:`prunekit.data.batches.iter_batches`).
    calib_images : int
        ``N``.
    channel_batch : int
        ``K``: channels scored per forward (the batch is replicated ``K`` times); 1 gives one
        forward per channel. The result does not depend on ``K`` (up to float round-off).
    batch_size : int
        Calibration images per forward (so a forward holds ``K * batch_size`` images).
    groups : list of str, optional
        Score only these groups (default: all).
    device : str or torch.device, optional
        Where to run (default: where the model is).
    channels_last : bool, optional
        Run in the ``channels_last`` memory format (default: on CPU, where it measured about
        1.5x faster for ResNet-20; the model's weights are converted back afterwards).

    Returns
    -------
    dict[str, Tensor[C]]
        Group name -> per-channel mean KL (float64, >= 0).

    Notes
    -----
    Exact (the KL of the physically pruned model) for every group but those normalised over
    their channels (:attr:`~prunekit.engine.graph.ChannelGroup.normalised`), where the channel
    is silenced after the normalisation instead; :func:`run` leaves such groups out.
    """
    if is_empty(data):
        raise DataError("CURL scores channels on calibration images and needs data (data=...)")
    if channel_batch < 1:
        raise ConfigError(f"channel_batch must be >= 1, got {channel_batch}")
    if calib_images < 1:
        raise ConfigError(f"calib_images must be >= 1, got {calib_images}")
    model = info.model
    dev = torch.device(device) if device is not None else module_device(model)
    was_training, old_dev = model.training, module_device(model)
    model.to(dev).eval()
    cl = channels_last if channels_last is not None else dev.type == "cpu"
    if cl:
        model.to(memory_format=torch.channels_last)
    chosen = [g for g in info.groups if groups is None or g.name in groups]
    sums = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in chosen}
    n = count(data, calib_images)
    per_batch = [(g, c0) for g in chosen for c0 in range(0, g.size, channel_batch)]
    bar = progress(range(num_batches(data, n, batch_size) * len(per_batch)),
                   desc="CURL: KL scores")
    try:
        for x, _ in iter_batches(data, n, batch_size):
            x = x.to(dev)
            if cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            log_p = F.log_softmax(model(x).float(), dim=1)
            for g, c0 in per_batch:
                channels = list(range(c0, min(c0 + channel_batch, g.size)))
                with _ReplicaMask(g) as mask:
                    mask.chosen = channels
                    xr = x.repeat(len(channels), *([1] * (x.dim() - 1)))
                    if cl and xr.dim() == 4:
                        xr = xr.contiguous(memory_format=torch.channels_last)
                    log_q = F.log_softmax(model(xr).float(), dim=1).view(len(channels), len(x), -1)
                kl = _kl(log_p.unsqueeze(0), log_q).sum(1).clamp_min(0).cpu()
                sums[g.name][channels] += kl
                bar.update(1)
    finally:
        bar.close()
        if cl:
            model.to(memory_format=torch.contiguous_format)
        model.to(old_dev).train(was_training)
    return {k: v / n for k, v in sums.items()}


def _ignored_names(ctx: PruneContext) -> list[str | Any]:
    """Ignored layers as names (module references of ``ctx.model`` mapped to their names), so
    they still name the layers of the pruned copies of later rounds."""
    names = {m: n for n, m in ctx.model.named_modules()}
    return [names.get(layer, layer) if isinstance(layer, nn.Module) else layer
            for layer in ctx.ignored_layers]


def _normalised_roots(model: nn.Module, x: torch.Tensor, ignored: list[str | Any]
                      ) -> tuple[list[str], list[str]]:
    """The roots of the groups normalised over their channels (a LayerNorm / GroupNorm, see
    :attr:`~prunekit.engine.graph.ChannelGroup.normalised`) and the names of those norms.

    Raises
    ------
    UnsupportedLayerError
        When every prunable group is normalised (nothing would be left to score).
    """
    info = analyse(model, x, ignored_layers=ignored)
    normalised = [g for g in info.groups if g.normalised]
    norms = sorted({s.name for g in normalised for s in g.channelwise
                    if isinstance(s.module, (nn.LayerNorm, nn.GroupNorm))})
    if normalised and len(normalised) == len(info.groups):
        raise UnsupportedLayerError(
            "curl: every prunable group is normalised over its channels by "
            f"{', '.join(map(repr, norms))} (LayerNorm / GroupNorm); zeroing a channel does not "
            "simulate its removal there, so its KL score would be wrong. Use another method")
    return [g.name for g in normalised], norms


def _one_round(model: nn.Module, x: torch.Tensor, ctx: PruneContext, target: float | None,
               ratio: float | None, opts: dict) -> tuple[nn.Module, PruningPlan, dict]:
    info = analyse(model, x, ignored_layers=opts["ignored"])
    scores = kl_scores(info, ctx.train_set, calib_images=opts["calib_images"],
                       channel_batch=opts["channel_batch"], batch_size=opts["batch_size"],
                       device=opts["device"])
    norm = opts["normalize"]
    if target is not None:
        r, widths, frac = solve_budget(info, target, lambda q: global_widths(scores, q, norm))
    else:
        r, widths, frac = ratio, global_widths(scores, ratio, norm), None
    plan = keep_top(info, scores, widths)
    pruned = apply_plan(model, x, plan)
    return pruned, plan, {"ratio": r, "searched_macs_fraction": frac,
                          "scores": {k: v.tolist() for k, v in scores.items()}}


@dataclass
class CurlOptions(MethodOptions):
    """Options of CURL. Cost of the scores: one forward of every calibration image per channel
    of the network (ResNet-20: 448 channels), i.e. ``calib_images * channels`` image-forwards."""

    calib_images: int = option(128, "calibration images for the KL scores", min=1)
    channel_batch: int = option(16, "channels scored per forward pass", min=1)
    batch_size: int = option(64, "calibration images per forward pass", min=1)
    normalize: str = option("l2", "per-group score normalisation before the global ranking",
                            choices=NORMALIZE)
    steps: int = option(1, "prune in this many rounds, re-scoring the smaller model each round "
                        "(targets interpolated geometrically)", min=1)
    device: str | None = option(None, "device of the scoring (None: the run's device)", kind="str")


@register_method("curl", CurlOptions, round_to=False, needs_data=True,
                 summary="CURL: channels ranked by the KL divergence of the output when removed "
                         "(Luo and Wu, CVPR 2020)")
def run(ctx: PruneContext) -> MethodOutput:
    """Prune ``ctx.model`` with CURL (S1-S4) to ``ctx.target_macs`` or ``ctx.ratio``; options:
    :class:`CurlOptions`.

    Returns
    -------
    MethodOutput
        ``extra``: ``ratio`` (fraction of channels removed, last round), the searched MACs
        fraction, the KL scores of the last round per group, and
        ``normalised_groups_left_out`` (roots of the groups kept whole because a LayerNorm /
        GroupNorm normalises over their channels).

    Raises
    ------
    UnsupportedLayerError
        When every prunable group is normalised over its channels.
    """
    o = ctx.parse(CurlOptions, "curl")
    steps = o.steps
    if is_empty(ctx.train_set):
        raise DataError("CURL scores channels on calibration images and needs data (data=...)")
    opts = {"calib_images": o.calib_images, "channel_batch": o.channel_batch,
            "batch_size": o.batch_size, "normalize": o.normalize,
            "device": resolve_device(o.device or ctx.device)}
    x = ctx.example_inputs
    model = ctx.model.eval()
    ignored = _ignored_names(ctx)
    left_out, norms = _normalised_roots(model, x, ignored)
    if left_out:
        message = (f"curl: left {len(left_out)} group(s) normalised over their channels by a "
                   f"LayerNorm / GroupNorm ({', '.join(map(repr, norms))}) out of the ranking: "
                   f"zeroing a channel does not simulate its removal there; groups: "
                   f"{', '.join(left_out)}")
        warnings.warn(message, PrunekitWarning, stacklevel=2)
        log.warning(message)
    opts["ignored"] = ignored = ignored + left_out
    base_macs = count_macs_params(model, x)[0]
    if ctx.target_macs is not None:
        final = check_fraction("target MACs", ctx.target_macs)
    else:
        final = None
        keep_final = 1.0 - check_fraction("ratio", ctx.ratio)
    plan = PruningPlan()
    extra: dict = {}
    channels0 = sum(g.size for g in analyse(model, x, ignored_layers=ignored).groups)
    for i in range(1, steps + 1):
        if final is not None:
            # MACs target of this round, as a fraction of the current model's MACs
            round_target = final ** (i / steps)
            current = count_macs_params(model, x)[0] / base_macs
            target, ratio = min(0.999, round_target / current), None
        else:
            now = sum(g.size for g in analyse(model, x, ignored_layers=ignored).groups)
            want = channels0 * keep_final ** (i / steps)
            target, ratio = None, min(0.999, max(0.0, 1.0 - want / now))
            if ratio <= 0:
                continue
        model, round_plan, extra = _one_round(model, x, ctx, target, ratio, opts)
        plan = plan.then(round_plan)
    model = model.cpu().eval()
    frac = count_macs_params(model, x)[0] / base_macs
    extra = {**extra, "macs_fraction": frac, "steps": steps,
             "normalised_groups_left_out": left_out}
    plan.meta = {"method": "curl", "ratio": extra.get("ratio"), "macs_fraction": frac,
                 "normalize": opts["normalize"], "steps": steps}
    return MethodOutput(model, plan, extra)
