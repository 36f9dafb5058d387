"""S3 (centripetal training): the gradient transform that pulls each cluster's members to
their centre, and its convergence measure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ...engine import DependencyInfo, analyse
from ...errors import ConfigError, ModelError
from .clustering import Clusters, group_clusters

#: S3's shared gradient: the document's cluster mean, or (an ablation) the cluster sum, which is
#: the gradient the merged filter would get in the pruned network
GRADIENTS = ("mean", "sum")

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
    then performs the update of S3 (Ding et al., CVPR 2019); with momentum the differences between members
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
