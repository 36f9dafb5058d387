"""Random-architecture fuzzing of the pruning engine.

:func:`random_spec` draws, from a seed, a JSON-serialisable description of a small valid CNN:
a stem conv followed by 1-4 blocks chosen among plain convs, residual blocks (identity and
projection shortcuts), inverted residuals (expand, depthwise, project), DenseNet-like blocks
(concatenation, optionally BN-ReLU-conv on the concatenated input), Inception-like branch
concatenations (conv, max-pool and identity branches), depthwise-separable blocks, grouped convs
(``1 < groups`` and not depthwise), depthwise convs with a channel multiplier, and max/avg
pooling; then a head (global average / max pooling, adaptive 2x2 pooling, a functional mean or
no pooling at all), ``flatten``, 0-2 hidden Linear layers (with or without BatchNorm1d) and the
classifier. BatchNorm and conv biases are on, off or mixed. :class:`FuzzNet` builds the network
from the spec; its ``forward`` interprets the spec, so any spec is one architecture. With
``extended=True`` the spec also draws blocks beyond what the engine documents
(:data:`EXTENDED_KINDS`: squeeze-excitation, upsampling, PReLU, GroupNorm, ``torch.chunk``,
channel shuffle).

:func:`check_architecture` prunes one architecture with each requested method and checks the
properties every pruned model must have (see :func:`check_method` and :func:`check_merge`). An
architecture the engine cannot handle must raise a typed prunekit error
(:class:`~prunekit.errors.ModelError`, of which :class:`~prunekit.errors.UnsupportedLayerError`
is a subclass) whose message names a layer: that is recorded as ``"rejected"``; any other
exception, a typed error naming no layer, or a violated property is a ``"failed"`` outcome.

Examples
--------
>>> from prunekit.testing.fuzz import random_spec, check_architecture
>>> spec = random_spec(7)
>>> outcomes = check_architecture(spec, ["l1", "merge"])           # doctest: +SKIP
>>> [o.status for o in outcomes]                                    # doctest: +SKIP
['passed', 'passed']
"""

from __future__ import annotations

import copy
import json
import math
import random
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Spec = dict[str, Any]

#: every kind of block :func:`random_spec` can draw (the stem is always a plain ``conv``)
BLOCK_KINDS = ("conv", "res", "inverted", "dense", "branch_cat", "dw", "grouped", "dw_mult", "pool")
#: blocks drawn only with ``random_spec(..., extended=True)``: squeeze-excitation, upsampling
#: with a residual add, PReLU, GroupNorm, a channel split (``torch.chunk``), a channel shuffle
EXTENDED_KINDS = ("se", "upsample", "prelu", "groupnorm", "chunk", "shuffle")
#: head pooling variants
HEAD_POOLS = ("gap_avg", "gap_max", "adaptive2", "fmean", "none")
#: the pseudo-method that checks the exact merge of forced-identical channels
MERGE = "merge"
#: the ratio range drawn per (architecture, method): every group of >= 2 channels loses one
RATIO_RANGE = (0.3, 0.7)
#: relative tolerances (float64): merge of identical channels, removal vs zeroed inputs
MERGE_RTOL = 1e-5
REMOVE_RTOL = 1e-9


# ---------------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------------

def _width(rng: random.Random) -> int:
    return rng.randint(2, 12)


def _flags(rng: random.Random, bn_mode: str, bias_mode: str) -> dict[str, bool]:
    bn = {"all": True, "none": False}.get(bn_mode, rng.random() < 0.5)
    bias = {"on": True, "off": False}.get(bias_mode, rng.random() < 0.5)
    return {"bn": bn, "bias": bias}


def _stride(rng: random.Random, size: int) -> int:
    return 2 if size >= 8 and rng.random() < 0.25 else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def random_spec(seed: int, *, n_blocks: tuple[int, int] = (1, 4), grouped_prob: float = 0.08,
                head_first_prob: float = 0.1, extended: bool = False) -> Spec:
    """A random valid CNN description, a pure function of ``seed``.

    Parameters
    ----------
    seed : int
        Everything (widths, block kinds, flags, input size) follows from it.
    n_blocks : (int, int)
        Inclusive range of the number of blocks after the stem.
    grouped_prob : float
        Probability that a block is a grouped conv or a depthwise conv with a channel
        multiplier (layers the engine may reject).
    head_first_prob : float
        Probability that the head (classifier first, then the hidden Linear layers) is defined
        before the body: definition order then differs from execution order, and with hidden
        layers the classifier is not the last Linear defined.
    extended : bool
        Also draw the blocks of :data:`EXTENDED_KINDS` (about 40% of the blocks), which go
        beyond the architectures the engine is documented to handle.

    Returns
    -------
    dict
        JSON-serialisable: ``in_channels``, ``size`` (square input side, 8-16),
        ``num_classes``, ``bn_mode``, ``bias_mode``, ``blocks`` (list of dicts with ``op``)
        and ``head`` (``pool``, ``hidden``, ``hidden_bn``, ``head_first``).
    """
    rng = random.Random(seed)
    bn_mode = rng.choice(["all", "none", "mixed"])
    bias_mode = rng.choice(["on", "off", "mixed"])
    spec: Spec = {"seed": seed, "extended": extended, "in_channels": rng.choice([1, 3]),
                  "size": rng.choice([8, 10, 12, 16]), "num_classes": rng.randint(2, 10),
                  "bn_mode": bn_mode, "bias_mode": bias_mode}
    c, s = spec["in_channels"], spec["size"]
    blocks: list[dict[str, Any]] = [{"op": "conv", "out": _width(rng), "k": rng.choice([1, 3]),
                                     "stride": 1, **_flags(rng, bn_mode, bias_mode)}]
    c = blocks[0]["out"]
    plain = [k for k in BLOCK_KINDS if k not in ("grouped", "dw_mult")]
    for _ in range(rng.randint(*n_blocks)):
        kind = rng.choice(["grouped", "dw_mult"]) if rng.random() < grouped_prob else rng.choice(plain)
        if extended and rng.random() < 0.4:
            kind = rng.choice(EXTENDED_KINDS)
        if (kind == "pool" and s < 4) or (kind == "shuffle" and c % 2) or (kind == "upsample" and s < 4):
            kind = "conv"
        f = _flags(rng, bn_mode, bias_mode)
        b: dict[str, Any] = {"op": kind, **f}
        if kind == "conv":
            b.update(out=_width(rng), k=rng.choice([1, 3]), stride=_stride(rng, s))
        elif kind == "res":
            out = c if rng.random() < 0.5 else _width(rng)
            stride = _stride(rng, s)
            b.update(out=out, stride=stride,
                     projection=not (out == c and stride == 1) or rng.random() < 0.15)
        elif kind == "inverted":
            out = c if rng.random() < 0.5 else _width(rng)
            stride = _stride(rng, s)
            b.update(expand=_width(rng), out=out, stride=stride, residual=out == c and stride == 1)
        elif kind == "dense":
            layers = rng.randint(1, 3)
            b.update(growth=rng.randint(2, 6), layers=layers, pre_bn=rng.random() < 0.5,
                     transition=_width(rng) if rng.random() < 0.5 else None)
        elif kind == "branch_cat":
            branches = []
            for _ in range(rng.randint(2, 3)):
                bk = rng.choice(["conv1", "conv3", "conv3", "pool", "identity"])
                branches.append({"kind": bk, "out": _width(rng) if bk.startswith("conv") else c})
            if all(br["kind"] in ("pool", "identity") for br in branches):
                branches[0] = {"kind": "conv3", "out": _width(rng)}
            b.update(branches=branches)
        elif kind == "dw":
            b.update(out=_width(rng), stride=_stride(rng, s))
        elif kind == "grouped":
            small = [d for d in _divisors(c) if d <= 6]
            g = rng.choice(small or _divisors(c))
            mult = rng.randint(1, max(1, 12 // g))
            if g == c and mult == 1:  # that would be depthwise: make it a real grouped conv
                mult = 2
            b.update(groups=g, out=g * mult, k=rng.choice([1, 3]))
        elif kind == "dw_mult":
            b.update(multiplier=2)
        elif kind == "pool":
            b.update(kind=rng.choice(["max", "avg"]))
        elif kind == "se":
            b.update(reduce=rng.randint(2, 8))
        elif kind in ("upsample", "prelu"):
            b.update(out=_width(rng))
        elif kind in ("groupnorm", "chunk"):
            b.update(out=2 * rng.randint(1, 6))
        elif kind == "shuffle":
            b.update(groups=2)
        blocks.append(b)
        c, s = _block_out(b, c, s)
    spec["blocks"] = blocks
    pool = rng.choice(HEAD_POOLS)
    if pool == "none" and c * s * s > 2048:
        pool = "gap_avg"
    n_hidden = rng.choice([0, 0, 1, 2])
    spec["head"] = {"pool": pool, "hidden": [_width(rng) for _ in range(n_hidden)],
                    "hidden_bn": rng.random() < 0.5, "hidden_bias": rng.random() < 0.8,
                    "head_first": rng.random() < head_first_prob}
    return spec


def _block_out(b: dict[str, Any], c: int, s: int) -> tuple[int, int]:
    """Channels and spatial side after block ``b`` given its input ``c`` x ``s`` x ``s``."""
    op = b["op"]
    stride = b.get("stride", 1)
    s_out = (s + stride - 1) // stride  # every strided conv here pads k // 2
    if op in ("conv", "res", "inverted", "dw", "grouped", "upsample", "prelu", "groupnorm"):
        return b["out"], s_out
    if op == "chunk":
        return b["out"] // 2, s
    if op in ("se", "shuffle"):
        return c, s
    if op == "dense":
        return (b["transition"] or c + b["layers"] * b["growth"]), s
    if op == "branch_cat":
        return sum(br["out"] for br in b["branches"]), s
    if op == "dw_mult":
        return c * b["multiplier"], s
    if op == "pool":
        return c, s // 2
    raise ValueError(f"unknown block op {op!r}")


def spec_features(spec: Spec) -> list[str]:
    """Named features of an architecture (for coverage counts in reports)."""
    feats: set[str] = set()
    for b in spec["blocks"][1:]:
        op = b["op"]
        if op == "res":
            feats.add("residual-projection" if b["projection"] else "residual-identity")
        elif op == "inverted":
            feats.update({"depthwise", "inverted-residual" if b["residual"] else "inverted"})
        elif op == "dense":
            feats.add("concat-dense" + ("-bn-after-concat" if b["pre_bn"] else ""))
        elif op == "branch_cat":
            feats.add("concat-branches")
        elif op == "dw":
            feats.add("depthwise")
        elif op == "pool":
            feats.add(f"{b['kind']}pool")
        elif op in ("grouped", "dw_mult", *EXTENDED_KINDS):
            feats.add(op)
        if b.get("stride", 1) > 1:
            feats.add("strided")
    head = spec["head"]
    feats.add(f"head-{head['pool']}")
    if head["hidden"]:
        feats.add("hidden-linear" + ("-bn" if head["hidden_bn"] else ""))
    if head["head_first"]:
        feats.add("head-defined-first")
    feats.add(f"bn-{spec['bn_mode']}")
    feats.add(f"bias-{spec['bias_mode']}")
    return sorted(feats)


def describe(spec: Spec) -> str:
    """A one-line summary of a spec: input, blocks, head."""
    parts = []
    for b in spec["blocks"]:
        op = b["op"]
        if op in ("conv", "res", "inverted", "dw"):
            parts.append(f"{op}{b['out']}" + (f"/s{b['stride']}" if b.get("stride", 1) > 1 else ""))
        elif op == "dense":
            parts.append(f"dense{b['layers']}x{b['growth']}" + ("bn" if b["pre_bn"] else ""))
        elif op == "branch_cat":
            parts.append("cat(" + ",".join(f"{br['kind']}" for br in b["branches"]) + ")")
        elif op == "grouped":
            parts.append(f"grouped{b['out']}g{b['groups']}")
        else:
            parts.append(op if op != "pool" else f"{b['kind']}pool")
    head = spec["head"]
    return (f"{spec['in_channels']}x{spec['size']}x{spec['size']} " + " ".join(parts)
            + f" | {head['pool']} fc{head['hidden']}->{spec['num_classes']}")


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------

def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, *, bn: bool,
          bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                                         bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return nn.Sequential(*layers)


class ConvBlock(nn.Module):
    """conv - [BN] - ReLU (also grouped convs and depthwise convs with a multiplier)."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        if b["op"] == "dw_mult":
            self.conv = _conv(cin, cin * b["multiplier"], 3, groups=cin, bn=b["bn"], bias=b["bias"])
        else:
            self.conv = _conv(cin, b["out"], b.get("k", 3), b.get("stride", 1), b.get("groups", 1),
                              bn=b["bn"], bias=b["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class ResBlock(nn.Module):
    """Basic residual block; identity shortcut or a 1x1 projection."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        f = {"bn": b["bn"], "bias": b["bias"]}
        self.conv1 = _conv(cin, b["out"], 3, b["stride"], **f)
        self.conv2 = _conv(b["out"], b["out"], 3, **f)
        self.shortcut = _conv(cin, b["out"], 1, b["stride"], **f) if b["projection"] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class InvertedBlock(nn.Module):
    """MobileNetV2-like: 1x1 expand, depthwise 3x3, 1x1 project, identity add when shapes allow."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        f = {"bn": b["bn"], "bias": b["bias"]}
        e = b["expand"]
        self.expand = _conv(cin, e, 1, **f)
        self.dw = _conv(e, e, 3, b["stride"], groups=e, **f)
        self.project = _conv(e, b["out"], 1, **f)
        self.residual = bool(b["residual"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))
        return x + y if self.residual else y


class DenseBlock(nn.Module):
    """DenseNet-like: each layer reads the concatenation of everything before it."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.pre_bn = bool(b["pre_bn"])
        self.norms = nn.ModuleList()
        self.convs = nn.ModuleList()
        c = cin
        for _ in range(b["layers"]):
            if self.pre_bn:
                self.norms.append(nn.BatchNorm2d(c))
            self.convs.append(nn.Conv2d(c, b["growth"], 3, padding=1, bias=b["bias"]))
            c += b["growth"]
        self.transition = (_conv(c, b["transition"], 1, bn=b["bn"], bias=b["bias"])
                           if b["transition"] else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x
        for i, conv in enumerate(self.convs):
            inp = F.relu(self.norms[i](feats)) if self.pre_bn else feats
            y = conv(inp)
            feats = torch.cat([feats, y if self.pre_bn else F.relu(y)], dim=1)
        return F.relu(self.transition(feats)) if self.transition is not None else feats


class BranchCat(nn.Module):
    """Inception-like: branches (conv 1x1 / 3x3, max-pool 3x3, identity) concatenated."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.kinds = [br["kind"] for br in b["branches"]]
        self.branches = nn.ModuleList()
        for br in b["branches"]:
            if br["kind"].startswith("conv"):
                k = 1 if br["kind"] == "conv1" else 3
                self.branches.append(_conv(cin, br["out"], k, bn=b["bn"], bias=b["bias"]))
            elif br["kind"] == "pool":
                self.branches.append(nn.MaxPool2d(3, stride=1, padding=1))
            else:
                self.branches.append(nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [F.relu(m(x)) if k.startswith("conv") else m(x) for k, m in zip(self.kinds, self.branches,
                                                                                strict=True)]
        return torch.cat(outs, dim=1)


class DWBlock(nn.Module):
    """Depthwise-separable: depthwise 3x3 (groups == channels), then pointwise 1x1."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.dw = _conv(cin, cin, 3, b["stride"], groups=cin, bn=b["bn"], bias=b["bias"])
        self.pw = _conv(cin, b["out"], 1, bn=b["bn"], bias=b["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pw(F.relu(self.dw(x))))


class Head(nn.Module):
    """Pooling (or none), flatten, hidden Linear layers, classifier."""

    def __init__(self, c: int, s: int, head: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.kind = head["pool"]
        self.pool: nn.Module | None = {
            "gap_avg": nn.AdaptiveAvgPool2d(1), "gap_max": nn.AdaptiveMaxPool2d(1),
            "adaptive2": nn.AdaptiveAvgPool2d(2)}.get(self.kind)
        features = c * {"none": s * s, "adaptive2": 4}.get(self.kind, 1)
        widths = [features, *head["hidden"]]
        if head.get("head_first"):  # the classifier is defined before the hidden layers
            self.classifier = nn.Linear(widths[-1], num_classes)
        layers: list[nn.Module] = []
        for h in head["hidden"]:
            layers.append(nn.Linear(features, h, bias=head.get("hidden_bias", True)))
            if head["hidden_bn"]:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            features = h
        self.hidden = nn.Sequential(*layers)
        if not head.get("head_first"):
            self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fmean":
            x = x.mean(dim=(2, 3))
        elif self.pool is not None:
            x = self.pool(x)
        return self.classifier(self.hidden(torch.flatten(x, 1)))


class SEBlock(nn.Module):
    """Squeeze-excitation: global mean, 1x1 reduce, ReLU, 1x1 expand, sigmoid, channel gate."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, b["reduce"], 1, bias=b["bias"])
        self.expand = nn.Conv2d(b["reduce"], cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class UpsampleBlock(nn.Module):
    """Strided conv, nearest upsampling back to the input size, plus a 1x1 shortcut."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.down = _conv(cin, b["out"], 3, 2, bn=b["bn"], bias=b["bias"])
        self.shortcut = _conv(cin, b["out"], 1, bn=b["bn"], bias=b["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(F.relu(self.down(x)), size=x.shape[-2:], mode="nearest")
        return F.relu(y + self.shortcut(x))


class NormActBlock(nn.Module):
    """conv - PReLU, or conv - GroupNorm(2 groups) - ReLU."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, b["out"], 3, padding=1, bias=b["bias"])
        self.norm = nn.GroupNorm(2, b["out"]) if b["op"] == "groupnorm" else nn.Identity()
        self.act = nn.PReLU(b["out"]) if b["op"] == "prelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ChunkBlock(nn.Module):
    """conv, ``torch.chunk`` into two halves along the channels, halves added."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.conv = _conv(cin, b["out"], 3, bn=b["bn"], bias=b["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, c = torch.chunk(F.relu(self.conv(x)), 2, dim=1)
        return a + c


class ShuffleBlock(nn.Module):
    """ShuffleNet's channel shuffle (view, transpose, reshape); no parameters."""

    def __init__(self, cin: int, b: dict[str, Any]) -> None:
        super().__init__()
        self.groups = b["groups"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


_BLOCKS: dict[str, type[nn.Module]] = {
    "se": SEBlock, "upsample": UpsampleBlock, "prelu": NormActBlock, "groupnorm": NormActBlock,
    "chunk": ChunkBlock, "shuffle": ShuffleBlock,
    "conv": ConvBlock, "grouped": ConvBlock, "dw_mult": ConvBlock, "res": ResBlock,
    "inverted": InvertedBlock, "dense": DenseBlock, "branch_cat": BranchCat, "dw": DWBlock,
}


class FuzzNet(nn.Module):
    """The CNN a :func:`random_spec` describes (weights from PyTorch's default init).

    Parameters
    ----------
    spec : dict
        A spec from :func:`random_spec` (kept, as a JSON copy, in ``self.spec``).
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = json.loads(json.dumps(spec))
        c, s = spec["in_channels"], spec["size"]
        blocks: list[nn.Module] = []
        for b in spec["blocks"]:
            if b["op"] == "pool":
                blocks.append(nn.MaxPool2d(2) if b["kind"] == "max" else nn.AvgPool2d(2))
            else:
                blocks.append(_BLOCKS[b["op"]](c, b))
            c, s = _block_out(b, c, s)
        head = Head(c, s, spec["head"], spec["num_classes"])
        if spec["head"].get("head_first"):
            self.head = head
            self.blocks = nn.ModuleList(blocks)
        else:
            self.blocks = nn.ModuleList(blocks)
            self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, and non-zero biases, so that exactness
    checks are not vacuous."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)


def build(spec: Spec, batch: int = 2) -> tuple[FuzzNet, torch.Tensor]:
    """The spec's network (seeded weights, random BN statistics, eval mode) and an example input
    batch; the same spec always gives the same weights and input. The global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = FuzzNet(spec)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    _randomise(model, gen)
    x = torch.randn(batch, spec["in_channels"], spec["size"], spec["size"], generator=gen)
    return model.eval(), x


def calibration_set(spec: Spec, n: int = 8):
    """A tiny random :class:`~prunekit.data.dataset.ImageDataset` matching the spec's input."""
    from ..data.dataset import ImageDataset

    g = torch.Generator().manual_seed(spec["seed"] + 2)
    c, s = spec["in_channels"], spec["size"]
    images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(n) % spec["num_classes"], mean=(0.5,) * c,
                        std=(0.25,) * c, num_classes=spec["num_classes"], name="fuzz")


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """The result of one (architecture, method) pair.

    Attributes
    ----------
    seed : int
        The architecture's seed (:func:`random_spec`).
    method : str
        A criterion of :data:`prunekit.criteria.CRITERIA`, or ``"merge"``.
    status : {"passed", "rejected", "failed"}
    message : str
        Why it was rejected or failed (empty when passed).
    ratio : float or None
        The ratio drawn for the pair.
    seconds : float
        Wall time of the pair's checks.
    """

    seed: int
    method: str
    status: str
    message: str = ""
    ratio: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PropertyViolation(AssertionError):
    """A pruned model broke one of the fuzzing properties."""


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise PropertyViolation(message)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def _names_a_layer(message: str, model: nn.Module) -> bool:
    return any(f"'{name}'" in message for name, _ in model.named_modules() if name)


def _roundtrip(model: nn.Module, spec: Spec, x: torch.Tensor, tmp: Path, tag: str,
               dtype: torch.dtype = torch.float32) -> None:
    """save, then load into a fresh unpruned instance: outputs must be identical."""
    from ..io import load, save

    path = tmp / f"{tag}.pt"
    save(model, path, meta={"fuzz_seed": spec["seed"], "tag": tag})
    fresh = FuzzNet(spec).to(dtype)
    loaded, meta = load(path, model=fresh)
    _expect(meta.get("fuzz_seed") == spec["seed"], "checkpoint meta lost")
    with torch.no_grad():
        _expect(torch.equal(loaded(x), model(x)), f"checkpoint reload changes the outputs ({tag})")
    path.unlink()


def _common_checks(model: nn.Module, pruned: nn.Module, x: torch.Tensor, macs0: int) -> int:
    """Shape, finiteness, no hooks or masks, MACs counted afresh and below the original."""
    from ..engine import leftover_hooks
    from ..engine.budget import count_macs_params

    with torch.no_grad():
        ref, out = model(x), pruned(x)
    _expect(out.shape == ref.shape, f"output shape {tuple(out.shape)} != original {tuple(ref.shape)}")
    _expect(bool(torch.isfinite(out).all()), "non-finite outputs")
    _expect(not leftover_hooks(pruned), f"hooks left on {leftover_hooks(pruned)}")
    _expect(not any(t.dtype == torch.bool for t in pruned.state_dict().values()), "masks left behind")
    macs1 = count_macs_params(pruned, x)[0]
    _expect(macs1 < macs0, f"MACs {macs1} not below the original {macs0}")
    return macs1


@torch.no_grad()
def zero_removed_inputs(model: nn.Module, x: torch.Tensor, plan) -> nn.Module:
    """The reference a correct removal must reproduce.

    Parameters
    ----------
    model : nn.Module
        The unpruned model (not modified).
    x : Tensor
        Example input (for tracing).
    plan : PruningPlan
        A plan on ``model`` whose groups are independent (one step; no merge or reconstruct).

    Returns
    -------
    nn.Module
        A copy of ``model`` whose consumers (convs and linears reading a group's channels, at
        every position, e.g. after ``flatten``) have zero input weights for every channel the
        plan removes. When every layer between a producer and its consumers is channel-wise,
        physically removing the channels gives exactly this model's outputs.
    """
    from ..engine import analyse, input_columns

    zeroed = copy.deepcopy(model)
    info = analyse(zeroed, x, ignore_classifier=False)
    for gp in plan:
        group = info.group(gp.group)
        for slot in group.consumers:
            cols = [p for c in gp.remove for p in slot.positions.get(c, [])]
            for rows, col in input_columns(slot.module, cols):  # grouped convs: own rows only
                slot.module.weight[rows, col] = 0
    return zeroed


def check_method(spec: Spec, method: str, ratio: float, tmp: Path,
                 model: nn.Module | None = None, x: torch.Tensor | None = None) -> Outcome:
    """Prune the spec's network with ``method`` at ``ratio`` and check every property.

    Properties: the pruned model runs on the example input with the original output shape and
    finite outputs; no hooks or masks are left; its MACs, counted afresh, equal the report's and
    are below the original's; removing the plan's channels equals zeroing their consumers'
    input columns in the original model (float64, relative :data:`REMOVE_RTOL`: the surgery
    removed exactly the planned channels everywhere); the checkpoint reloads into a fresh
    unpruned instance with identical outputs.
    """
    from .. import methods, prune
    from ..engine import PruningPlan, analyse, apply_plan
    from ..engine.budget import count_macs_params
    from ..errors import ModelError

    t0 = time.perf_counter()
    outcome = Outcome(spec["seed"], method, "passed", ratio=ratio)
    if model is None or x is None:
        model, x = build(spec)
    try:
        macs0 = count_macs_params(model, x)[0]
        try:
            quick = {"calib_images": 8, "steps": 1, "finetune_epochs_per_step": 0}
            accepted = set(methods.spec(method).options.names())
            res = prune(model, x, method=method, ratio=ratio, data=calibration_set(spec),
                        seed=spec["seed"], evaluate=False,
                        **{k: v for k, v in quick.items() if k in accepted})
        except ModelError as e:
            _expect(_names_a_layer(str(e), model), f"{type(e).__name__} names no layer: {e}")
            outcome.status, outcome.message = "rejected", f"{type(e).__name__}: {e}"
            return outcome
        _expect(res.report["macs_before"] == macs0, "report's MACs before differ from a fresh count")
        macs1 = _common_checks(model, res.model, x, macs0)
        _expect(res.report["macs_after"] == macs1,
                f"report says {res.report['macs_after']} MACs, a fresh count {macs1}")
        _expect(res.plan is not None and len(res.plan) > 0, "empty plan")
        x64 = x.double()
        # a LayerNorm / GroupNorm over a group's channels makes removal differ from zeroing:
        # those groups are checked by everything but this property
        model64 = copy.deepcopy(model).double()
        normalised = {g.name for g in analyse(model64, x64, ignore_classifier=False).groups
                      if g.normalised}
        plan = PruningPlan([gp for gp in res.plan if gp.group not in normalised])
        removed = apply_plan(model64, x64, plan) if normalised else copy.deepcopy(res.model).double()
        zeroed = zero_removed_inputs(model64, x64, plan)
        with torch.no_grad():
            diff = _rel_diff(removed(x64), zeroed(x64))
        _expect(diff < REMOVE_RTOL, f"pruned outputs differ from the zeroed-input original by {diff:.3g} "
                "(wrong channels removed somewhere)")
        _roundtrip(res.model, spec, x, tmp, f"s{spec['seed']}_{method}")
    except PropertyViolation as e:
        outcome.status, outcome.message = "failed", str(e)
    except Exception as e:  # any untyped crash on a valid model is a failure
        outcome.status, outcome.message = "failed", _crash(e)
    finally:
        outcome.seconds = time.perf_counter() - t0
    return outcome


def random_clusters(size: int, gen: torch.Generator) -> list[list[int]]:
    """A random partition of ``range(size)`` into 1 .. size-1 clusters (each sorted; at least
    one cluster has two members)."""
    n = int(torch.randint(1, max(2, size), (1,), generator=gen))
    perm = torch.randperm(size, generator=gen).tolist()
    clusters = [sorted(perm[i::n]) for i in range(n)]
    return sorted(clusters, key=lambda c: c[0])


def check_merge(spec: Spec, tmp: Path, model: nn.Module | None = None,
                x: torch.Tensor | None = None) -> Outcome:
    """Merge forced-identical channels in every group (float64) and check exactness.

    Every group of two or more channels gets a random partition into clusters;
    :func:`~prunekit.engine.make_identical` copies each cluster's first member onto the others;
    a merge plan keeps the first member of each cluster and folds the others into it. The merged
    model must give the same outputs (relative :data:`MERGE_RTOL`), fewer MACs, and reload from
    its checkpoint with identical outputs.
    """
    from ..engine import GroupPlan, PruningPlan, analyse, apply_plan, make_identical
    from ..engine.budget import count_macs_params
    from ..errors import ModelError

    t0 = time.perf_counter()
    outcome = Outcome(spec["seed"], MERGE, "passed")
    if model is None or x is None:
        model, x = build(spec)
    model, x = copy.deepcopy(model).double(), x.double()
    try:
        try:
            info = analyse(model, x)
            groups = info.groups
        except ModelError as e:
            _expect(_names_a_layer(str(e), model), f"{type(e).__name__} names no layer: {e}")
            outcome.status, outcome.message = "rejected", f"{type(e).__name__}: {e}"
            return outcome
        gen = torch.Generator().manual_seed(spec["seed"] + 3)
        plans = []
        for g in groups:
            if g.size < 2 or g.normalised:  # merging under a LayerNorm / GroupNorm is not exact
                continue
            clusters = random_clusters(g.size, gen)
            make_identical(g, clusters)
            plans.append(GroupPlan(g.name, g.size, [c[0] for c in clusters],
                                   {c[0]: c[1:] for c in clusters if len(c) > 1}))
        _expect(bool(plans), "no group to merge")
        macs0 = count_macs_params(model, x)[0]
        with torch.no_grad():
            before = model(x)
        merged = apply_plan(model, x, PruningPlan(plans))
        _common_checks(model, merged, x, macs0)
        with torch.no_grad():
            diff = _rel_diff(merged(x), before)
        _expect(diff < MERGE_RTOL, f"merge of identical channels changes the outputs by {diff:.3g}")
        _roundtrip(merged, spec, x, tmp, f"s{spec['seed']}_merge", dtype=torch.float64)
    except PropertyViolation as e:
        outcome.status, outcome.message = "failed", str(e)
    except Exception as e:
        outcome.status, outcome.message = "failed", _crash(e)
    finally:
        outcome.seconds = time.perf_counter() - t0
    return outcome


def _crash(e: BaseException) -> str:
    """``Type: message (at file:line)``, the innermost frame of the traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    text = " ".join(str(e).split())[:400]
    return f"crash {type(e).__name__}: {text}{where}"


def draw_ratio(seed: int, method: str) -> float:
    """The ratio of an (architecture, method) pair: a pure function of both, in
    :data:`RATIO_RANGE`, rounded to 3 decimals."""
    rng = random.Random(f"{seed}:{method}")
    return round(rng.uniform(*RATIO_RANGE), 3)


def check_architecture(spec: Spec, methods: Sequence[str],
                       tmp: str | Path | None = None) -> list[Outcome]:
    """Every (architecture, method) pair of one spec; ``"merge"`` in ``methods`` runs
    :func:`check_merge`, anything else :func:`check_method` at :func:`draw_ratio`."""
    model, x = build(spec)
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        out = []
        for method in methods:
            if method == MERGE:
                out.append(check_merge(spec, Path(d), model, x))
            else:
                out.append(check_method(spec, method, draw_ratio(spec["seed"], method), Path(d),
                                        model, x))
    return out


def architecture_status(outcomes: Iterable[Outcome]) -> str:
    """``failed`` if any pair failed, else ``rejected`` if any was rejected, else ``passed``."""
    statuses = {o.status for o in outcomes}
    return "failed" if "failed" in statuses else "rejected" if "rejected" in statuses else "passed"


def summarise(results: dict[int, list[Outcome]]) -> dict[str, Any]:
    """Counts over ``{seed: outcomes}``: architectures and pairs passed / rejected / failed,
    per method, and feature coverage of the passing architectures."""
    arch = Counter(architecture_status(v) for v in results.values())
    pairs = Counter(o.status for v in results.values() for o in v)
    per_method: dict[str, Counter] = {}
    for v in results.values():
        for o in v:
            per_method.setdefault(o.method, Counter())[o.status] += 1
    seconds = [sum(o.seconds for o in v) for v in results.values()]
    return {
        "architectures": len(results),
        "architectures_by_status": {k: arch.get(k, 0) for k in ("passed", "rejected", "failed")},
        "pairs": sum(pairs.values()),
        "pairs_by_status": {k: pairs.get(k, 0) for k in ("passed", "rejected", "failed")},
        "per_method": {m: {k: c.get(k, 0) for k in ("passed", "rejected", "failed")}
                       for m, c in per_method.items()},
        "seconds_per_architecture": (sum(seconds) / len(seconds)) if seconds else math.nan,
    }


__all__ = ["BLOCK_KINDS", "EXTENDED_KINDS", "FuzzNet", "HEAD_POOLS", "MERGE", "Outcome", "PropertyViolation",
           "RATIO_RANGE", "architecture_status", "build", "calibration_set", "check_architecture",
           "check_merge", "check_method", "describe", "draw_ratio", "random_clusters", "zero_removed_inputs",
           "random_spec", "spec_features", "summarise"]
