"""Engine coverage of real architectures (issue #17, item 2), on small own-factory models.

The models are written here (in ``MODELS``, a factory file the CLI loads with ``--model
file.py:FUNC``): a ResNeXt bottleneck (grouped 3x3 conv), a RegNet-Y block (grouped conv and
squeeze-excitation), a ConvNeXt block (depthwise 7x7, permute to channel-last, LayerNorm,
Linear-GELU-Linear, layer scale, permute back, residual) with a channel-first LayerNorm and a
GroupNorm, a MobileNetV2 inverted residual (depthwise) and an Inception-style concatenation.
For each, several criteria through :func:`prunekit.prune`: a plain smaller model whose grouped
convs stay valid, the right output shape, finite outputs, MACs equal to a count by hand (the
counting rules of ``docs/engine.md``, applied here to every layer's recorded shapes), exact
equivalence where removing channels must not change the output, save -> load exact. Refusals
name every unsupported layer at once; ``ignored_layers`` takes types and name patterns;
``skip_unsupported`` prunes the rest.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import assert_one_line_error, import_file, run

import prunekit
from prunekit.criteria import score
from prunekit.data import ImageDataset
from prunekit.engine import GroupPlan, PruningPlan, analyse, apply_plan, make_identical
from prunekit.errors import ConfigError, UnsupportedLayerError

torch.set_num_threads(1)

MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    def conv_bn(cin, cout, k=1, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


    class Bottleneck(nn.Module):
        """ResNeXt: 1x1 -> grouped 3x3 -> 1x1 (+ SE for RegNet-Y), projection shortcut."""

        def __init__(self, cin, cout, width, groups, stride=1, se=0):
            super().__init__()
            self.conv1 = conv_bn(cin, width)
            self.conv2 = conv_bn(width, width, 3, stride, groups=groups)
            self.se = (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, se, 1), nn.ReLU(),
                                     nn.Conv2d(se, width, 1), nn.Sigmoid()) if se else None)
            self.conv3 = conv_bn(width, cout, act=False)
            self.short = (conv_bn(cin, cout, 1, stride, act=False)
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = self.conv2(self.conv1(x))
            if self.se is not None:
                y = y * self.se(y)
            return F.relu(self.conv3(y) + self.short(x))


    class GroupedNet(nn.Module):
        def __init__(self, num_classes=10, se=0, groups=(4, 2)):
            super().__init__()
            self.stem = conv_bn(3, 16, 3, 2)
            self.b1 = Bottleneck(16, 32, 16, groups[0], se=se)
            self.b2 = Bottleneck(32, 32, 16, groups[0], se=se)
            self.b3 = Bottleneck(32, 48, 24, groups[1], stride=2, se=se)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(48, num_classes)

        def forward(self, x):
            x = self.b3(self.b2(self.b1(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))


    def make_resnext(num_classes=10):
        return GroupedNet(num_classes)


    def make_regnet(num_classes=10):
        """RegNet-Y: group width 4 (groups = width / 4) and squeeze-excitation."""
        return GroupedNet(num_classes, se=4, groups=(4, 6))


    class LayerNorm2d(nn.LayerNorm):
        """A LayerNorm over the channels of an NCHW map (as ConvNeXt's downsampling)."""

        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


    class CNBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.pwconv1 = nn.Linear(dim, 4 * dim)
            self.pwconv2 = nn.Linear(4 * dim, dim)
            self.gamma = nn.Parameter(torch.full((dim,), 0.5))

        def forward(self, x):
            y = self.dwconv(x).permute(0, 2, 3, 1)
            y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
            return x + (self.gamma * y).permute(0, 3, 1, 2)


    class ConvNeXtNet(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, 2), LayerNorm2d(8, eps=1e-6))
            self.stage1 = CNBlock(8)
            self.down = nn.Sequential(LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2))
            self.stage2 = CNBlock(16)
            self.gn_conv = nn.Conv2d(16, 16, 3, padding=1)
            self.gn = nn.GroupNorm(4, 16)
            self.head_norm = nn.LayerNorm(16)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.stage2(self.down(self.stage1(self.stem(x))))
            x = x + F.relu(self.gn(self.gn_conv(x)))
            return self.fc(self.head_norm(x.mean((2, 3))))


    def make_convnext(num_classes=10):
        return ConvNeXtNet(num_classes)


    class Inverted(nn.Module):
        def __init__(self, c, e):
            super().__init__()
            self.expand = conv_bn(c, e)
            self.dw = conv_bn(e, e, 3, groups=e)
            self.project = conv_bn(e, c, act=False)

        def forward(self, x):
            return x + self.project(self.dw(self.expand(x)))


    class BranchNet(nn.Module):
        """MobileNetV2 inverted residuals, then an Inception-style concatenation."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = conv_bn(3, 12, 3, 2)
            self.inv1 = Inverted(12, 24)
            self.inv2 = Inverted(12, 36)
            self.a = conv_bn(12, 8)
            self.b = nn.Sequential(conv_bn(12, 6), conv_bn(6, 10, 3))
            self.mix = conv_bn(18, 16, 3, groups=1)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.inv2(self.inv1(self.stem(x)))
            x = self.mix(torch.cat([self.a(x), self.b(x)], 1))
            return self.fc(x.mean((2, 3)))


    def make_branches(num_classes=10):
        return BranchNet(num_classes)


    class Ghost(nn.Module):
        """GhostNet's module: half the channels from a conv, half a depthwise copy of them."""

        def __init__(self, cin, cout, act=True):
            super().__init__()
            self.primary = conv_bn(cin, cout // 2, act=act)
            self.cheap = conv_bn(cout // 2, cout // 2, 3, groups=cout // 2, act=act)

        def forward(self, x):
            y = self.primary(x)
            return torch.cat([y, self.cheap(y)], 1)


    class GhostNet(nn.Module):
        """Ghost bottlenecks on a residual trunk: trunk channels j and j + C/2 both come from
        channel j of every block's second ghost conv, so they are one unit."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = conv_bn(3, 8, 3, 2)
            self.g1 = nn.Sequential(Ghost(8, 24), Ghost(24, 16, act=False))
            self.short = conv_bn(8, 16, act=False)
            self.g2 = nn.Sequential(Ghost(16, 32), Ghost(32, 16, act=False))
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = self.g1(x) + self.short(x)
            x = self.g2(x) + x
            return self.fc(x.mean((2, 3)))


    def make_ghost(num_classes=10):
        return GhostNet(num_classes)
''')

FACTORIES = ("make_resnext", "make_regnet", "make_convnext", "make_branches", "make_ghost")


@pytest.fixture(scope="module")
def models_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("own") / "own_models.py"
    path.write_text(MODELS)
    return path


@pytest.fixture(scope="module")
def own(models_file):
    yield import_file(models_file, "own_models_for_coverage", register=True)
    sys.modules.pop("own_models_for_coverage", None)


def build(own, factory: str, seed: int = 0) -> nn.Module:
    """The model with random weights and non-trivial normalisation statistics."""
    torch.manual_seed(seed)
    model = getattr(own, factory)()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def images(n: int, seed: int = 0, size: int = 16) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g), mean=[0.5] * 3, std=[0.25] * 3,
                        num_classes=10, name="random")


def hand_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one image by the rules of docs/engine.md, from each layer's recorded shapes:
    conv = output positions x out x in/groups x kh x kw (+ out per position for a bias);
    linear = input elements x out (+ out for a bias); BN / GroupNorm / LayerNorm = 2 per input
    element (affine); ReLU = 1 per element; pooling = 1 per input element; other ops free.
    Like the counter, rules apply to these exact layer types (a LayerNorm2d subclass is free)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        i, kind = inp[0], type(m)
        if kind is nn.Conv2d:
            positions = out.shape[2] * out.shape[3]
            total += positions * m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            total += positions * m.out_channels if m.bias is not None else 0
        elif kind is nn.Linear:
            total += i.numel() * m.out_features + (m.out_features if m.bias is not None else 0)
        elif kind in (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm):
            total += 2 * i.numel()
        elif kind is nn.ReLU:
            total += out.numel()
        elif kind is nn.AdaptiveAvgPool2d:
            total += i.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_smaller_valid(model: nn.Module, res, x: torch.Tensor) -> nn.Module:
    """The pruned model of ``res``: fewer params and MACs (equal to the report and a hand count),
    valid grouped convs, a finite ``[4, 10]`` output on ``x``."""
    pruned = res.model.eval()
    r = res.report
    assert r["params_after"] == params(pruned) < params(model) == r["params_before"]
    assert r["macs_after"] == hand_macs(pruned, x) < hand_macs(model, x) == r["macs_before"]
    check_grouped_convs(pruned, model)
    y = out_of(pruned, x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    return pruned


def check_grouped_convs(model: nn.Module, original: nn.Module) -> None:
    """Every conv keeps its ``groups`` (depthwise: groups = channels) and a weight that fits."""
    before = dict(original.named_modules())
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        o = before[name]
        assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
        assert tuple(m.weight.shape) == (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        if o.groups == o.in_channels == o.out_channels:
            assert m.groups == m.in_channels == m.out_channels, name
        else:
            assert m.groups == o.groups, name


def out_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- the API, per model
CRITERIA = {"make_resnext": ("l1", "l2", "random", "bn-scale", "taylor", "apoz"),
            "make_regnet": ("l1", "random", "taylor", "mean-l2"),
            "make_convnext": ("l1", "l2", "random", "taylor", "apoz"),
            "make_branches": ("l1", "bn-scale", "taylor", "var-l2"),
            "make_ghost": ("l1", "bn-scale", "taylor")}
CASES = [(f, c) for f in FACTORIES for c in CRITERIA[f]]


@pytest.mark.parametrize(("factory", "criterion"), CASES)
def test_prunes_a_smaller_valid_model(own, factory, criterion, tmp_path):
    model = build(own, factory)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    data = images(24)
    options = {"steps": 1, "calib_images": 16} if criterion == "taylor" else {}
    res = prunekit.prune(model, x[:1], method=criterion, ratio=0.4, seed=3,
                         data=data if criterion not in ("l1", "l2", "random", "bn-scale") else None,
                         **options)
    pruned = check_smaller_valid(model, res, x)
    y = out_of(pruned, x)
    # save -> load into a fresh unpruned instance: the same outputs
    prunekit.save(pruned, tmp_path / "p.pt")
    loaded, _ = prunekit.load(tmp_path / "p.pt", model=getattr(own, factory)())
    torch.testing.assert_close(out_of(loaded.eval(), x), y, rtol=1e-5, atol=1e-5)


def test_grouped_conv_channels_are_pruned_at_the_same_position_in_every_group(own):
    """conv1 of a ResNeXt bottleneck feeds a conv with 4 groups of 4 channels: a unit is the
    channels {j, j+4, j+8, j+12}; every criterion scores the unit as the mean over them."""
    model = build(own, "make_resnext")
    x = torch.randn(1, 3, 16, 16)
    info = analyse(model, x)
    g = info.producer_group("b1.conv1.0")
    assert (g.size, g.channels, g.units) == (4, 16, [[j, j + 4, j + 8, j + 12] for j in range(4)])
    g2 = info.producer_group("b1.conv2.0")  # the grouped conv's own outputs: tied the same way
    assert g2.units == [[j, j + 4, j + 8, j + 12] for j in range(4)]
    scores = score(info, "l1")
    rows = model.b1.conv1[0].weight.detach().flatten(1).abs().sum(1).double()
    torch.testing.assert_close(scores[g.name], rows.view(4, 4).mean(0))
    # keep units 1 and 3 -> conv2 keeps input columns 1 and 3 of each group's block
    plan = PruningPlan([GroupPlan(g.name, 4, [1, 3])])
    pruned = apply_plan(model, x, plan)
    w0, w1 = model.b1.conv2[0].weight, pruned.b1.conv2[0].weight
    assert pruned.b1.conv1[0].out_channels == 8 and pruned.b1.conv2[0].in_channels == 8
    torch.testing.assert_close(w1, w0[:, [1, 3]])
    torch.testing.assert_close(pruned.b1.conv1[0].weight, model.b1.conv1[0].weight[1::2])


def test_round_to_counts_the_channels_of_tied_units(own):
    """round_to=8 on a group of 4 units of 4 channels keeps 2 or 4 units (8 or 16 channels), not
    3 (12 channels); every pruned conv of the ResNeXt keeps a multiple of 8 channels."""
    from prunekit.engine.budget import round_widths, unit_round_to

    model = build(own, "make_resnext")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    info = analyse(model, x[:1])
    g = info.producer_group("b1.conv1.0")
    assert (g.size, g.channels, unit_round_to(g, 8)) == (4, 16, 2)
    assert round_widths(info, {g.name: 3}, 8) == {g.name: 2}
    plain = next(h for h in info.groups if h.units is None and h.size > 8)
    assert unit_round_to(plain, 8) == 8
    res = prunekit.prune(model, x[:1], method="l1", ratio=0.3, round_to=8, evaluate=False)
    pruned = check_smaller_valid(model, res, x)
    before = dict(model.named_modules())
    changed = [(n, m.out_channels) for n, m in pruned.named_modules()
               if isinstance(m, nn.Conv2d) and m.out_channels != before[n].out_channels]
    assert changed and all(c % 8 == 0 for _, c in changed), changed


@pytest.mark.parametrize("factory", ["make_resnext", "make_regnet"])
def test_removing_silent_units_of_grouped_convs_changes_nothing(own, factory):
    """Units whose BatchNorm outputs are exactly zero (scale and shift 0, after ReLU) are the
    ones bn-scale removes; the pruned model's outputs equal the original's (float64)."""
    model = build(own, factory).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    info = analyse(model, x[:1])
    silent = {}
    with torch.no_grad():
        for g in info.groups:
            bns = [s for s in g.channelwise if isinstance(s.module, nn.BatchNorm2d)]
            if g.size < 2 or len(g.channelwise) != 1 or len(bns) != 1 or len(g.producers) > 1:
                continue  # one conv -> BN -> ReLU (a residual stream is not silenced this way)
            bn = bns[0]
            unit = g.size - 1
            bn.module.weight[bn.positions[unit]] = 0
            bn.module.bias[bn.positions[unit]] = -1.0  # ReLU(-1) = 0 whatever the input
            silent[g.name] = unit
    assert len(silent) >= 3 and any(analyse(model, x[:1]).producer_group(n).units
                                    for n in silent), silent
    before = out_of(model, x)
    plan = PruningPlan([GroupPlan(n, info.producer_group(n).size,
                                  [u for u in range(info.producer_group(n).size) if u != unit])
                        for n, unit in silent.items()])
    pruned = apply_plan(model, x[:1], plan)
    assert params(pruned) < params(model)
    check_grouped_convs(pruned, model)
    torch.testing.assert_close(out_of(pruned, x), before, rtol=1e-9, atol=1e-10)


def test_ghost_trunk_ties_a_channel_and_its_depthwise_copy(own):
    """In the GhostNet trunk, channel j of the second ghost conv reaches trunk channels j and
    j + 8 (the concatenation of it and its depthwise copy): they are one unit, named after the
    shortcut conv (the one producer that carries each trunk channel once). Removing units is
    exactly the original with those trunk channels' inputs zeroed in every consumer."""
    from prunekit.testing.fuzz import zero_removed_inputs

    model = build(own, "make_ghost").double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    info = analyse(model, x[:1])
    g = info.producer_group("short.0")
    assert g.name == "short.0" and g.units == [[j, j + 8] for j in range(8)]
    primary = next(s for s in g.producers if s.name == "g2.1.primary.0")
    assert primary.positions == {j: [j] for j in range(8)}
    reader = next(s for s in g.consumers if s.name == "g2.0.primary.0")
    assert reader.positions == {j: [j, j + 8] for j in range(8)}
    plan = PruningPlan([GroupPlan(g.name, 8, [0, 2, 3, 6, 7])])
    pruned = apply_plan(model, x[:1], plan)
    assert pruned.short[0].out_channels == 10 and pruned.g2[1].primary[0].out_channels == 5
    assert pruned.g2[1].cheap[0].groups == 5
    torch.testing.assert_close(out_of(pruned, x), out_of(zero_removed_inputs(model, x[:1], plan), x),
                               rtol=1e-9, atol=1e-10)


def test_convnext_hidden_width_and_empty_plan_are_exact(own):
    """In a ConvNeXt block, hidden units of pwconv1 whose rows and bias are zero give GELU(0)=0:
    removing them is exact; a plan that removes nothing changes nothing anywhere."""
    model = build(own, "make_convnext").double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.stage1.pwconv1.weight[[3, 17, 30]] = 0
        model.stage1.pwconv1.bias[[3, 17, 30]] = 0
    before = out_of(model, x)
    info = analyse(model, x[:1])
    names = [g.name for g in info.groups]
    assert "stage1.pwconv1" in names and "stem.0" in names
    stem = info.producer_group("stem.0")  # the residual stream: stem, layer scale, LayerNorms
    assert {p.name for p in stem.params} == {"stage1.gamma"}
    assert {s.name for s in stem.channelwise} >= {"stem.1", "stage1.dwconv", "stage1.norm", "down.0"}
    plan = PruningPlan([GroupPlan("stage1.pwconv1", 32, [c for c in range(32) if c not in (3, 17, 30)])])
    pruned = apply_plan(model, x[:1], plan)
    assert pruned.stage1.pwconv1.out_features == 29 and pruned.stage1.pwconv2.in_features == 29
    torch.testing.assert_close(out_of(pruned, x), before, rtol=1e-9, atol=1e-10)
    same = apply_plan(model, x[:1], PruningPlan([GroupPlan(g.name, g.size, list(range(g.size)))
                                                   for g in info.groups]))
    torch.testing.assert_close(out_of(same, x), before, rtol=0, atol=0)


def test_convnext_stream_pruning_cuts_every_layer_of_the_channels(own):
    """Pruning the residual stream of stage 1 removes the same channels from the stem conv, both
    LayerNorms, the depthwise conv, pwconv1's inputs, pwconv2's outputs and the layer scale."""
    model = build(own, "make_convnext")
    x = torch.randn(1, 3, 16, 16)
    keep = [0, 2, 3, 6, 7]
    pruned = apply_plan(model, x, PruningPlan([GroupPlan("stem.0", 8, keep)]))
    torch.testing.assert_close(pruned.stage1.gamma, model.stage1.gamma[keep])
    torch.testing.assert_close(pruned.stem[1].weight, model.stem[1].weight[keep])
    torch.testing.assert_close(pruned.stage1.norm.weight, model.stage1.norm.weight[keep])
    torch.testing.assert_close(pruned.stage1.pwconv1.weight, model.stage1.pwconv1.weight[:, keep])
    torch.testing.assert_close(pruned.stage1.pwconv2.weight, model.stage1.pwconv2.weight[keep])
    torch.testing.assert_close(pruned.down[1].weight, model.down[1].weight[:, keep])
    assert pruned.stage1.dwconv.groups == 5 and pruned.stage1.norm.normalized_shape == (5,)


def test_groupnorm_channels_are_tied_across_its_groups(own):
    model = build(own, "make_convnext")
    x = torch.randn(1, 3, 16, 16)
    g = analyse(model, x).producer_group("gn_conv")
    assert g.units == [[j, j + 4, j + 8, j + 12] for j in range(4)]
    pruned = apply_plan(model, x, PruningPlan([GroupPlan("gn_conv", 4, [0, 2])]))
    assert pruned.gn.num_channels == 8 and pruned.gn.num_groups == 4
    torch.testing.assert_close(pruned.gn.weight, model.gn.weight[[0, 2, 4, 6, 8, 10, 12, 14]])


@pytest.mark.parametrize("factory", FACTORIES)
def test_merging_identical_units_is_exact(own, factory):
    """centripetal SGD's merge on tied units: make clusters identical, merge, same outputs."""
    model = build(own, factory).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    info = analyse(model, x[:1])
    plans = []
    for g in info.groups:
        # a LayerNorm / GroupNorm normalises over the channels: a duplicate channel changes its
        # statistics, so merging is exact only in groups without one
        if g.size >= 2 and not any(isinstance(s.module, (nn.LayerNorm, nn.GroupNorm))
                                   for s in g.channelwise):
            clusters = [[0, g.size - 1]] + [[u] for u in range(1, g.size - 1)]
            make_identical(g, clusters)
            plans.append(GroupPlan(g.name, g.size, list(range(g.size - 1)), {0: [g.size - 1]}))
    before = out_of(model, x)
    merged = apply_plan(model, x[:1], PruningPlan(plans))
    assert params(merged) < params(model)
    torch.testing.assert_close(out_of(merged, x), before, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------- refusals and ignored layers
class ThreeUnsupported(nn.Module):
    """A conv stem, then three layers the engine cannot prune through: a channel shuffle, an
    nn.MultiheadAttention and a ViT-style attention written with reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pre_shuffle = nn.Conv2d(8, 8, 1)
        self.proj_in = nn.Conv2d(8, 16, 1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.pre_shuffle(torch.relu(self.stem(x))))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        t = self.proj_in(x).mean((2, 3)).unsqueeze(1)  # [N, 1, 16] tokens
        t = t + self.attn(t, t, t, need_weights=False)[0]
        q, k, v = self.qkv(t).reshape(n, 1, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        t = t + self.proj(a.transpose(1, 2).reshape(n, 1, 16))
        t = t + self.mlp(t)
        return self.fc(t[:, 0])


def test_refusal_names_every_unsupported_layer_at_once():
    torch.manual_seed(0)
    model, x = ThreeUnsupported().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedLayerError) as err:
        prunekit.prune(model, x, method="l1", ratio=0.5)
    msg = str(err.value)
    assert "\n" not in msg
    for layer in ("'pre_shuffle'", "'attn'", "'qkv'"):
        assert layer in msg, msg
    assert {r.layer for r in err.value.refused} >= {"pre_shuffle", "attn", "qkv"}
    assert "skip_unsupported" in msg


def test_skip_unsupported_prunes_everything_else_and_reports_it():
    torch.manual_seed(0)
    model, x = ThreeUnsupported().eval(), torch.randn(2, 3, 8, 8)
    res = prunekit.prune(model, x[:1], method="l1", ratio=0.5, skip_unsupported=True)
    left = {r["layer"] for r in res.report["skipped_unsupported"]}
    assert left >= {"pre_shuffle", "attn", "qkv"}
    pruned = res.model
    assert pruned.stem.out_channels == 4 and pruned.mlp[0].out_features == 16  # pruned
    assert pruned.pre_shuffle.out_channels == 8 and pruned.qkv.out_features == 48  # left
    assert out_of(pruned, x).shape == (2, 10)
    json.dumps(res.report["skipped_unsupported"])


def test_large_model_is_refused_from_its_weightless_twin(monkeypatch):
    """Over STRUCTURE_CHECK_PARAMS the refusal comes from a meta-device twin: the same layers,
    and the model's own weights never run a forward pass (no copy, no real computation)."""
    import prunekit.engine.graph as graph

    torch.manual_seed(0)
    model, x = ThreeUnsupported().eval(), torch.randn(1, 3, 8, 8)
    devices: list[str] = []

    def refused_layers() -> set[str]:
        devices.clear()
        hook = model.stem.register_forward_pre_hook(
            lambda m, args: devices.append(args[0].device.type))
        try:
            with pytest.raises(UnsupportedLayerError) as err:
                prunekit.prune(model, x, method="l1", ratio=0.5)
        finally:
            hook.remove()
        return {r.layer for r in err.value.refused}

    full = refused_layers()
    assert "cpu" in devices  # small: analysed on the model's copy, as before
    monkeypatch.setattr(graph, "STRUCTURE_CHECK_PARAMS", 0)
    assert refused_layers() == full and full >= {"pre_shuffle", "attn", "qkv"}
    assert devices and set(devices) == {"meta"}
    # skipping: the twin's list is the one reported, and the rest is pruned as before
    res = prunekit.prune(model, x, method="l1", ratio=0.5, skip_unsupported=True)
    assert {r["layer"] for r in res.report["skipped_unsupported"]} == full
    assert res.model.stem.out_channels == 4 and res.model.pre_shuffle.out_channels == 8


class DataDependent(nn.Module):
    """A forward pass that reads a value (cannot run on the meta device)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.detach().mean().item() > 1e9:  # never true; needs the value
            y = y * 0
        return self.fc(y.mean((2, 3)))


def test_structure_check_falls_back_when_the_twin_cannot_run(monkeypatch):
    import prunekit.engine.graph as graph

    monkeypatch.setattr(graph, "STRUCTURE_CHECK_PARAMS", 0)
    model, x = DataDependent().eval(), torch.randn(1, 3, 8, 8)
    assert graph.refusals_before_copy(model, x) is None
    assert prunekit.prune(model, x, method="l1", ratio=0.5).model.conv.out_channels == 4


def test_ignored_layers_take_types_and_patterns():
    torch.manual_seed(0)
    model, x = ThreeUnsupported().eval(), torch.randn(1, 3, 8, 8)
    res = prunekit.prune(model, x, method="l1", ratio=0.5,
                         ignored_layers=[nn.MultiheadAttention, "pre_*", "q?v", "proj_in"])
    assert res.report["skipped_unsupported"] == []
    assert res.model.stem.out_channels == 4 and res.model.mlp[0].out_features == 16
    assert res.model.pre_shuffle.out_channels == 8
    # module instances of the user's model (not of prunekit's working copy) are honoured
    res = prunekit.prune(model, x, method="l1", ratio=0.5,
                         ignored_layers=[model.attn, model.pre_shuffle, model.qkv, model.proj_in,
                                         model.stem])
    assert res.model.stem.out_channels == 8 and res.model.mlp[0].out_features == 16
    for bad, match in (("*.nothing", "matches no layer"), ("nope", "no layer named"),
                       (nn.LSTM, "no layer of type LSTM"), (nn.Conv2d(1, 1, 1), "not part of")):
        with pytest.raises(ConfigError, match=match):
            prunekit.prune(model, x, method="l1", ratio=0.5, ignored_layers=[bad])


class Exploding(nn.Module):
    """A conv whose output is reshaped to a long token axis and read by a Linear on it:
    Torch-Pruning maps each channel to 1024 flattened indices and back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.tokens = nn.Linear(16 * 32 * 32, 2, bias=False)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.tokens(torch.relu(self.conv(x)).flatten(1)))


def test_index_mapping_that_would_explode_is_refused_with_the_layer_name(monkeypatch):
    """A guard bounds Torch-Pruning's index lists: with a small budget the flatten mapping of
    conv -> Linear is refused naming the layers instead of growing without bound."""
    import prunekit.engine.graph as graph

    torch.manual_seed(0)
    model, x = Exploding().eval(), torch.randn(1, 3, 32, 32)
    real = graph.DependencyInfo._guard_index_mappings

    def small_budget(self):
        real(self)
        self._budget.per_call, self._budget.total = 1000, 10_000

    monkeypatch.setattr(graph.DependencyInfo, "_guard_index_mappings", small_budget)
    with pytest.raises(UnsupportedLayerError, match=r"'conv'.*index mapping.*would build 16,384"):
        _ = analyse(model, x).groups
    monkeypatch.undo()
    assert "conv" in [g.name for g in analyse(model, x).groups]  # within the real budget


def test_fast_flatten_mapping_builds_torch_prunings_index_sets():
    """The engine's flatten / reshape mapping (built without Torch-Pruning's per-index keyword
    construction) gives the same (index, root index) set as Torch-Pruning's own, both ways."""
    import random

    from torch_pruning._helpers import _HybridIndex
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    from prunekit.engine.graph import _flatten

    rng = random.Random(0)
    idxs = [_HybridIndex(idx=rng.randrange(200), root_idx=rng.choice([None, 3, 7])) for _ in range(300)]
    for stride in (1, 4, 49):
        for reverse in (False, True):
            fn = _FlattenIndexMapping(stride=stride, reverse=reverse)
            ours, theirs = _flatten(fn, idxs), fn(idxs)
            assert sorted(ours, key=repr) == sorted(theirs, key=repr)
            assert all(type(i) is _HybridIndex for i in ours)
            assert len(ours) == len(theirs)  # no duplicates lost or added


# ------------------------------------------------------------------------------- the CLI
def _rgb_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for label, cls in enumerate(("a", "b")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (32, 32, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8), mode="RGB").save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("factory", ["make_resnext", "make_convnext"])
def test_cli_prunes_an_own_factory_model(capsys, own, models_file, tmp_path, factory):
    model = build(own, factory)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    data = f"folder:{_rgb_folder(tmp_path / 'imgs')}"
    out = tmp_path / "p.pt"
    code, stdout, err = run(capsys, "prune", "--model", f"{models_file}:{factory}", "--weights",
                            weights, "--input-shape", "3,32,32", "--data", data, "--method", "l1",
                            "--ratio", "0.4", "--round-to", "1", "--out", out, "--device", "cpu",
                            "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["macs_after"] < report["macs_before"] and report["skipped_unsupported"] == []
    loaded, _ = prunekit.load(out, trust_code=True)
    res = prunekit.prune(model, torch.zeros(1, 3, 32, 32), method="l1", ratio=0.4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out_of(loaded.eval(), x), out_of(res.model.eval(), x),
                               rtol=1e-5, atol=1e-5)
    check_grouped_convs(loaded, model)


def test_cli_refuses_in_one_line_then_skips_unsupported(capsys, tmp_path):
    src = tmp_path / "three.py"
    src.write_text("import torch\nfrom torch import nn\n"
                   + textwrap.dedent(_source(ThreeUnsupported))
                   + "\n\ndef make():\n    return ThreeUnsupported()\n")
    data = f"folder:{_rgb_folder(tmp_path / 'imgs')}"
    argv = ["prune", "--model", f"{src}:make", "--input-shape", "3,8,8", "--data", data,
            "--method", "l1", "--ratio", "0.5", "--out", tmp_path / "p.pt", "--device", "cpu"]
    code, stdout, err = run(capsys, *argv)
    line = assert_one_line_error(code, stdout, err, match="3 unsupported layers")
    assert all(n in line for n in ("'pre_shuffle'", "'attn'", "'qkv'"))
    assert not (tmp_path / "p.pt").exists()
    code, stdout, err = run(capsys, *argv, "--skip-unsupported", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert {r["layer"] for r in report["skipped_unsupported"]} >= {"pre_shuffle", "attn", "qkv"}
    notes = [ln for ln in err.splitlines() if "--skip-unsupported" in ln]
    assert len(notes) == 1 and "attn" in notes[0]
    # the producers the error names, given to --ignore (a name, a pattern): nothing is refused
    groups = line.split("ignored_layers (")[1].split(")")[0].replace("'", "").split(", ")
    assert set(groups) == {"mlp.2", "pre_shuffle", "qkv"}
    code, stdout, err = run(capsys, *argv, "--ignore", "mlp.2,pre_*,q?v", "--json")
    assert code == 0, err
    assert json.loads(stdout)["skipped_unsupported"] == []


def _source(cls) -> str:
    import inspect

    return inspect.getsource(cls)


class _ShapeScale(nn.Module):
    """A layer scale that keeps its own ``shape`` for a ``view`` (as timm's PoolFormer does)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.shape)


class _ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.ls = _ShapeScale(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.ls(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_a_pruned_model_that_does_not_run_is_refused_naming_the_module() -> None:
    """The surgery cannot know a module's private channel count: the result is run once and a
    failure becomes a ModelError naming the innermost failing module, never a model that
    breaks later."""
    from prunekit.errors import ModelError

    torch.manual_seed(0)
    with pytest.raises(ModelError, match=r"does not run in 'ls' \(_ShapeScale\)"):
        prunekit.prune(_ScaledNet().eval(), torch.randn(2, 3, 8, 8), method="l1", ratio=0.5,
                       evaluate=False)
    res = prunekit.prune(_ScaledNet().eval(), torch.randn(2, 3, 8, 8), method="l1", ratio=0.5,
                         evaluate=False, ignored_layers=["conv1"])
    assert res.model.conv2.out_channels == 4
