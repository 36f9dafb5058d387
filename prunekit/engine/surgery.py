"""Physical surgery: the one place where a plan becomes a smaller model.

Three operations, applied per group in plan order (:func:`apply_plan`):

remove
    delete the channel from every producer (output rows), channel-wise op and consumer (input
    columns) of the group (Torch-Pruning's pruners do the slicing);
merge
    before removing channel ``m`` that was merged into kept channel ``k``, add ``m``'s input
    slice to ``k``'s in every consumer: ``K[:, k] <- K[:, k] + K[:, m]`` (the merge of
    centripetal SGD, Ding et al., CVPR 2019). Because
    convolution and linear layers are linear in their input, this is exact whenever channel
    ``m``'s values equal channel ``k``'s at every consumer's input;
reconstruct
    after removal, write given weights (and bias) into consumers (ThiNet / LASSO least squares);
vanish
    a group that keeps no channel (a residual branch's hidden channels) is removed whole after
    every other group: :func:`prunekit.engine.depth.vanish`.

The result is a plain ``nn.Module`` with narrower Conv/BN/Linear layers: no masks, no hooks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import UnsupportedLayerError
from .graph import ChannelGroup, DependencyInfo, Slot, analyse, input_columns, is_grouped
from .plan import GroupPlan, PlanError, PruningPlan

_PER_CHANNEL_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _per_channel_tensors(slot: Slot) -> list[torch.Tensor]:
    """Tensors of a producer / channel-wise layer indexed by output channel along dim 0."""
    out = []
    for attr in _PER_CHANNEL_TENSORS:
        t = getattr(slot.module, attr, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            out.append(t.data if isinstance(t, nn.Parameter) else t)
    return out


@torch.no_grad()
def fold_consumers(group: ChannelGroup, merge: dict[int, list[int]]) -> None:
    """S4: add every merged member's input slice to its kept channel's slice, in every consumer.

    Parameters
    ----------
    group : ChannelGroup
        A freshly traced group (positions valid for the model's current shapes).
    merge : dict[int, list[int]]
        Kept channel -> members to fold into it.
    """
    for slot in group.consumers:
        w = slot.module.weight.data
        for k, members in merge.items():
            pk = slot.positions.get(k)
            if pk is None:
                continue
            for m in members:
                pm = slot.positions.get(m)
                if pm is None or len(pm) != len(pk):
                    raise UnsupportedLayerError(
                        f"consumer {slot.name!r} reads channels {k} and {m} of group {group.name!r} "
                        "at different numbers of positions; cannot merge them")
                if is_grouped(slot.module):
                    # the t-th channel of two units lies in the same group of the conv: add
                    # column by column within that group's block of output rows
                    for (rows_k, ck), (rows_m, cm) in zip(input_columns(slot.module, pk),
                                                          input_columns(slot.module, pm), strict=True):
                        if rows_k != rows_m:
                            raise UnsupportedLayerError(
                                f"consumer {slot.name!r} reads channels {k} and {m} of group "
                                f"{group.name!r} in different groups of a grouped conv; cannot "
                                "merge them")
                        w[rows_k, ck] += w[rows_m, cm]
                    continue
                w.index_add_(1, torch.tensor(pk, device=w.device),
                             w.index_select(1, torch.tensor(pm, device=w.device)))


@torch.no_grad()
def make_identical(group: ChannelGroup, clusters: Iterable[Sequence[int]]) -> None:
    """Copy the first member's per-channel parameters (conv rows, bias, BN / LayerNorm affine
    parameters and running statistics, depthwise kernels, layer scales) onto the other members
    of each cluster, in every producer, channel-wise layer and free parameter of ``group``.
    After this a merge of the cluster is exact."""
    for cluster in clusters:
        k, *members = list(cluster)
        for slot in group.producers + group.channelwise:
            pk = slot.positions[k]
            for t in _per_channel_tensors(slot):
                for m in members:
                    t[slot.positions[m]] = t[pk]
        for ps in group.params:  # free per-channel parameters (layer scales)
            t = ps.param.data.movedim(ps.dim, 0)
            for m in members:
                t[ps.positions[m]] = t[ps.positions[k]]


@torch.no_grad()
def _reconstruct(model: nn.Module, gp: GroupPlan) -> None:
    named = dict(model.named_modules())
    for name, weights in gp.reconstruct.items():
        layer = named.get(name)
        if layer is None:
            raise PlanError(f"group {gp.group!r}: no consumer layer named {name!r}")
        w = weights.get("weight")
        if w is None or tuple(w.shape) != tuple(layer.weight.shape):
            raise PlanError(f"group {gp.group!r}: reconstructed weight for {name!r} has shape "
                            f"{None if w is None else tuple(w.shape)}, layer has {tuple(layer.weight.shape)}")
        layer.weight.data.copy_(w)
        b = weights.get("bias")
        if b is not None:
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=w.device))
            layer.bias.data.copy_(b)


def apply_group(info: DependencyInfo, gp: GroupPlan) -> None:
    """Apply one group's plan to ``info.model`` in place (merge, remove, reconstruct)."""
    named = dict(info.model.named_modules())
    if gp.group not in named:
        raise PlanError(f"plan names group {gp.group!r}, which is not a layer of this model")
    group = info.group(gp.group)
    if group.size != gp.size:
        raise PlanError(f"group {gp.group!r} has {group.size} channels, the plan expects {gp.size}")
    if not gp.keep:
        from .depth import vanish

        vanish(info, group)
        return
    if gp.merge:
        fold_consumers(group, gp.merge)
    remove = group.root_channels(gp.remove)  # a unit of tied channels goes as a whole
    if remove:
        info.pruning_group(group.root, info.out_handler(group.root), remove).prune()
    if gp.reconstruct:
        _reconstruct(info.model, gp)


def apply_plan(model: nn.Module, example_inputs: torch.Tensor, plan: PruningPlan, *,
               inplace: bool = False, ignored_layers: Sequence[nn.Module | str] | None = None
               ) -> nn.Module:
    """Apply ``plan`` and return the smaller model (a deep copy unless ``inplace``).

    The same plan applied to two copies of the same model gives identical models.
    """
    target = model if inplace else copy.deepcopy(model)
    if len(plan) == 0:
        return target
    info = analyse(target, example_inputs, ignored_layers=ignored_layers, ignore_classifier=False)
    if any(not gp.keep for gp in plan):
        info.groups  # noqa: B018 (traced before any surgery: whether a group can vanish)
    for gp in sorted(plan, key=lambda gp: not gp.keep):  # vanishing groups last
        apply_group(info, gp)
    return target


def leftover_hooks(model: nn.Module) -> list[str]:
    """Names of modules that still carry forward/backward hooks (should be empty after surgery)."""
    bad = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            bad.append(name)
    return bad
