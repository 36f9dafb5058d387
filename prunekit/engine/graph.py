"""Dependency groups: which channels must be removed (or merged) together.

This is the only module that talks to Torch-Pruning's ``DependencyGraph``. It turns each of
Torch-Pruning's groups into a :class:`ChannelGroup`: the channels of one *root* layer (a conv
or linear producing them) and, for every layer that touches those channels, the positions
(``local`` indices) in that layer that correspond to each root channel. A root channel can
appear at several positions of one layer: after ``flatten`` a Linear sees every channel
``H*W`` times, and in DenseNet a channel can reach the same conv through two concatenations.

Every layer in a group has one of three roles:

``producer``
    a conv or linear whose *output* rows make the channel (the root, and every layer tied to
    it by a residual add);
``channelwise``
    a per-channel op on the channel: BatchNorm (before or after a concatenation), a
    depthwise conv, PReLU;
``consumer``
    a conv or linear that *reads* the channel through its input slice ``weight[:, local]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ConfigError, ModelError, UnsupportedLayerError
from ..utils import eval_mode

Role = Literal["producer", "channelwise", "consumer"]

# Torch-Pruning ops that cut a tensor's channels into pieces whose sizes the model's code fixes
_SPLIT_TYPES = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.SLICE)

_CHANNELWISE_TYPES = (nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.GroupNorm,
                      nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)


def _splits_channels(node) -> bool:
    """Whether a Torch-Pruning node is a split / chunk / unbind / slice along dim 1 (channels)."""
    if node.type not in _SPLIT_TYPES:
        return False
    dim = getattr(node.grad_fn, "_saved_dim", 1)
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if isinstance(dim, int) and dim < 0 and sizes is not None:
        dim += len(sizes)
    return dim == 1


# Tensor-level transposes (not a Linear's weight ``.t()``, which is ``TBackward0``): in a CNN
# they reorder channels (e.g. ShuffleNet's channel shuffle, view -> transpose -> reshape), which
# Torch-Pruning treats as element-wise, so pruning through them would remove the wrong channels.
_REORDERING_GRAD_FNS = ("TransposeBackward0", "TransposeBackward1", "PermuteBackward0")


def _reorders_channels(node) -> bool:
    """Whether a Torch-Pruning node is a transpose / permute of a feature map."""
    return node.grad_fn is not None and type(node.grad_fn).__name__ in _REORDERING_GRAD_FNS


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every output channel reads exactly its own input channel."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


@dataclass
class Slot:
    """One layer's view of a group.

    Attributes
    ----------
    name : str
        Qualified module name in the model.
    module : nn.Module
        The layer itself (a live reference: surgery changes it in place).
    role : {"producer", "channelwise", "consumer"}
    positions : dict[int, list[int]]
        Root channel -> the layer's own indices that carry it (output rows for producers and
        channel-wise ops, input columns for consumers), in a fixed order that is aligned
        across root channels (the ``t``-th position of two channels plays the same part).
    """

    name: str
    module: nn.Module
    role: Role
    positions: dict[int, list[int]]


@dataclass
class ChannelGroup:
    """Channels that live and die together, named after their root layer."""

    name: str
    root: nn.Module
    size: int
    slots: list[Slot] = field(default_factory=list)

    def by_role(self, role: Role) -> list[Slot]:
        return [s for s in self.slots if s.role == role]

    @property
    def producers(self) -> list[Slot]:
        return self.by_role("producer")

    @property
    def channelwise(self) -> list[Slot]:
        return self.by_role("channelwise")

    @property
    def consumers(self) -> list[Slot]:
        return self.by_role("consumer")

    @property
    def layer_names(self) -> list[str]:
        return [s.name for s in self.slots]

    def __repr__(self) -> str:
        return (f"ChannelGroup({self.name!r}, size={self.size}, producers="
                f"{[s.name for s in self.producers]}, consumers={[s.name for s in self.consumers]})")


def _execution_order(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Conv2d / Linear layers in the order a forward pass on ``example_inputs`` calls them."""
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
               for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with eval_mode(model, handles), torch.no_grad():
        model(example_inputs)
    return order


def find_classifier(model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module | None:
    """The classifier, whose output units are never pruned by default: the last Linear (or,
    failing that, the last Conv2d) called by a forward pass on ``example_inputs``; without
    inputs, the last one in definition order (which differs when, say, the classifier is
    defined before a hidden Linear layer)."""
    if example_inputs is not None:
        layers = _execution_order(model, example_inputs)
    else:
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return (linears or layers or [None])[-1]


def _resolve_modules(model: nn.Module, layers: Iterable[nn.Module | str] | None) -> list[nn.Module]:
    named = dict(model.named_modules())
    out: list[nn.Module] = []
    for layer in layers or ():
        if isinstance(layer, str):
            if layer not in named:
                raise ModelError(f"no layer named {layer!r} in the model")
            out.append(named[layer])
        else:
            out.append(layer)
    return out


class DependencyInfo:
    """The pruning view of a model: its groups of coupled channels.

    Parameters
    ----------
    model : nn.Module
        The network (traced once with ``example_inputs``).
    example_inputs : Tensor
        An input batch of the right shape (values do not matter).
    ignored_layers : iterable of modules or names, optional
        Layers whose output channels must not be pruned; a group containing one of them as a
        producer is skipped.
    ignore_classifier : bool
        Skip the final classifier (default True).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor,
                 ignored_layers: Iterable[nn.Module | str] | None = None,
                 ignore_classifier: bool = True) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.ignored = _resolve_modules(model, ignored_layers)
        if ignore_classifier:
            clf = find_classifier(model, example_inputs)
            if clf is not None and all(clf is not m for m in self.ignored):
                self.ignored.append(clf)
        self.names = {m: n for n, m in model.named_modules()}
        self._order = {m: i for i, m in enumerate(self.names)}
        was_training = model.training
        model.eval()
        # Torch-Pruning traces the autograd graph: a frozen layer (requires_grad=False) or a
        # call under torch.no_grad() would drop out of it and silently break the coupling.
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        except Exception as exc:  # tracing failures are model problems, not ours to hide
            raise ModelError(f"cannot trace the model for pruning: {exc}") from exc
        finally:
            for p in frozen:
                p.requires_grad_(False)
            model.train(was_training)
        self._unmapped_concats = [
            node for node in self.dg.module2node.values()
            if node.type == tp.ops.OPTYPE.CONCAT and node.module.offsets is None
            and getattr(node.grad_fn, "_saved_dim", 1) == 1]
        self._groups: list[ChannelGroup] | None = None

    def pruning_group(self, module: nn.Module, handler, idxs: Sequence[int]):
        """Torch-Pruning's group of ``module``'s channels ``idxs`` (what ``Group.prune()`` cuts).

        Every group goes through here, so that channel concatenations Torch-Pruning 1.6 leaves
        unmapped are mapped first (see :meth:`_map_concats`)."""
        self._map_concats()
        return self.dg.get_pruning_group(module, handler, list(idxs))

    def _map_concats(self) -> None:
        """Index mappings for channel concatenations whose offsets Torch-Pruning did not set.

        Torch-Pruning checks a concatenation's inferred output width against the sum of its
        inputs' widths; when the concatenation is flattened into a Linear (no global pooling) the
        inferred width is the Linear's ``in_features`` (channels x positions), the check fails
        and the concatenation keeps the identity mapping, which couples the wrong channels
        (crashes or silently wrong surgery). The inputs' widths (``concat_sizes``, which
        Torch-Pruning keeps up to date as channels are removed) are right, so the mapping is
        built from them, as Torch-Pruning does for every other concatenation. Torch-Pruning
        recomputes mappings at every ``get_pruning_group`` but skips these nodes, so the
        mappings set here are the ones used.
        """
        from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

        for node in self._unmapped_concats:
            sizes = node.module.concat_sizes
            if not sizes or any(c is None for c in sizes):
                names = sorted({self.names[n.module] for n in node.outputs
                                if isinstance(n.module, nn.Module) and n.module in self.names})
                raise UnsupportedLayerError(
                    f"cannot tell the channel widths of a concatenation read by {names or 'the output'}"
                    "; add global pooling before flattening it, or pass its producers in "
                    "ignored_layers")
            offsets = [0]
            for c in sizes:
                offsets.append(offsets[-1] + int(c))
            node.module.offsets = offsets
            if not node.enable_index_mapping:
                continue
            # as Torch-Pruning's update_concat_index_mapping: concat -> input i (reverse) and
            # input i -> concat, each dependency mapped once
            for reverse in (True, False):
                done: list = []
                for i, in_node in enumerate(node.inputs):
                    source, target = (node, in_node) if reverse else (in_node, node)
                    for dep in source.dependencies:
                        if dep.target is target and not any(dep is d for d in done):
                            dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2],
                                                                       reverse=reverse)
                            done.append(dep)
                            break

    @property
    def groups(self) -> list[ChannelGroup]:
        """All prunable groups, traced on first use (in model order of their first producer)."""
        if self._groups is None:
            found = self._collect_groups()
            self._groups = sorted(found, key=lambda g: self._order[g.root])
        return self._groups

    def group_of(self, layer: nn.Module | str) -> ChannelGroup:
        """The group in which ``layer`` produces (or channel-wise processes) channels."""
        module = _resolve_modules(self.model, [layer])[0]
        for g in self.groups:
            if any(s.module is module and s.role != "consumer" for s in g.slots):
                return g
        raise ModelError(f"layer {self.names.get(module, module)!r} is not prunable "
                         "(ignored, classifier or not a channel producer)")

    def producer_group(self, key: nn.Module | str) -> ChannelGroup:
        """The group named ``key`` or produced (output rows) by layer ``key`` (module or name);
        :class:`~prunekit.errors.ConfigError` when there is none (``key`` is a user's choice)."""
        if isinstance(key, str):
            for g in self.groups:
                if g.name == key:
                    return g
            named = dict(self.model.named_modules())
            if key not in named:
                raise ConfigError(f"no layer or group named {key!r} in the model")
            module = named[key]
        elif isinstance(key, nn.Module):
            module = key
        else:
            raise ConfigError(f"expected a producing layer (module or name), got {key!r}")
        for g in self.groups:
            if any(s.module is module for s in g.producers):
                return g
        name = self.names.get(module, type(module).__name__)
        raise ConfigError(f"layer {name!r} does not produce the channels of any prunable group "
                          "(name a conv/linear producer, e.g. the conv before a BatchNorm)")

    # ------------------------------------------------------------------ groups
    def _collect_groups(self) -> list[ChannelGroup]:
        groups: list[ChannelGroup] = []
        self._map_concats()
        for tp_group in self.dg.get_all_groups(ignored_layers=list(self.ignored),
                                               root_module_types=(nn.Conv2d, nn.Linear)):
            root = tp_group[0].dep.target.module
            groups.append(self._to_channel_group(root, tp_group))
        return groups

    def group(self, root: nn.Module | str) -> ChannelGroup:
        """The (freshly traced) group whose root is ``root``."""
        module = _resolve_modules(self.model, [root])[0]
        size = self.out_channels(module)
        tp_group = self.pruning_group(module, self.out_handler(module), range(size))
        return self._to_channel_group(module, tp_group)

    def out_handler(self, module: nn.Module):
        pruner = self.dg.get_pruner_of_module(module)
        if pruner is None:
            raise UnsupportedLayerError(f"layer {self.names.get(module, module)!r} "
                                        f"({type(module).__name__}) has no channel pruner")
        if is_depthwise(module):
            return tp.prune_depthwise_conv_out_channels
        return pruner.prune_out_channels

    def out_channels(self, module: nn.Module) -> int:
        n = self.dg.get_out_channels(module)
        if n is None:
            raise UnsupportedLayerError(f"cannot tell the output channels of "
                                        f"{self.names.get(module, module)!r}")
        return int(n)

    def _to_channel_group(self, root: nn.Module, tp_group) -> ChannelGroup:
        name = self.names.get(root)
        if name is None:
            raise ModelError("group root is not a submodule of the model")
        size = self.out_channels(root)
        slots: dict[tuple[int, Role], Slot] = {}
        split = next((item.dep.target for item in tp_group if _splits_channels(item.dep.target)), None)
        if split is not None:
            raise UnsupportedLayerError(
                f"the output channels of layer {name!r} are split by the model's code "
                f"({type(split.grad_fn).__name__}: torch.split / chunk / unbind or a slice); pruning "
                f"them would break the split sizes. Pass {name!r} in ignored_layers")
        shuffle = next((item.dep.target for item in tp_group if _reorders_channels(item.dep.target)),
                       None)
        if shuffle is not None:
            raise UnsupportedLayerError(
                f"the output channels of layer {name!r} pass through a transpose / permute "
                f"({type(shuffle.grad_fn).__name__}, e.g. a channel shuffle), which reorders "
                f"channels the engine cannot follow. Pass {name!r} in ignored_layers")
        for item in tp_group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module not in self.names:
                continue  # Torch-Pruning's pseudo ops (add, concat, flatten) and raw params
            role = self._role(module, item.dep.handler)
            if role is None:
                continue
            key = (id(module), role)
            slot = slots.get(key)
            if slot is None:
                slot = slots[key] = Slot(self.names[module], module, role, {})
            for local, r in zip(item.idxs, item.root_idxs, strict=True):
                slot.positions.setdefault(int(r), []).append(int(local))
        ordered = sorted(slots.values(), key=lambda s: self._order[s.module])
        producers = [s for s in ordered if s.role == "producer"]
        if producers:  # name the group after its first producing layer: stable across traces
            name, root = producers[0].name, producers[0].module
        group = ChannelGroup(name, root, size, ordered)
        self._check_supported(group)
        return group

    def _role(self, module: nn.Module, handler) -> Role | None:
        if isinstance(module, _CHANNELWISE_TYPES) or is_depthwise(module):
            return "channelwise"
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if self.dg.is_out_channel_pruning_fn(handler):
                return "producer"
            if self.dg.is_in_channel_pruning_fn(handler):
                return "consumer"
            return None
        if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.LSTM,
                               nn.MultiheadAttention, nn.Embedding)):
            raise UnsupportedLayerError(
                f"layer {self.names[module]!r} ({type(module).__name__}) is not supported by the "
                "pruning engine; pass it in ignored_layers")
        return None

    def _check_supported(self, group: ChannelGroup) -> None:
        for slot in group.slots:
            m = slot.module
            if isinstance(m, nn.GroupNorm) and m.num_groups > 1:
                raise UnsupportedLayerError(
                    f"layer {slot.name!r} is a GroupNorm with {m.num_groups} groups over channels of "
                    f"group {group.name!r}; removing channels would break its groups. Pass the "
                    "group's producers in ignored_layers")
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m):
                raise UnsupportedLayerError(
                    f"layer {slot.name!r} is a grouped conv (groups={m.groups}) reading channels of "
                    f"group {group.name!r}; grouped (non-depthwise) convs cannot be pruned channel by "
                    "channel. Pass its producer in ignored_layers")
            if len(slot.positions) != group.size and slot.role != "consumer":
                raise UnsupportedLayerError(
                    f"layer {slot.name!r} covers {len(slot.positions)} of the {group.size} channels "
                    f"of group {group.name!r}; partial coupling is not supported")


def analyse(model: nn.Module, example_inputs: torch.Tensor,
            ignored_layers: Sequence[nn.Module | str] | None = None,
            ignore_classifier: bool = True) -> DependencyInfo:
    """Trace ``model`` and list its groups of coupled channels (see :class:`DependencyInfo`)."""
    return DependencyInfo(model, example_inputs, ignored_layers, ignore_classifier)
