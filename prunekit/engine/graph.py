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

import contextlib
import copy
import fnmatch
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


def _moves_channel_axis(dims: Sequence[int]) -> bool:
    """Whether a permutation only moves the channel axis between position 1 and the last one
    (``(0, 2, 3, 1)``: NCHW -> NHWC, ``(0, 3, 1, 2)``: back), keeping the batch axis first and
    the other axes in order. Channel ``c`` stays channel ``c``: this is the channel-last block
    of ConvNeXt (Liu et al., CVPR 2022), where a Linear or a LayerNorm acts on the last axis."""
    dims = [int(d) % len(dims) for d in dims]
    n = len(dims)
    if n < 3 or dims[0] != 0:
        return False
    last = list(range(2, n)) + [1]
    first = [n - 1] + list(range(1, n - 1))
    return dims[1:] in (last, first)


def _reorders_channels(node) -> bool:
    """Whether a Torch-Pruning node is a transpose / permute that reorders a feature map's
    channels (a permute that only moves the channel axis, see :func:`_moves_channel_axis`, does
    not)."""
    if node.grad_fn is None or type(node.grad_fn).__name__ not in _REORDERING_GRAD_FNS:
        return False
    dims = getattr(node.grad_fn, "_saved_dims", None)
    return not (dims is not None and _moves_channel_axis(dims))


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every output channel reads exactly its own input channel."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (ResNeXt, RegNet): ``1 < groups``, and an output
    channel reads only the ``in_channels / groups`` input channels of its own group."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m)


def _chunk(slot: Slot) -> int | None:
    """Channels per group of a layer that ties channels across its groups, else ``None``.

    A grouped conv computes output channel ``o`` of group ``g`` from the input channels of group
    ``g`` only, with one ``[out/groups, in/groups, kh, kw]`` block per group: it stays a valid
    grouped conv only if every group loses the same number of input (output) channels, so the
    engine removes the same position within every group (as Torch-Pruning does). Channel ``i``
    is tied to ``i + k * chunk`` for every ``k``. A GroupNorm with ``num_groups > 1`` is tied the
    same way (its groups must keep equal sizes)."""
    m = slot.module
    if is_grouped(m):
        size = m.in_channels if slot.role == "consumer" else m.out_channels
        return size // m.groups
    if isinstance(m, nn.GroupNorm) and m.num_groups > 1:
        return m.num_channels // m.num_groups
    return None


def input_columns(module: nn.Module, cols: Sequence[int]) -> list[tuple[slice, int]]:
    """Where input channels ``cols`` of a consumer sit in its weight: ``(rows, column)`` pairs,
    ``weight[rows, column]`` being what reads the channel. For a plain conv / linear that is
    every row and the column itself; for a grouped conv, the output rows of the channel's group
    and the column within the group."""
    if not is_grouped(module):
        return [(slice(None), int(c)) for c in cols]
    chunk_in, chunk_out = module.in_channels // module.groups, module.out_channels // module.groups
    return [(slice(g * chunk_out, (g + 1) * chunk_out), int(c) % chunk_in)
            for c in cols for g in [int(c) // chunk_in]]


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
        Channel (a unit of tied channels, see :class:`ChannelGroup`) -> the layer's own indices
        that carry it (output rows for producers and channel-wise ops, input columns for
        consumers: for a grouped conv, columns of the full input, see :func:`input_columns`),
        in a fixed order that is aligned across channels (the ``t``-th position of two
        channels plays the same part).
    """

    name: str
    module: nn.Module
    role: Role
    positions: dict[int, list[int]]


@dataclass
class ParamSlot:
    """A free parameter (not a layer's own weight) applied channel by channel to a group's
    channels, e.g. ConvNeXt's layer scale ``gamma * x`` (shape ``[C]`` or ``[C, 1, 1]``).

    Attributes
    ----------
    name : str
        Qualified parameter name.
    param : nn.Parameter
    dim : int
        The axis that holds the channels.
    positions : dict[int, list[int]]
        Channel -> indices along ``dim`` (as :attr:`Slot.positions`).
    """

    name: str
    param: nn.Parameter
    dim: int
    positions: dict[int, list[int]]


@dataclass
class ChannelGroup:
    """Channels that live and die together, named after their root layer.

    A channel of the group is a *unit*: usually one output channel of the root layer, but when
    grouped convs (or GroupNorms) read or write the channels, the channels they tie together
    (the same position in each of their groups, see :func:`_chunk`) form one unit, pruned as a
    whole. ``size`` counts units; ``units[u]`` lists the root layer's channels of unit ``u``
    (``None``: one channel per unit), and every slot's ``positions`` are keyed by unit.
    """

    name: str
    root: nn.Module
    size: int
    slots: list[Slot] = field(default_factory=list)
    units: list[list[int]] | None = None
    params: list[ParamSlot] = field(default_factory=list)

    @property
    def normalised(self) -> bool:
        """Whether a LayerNorm / GroupNorm normalises over the group's channels: removing (or
        merging) a channel then changes the statistics every other channel is normalised with,
        so it is not the same as silencing the channel (structurally valid, never exact)."""
        return any(isinstance(s.module, (nn.LayerNorm, nn.GroupNorm)) for s in self.channelwise)

    @property
    def channels(self) -> int:
        """Output channels of the root layer (``size`` times the unit size)."""
        return self.size if self.units is None else sum(len(u) for u in self.units)

    def root_channels(self, units: Iterable[int]) -> list[int]:
        """The root layer's channels of ``units`` (ascending)."""
        if self.units is None:
            return sorted(int(u) for u in units)
        return sorted(c for u in units for c in self.units[int(u)])

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


def _record_order(model: nn.Module, order: list[nn.Module]) -> list:
    """Hooks that append each Conv2d / Linear layer to ``order`` when a forward pass calls it."""
    return [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
            for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _execution_order(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Conv2d / Linear layers in the order a forward pass on ``example_inputs`` calls them."""
    order: list[nn.Module] = []
    handles = _record_order(model, order)
    with eval_mode(model, handles), torch.no_grad():
        model(example_inputs)
    return order


def _last_classifier(layers: Sequence[nn.Module]) -> nn.Module | None:
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    return (linears or list(layers) or [None])[-1]


def find_classifier(model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module | None:
    """The classifier, whose output units are never pruned by default: the last Linear (or,
    failing that, the last Conv2d) called by a forward pass on ``example_inputs``; without
    inputs, the last one in definition order (which differs when, say, the classifier is
    defined before a hidden Linear layer)."""
    if example_inputs is not None:
        return _last_classifier(_execution_order(model, example_inputs))
    return _last_classifier([m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))])


_PATTERN_CHARS = frozenset("*?[")


def resolve_layers(model: nn.Module, layers: Iterable[nn.Module | str | type] | None
                   ) -> list[nn.Module]:
    """The modules ``layers`` designates in ``model``, each with all its submodules.

    Parameters
    ----------
    model : nn.Module
    layers : iterable, optional
        Each one of: a module of ``model``; a layer name (``"layer1.0.conv1"``); a name pattern
        with shell wildcards (:mod:`fnmatch`, ``"*.attn"``, ``"blocks.*.mlp.fc1"``); a module
        type (``nn.MultiheadAttention``: every module of that type). A container stands for
        everything inside it, as in Torch-Pruning's ``ignored_layers``.

    Returns
    -------
    list of nn.Module
        Without duplicates, in model order.

    Raises
    ------
    ConfigError
        A name, pattern or type that matches no module of ``model``, or a module that is not
        part of it.
    """
    named = dict(model.named_modules())
    index = {id(m): i for i, m in enumerate(named.values())}
    chosen: dict[int, nn.Module] = {}

    def add(m: nn.Module) -> None:
        for sub in m.modules():
            chosen.setdefault(id(sub), sub)

    for layer in layers or ():
        if isinstance(layer, type) and issubclass(layer, nn.Module):
            hits = [m for m in named.values() if isinstance(m, layer)]
            if not hits:
                raise ConfigError(f"no layer of type {layer.__name__} in the model")
        elif isinstance(layer, str):
            if layer in named:
                hits = [named[layer]]
            elif _PATTERN_CHARS & set(layer):
                hits = [m for n, m in named.items() if n and fnmatch.fnmatchcase(n, layer)]
                if not hits:
                    raise ConfigError(f"the pattern {layer!r} matches no layer of the model")
            else:
                raise ConfigError(f"no layer named {layer!r} in the model")
        elif isinstance(layer, nn.Module):
            if id(layer) not in index:
                raise ConfigError(f"{type(layer).__name__} module given in ignored_layers is not "
                                  "part of the model (a module of a copy?); pass its name")
            hits = [layer]
        else:
            raise ConfigError(f"ignored_layers takes modules, names, name patterns and module "
                              f"types, got {layer!r}")
        for m in hits:
            add(m)
    return sorted(chosen.values(), key=lambda m: index.get(id(m), len(index)))


def layer_names(model: nn.Module, layers: Iterable[nn.Module | str | type] | None) -> list[str]:
    """:func:`resolve_layers` as qualified names (what a copy of ``model`` can resolve again)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in resolve_layers(model, layers)]


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


# Layers whose channels the engine cannot follow: a group that reaches one is refused.
_UNSUPPORTED_TYPES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                      nn.ConvTranspose3d, nn.RNNBase, nn.MultiheadAttention, nn.Embedding,
                      nn.EmbeddingBag)


@dataclass
class Refusal:
    """A group the engine leaves alone: its root layer, the layer (or parameter) that makes it
    unsupported and why."""

    group: str
    layer: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"group": self.group, "layer": self.layer, "reason": self.reason}


class _Refused(UnsupportedLayerError):
    """One group cannot be handled because of ``layer`` (and ``others`` of the same kind),
    collected, then raised together."""

    def __init__(self, layer: str, reason: str, others: Sequence[str] = ()) -> None:
        super().__init__(f"layer {layer!r}: {reason}")
        self.layer, self.reason = layer, reason
        self.layers = [layer, *others]


@contextlib.contextmanager
def _index_mappings_frozen(dg):
    """Torch-Pruning recomputes every index mapping of the graph for each group it traces
    (seconds per group on a transformer, over a minute for Swin-T); while groups are only
    listed, nothing changes shapes, so the mappings are computed once and reused."""
    from torch_pruning.dependency import index_mapping

    real = index_mapping.update_index_mapping
    real(dg)
    index_mapping.update_index_mapping = lambda graph: None if graph is dg else real(graph)
    try:
        yield
    finally:
        index_mapping.update_index_mapping = real


class _IndexExplosion(_Refused):
    """Torch-Pruning's index mapping would build an index list larger than any tensor."""


def refusal_error(refused: Sequence[Refusal]) -> UnsupportedLayerError:
    """One :class:`~prunekit.errors.UnsupportedLayerError` naming every unsupported layer (once
    each, with its reason) and the groups to ignore; ``.refused`` holds the list."""
    by_layer: dict[str, Refusal] = {}
    for r in refused:
        by_layer.setdefault(r.layer, r)
    roots = sorted({r.group for r in refused})
    items = "; ".join(f"{layer!r} ({r.reason})" for layer, r in by_layer.items())
    n = len(by_layer)
    err = UnsupportedLayerError(
        f"{n} unsupported layer{'s' * (n != 1)}: {items}. Pass the producers of the groups they "
        f"touch in ignored_layers ({', '.join(map(repr, roots))}), or prune everything else with "
        "skip_unsupported=True (CLI: --skip-unsupported)")
    err.refused = list(refused)  # type: ignore[attr-defined]
    return err


class _IndexBudget:
    """Bounds on the index lists Torch-Pruning's index mappings build while tracing one group.

    A flatten / reshape mapping turns each index into ``stride`` indices; chains of them (window
    attention's reshapes, in Swin) multiply the list until the process runs out of memory. No
    real dependency needs more indices than the longest axis of any parameter, so one mapping
    may produce at most ``per_call`` indices and one group ``total`` (32 times that axis: the
    most measured on torchvision's zoo was 17 times, DenseNet-121's concatenations; MaxViT's
    window partitions reached 1,300 times and 10-16 s per group before this bound)."""

    def __init__(self, per_call: int, total: int) -> None:
        self.per_call, self.total, self.used = per_call, total, 0


class _GuardedMapping:
    """An index mapping that refuses (naming the layers) to exceed its :class:`_IndexBudget`."""

    __slots__ = ("fn", "budget", "dep", "names")

    def __init__(self, fn, budget: _IndexBudget, dep, names) -> None:
        self.fn, self.budget, self.dep, self.names = fn, budget, dep, names

    def _explode(self, n: int, total: bool) -> None:
        layer = _node_name(self.dep.target, self.names)
        what = (f"would take the group's index lists past {self.budget.total:,} indices" if total
                else f"would build {n:,} indices (more than any tensor of the model holds)")
        raise _IndexExplosion(layer, f"Torch-Pruning's index mapping from "
                                     f"{_node_name(self.dep.source, self.names)} to {layer} {what}: "
                                     "reshapes the engine cannot follow")

    def __call__(self, idxs):
        stride = getattr(self.fn, "_stride", None)
        if stride is not None and not getattr(self.fn, "reverse", True):
            predicted = len(idxs) * int(stride)  # check before building a huge list
            if predicted > self.budget.per_call or self.budget.used + predicted > self.budget.total:
                self._explode(predicted, predicted <= self.budget.per_call)
        out = _flatten(self.fn, idxs) if type(self.fn) is _FLATTEN else self.fn(idxs)
        self.budget.used += len(out)
        if len(out) > self.budget.per_call or self.budget.used > self.budget.total:
            self._explode(len(out), len(out) <= self.budget.per_call)
        return out


_FLATTEN = tp.dependency.index_mapping._FlattenIndexMapping
_HYBRID = tp._helpers._HybridIndex


def _flatten(fn, idxs) -> list:
    """Torch-Pruning's flatten / reshape index mapping, the same index set built without its
    per-index keyword construction (forward: each index becomes ``stride`` indices; reverse:
    the distinct ``index // stride``, deduplicated before any object is made). Window
    attention's reshapes run these on lists of 10^5 indices before a group is refused."""
    s, new = int(fn._stride), tuple.__new__
    if fn.reverse:
        return [new(_HYBRID, t) for t in {(i[0] // s, i[1]) for i in idxs}]
    return [new(_HYBRID, (k, i[1])) for i in idxs for k in range(i[0] * s, (i[0] + 1) * s)]


class _GuardedMappings(list):
    """A dependency's ``index_mapping`` list whose mappings run under an :class:`_IndexBudget`
    (Torch-Pruning assigns entries into the list and iterates it)."""

    def __init__(self, items, budget: _IndexBudget, dep, names) -> None:
        super().__init__(items)
        self._guard = (budget, dep, names)

    def __iter__(self):
        for fn in list.__iter__(self):
            yield fn if fn is None else _GuardedMapping(fn, *self._guard)


def _node_name(node, names: dict) -> str:
    m = node.module
    if isinstance(m, nn.Module) and m in names:
        return repr(names[m])
    return str(getattr(node, "name", type(m).__name__))


class DependencyInfo:
    """The pruning view of a model: its groups of coupled channels.

    Parameters
    ----------
    model : nn.Module
        The network (traced once with ``example_inputs``).
    example_inputs : Tensor
        An input batch of the right shape (values do not matter).
    ignored_layers : iterable of modules, names, name patterns or module types, optional
        Layers whose output channels must not be pruned (see :func:`resolve_layers`; a
        container stands for all its layers); a group containing one of them as a producer is
        skipped.
    ignore_classifier : bool
        Skip the final classifier (default True).
    skip_unsupported : bool
        Leave the groups the engine cannot handle unpruned (listed in :attr:`refused`) instead
        of raising one :class:`~prunekit.errors.UnsupportedLayerError` that names them all.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor,
                 ignored_layers: Iterable[nn.Module | str | type] | None = None,
                 ignore_classifier: bool = True, *, skip_unsupported: bool = False) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.ignored = resolve_layers(model, ignored_layers)
        self.skip_unsupported = bool(skip_unsupported)
        #: groups the engine cannot handle (left unpruned with ``skip_unsupported``)
        self.refused: list[Refusal] = []
        self.names = {m: n for n, m in model.named_modules()}
        self._order = {m: i for i, m in enumerate(self.names)}
        was_training = model.training
        model.eval()
        # Torch-Pruning traces the autograd graph: a frozen layer (requires_grad=False) or a
        # call under torch.no_grad() would drop out of it and silently break the coupling.
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        order: list[nn.Module] = []  # the tracing pass also finds the classifier (one forward)
        handles = _record_order(model, order) if ignore_classifier else []
        try:
            with torch.enable_grad():
                from .depth import BranchConstant  # its constant: one value per channel

                constants = [(m.bias, 0) for m in model.modules() if isinstance(m, BranchConstant)]
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, unwrapped_parameters=constants or None)
        except Exception as exc:  # tracing failures are model problems, not ours to hide
            raise ModelError(f"cannot trace the model for pruning: {exc}") from exc
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(False)
            model.train(was_training)
        clf = _last_classifier(order) if ignore_classifier else None
        if clf is not None and all(clf is not m for m in self.ignored):
            self.ignored.append(clf)
        self.param_names = {p: n for n, p in model.named_parameters()}
        self._guard_index_mappings()
        self._unmapped_concats = [
            node for node in self.dg.module2node.values()
            if node.type == tp.ops.OPTYPE.CONCAT and node.module.offsets is None
            and getattr(node.grad_fn, "_saved_dim", 1) == 1]
        self._groups: list[ChannelGroup] | None = None

    def _guard_index_mappings(self) -> None:
        """Run every index mapping of the graph under one :class:`_IndexBudget`."""
        longest = max((max(p.shape) for p in self.model.parameters() if p.dim() > 0), default=1)
        per_call = max(1 << 16, 4 * int(longest))
        self._budget = _IndexBudget(per_call, max(1 << 16, 32 * int(longest)))
        for node in self.dg.module2node.values():
            for dep in node.dependencies:
                if not isinstance(dep.index_mapping, _GuardedMappings):
                    dep.index_mapping = _GuardedMappings(dep.index_mapping, self._budget, dep,
                                                         self.names)

    def pruning_group(self, module: nn.Module, handler, idxs: Sequence[int]):
        """Torch-Pruning's group of ``module``'s channels ``idxs`` (what ``Group.prune()`` cuts).

        Every group goes through here, so that channel concatenations Torch-Pruning 1.6 leaves
        unmapped are mapped first (see :meth:`_map_concats`)."""
        self._map_concats()
        self._budget.used = 0
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

    @property
    def all_groups(self) -> list[ChannelGroup]:
        """Every prunable group of the model, also in a :meth:`restricted` view."""
        return getattr(self, "_unrestricted", None) or self.groups

    def restricted(self, names: Iterable[str]) -> DependencyInfo:
        """A view of this analysis that offers only the groups named in ``names`` (what reads
        it leaves the others whole); it shares the traced graph and the model."""
        keep = set(names)
        view = copy.copy(self)
        view._unrestricted = self.all_groups
        view._groups = [g for g in self.groups if g.name in keep]
        return view

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
        """Every prunable group, each rooted at the first Conv2d / Linear (in Torch-Pruning's
        graph order) not yet seen producing in an earlier group; a group with an ignored producer
        is left out. Every group the engine cannot handle is recorded in :attr:`refused`; unless
        ``skip_unsupported``, they are then raised together in one
        :class:`~prunekit.errors.UnsupportedLayerError`."""
        with _index_mappings_frozen(self.dg):
            groups = self._trace_groups()
        if self.refused and not self.skip_unsupported:
            raise refusal_error(self.refused)
        return groups

    def _trace_groups(self) -> list[ChannelGroup]:
        groups: list[ChannelGroup] = []
        self._map_concats()
        ignored = {id(m) for m in list(self.ignored) + list(self.dg.IGNORED_LAYERS_IN_TRACING)}
        seen: set[int] = set()
        for module in list(self.dg.module2node):
            if (not isinstance(module, (nn.Conv2d, nn.Linear)) or id(module) in ignored
                    or id(module) in seen):
                continue
            pruner = self.dg.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            name = self.names.get(module, type(module).__name__)
            try:
                tp_group = self.pruning_group(module, pruner.prune_out_channels,
                                              range(int(pruner.get_out_channels(module))))
            except _IndexExplosion as exc:  # named after the root: the op is a pseudo-node
                seen.add(id(module))
                self.refused.append(Refusal(name, name, f"{exc.layer}: {exc.reason}"))
                continue
            producing = [item.dep.target.module for item in tp_group
                         if self.dg.is_out_channel_pruning_fn(item.dep.handler)]
            seen.update(id(m) for m in producing)
            if any(id(m) in ignored for m in producing):
                continue
            try:
                groups.append(self._to_channel_group(module, tp_group))
            except _Refused as exc:
                self.refused += [Refusal(name, layer, exc.reason) for layer in exc.layers]
        return groups

    def group(self, root: nn.Module | str) -> ChannelGroup:
        """The (freshly traced) group whose root is ``root``."""
        module = _resolve_modules(self.model, [root])[0]
        size = self.out_channels(module)
        try:
            tp_group = self.pruning_group(module, self.out_handler(module), range(size))
            return self._to_channel_group(module, tp_group)
        except _IndexExplosion as exc:
            name = self.names.get(module, type(module).__name__)
            raise refusal_error([Refusal(name, name, f"{exc.layer}: {exc.reason}")]) from None
        except _Refused as exc:
            name = self.names.get(module, type(module).__name__)
            raise refusal_error([Refusal(name, layer, exc.reason) for layer in exc.layers]) from None

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
        params: dict[int, ParamSlot] = {}
        # name the unsupported layers (all of them) before the ops inside them (MHA transposes)
        unsupported = sorted({self.names[item.dep.target.module] for item in tp_group
                              if isinstance(item.dep.target.module, _UNSUPPORTED_TYPES)
                              and item.dep.target.module in self.names})
        if unsupported:
            kinds = sorted({type(self.model.get_submodule(n)).__name__ for n in unsupported})
            raise _Refused(unsupported[0], f"{' / '.join(kinds)} is not supported by the pruning "
                                           "engine", unsupported[1:])
        split = next((item.dep.target for item in tp_group if _splits_channels(item.dep.target)), None)
        if split is not None:
            raise _Refused(name, f"its channels are split by the model's code "
                                 f"({type(split.grad_fn).__name__}: torch.split / chunk / unbind or a "
                                 "slice); pruning them would break the split sizes")
        shuffle = next((item.dep.target for item in tp_group if _reorders_channels(item.dep.target)),
                       None)
        if shuffle is not None:
            raise _Refused(name, f"its channels pass through a transpose / permute "
                                 f"({type(shuffle.grad_fn).__name__}, e.g. a channel shuffle or "
                                 "attention heads), which reorders channels the engine cannot follow")
        self._collect(tp_group, slots, params)
        self._complete(root, size, slots, params)
        ordered = sorted(slots.values(), key=lambda s: self._order[s.module])
        # name the group after its first producing layer (stable across traces) that carries
        # every channel once: the channels of a plan are that layer's channels
        producers = [s for s in ordered if s.role == "producer" and _one_to_one(s, size)]
        if producers:
            name, root = producers[0].name, producers[0].module
        group = ChannelGroup(name, root, size, ordered, params=list(params.values()))
        self._check_supported(group)
        _tie_units(group)
        return group

    def _collect(self, tp_group, slots: dict[tuple[int, Role], Slot],
                 params: dict[int, ParamSlot]) -> None:
        """Add the (root channel, local index) pairs of ``tp_group``'s items to the slots."""
        for item in tp_group:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter):
                self._add_param(params, item)
                continue
            if not isinstance(module, nn.Module) or module not in self.names:
                continue  # Torch-Pruning's pseudo ops (add, concat, flatten)
            role = self._role(module, item.dep.handler)
            if role is None:
                continue
            key = (id(module), role)
            slot = slots.get(key)
            if slot is None:
                slot = slots[key] = Slot(self.names[module], module, role, {})
            _record(slot.positions, item)

    def _complete(self, root: nn.Module, size: int, slots: dict[tuple[int, Role], Slot],
                  params: dict[int, ParamSlot]) -> None:
        """Trace again from the root channels some layer was not reached from.

        Torch-Pruning visits each (layer, index) once per trace, so when two root channels
        reach the same channel of a layer (GhostNet: a conv's output and a depthwise copy of it
        are concatenated, then added to a trunk: trunk channels ``j`` and ``j + C`` both reach
        the conv's channel ``j``) only the first is recorded. Tracing from the missed root
        channels records the others; :func:`_tie_units` then makes such channels one unit."""
        def recorded() -> int:
            return sum(len(sl.positions) for sl in list(slots.values()) + list(params.values()))

        for _ in range(8):  # one trace per set of missed channels (GhostNet: two at most)
            partial = next((sl for sl in list(slots.values()) + list(params.values())
                            if getattr(sl, "role", None) != "consumer" and len(sl.positions) < size),
                           None)
            if partial is None:
                return
            missed = sorted(set(range(size)) - set(partial.positions))
            before = recorded()
            self._collect(self.pruning_group(root, self.out_handler(root), missed), slots, params)
            if recorded() == before:
                return  # really partial: _check_supported refuses it

    def _add_param(self, params: dict[int, ParamSlot], item) -> None:
        """Record a free parameter pruned with the group (Torch-Pruning prunes it along
        ``pruning_dim``); only per-channel parameters (one axis longer than 1) are accepted."""
        p = item.dep.target.module
        name = self.param_names.get(p, "a parameter")
        dim = getattr(item.dep.target, "pruning_dim", -1)
        if sum(1 for s in p.shape if s > 1) > 1 or dim is None:
            raise _Refused(name, f"a parameter of shape {tuple(p.shape)} applied to the channels; "
                                 "only per-channel parameters ([C], [C, 1, 1] ...) are pruned")
        slot = params.get(id(p))
        if slot is None:
            slot = params[id(p)] = ParamSlot(name, p, int(dim) % max(p.dim(), 1), {})
        _record(slot.positions, item)

    def _role(self, module: nn.Module, handler) -> Role | None:
        if isinstance(module, _CHANNELWISE_TYPES) or is_depthwise(module):
            return "channelwise"
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if self.dg.is_out_channel_pruning_fn(handler):
                return "producer"
            if self.dg.is_in_channel_pruning_fn(handler):
                return "consumer"
            return None
        if isinstance(module, _UNSUPPORTED_TYPES):
            raise _Refused(self.names[module], f"{type(module).__name__} is not supported by the "
                                               "pruning engine")
        return None

    def _check_supported(self, group: ChannelGroup) -> None:
        for slot in group.slots:
            chunk = _chunk(slot)
            if chunk is not None:
                # the group must cover each tied set of positions completely: removing a channel
                # removes the same position in every group of the layer
                covered = {p for ps in slot.positions.values() for p in ps}
                width = _width(slot)
                if any(q not in covered for r in {p % chunk for p in covered}
                       for q in range(r, width, chunk)):
                    raise _Refused(slot.name, f"{_describe(slot.module)} whose groups read channels "
                                              f"of group {group.name!r} and of other layers at the "
                                              "same positions; the engine prunes one group at a time")
            if len(slot.positions) != group.size and slot.role != "consumer":
                raise _Refused(slot.name, f"covers {len(slot.positions)} of the {group.size} "
                                          f"channels of group {group.name!r}; partial coupling is "
                                          "not supported")


def _record(positions: dict[int, list[int]], item) -> None:
    """Add a Torch-Pruning group item's (root channel -> local index) pairs to ``positions``,
    each pair once (a second trace from missed root channels repeats the others)."""
    for local, r in zip(item.idxs, item.root_idxs, strict=True):
        ps = positions.setdefault(int(r), [])
        if int(local) not in ps:
            ps.append(int(local))


def _one_to_one(slot: Slot, size: int) -> bool:
    """Whether ``slot`` carries each of the ``size`` root channels at one index of its own."""
    if len(slot.positions) != size or any(len(ps) != 1 for ps in slot.positions.values()):
        return False
    return len({ps[0] for ps in slot.positions.values()}) == size


def _width(slot: Slot) -> int:
    """Channels a tying layer has on the side the group sees (inputs of a consumer)."""
    m = slot.module
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    return m.in_channels if slot.role == "consumer" else m.out_channels


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.GroupNorm):
        return f"a GroupNorm with {m.num_groups} groups"
    return f"a grouped conv (groups={m.groups})"


def _tie_units(group: ChannelGroup) -> None:
    """Bundle channels that grouped convs / GroupNorms tie (see :func:`_chunk`) into units.

    Union-find over the root channels: in every tying layer, the channels at positions
    ``j, j + chunk, j + 2 chunk ...`` are one unit. Units are ordered by their first channel and
    list their channels in ascending order, so the ``t``-th channel of two units sits in the same
    group of a grouped conv; slot positions are re-keyed by unit (a unit's positions are its
    channels' positions, in that order)."""
    parent = list(range(group.size))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    tied = False
    for slot in list(group.slots) + list(group.params):
        chunk = _chunk(slot) if isinstance(slot, Slot) else None
        if chunk is None and getattr(slot, "role", None) == "consumer":
            continue
        # a grouped conv ties position p to p + k chunk; any other layer ties root channels
        # that reach the same one of its channels (see DependencyInfo._complete)
        first: dict[int, int] = {}
        for c, ps in slot.positions.items():
            for p in ps:
                r = first.setdefault(p % chunk if chunk else p, c)
                a, b = find(r), find(c)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                    tied = True
    if not tied:
        return
    members: dict[int, list[int]] = {}
    for c in range(group.size):
        members.setdefault(find(c), []).append(c)
    units = sorted(members.values(), key=lambda u: u[0])
    for slot in list(group.slots) + list(group.params):
        slot.positions = {u: list(dict.fromkeys(p for c in unit for p in slot.positions.get(c, [])))
                          for u, unit in enumerate(units)
                          if any(c in slot.positions for c in unit)}
    group.units = units
    group.size = len(units)


def analyse(model: nn.Module, example_inputs: torch.Tensor,
            ignored_layers: Sequence[nn.Module | str | type] | None = None,
            ignore_classifier: bool = True, skip_unsupported: bool = False) -> DependencyInfo:
    """Trace ``model`` and list its groups of coupled channels (see :class:`DependencyInfo`)."""
    return DependencyInfo(model, example_inputs, ignored_layers, ignore_classifier,
                          skip_unsupported=skip_unsupported)


#: models with at least this many parameters are checked on a weightless twin first (see
#: :func:`refusals_before_copy`): below it, copying and tracing the model takes under a second
STRUCTURE_CHECK_PARAMS = 50_000_000


def structure_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device: the same
    modules, names and shapes, no weights. Built by a deep copy that maps every parameter and
    buffer to an empty meta tensor, so it costs no memory and a forward pass computes nothing.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def refusals_before_copy(model: nn.Module, example_inputs: torch.Tensor,
                         ignored_layers: Sequence[nn.Module | str | type] | None = None
                         ) -> list[Refusal] | None:
    """The groups the engine would refuse in ``model``, found on its :func:`structure_twin`
    when the model is large (at least :data:`STRUCTURE_CHECK_PARAMS` parameters).

    Whether a group is supported depends on the layers and shapes only, so the weightless twin
    traced on a ``meta`` input gives the same refusals as the model itself, without the deep
    copy of its weights and the real forward pass of the full analysis (ViT-H/14: 2.5 GB and 167
    GMACs, 12 of the 15 s its refusal took). ``None`` when the model is small or its forward pass
    cannot run on the meta device (data-dependent code): the caller then analyses the model.
    """
    if not isinstance(example_inputs, torch.Tensor):
        return None
    try:
        if sum(p.numel() for p in model.parameters()) < STRUCTURE_CHECK_PARAMS:
            return None
        twin = structure_twin(model)
        info = DependencyInfo(twin, example_inputs.to("meta"), ignored_layers,
                              skip_unsupported=True)
        info.groups  # noqa: B018  (traced on first use, which fills info.refused)
    except ConfigError:
        raise  # an ignored layer that does not exist: the user's mistake, said now
    except Exception:  # noqa: BLE001  (not traceable on meta: the full analysis decides)
        return None
    return info.refused
