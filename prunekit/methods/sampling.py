"""Sampling for reconstruction pruning (ThiNet, LASSO): each consumer's original outputs at
drawn positions, and its inputs from the network pruned so far at the same positions.

``N`` calibration images are streamed batch by batch through the *original* network once
(forward hooks keep each consumer's original outputs, all channels, at ``p`` drawn output
positions per image: the reconstruction targets, reused by every group the consumer reads) and,
for each group, through the network *pruned so far* (a forward pre-hook takes each consumer's
input at the same positions: for a conv the ``Cin x kh x kw`` window, gathered by indexing, no
``unfold`` of whole maps, kept for the group's input columns only). Only these samples survive a
batch; every forward pass stops at the last hooked layer. :meth:`ConsumerSamples.contributions`
gives ThiNet's ``X [rows, C]`` and ``y [rows]``. The network loop is
:func:`prunekit.methods.reconstruct.prune_network`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batches import Selection, is_empty, is_loader
from ..data.batches import select as select_inputs
from ..engine import ChannelGroup
from ..errors import DataError, PrunekitWarning, UnsupportedLayerError
from ..utils import eval_mode, module_device


# --------------------------------------------------------------------------------- samples
@dataclass
class ConsumerSamples:
    """Samples of one consumer layer for one group.

    Attributes
    ----------
    name : str
        The consumer's module name.
    weight : Tensor, shape [out, K]
        Its current weight, flattened (``K = Cin * kh * kw``; ``Cin`` for a linear layer).
    shape : tuple of int
        The weight's real shape.
    bias : Tensor or None, shape [out]
    kk : int
        Columns per input channel (``kh * kw``; 1 for a linear layer).
    cols : LongTensor, shape [Kg]
        The weight columns that read the group's channels.
    chan : LongTensor, shape [Kg]
        The group channel each of those columns reads.
    positions : dict[int, list[int]]
        Group channel -> the consumer's input channels (features) carrying it.
    group_size : int
        Channels in the group (``C``).
    U : Tensor, shape [S, Kg]
        Sampled inputs at those columns (from the network pruned so far).
    T : Tensor, shape [S, out]
        Original outputs at the same places minus what the other columns contribute (with the
        current weights and inputs); the bias is still in it.
    y_sq : float
        Sum of squares of the original outputs at the sampled places (for relative errors).
    rows_s, rows_o : LongTensor, shape [R]
        Selection rows: sample index and output channel of each row of :meth:`contributions`.
    """

    name: str
    weight: torch.Tensor
    shape: tuple[int, ...]
    bias: torch.Tensor | None
    kk: int
    cols: torch.Tensor
    chan: torch.Tensor
    positions: dict[int, list[int]]
    group_size: int
    U: torch.Tensor
    T: torch.Tensor
    y_sq: float
    rows_s: torch.Tensor
    rows_o: torch.Tensor
    _xy: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.U.shape[0])

    def kept_columns(self, keep: Sequence[int]) -> torch.Tensor:
        """Indices into ``cols`` / ``chan`` of the columns of the kept channels, in column order."""
        mask = torch.zeros(self.group_size, dtype=torch.bool)
        mask[list(keep)] = True
        return torch.nonzero(mask[self.chan]).flatten()

    def contributions(self, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """ThiNet's ``X [R, C]`` and ``y [R]`` (Luo et al., ICCV 2017: ``y_hat = y - b = sum_c x_c``).

        Row ``i`` is the output channel ``rows_o[i]`` at sample ``rows_s[i]``; computed in
        chunks of rows (``[chunk, Kg]`` at a time) and cached.
        """
        if self._xy is None:
            Wg = self.weight[:, self.cols]
            R = self.rows_s.numel()
            X = torch.zeros(R, self.group_size, dtype=self.U.dtype, device=self.U.device)
            chan = self.chan.to(self.U.device)
            for a in range(0, R, chunk):
                s, o = self.rows_s[a:a + chunk], self.rows_o[a:a + chunk]
                X[a:a + chunk].index_add_(1, chan, self.U[s] * Wg[o])
            y = self.T[self.rows_s, self.rows_o]
            if self.bias is not None:
                y = y - self.bias[self.rows_o]
            self._xy = (X, y)
        return self._xy

    def residual_sq(self, keep: Sequence[int] | None = None, weights: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> float:
        """``||T - U_S W_S^T - b||_F^2`` over all samples and output channels, in float64.

        ``keep=None``: every channel with the current weights (the drift of the inputs alone);
        ``weights``: new weights of the kept columns ``[out, Kg_kept]`` (default: the current
        ones); ``bias``: new bias (default: the current one).
        """
        idx = (torch.arange(self.cols.numel()) if keep is None else self.kept_columns(keep))
        W = self.weight[:, self.cols[idx]] if weights is None else weights
        b = self.bias if bias is None else bias
        total = 0.0
        U = self.U[:, idx.to(self.U.device)]
        for a in range(0, U.shape[0], 8192):
            pred = U[a:a + 8192].double() @ W.double().T
            if b is not None:
                pred = pred + b.double()
            total += float(((self.T[a:a + 8192].double() - pred) ** 2).sum())
        return total

    def relative_error(self, **kw: Any) -> float:
        """``||Y_orig - Y_hat|| / ||Y_orig||`` of the consumer's output at the sampled places."""
        return math.sqrt(self.residual_sq(**kw) / max(self.y_sq, 1e-30))

    def weights_after(self, keep: Sequence[int], kept_weights: torch.Tensor,
                      bias: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """The consumer's ``{"weight", "bias"}`` after the removal (the engine's ``reconstruct``).

        ``kept_weights [out, Kg_kept]`` replaces the kept group columns; the other columns keep
        their current values; the removed channels' input columns are dropped.
        """
        W = self.weight.clone()
        W[:, self.cols[self.kept_columns(keep)]] = kept_weights.to(W.dtype)
        W = W.reshape(self.shape)
        kept = set(int(k) for k in keep)
        removed = {i for c, locs in self.positions.items() if c not in kept for i in locs}
        remaining = [i for i in range(self.shape[1]) if i not in removed]
        out: dict[str, torch.Tensor | None] = {"weight": W[:, remaining].contiguous().clone()}
        out["bias"] = None if bias is None else bias.to(W.dtype).clone()
        return out


class _Stop(Exception):
    """Raised by a hook once every consumer has been seen: the rest of the forward is skipped."""


def _conv_geometry(conv: nn.Conv2d) -> tuple[list[int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    pad = list(conv._reversed_padding_repeated_twice)  # [left, right, top, bottom]
    return pad, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)


def conv_patches(x: torch.Tensor, conv: nn.Conv2d, n_idx: torch.Tensor, oh: torch.Tensor,
                 ow: torch.Tensor) -> torch.Tensor:
    """The receptive fields of ``conv`` at output positions ``(n_idx, oh, ow)``, flattened like
    ``conv.weight.flatten(1)``: ``[R, Cin * kh * kw]`` (so ``patches @ W.flatten(1).T + b`` equals
    ``conv(x)[n_idx, :, oh, ow]``). Only the sampled windows are gathered."""
    pad, (kh, kw), (sh, sw), (dh, dw) = _conv_geometry(conv)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    dev = x.device
    rows = oh.to(dev)[:, None] * sh + torch.arange(kh, device=dev) * dh      # [R, kh]
    cols = ow.to(dev)[:, None] * sw + torch.arange(kw, device=dev) * dw      # [R, kw]
    p = x[n_idx.to(dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [R, kh, kw, C]
    return p.permute(0, 3, 1, 2).reshape(len(n_idx), -1)


def _conv_out_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    pad, (kh, kw), (sh, sw), (dh, dw) = _conv_geometry(conv)
    H = x.shape[2] + pad[2] + pad[3]
    W = x.shape[3] + pad[0] + pad[1]
    return (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1


def _check_consumer(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        return
    if isinstance(m, nn.Conv2d) and m.groups == 1:
        return
    raise UnsupportedLayerError(f"consumer {name!r} ({type(m).__name__}) cannot be reconstructed: "
                                "only Conv2d (groups=1) and Linear consumers are supported")


def _draw_places(n: int, places: int, wanted: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``p = min(wanted, places)`` distinct places per image, drawn at random: the image index
    and the flat place of each (image-major), and ``p``."""
    p = min(wanted, places)
    pos = torch.rand(n, places, generator=gen).argsort(1)[:, :p].reshape(-1)
    return torch.arange(n).repeat_interleave(p), pos, p


def _forward_until(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except _Stop:
        pass


def _seed_of(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on Python's hash randomisation."""
    h = seed & 0xFFFFFFFF
    for ch in name.encode():
        h = (h * 1000003 + ch) & 0x7FFFFFFFFFFFFFFF
    return h


class OriginalTargets:
    """The original network's outputs of the consumer layers at sampled places.

    One pass of the original network over the calibration images (batch by batch; the pass
    stops after the last hooked layer) draws, per layer and image, ``min(m, H_out * W_out)``
    distinct output positions (one "position" for a linear layer) and keeps the outputs of all
    output channels there: ``[samples, out]`` per layer, never a whole map. Targets do not change
    while the copy is pruned, so every layer is sampled once and reused by every group that
    reads it (DenseNet layers are consumers of up to a dozen groups).

    Parameters
    ----------
    original : nn.Module
    names : sequence of str
        The consumer layers (Conv2d or Linear).
    data : ImageDataset, Dataset, DataLoader or Tensor
        Calibration data (labels are not read).
    images : LongTensor, int or Selection
        Calibration image indices of an indexable ``data``, streamed in chunks of
        ``batch_size``; or a number ``n`` (the first ``n`` inputs, the only choice for a
        ``DataLoader``, read in its own batches); or a
        :func:`~prunekit.data.batches.select` result. Every later pass
        (:func:`sample_group`) reads the same inputs in the same batches.
    samples_per_image : int
    batch_size : int
    seed : int
    """

    def __init__(self, original: nn.Module, names: Sequence[str], data: Any,
                 images: torch.Tensor | int | Selection, *, samples_per_image: int = 10,
                 batch_size: int = 64, seed: int = 0) -> None:
        if is_empty(data):
            raise DataError("reconstruction pruning needs calibration data (got none)")
        self.selection = _selection(data, images, batch_size)
        self.data, self.images, self.batch_size = data, self.selection.indices, batch_size
        self.m = samples_per_image
        mods = dict(original.named_modules())
        names = list(dict.fromkeys(names))
        for n in names:
            if n not in mods:
                raise UnsupportedLayerError(f"layer {n!r} is missing from the original model")
            _check_consumer(n, mods[n])
        self.names = names
        #: layer -> output places to draw per image: at least ``samples_per_image``, raised for
        #: a wide consumer so that its refit has ROWS_PER_COLUMN rows per weight column
        n_images = max(1, len(self.selection))
        self.wanted = {n: max(samples_per_image, math.ceil(ROWS_PER_COLUMN * _columns(mods[n]) / n_images))
                       for n in names}
        #: layer -> per batch: (n_idx, oh, ow) for convs, (n_idx, position) for channel-last
        #: linear layers, None for [N, features] linear layers
        self.places: dict[str, list[tuple[torch.Tensor, ...] | None]] = {}
        #: layer -> per batch: original outputs [n * p, out]
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.sizes: dict[str, tuple[int, ...]] = {}
        self.per_image: dict[str, int] = {}
        gens = {n: torch.Generator().manual_seed(_seed_of(seed, n)) for n in names}
        for n in names:
            self.places[n] = []
        seen: set[str] = set()

        def hook(name: str):
            def fn(_m, _args, y):
                if name in seen:
                    raise UnsupportedLayerError(f"layer {name!r} runs twice in one forward pass; "
                                                "shared layers cannot be reconstructed")
                seen.add(name)
                y = y.detach()
                if y.dim() == 4 and not isinstance(mods[name], nn.Linear):
                    N, _, Ho, Wo = y.shape
                    n_idx, pos, p = _draw_places(N, Ho * Wo, self.wanted[name], gens[name])
                    oh, ow = pos // Wo, pos % Wo
                    dev = y.device
                    self.places[name].append((n_idx, oh, ow))
                    self.outputs[name].append(y[n_idx.to(dev), :, oh.to(dev), ow.to(dev)].clone())
                    self.sizes[name], self.per_image[name] = (Ho, Wo), p
                elif y.dim() == 2:
                    self.places[name].append(None)
                    self.outputs[name].append(y.clone())
                    self.sizes[name], self.per_image[name] = (), 1
                elif isinstance(mods[name], nn.Linear):
                    # channel-last [N, ..., features] (ConvNeXt's MLP, tokens): each position
                    # of the leading axes is one place, drawn as an output pixel is
                    N, L = y.shape[0], math.prod(y.shape[1:-1])
                    n_idx, pos, p = _draw_places(N, L, self.wanted[name], gens[name])
                    self.places[name].append((n_idx, pos))
                    rows = y.reshape(N, L, y.shape[-1])
                    self.outputs[name].append(rows[n_idx.to(y.device), pos.to(y.device)].clone())
                    self.sizes[name], self.per_image[name] = tuple(y.shape[1:-1]), p
                else:
                    raise UnsupportedLayerError(f"layer {name!r} outputs a {y.dim()}-D tensor; only "
                                                "[N, C, H, W], [N, features] and channel-last "
                                                "[N, ..., features] (Linear) are supported")
                if len(seen) == len(self.names):
                    raise _Stop
            return fn

        handles = [mods[n].register_forward_hook(hook(n)) for n in names]
        was_training = original.training
        original.eval()
        dev = module_device(original)
        try:
            with torch.no_grad():
                for x, _ in self.selection:
                    seen.clear()
                    _forward_until(original, x.to(dev))
                    if len(seen) != len(names):
                        raise UnsupportedLayerError(f"layers {sorted(set(names) - seen)} were not run "
                                                    "by the forward pass of the original model")
        finally:
            for h in handles:
                h.remove()
            original.train(was_training)
        rows = {n: len(self.selection) * self.per_image.get(n, 1) for n in names}
        short = {n: _columns(mods[n]) for n in names if rows[n] < 2 * _columns(mods[n])}
        if short:
            n, cols = max(short.items(), key=lambda kv: kv[1])
            warnings.warn(f"{len(self.selection)} calibration images give fewer than 2 samples per weight "
                          f"column for {len(short)} layer(s) (e.g. {n!r}: {cols} columns, "
                          f"{rows[n]} samples): the least-squares refit may overfit; give more "
                          "calibration images", PrunekitWarning, stacklevel=3)


#: sampled rows wanted per weight column of a consumer's refit (fewer overfit it: 64 images x 10
#: places for 576 columns gave 19.6 % on ResNet-20 / Fashion-MNIST, x 40 places 91.4 %)
ROWS_PER_COLUMN = 4


def _columns(module: nn.Module) -> int:
    """Weight columns of a consumer's least-squares refit (``Cin / groups * kh * kw``)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    return int(getattr(module, "in_features", 1))


def _selection(data: Any, images: torch.Tensor | int | Selection, batch_size: int) -> Selection:
    """The calibration inputs as a :class:`~prunekit.data.batches.Selection` (see
    :class:`OriginalTargets`)."""
    if isinstance(images, Selection):
        return images
    if isinstance(images, int):
        return select_inputs(data, images, batch_size)
    if is_loader(data):
        raise DataError("a DataLoader is read in its own order: give the number of calibration "
                        "images (its first n), not indices")
    idx = torch.as_tensor(images, dtype=torch.long)
    return Selection(data, list(idx.split(batch_size)), len(idx))


class _Collector:
    """Per-consumer buffers filled by the pre-hook of one :func:`sample_group` call."""

    def __init__(self, name: str, module: nn.Module, positions: dict[int, list[int]], size: int,
                 out_rows: torch.Tensor | None, targets: OriginalTargets) -> None:
        _check_consumer(name, module)
        self.name, self.module, self.positions, self.size = name, module, positions, size
        self.targets = targets
        self.is_conv = isinstance(module, nn.Conv2d)
        self.kk = int(math.prod(module.kernel_size)) if self.is_conv else 1
        w = module.weight.detach()
        self.shape = tuple(w.shape)
        self.weight = w.reshape(w.shape[0], -1)
        self.bias = None if module.bias is None else module.bias.detach().clone()
        cols, chan = [], []
        for c in sorted(positions):
            for local in positions[c]:
                cols += range(local * self.kk, (local + 1) * self.kk)
                chan += [c] * self.kk
        self.cols = torch.tensor(cols, dtype=torch.long)
        self.chan = torch.tensor(chan, dtype=torch.long)
        other = torch.ones(self.weight.shape[1], dtype=torch.bool)
        other[self.cols] = False
        self.other = torch.nonzero(other).flatten()
        self.w_other = self.weight[:, self.other.to(w.device)]
        self.out_rows = out_rows
        self.U: list[torch.Tensor] = []
        self.T: list[torch.Tensor] = []
        self.y_sq = 0.0
        self.batch = 0

    def take_input(self, x: torch.Tensor) -> None:
        """From the pruned network: the group columns at the target's places, and what the other
        columns contribute there (subtracted from the target)."""
        name, b = self.name, self.batch
        Y = self.targets.outputs[name][b]
        if self.is_conv:
            size = _conv_out_size(x, self.module)
            if size != self.targets.sizes[name]:
                raise UnsupportedLayerError(f"consumer {name!r}: output size {size} in the pruned model, "
                                            f"{self.targets.sizes[name]} in the original")
            n_idx, oh, ow = self.targets.places[name][b]
            P = conv_patches(x, self.module, n_idx, oh, ow)
        elif x.dim() == 2:
            P = x
        else:  # channel-last: the same places as the original's outputs
            if tuple(x.shape[1:-1]) != self.targets.sizes[name]:
                raise UnsupportedLayerError(f"consumer {name!r}: input positions {tuple(x.shape[1:-1])} "
                                            f"in the pruned model, {self.targets.sizes[name]} in the "
                                            "original")
            n_idx, pos = self.targets.places[name][b]
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            P = rows[n_idx.to(x.device), pos.to(x.device)]
        dev = P.device
        if self.out_rows is not None:
            Y = Y[:, self.out_rows.to(Y.device)]
        Y = Y.to(dev)
        self.y_sq += float((Y.double() ** 2).sum())
        U = P[:, self.cols.to(dev)]
        T = Y - P[:, self.other.to(dev)] @ self.w_other.T if self.other.numel() else Y
        self.U.append(U.detach().clone())
        self.T.append(T.detach())
        self.batch += 1

    def finish(self, gen: torch.Generator) -> ConsumerSamples:
        U, T = torch.cat(self.U), torch.cat(self.T)
        S, out = T.shape
        q = max(1, math.ceil(self.targets.m / self.targets.per_image[self.name]))  # channels per place
        rows_s = torch.arange(S).repeat_interleave(q)
        rows_o = torch.randint(out, (S * q,), generator=gen)
        return ConsumerSamples(self.name, self.weight, self.shape, self.bias, self.kk, self.cols,
                               self.chan, self.positions, self.size, U, T, self.y_sq,
                               rows_s.to(U.device), rows_o.to(U.device))


@torch.no_grad()
def sample_group(model: nn.Module, original: nn.Module | OriginalTargets, group: ChannelGroup,
                 data: Any, images: torch.Tensor | int | Selection, *, samples_per_image: int = 10,
                 batch_size: int = 64,
                 seed: int = 0, out_rows: dict[str, torch.Tensor] | None = None
                 ) -> list[ConsumerSamples]:
    """Sample every consumer of ``group``: inputs from ``model``, targets from the original.

    Parameters
    ----------
    model : nn.Module
        The network pruned so far (``group`` must be traced on it).
    original : nn.Module or OriginalTargets
        The unpruned network (same module names), or targets already sampled from it (which
        fix the images, places, ``samples_per_image`` and ``batch_size``).
    group : ChannelGroup
    data : ImageDataset, Dataset, DataLoader or Tensor
        Calibration images (ignored when ``original`` is ``OriginalTargets``, which holds
        them).
    images : LongTensor, int or Selection
        The calibration images, as for :class:`OriginalTargets` (ignored when ``original`` is
        ``OriginalTargets``).
    samples_per_image : int
    batch_size : int
    seed : int
        Seeds the places and the output channel drawn for each selection row.
    out_rows : dict, optional
        Consumer name -> the original output rows its current rows are (when its outputs were
        pruned already); default: all rows.

    Returns
    -------
    list of ConsumerSamples
        One per consumer, in the group's order.
    """
    consumers = group.consumers
    if not consumers:
        raise UnsupportedLayerError(f"group {group.name!r} has no consumer to reconstruct")
    if isinstance(original, OriginalTargets):
        targets = original
    else:
        targets = OriginalTargets(original, [s.name for s in consumers], data, images,
                                  samples_per_image=samples_per_image, batch_size=batch_size, seed=seed)
    out_rows = out_rows or {}
    cols: dict[str, _Collector] = {}
    for slot in consumers:
        if slot.name not in targets.outputs:
            raise UnsupportedLayerError(f"no original targets were sampled for consumer {slot.name!r}")
        cols[slot.name] = _Collector(slot.name, slot.module, slot.positions, group.size,
                                     out_rows.get(slot.name), targets)
    work_mods = dict(model.named_modules())
    dev = module_device(model)
    seen: set[str] = set()

    def pre_hook(name: str):
        def hook(_m, args):
            if name in seen:
                raise UnsupportedLayerError(f"consumer {name!r} runs twice in one forward pass; "
                                            "shared layers cannot be reconstructed")
            cols[name].take_input(args[0])
            seen.add(name)
            if len(seen) == len(cols):
                raise _Stop
        return hook

    handles = [work_mods[n].register_forward_pre_hook(pre_hook(n)) for n in cols]
    with eval_mode(model, handles):
        for x, _ in targets.selection:
            seen.clear()
            _forward_until(model, x.to(dev))
            if len(seen) != len(cols):
                raise UnsupportedLayerError(f"consumers {sorted(set(cols) - seen)} of group "
                                            f"{group.name!r} were not run by the forward pass")
    gen = torch.Generator().manual_seed(seed)
    return [c.finish(gen) for c in cols.values()]


def stacked_contributions(samples: list[ConsumerSamples]) -> tuple[torch.Tensor, torch.Tensor]:
    """All consumers' ``X, y`` stacked; each consumer's rows divided by the RMS of its original
    outputs, so that every consumer's *relative* error counts the same."""
    if len(samples) == 1:
        return samples[0].contributions()
    Xs, ys = [], []
    for cs in samples:
        X, y = cs.contributions()
        rms = math.sqrt(max(cs.y_sq, 1e-30) / max(cs.T.numel(), 1))
        Xs.append(X / rms)
        ys.append(y / rms)
    return torch.cat(Xs), torch.cat(ys)
