"""Removing a residual branch whole: a group pruned to no channels at all.

In a residual block ``y = x + F(x)`` the channels between the branch's first and last layer
(the hidden group: ResNet's ``conv1 -> conv2``, MobileNetV2's expansion, ConvNeXt's MLP) can all
go. The branch's last layer then reads nothing, and its output is its bias, a constant per
channel, so the block becomes ``y = x + c``. It is the limit of width pruning that keeps the
residual stream intact, and it is what a runtime runs fastest: no narrow kernels left and
no fixed cost per layer (a ResNet-20 at 28x28 and batch 64 on OpenVINO kept 0.64 of the MACs
per unit of latency at half its latency by widths alone, and 1.02 with two blocks of each
stage removed: ``bench/results/runtimes_session20_resnet20_depth2.md``). Removing whole
residual blocks, the layers an ensemble of paths can best spare, is studied by Veit et al.
[1]_; learning which blocks to drop under a latency budget, by Fu et al. (DepthShrinker) [2]_.

A group can vanish (:func:`vanish_refusal` says why not) when it has one producing layer (a
plain conv or linear whose outputs are all the group's channels), only per-channel layers on
the way (BatchNorm, LayerNorm, GroupNorm, PReLU, depthwise convs) and consumers that read
nothing but the group and whose own output is added to a shortcut around the branch: it
produces the channels the producer reads (an identity shortcut), or a projection that reads
them produces its channels too. The surgery (:func:`vanish`) replaces, by name, the producer and the
depthwise convs with :class:`Vanished` (one channel of zeros with the layer's output geometry:
batch and spatial size, so that the code of the block still runs), the norms with a
pass-through :class:`Vanished`, and each consumer with :class:`BranchConstant` (its bias,
broadcast to the shape the layer would give). The result is exact: the same outputs as the
original with the consumers' input weights set to zero.

References
----------
.. [1] A. Veit, M. Wilber, S. Belongie, "Residual Networks Behave Like Ensembles of Relatively
   Shallow Networks", NeurIPS 2016.
.. [2] Y. Fu et al., "DepthShrinker: A New Compression Paradigm Towards Boosting Real-Hardware
   Efficiency of Compact Neural Networks", ICML 2022.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .graph import ChannelGroup, DependencyInfo, is_depthwise

__all__ = ["BranchConstant", "Vanished", "branch", "streams", "vanish", "vanish_refusal",
           "vanishable"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


class _Geometry:
    """The output shape of a conv (kernel, stride, padding, dilation) or linear layer for an
    input shape, computed from the shape alone: the input's values take no part, so the
    traced graph holds no edge from the layer's input (nothing couples its channels)."""

    def __init__(self, layer: nn.Module) -> None:
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            pad = layer.padding
            if isinstance(pad, str):  # "valid", or "same" (stride 1): the input's size
                pad = (0, 0) if pad == "valid" else tuple(
                    d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation, strict=True))
            self.kernel, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
            self.padding, self.dilation = tuple(pad), tuple(layer.dilation)

    def shape(self, x: torch.Tensor, channels: int) -> list[Any]:
        """The layer's output shape for input ``x``, with ``channels`` channels."""
        if not self.conv:
            return [*x.shape[:-1], channels]
        sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
                 zip(x.shape[2:], self.kernel, self.stride, self.padding, self.dilation, strict=True)]
        return [x.shape[0], channels, *sizes]


class Vanished(nn.Module):
    """Stands for a layer of a vanished group: a conv or linear passes on one channel of zeros
    of its output's batch and spatial size; a norm or PReLU passes its input on.

    Parameters
    ----------
    layer : nn.Module
        The layer replaced (``nn.Conv2d``, ``nn.Linear``, a norm or ``nn.PReLU``).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.passes = not isinstance(layer, (nn.Conv2d, nn.Linear))
        self.geometry = _Geometry(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.passes else x.new_zeros(self.geometry.shape(x, 1))


class BranchConstant(nn.Module):
    """Stands for the last layer of a vanished branch: its output is its bias (zeros when it had
    none), one value per output channel, broadcast to the shape the layer would give.

    Parameters
    ----------
    layer : nn.Conv2d or nn.Linear
        The consumer replaced.

    Attributes
    ----------
    bias : nn.Parameter [out]
        The constant (trainable, like the layer's bias was).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.geometry = _Geometry(layer)
        out = layer.out_channels if self.geometry.conv else layer.out_features
        b = layer.bias.detach().clone() if layer.bias is not None else \
            torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device)
        self.bias = nn.Parameter(b)

    @property
    def out_channels(self) -> int:
        return int(self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.geometry.shape(x, self.out_channels)
        b = self.bias.view(1, -1, 1, 1) if self.geometry.conv else self.bias
        # a copy, not a view: under no_grad a view of the parameter would still claim to
        # require grad with no grad_fn, which hooks on module outputs reject
        return b.expand(shape).clone()


def _plain(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


class _Topology:
    """Which group each layer produces channels of, and which groups it reads."""

    def __init__(self, info: DependencyInfo) -> None:
        self.produces: dict[nn.Module, ChannelGroup] = {}
        self.reads: dict[nn.Module, set[str]] = {}
        for g in info.all_groups:
            for s in g.producers:
                self.produces[s.module] = g
            for s in g.consumers:
                self.reads.setdefault(s.module, set()).add(g.name)

    def shortcut(self, producer: nn.Module, consumer: nn.Module) -> bool:
        """Whether ``consumer``'s output is added to a path that leaves from ``producer``'s
        input around the branch: the group it produces is the one ``producer`` reads (an
        identity shortcut), or another of its producers reads that group too (a projection)."""
        out = self.produces.get(consumer)
        ins = self.reads.get(producer, set())
        if out is None or not ins:
            return False
        if out.name in ins:
            return True
        return any(s.module is not consumer and self.reads.get(s.module, set()) & ins
                   for s in out.producers)


def _hidden_refusal(group: ChannelGroup) -> str | None:
    """Why ``group`` is not a branch's hidden group by itself (one plain producer of all its
    channels, only per-channel layers on them), or ``None``."""
    if group.params:
        return "free per-channel parameters read its channels"
    if group.units is not None:
        return "grouped convolutions tie its channels"
    if len(group.producers) != 1:
        return "several layers produce its channels (a residual stream)"
    prod = group.producers[0]
    out = prod.module.out_channels if isinstance(prod.module, nn.Conv2d) else \
        getattr(prod.module, "out_features", None)
    if not _plain(prod.module) or out != group.channels:
        return f"its producer {prod.name!r} is not a plain conv or linear layer of its channels"
    for s in group.channelwise:
        m = s.module
        if not (isinstance(m, _NORMS) or (is_depthwise(m) and m.padding_mode == "zeros")):
            return f"{s.name!r} ({type(m).__name__}) on its channels cannot be passed over"
    if not group.consumers:
        return "no layer reads its channels"
    for s in group.consumers:
        m = s.module
        n_in = m.in_channels if isinstance(m, nn.Conv2d) else getattr(m, "in_features", None)
        if not _plain(m) or sum(len(p) for p in s.positions.values()) != n_in:
            return f"its consumer {s.name!r} reads other channels too"
    return None


def branch(info: DependencyInfo, group: ChannelGroup, topology: _Topology | None = None
           ) -> tuple[list[ChannelGroup], str | None]:
    """The hidden groups of the residual branch that ``group`` ends, first first (a
    bottleneck's ``conv1 -> conv2 -> conv3``: the groups of ``conv1`` and ``conv2``), and why
    it cannot vanish (``None``: it can). Walking back, a group joins the chain when its only
    consumer is the next group's producer."""
    why = _hidden_refusal(group)
    if why is not None:
        return [group], why
    topology = _Topology(info) if topology is None else topology
    by_name = {g.name: g for g in info.all_groups}
    chain = [group]
    while True:
        first = chain[0].producers[0].module
        ins = topology.reads.get(first, set())
        back = by_name.get(next(iter(ins))) if len(ins) == 1 else None
        if back is None or back in chain or _hidden_refusal(back) is not None \
                or [s.module for s in back.consumers] != [first]:
            break
        chain.insert(0, back)
    first = chain[0].producers[0].module
    for s in group.consumers:
        if not topology.shortcut(first, s.module):
            return chain, f"the output of {s.name!r} is not added to a shortcut around the branch"
    return chain, None


def vanish_refusal(info: DependencyInfo, group: ChannelGroup,
                   topology: _Topology | None = None) -> str | None:
    """Why ``group`` cannot vanish (module docstring), or ``None`` when it can."""
    return branch(info, group, topology)[1]


def streams(info: DependencyInfo, names: list[str]) -> dict[str, str]:
    """Branch group -> the residual stream (the group) its last layer adds to: a stage."""
    topology = _Topology(info)
    groups = {g.name: g for g in info.all_groups}
    return {n: topology.produces[groups[n].consumers[0].module].name for n in names}


def vanishable(info: DependencyInfo) -> list[str]:
    """Names of the groups of ``info`` that can vanish (the last hidden group of each residual
    branch), in the model's order."""
    topology = _Topology(info)
    return [g.name for g in info.groups if vanish_refusal(info, g, topology) is None]


@torch.no_grad()
def vanish(info: DependencyInfo, group: ChannelGroup) -> None:
    """Remove every channel of ``group`` from ``info.model`` in place, and the layers before it
    in its branch (:func:`branch`; module docstring);
    :class:`~prunekit.engine.plan.PlanError` when the group cannot vanish."""
    from .plan import PlanError

    chain, reason = branch(info, group)
    if reason is not None:
        raise PlanError(f"group {group.name!r} cannot keep no channels: {reason}")
    done: set[str] = set()
    for g in reversed(chain):
        for s in g.slots:
            if s.name in done:
                continue  # a producer of the next group (already replaced)
            done.add(s.name)
            new: nn.Module = BranchConstant(s.module) if s.role == "consumer" and g is group \
                else Vanished(s.module)
            new.train(s.module.training)
            info.model.set_submodule(s.name, new)
