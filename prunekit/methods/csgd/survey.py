"""S1 (survey): the global average pool of every channel's map for each survey image."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ...criteria import channels_first
from ...data.batches import count, first_input, iter_batches
from ...engine import DependencyInfo, analyse
from ...engine.graph import ChannelGroup, Slot
from ...errors import ConfigError, DataError
from ...utils import eval_mode, module_device, progress

#: S1's statistic of a channel's map: the GAP of the map itself (before the non-linearity; the
#: document's reading and the default) or of the rectified map ``max(0, x)``
STATISTICS = ("gap", "relu-gap")

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)

# =============================================================================================
# S1: survey
# =============================================================================================

def _as_batches(data: Any, samples: int, batch_size: int) -> tuple[int, Iterable[torch.Tensor]]:
    """The first ``samples`` inputs of ``data`` (see :func:`prunekit.data.batches.iter_batches`:
    an ImageDataset, a map-style dataset, a DataLoader or a tensor), batch by batch."""
    if data is None:
        raise DataError("the survey (S1) needs data: pass a dataset, a DataLoader or a tensor of inputs")
    n = count(data, samples)
    if n <= 0:
        raise DataError("the survey set is empty")
    return n, (x for x, _ in iter_batches(data, n, batch_size))


def _resolve_groups(info: DependencyInfo, layers: Iterable[Any] | None) -> list[ChannelGroup]:
    if layers is None:
        return list(info.groups)
    out: list[ChannelGroup] = []
    for layer in layers:
        g = info.producer_group(layer)
        if all(g.name != h.name for h in out):
            out.append(g)
    return out


def _following_bn(model: nn.Module, example_inputs: torch.Tensor,
                  producers: Sequence[nn.Module]) -> dict[nn.Module, nn.Module]:
    """Producer -> the BatchNorm whose input is exactly that producer's output tensor.

    Found by one traced forward pass with hooks (the tensor objects are compared), so it
    works for any wiring: ``conv -> bn`` gives a pair, a conv whose output first goes through
    a concatenation or an add (DenseNet, pre-activation blocks) gives none.
    """
    outputs: dict[int, nn.Module] = {}
    found: dict[nn.Module, nn.Module] = {}
    handles = []

    def after_producer(module, _inp, out):
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = module
            keep_alive.append(out)

    def before_bn(module, inp):
        if inp and isinstance(inp[0], torch.Tensor):
            producer = outputs.get(id(inp[0]))
            if producer is not None and producer not in found:
                found[producer] = module

    keep_alive: list[torch.Tensor] = []  # ids stay unique while the tensors live
    for p in producers:
        handles.append(p.register_forward_hook(after_producer))
    for m in model.modules():
        if isinstance(m, _BN_TYPES):
            handles.append(m.register_forward_pre_hook(before_bn))
    with eval_mode(model, handles), torch.no_grad():
        model(example_inputs.to(module_device(model)))
    return found


@dataclass
class _SurveySource:
    group: str
    producer: Slot
    module: nn.Module     # the hooked layer: the producer's BatchNorm, else the producer
    rows: list[list[int]]  # per root channel, the hooked layer's channel indices


def _standardise(block: torch.Tensor) -> torch.Tensor:
    """Rows to zero mean and unit variance over the samples (constant rows -> zeros)."""
    b = block.double()
    centred = b - b.mean(1, keepdim=True)
    std = centred.pow(2).mean(1, keepdim=True).sqrt()
    scale = b.abs().amax(1, keepdim=True)
    const = std <= 64 * torch.finfo(torch.float64).eps * scale
    return torch.where(const, torch.zeros_like(centred), centred / std.clamp_min(1e-300)).float()


def survey(model: nn.Module, data: Any, layers: Iterable[Any] | None = None, samples: int = 1000,
           batch_size: int = 128, *, example_inputs: torch.Tensor | None = None,
           info: DependencyInfo | None = None, standardize: bool = True,
           statistic: str = "gap", device: str | torch.device | None = None,
           stats: dict[str, Any] | None = None
           ) -> dict[str, torch.Tensor]:
    """S1: the survey vectors of every channel group (GAP of each channel per survey image).

    The images are streamed batch by batch; forward hooks reduce each hooked layer's output
    ``[B, C, H, W]`` to its global average pool ``[B, C]`` at once (a Linear in a channel-last
    block, ConvNeXt's ``[B, H, W, C]``, has its channel axis moved first), so memory is ``O(N * C)``
    floats per layer and no feature map is ever stored (S1 of Ding et al., 2019: the paper's
    ResNet-50 example would need 41 GB of feature maps).

    Which tensor: the output of the BatchNorm that directly follows each producer (what the
    rest of the network sees, before the non-linearity), else the producer's own output (a
    DenseNet conv, whose BatchNorms sit behind concatenations). Pearson correlation is
    invariant to a per-channel affine map with positive scale, so the two choices differ only
    where a BatchNorm scale ``gamma`` is negative.

    Which statistic: ``"gap"`` (default) averages that map; ``"relu-gap"`` averages the
    rectified map ``max(0, x)``, the feature a following ReLU passes on. Before the
    non-linearity the GAP of a convolution is, up to the zero padding at the borders, a linear
    function of its input channels' GAPs weighted by the kernels' spatial sums, so filters that
    differ only in their spatial pattern get similar vectors; the rectified statistic tells
    them apart. Measured on the ResNet-20 benchmark (docs/csgd.md): its clusters cost less at
    the merge, but the network ends lower after fine-tuning.

    Coupled groups (several producers tied by residual adds or concatenations) are clustered
    once: their vector is the concatenation, along the sample axis, of each producer's
    vectors, each producer's block standardised per channel (zero mean, unit variance over the
    ``N`` images). The Pearson correlation of two such concatenations is exactly the mean,
    over the producers, of the per-producer correlations, so every producer counts equally and
    differences of scale or offset between producers do not create spurious correlation.

    Parameters
    ----------
    model : nn.Module
        The network (run in eval mode, without gradients; its mode is restored).
    data : ImageDataset, map-style dataset of ``(x, y)`` or Tensor ``[N, C, H, W]``
        The survey set X; its first ``samples`` inputs are used.
    layers : iterable of modules / names, optional
        Groups to survey, named by any producing layer (or the group name). Default: every
        prunable group.
    samples : int
        ``N = |X|``, the survey vectors' length.
    batch_size : int
        Images per forward pass.
    example_inputs : Tensor, optional
        For tracing the groups (default: the first survey input).
    info : DependencyInfo, optional
        A ready analysis of ``model`` (skips tracing).
    standardize : bool
        Standardise each producer's block as described above (default). With ``False`` the
        raw GAP values are returned (concatenated for coupled groups).
    statistic : {"gap", "relu-gap"}
        GAP of the map itself (default) or of the rectified map (see above).
    device : str or torch.device, optional
        Where to run (default: where the model is).
    stats : dict, optional
        Filled with ``bytes`` (memory of the stored GAP vectors), ``seconds`` and ``samples``.

    Returns
    -------
    dict[str, Tensor]
        Group name -> ``float32 [C, P * N]`` (``P``: producers of the group; ``[C, N]`` for a
        plain layer).

    Examples
    --------
    >>> vectors = survey(model, train_set, samples=512)          # doctest: +SKIP
    >>> vectors["layer1.0.conv1"].shape                          # doctest: +SKIP
    torch.Size([16, 512])
    """
    t0 = time.perf_counter()
    samples, batch_size = int(samples), int(batch_size)
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    if statistic not in STATISTICS:
        raise ConfigError(f"unknown survey statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
    rectify = statistic == "relu-gap"
    if info is None:
        x0 = example_inputs if example_inputs is not None else first_input(data)
        info = analyse(model, x0)
    groups = _resolve_groups(info, layers)
    dev = torch.device(device) if device is not None else module_device(model)
    bn_after = _following_bn(model, info.example_inputs,
                             [s.module for g in groups for s in g.producers])
    sources: list[_SurveySource] = []
    for g in groups:
        for slot in g.producers:
            hooked = bn_after.get(slot.module, slot.module)
            sources.append(_SurveySource(g.name, slot, hooked,
                                         [slot.positions[c] for c in range(g.size)]))

    n, batches = _as_batches(data, samples, batch_size)
    store: dict[nn.Module, torch.Tensor] = {}
    cursor = {"at": 0}
    handles = []

    def hook(module, _inp, out):
        o = channels_first(module, out.detach())  # a Linear in a channel-last block: [N, H, W, C]
        o = o.clamp_min(0) if rectify else o
        gap = o.flatten(2).mean(2) if o.dim() > 2 else o
        buf = store.get(module)
        if buf is None:
            buf = store[module] = torch.empty(gap.shape[1], n, dtype=torch.float32)
        lo = cursor["at"]
        buf[:, lo:lo + gap.shape[0]] = gap.float().t().cpu()

    for m in {s.module for s in sources}:
        handles.append(m.register_forward_hook(hook))
    with eval_mode(model, handles), torch.no_grad():
        n_batches = math.ceil(n / batch_size)
        for x in progress(batches, desc="S1 survey", total=n_batches):
            model(x.to(dev))
            cursor["at"] += x.shape[0]

    out: dict[str, torch.Tensor] = {}
    for g in groups:
        blocks = []
        for s in (s for s in sources if s.group == g.name):
            gap = store[s.module]
            block = torch.stack([gap[rows].mean(0) for rows in s.rows])
            blocks.append(_standardise(block) if standardize else block)
        out[g.name] = torch.cat(blocks, dim=1)
    if stats is not None:
        stats.update(bytes=int(sum(t.numel() * t.element_size() for t in store.values())),
                     seconds=time.perf_counter() - t0, samples=n)
    return out
