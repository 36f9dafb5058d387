"""Per-channel importance scores for every group of a model.

Every criterion returns ``{group name: Tensor[C]}`` (higher = more important). A group's channel
score is aggregated over the group's layers by one rule:

    *the score of a channel is the mean, over the group's scored layers, of that layer's score
    for the channel* (a layer that carries the channel at several positions, e.g. a BN after two
    concatenations, contributes the mean over those positions).

Channels tied together by grouped convs (the same position in every group) form one unit
of the group (:class:`~prunekit.engine.ChannelGroup`): a unit's score is the mean over all its
channels' positions, so every criterion ranks whole units.

Scored layers: the producers (conv / linear rows) for weight criteria; the BatchNorm layers of the
group for ``bn-scale`` and for the data criteria (their output, after ReLU, is the feature map the
rest of the network sees), or the producers' outputs when a group has no BatchNorm.

Criteria (the baselines compared by Luo et al., ThiNet, IEEE TPAMI 2019: random, weight sum
(Li et al., ICLR 2017), APoZ (Hu et al., arXiv 2016) and the activation statistics; Taylor-FO
(Molchanov et al., ICLR 2017); the BN scale (Liu et al., ICCV 2017)):

``random``     uniform random scores (seeded);
``l1``         weight sum: sum of |W| over the filter;
``l2``         L2 norm of the filter;
``bn-scale``   |gamma| of the BatchNorm scale factors (falls back to ``l1`` without BN);
``taylor``     Taylor-FO: |mean over batch and positions of (activation * dL/dactivation)|,
               averaged over batches, each layer's scores divided by their L2 norm;
``apoz``       1 - average percentage of zeros of the post-ReLU feature map;
``mean-mean``  (1/N) sum_n mean(I_n(c,:,:));
``mean-std``   (1/N) sum_n std(I_n(c,:,:));
``mean-l1``    (1/N) sum_n ||I_n(c,:,:)||_1;
``mean-l2``    (1/N) sum_n ||I_n(c,:,:)||_2;
``var-l2``     variance over the N images of ||I_n(c,:,:)||_2.

Data criteria stream the calibration images batch by batch through forward hooks and keep only
per-channel running sums (never a feature map).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batches import count, is_empty, iter_batches, labels_of, num_batches
from ..engine.graph import ChannelGroup, DependencyInfo, Slot
from ..errors import ConfigError, DataError
from ..utils import module_device, progress

WEIGHT_CRITERIA = ("random", "l1", "l2", "bn-scale")
ACTIVATION_CRITERIA = ("apoz", "mean-mean", "mean-std", "mean-l1", "mean-l2", "var-l2")
CRITERIA = WEIGHT_CRITERIA + ("taylor",) + ACTIVATION_CRITERIA

Scores = dict[str, torch.Tensor]


def needs_data(criterion: str) -> bool:
    return criterion in ACTIVATION_CRITERIA or criterion == "taylor"


def _per_channel(slot: Slot, size: int, values: torch.Tensor) -> torch.Tensor:
    """Average a layer's per-position values into per-root-channel values."""
    out = torch.empty(size, dtype=torch.float64)
    for c in range(size):
        out[c] = values[slot.positions[c]].double().mean()
    return out


def _mean_over(slots: list[Slot], size: int, per_slot: Callable[[Slot], torch.Tensor]) -> torch.Tensor:
    return torch.stack([_per_channel(s, size, per_slot(s)) for s in slots]).mean(0)


def _bn_slots(group: ChannelGroup) -> list[Slot]:
    return [s for s in group.channelwise if isinstance(s.module, nn.modules.batchnorm._BatchNorm)]


def weight_scores(info: DependencyInfo, criterion: str, seed: int = 0) -> Scores:
    """Scores that need no data: ``random``, ``l1``, ``l2``, ``bn-scale``."""
    gen = torch.Generator().manual_seed(seed)
    out: Scores = {}
    for g in info.groups:
        if criterion == "random":
            out[g.name] = torch.rand(g.size, generator=gen, dtype=torch.float64)
            continue
        bns = _bn_slots(g)
        if criterion == "bn-scale" and bns and all(s.module.weight is not None for s in bns):
            out[g.name] = _mean_over(bns, g.size, lambda s: s.module.weight.detach().abs().cpu())
            continue
        p = 1 if criterion in ("l1", "bn-scale") else 2
        out[g.name] = _mean_over(
            g.producers, g.size,
            lambda s, p=p: s.module.weight.detach().flatten(1).norm(p=p, dim=1).cpu())
    return out


class _Accumulator:
    """Per-channel running sums of one hooked layer's output (no feature maps kept)."""

    def __init__(self, criterion: str) -> None:
        self.criterion = criterion
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def _add(self, key: str, v: torch.Tensor) -> None:
        v = v.detach().double().cpu()
        self.sums[key] = self.sums[key] + v if key in self.sums else v

    def update(self, y: torch.Tensor) -> None:
        a = F.relu(y.detach()).flatten(2) if y.dim() > 2 else F.relu(y.detach()).unsqueeze(2)
        c = self.criterion
        self.count += a.shape[0]
        if c == "apoz":
            self._add("s", (a == 0).float().mean(2).sum(0))
        elif c == "mean-mean":
            self._add("s", a.mean(2).sum(0))
        elif c == "mean-std":
            self._add("s", a.std(2, unbiased=False).sum(0))
        elif c == "mean-l1":
            self._add("s", a.abs().sum(2).sum(0))
        elif c in ("mean-l2", "var-l2"):
            n2 = a.norm(dim=2).double()
            self._add("s", n2.sum(0))
            self._add("s2", (n2 * n2).sum(0))

    def result(self) -> torch.Tensor:
        n = max(self.count, 1)
        if self.criterion == "apoz":
            return 1.0 - self.sums["s"] / n
        if self.criterion == "var-l2":
            mean = self.sums["s"] / n
            return (self.sums["s2"] / n - mean * mean).clamp_min(0)
        return self.sums["s"] / n


def channels_first(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A hooked layer's output with its channels on axis 1: a Linear or a LayerNorm acts on the
    last axis, so in a channel-last block (ConvNeXt's ``[N, H, W, C]``) that axis is moved."""
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and out.dim() > 2:
        return out.movedim(-1, 1)
    return out


def _hooked_slots(g: ChannelGroup) -> list[Slot]:
    return _bn_slots(g) or g.producers


def data_scores(info: DependencyInfo, criterion: str, data, *, samples: int = 512,
                batch_size: int = 64, device: str | torch.device | None = None,
                desc: str | None = None) -> Scores:
    """Activation statistics or Taylor-FO scores over the first ``samples`` images of ``data``.

    ``data``: an ImageDataset, a map-style dataset, a DataLoader or a tensor of inputs (see
    :func:`prunekit.data.batches.iter_batches`); ``batch_size`` applies to all but a
    DataLoader. The activation criteria read images only; ``taylor`` needs labels.
    """
    if is_empty(data):
        raise DataError(f"criterion {criterion!r} needs calibration data (got none)")
    model = info.model
    dev = torch.device(device) if device is not None else module_device(model)
    slots = {s.name: s for g in info.groups for s in _hooked_slots(g)}
    modules = dict(model.named_modules())
    taylor = criterion == "taylor"
    accs: dict[str, _Accumulator] = {n: _Accumulator(criterion) for n in slots}
    taylor_sum: dict[str, torch.Tensor] = {}
    n_batches = 0
    handles = []

    def make_hook(name: str):
        def hook(m, _inp, out):
            if not taylor:
                accs[name].update(channels_first(m, out))
                return

            def grad_hook(grad, out=out, m=m):
                prod = channels_first(m, out.detach() * grad)
                dims = [0] + list(range(2, prod.dim()))
                v = prod.mean(dim=dims).abs().double().cpu()
                taylor_sum[name] = taylor_sum[name] + v if name in taylor_sum else v
            out.register_hook(grad_hook)
        return hook

    for name in slots:
        handles.append(modules[name].register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        n = count(data, samples)
        if n <= 0:
            raise DataError("empty calibration set")
        batches = iter_batches(data, n, batch_size)
        for x, y in progress(batches, desc=desc or f"scoring ({criterion})",
                             total=num_batches(data, n, batch_size)):
            x = x.to(dev)
            if taylor:
                y = labels_of(y, "the taylor criterion").to(dev)
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    F.cross_entropy(model(x), y).backward()
            else:
                with torch.no_grad():
                    model(x)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        if taylor:
            model.zero_grad(set_to_none=True)
        model.train(was_training)

    def slot_values(s: Slot) -> torch.Tensor:
        if taylor:
            v = taylor_sum[s.name] / n_batches
            return v / v.norm().clamp_min(1e-12)  # Molchanov et al. (2017): per-layer L2 normalisation
        return accs[s.name].result()

    return {g.name: _mean_over(_hooked_slots(g), g.size, slot_values) for g in info.groups}


def score(info: DependencyInfo, criterion: str, data=None, *, samples: int = 512,
          batch_size: int = 64, seed: int = 0, device=None) -> Scores:
    """Importance of every channel of every group of ``info.model`` under ``criterion``."""
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if needs_data(criterion):
        return data_scores(info, criterion, data, samples=samples, batch_size=batch_size,
                           device=device)
    return weight_scores(info, criterion, seed=seed)


__all__ = ["ACTIVATION_CRITERIA", "CRITERIA", "WEIGHT_CRITERIA", "Scores", "data_scores",
           "needs_data", "score", "weight_scores"]
