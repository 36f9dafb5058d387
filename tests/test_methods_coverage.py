"""csgd and AutoPruner on grouped convs (ResNeXt, RegNet-Y) and ConvNeXt channel-last blocks.

The models are the own-factory models of ``tests/test_coverage.py`` (its ``MODELS`` source).
Each method gives a plain smaller model whose grouped convs stay valid, MACs equal to the count
by hand, finite outputs of the right shape; or, where a merge cannot be exact (every group
normalised by a LayerNorm / GroupNorm), a typed refusal naming the layers (one line, exit 2
from the CLI). The pieces that were wrong are checked against independent computations: the
csgd survey of a channel-last Linear (GAP over H, W of its ``[N, H, W, C]`` output) and
AutoPruner's gate folding into grouped and channel-last consumers (a constant gate applied at
every consumer's input by hooks here == the folded weights, 1e-5).
"""

from __future__ import annotations

import copy
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import assert_one_line_error, import_file, run
from test_coverage import (
    MODELS,
    _rgb_folder,
    build,
    check_smaller_valid,
    images,
    out_of,
)

import prunekit
from prunekit.engine import analyse
from prunekit.errors import UnsupportedLayerError
from prunekit.methods import csgd
from prunekit.methods.autopruner import fold_gates

torch.set_num_threads(1)

CSGD_FAST = {"centripetal_epochs": 1, "survey_samples": 16, "batch_size": 8,
             "max_steps_per_epoch": 2, "recalibrate_samples": 16}
AUTOPRUNER_FAST = {"epochs": 1, "batch_size": 8, "calib_images": 16}
MODELS_UNDER_TEST = ("make_resnext", "make_regnet", "make_convnext")


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "own_models.py"
    path.write_text(MODELS)
    yield import_file(path, "own_models_for_methods", register=True)
    sys.modules.pop("own_models_for_methods", None)


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _check_smaller_valid(model: nn.Module, res) -> nn.Module:
    return check_smaller_valid(model, res, _x())


# ------------------------------------------------------------------------------------- csgd
def test_csgd_survey_of_a_channel_last_linear_is_its_gap_over_height_and_width(own):
    model = build(own, "make_convnext")
    x = _x(6)
    info = analyse(model, x[:1])
    group = info.producer_group(model.stage1.pwconv1)
    seen = []
    handle = model.stage1.pwconv1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    vectors = csgd.survey(model, x, layers=[model.stage1.pwconv1], samples=6, batch_size=4,
                          info=info, standardize=False)
    handle.remove()
    # the last 6 outputs are the survey's (one traced pass comes first); [N, H, W, C] -> [C, N]
    expected = torch.cat(seen)[-6:].mean((1, 2)).t()
    assert vectors[group.name].shape == (32, 6)
    torch.testing.assert_close(vectors[group.name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", MODELS_UNDER_TEST)
def test_csgd_prunes_grouped_and_convnext_models(own, factory):
    model = build(own, factory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the tiny S3 does not converge
        res = prunekit.prune(model, _x(1), method="csgd", ratio=0.4, seed=0, data=images(24),
                             **CSGD_FAST)
    pruned = _check_smaller_valid(model, res)
    left_out = res.report["method_normalised_groups_left_out"]
    if factory != "make_convnext":
        assert left_out == []
        return
    # the residual streams (LayerNorm2d / LayerNorm / GroupNorm over their channels) are left
    # as they are; the MLP hidden widths (Linear -> GELU -> Linear, channel-last) are merged
    assert sorted(left_out) == ["down.1", "stem.0"]
    assert pruned.stem[0].out_channels == 8 and pruned.down[1].out_channels == 16
    assert pruned.gn.num_channels == 16 and pruned.head_norm.normalized_shape == (16,)
    assert pruned.stage1.pwconv1.out_features < 32 and pruned.stage2.pwconv1.out_features < 64


ALL_NORMALISED = textwrap.dedent('''
    import torch
    from torch import nn


    class Normed(nn.Module):
        """Its one prunable group is normalised over its channels by a GroupNorm."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gn = nn.GroupNorm(2, 8)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.gn(self.conv(x))).mean((2, 3)))


    def make_normed(num_classes=10):
        return Normed(num_classes)
''')


@pytest.mark.parametrize("method", ["csgd", "curl"])
def test_refuses_when_every_group_is_normalised(capsys, tmp_path, method):
    src = tmp_path / "normed.py"
    src.write_text(ALL_NORMALISED)
    mod = import_file(src, f"normed_for_{method}")
    options = CSGD_FAST if method == "csgd" else {"calib_images": 8}
    with pytest.raises(UnsupportedLayerError, match="'gn'"):
        prunekit.prune(mod.make_normed(), _x(1), method=method, ratio=0.4, data=images(8),
                       **options)
    out = tmp_path / "p.pt"
    code, stdout, err = run(capsys, "prune", "--model", f"{src}:make_normed", "--input-shape",
                            "3,32,32", "--data", f"folder:{_rgb_folder(tmp_path / 'imgs')}",
                            "--method", method, "--ratio", "0.4", "--out", out, "--device", "cpu")
    assert_one_line_error(code, stdout, err, "'gn'")
    assert not out.exists()


# ------------------------------------------------------------------------------- AutoPruner
def _gated_reference(model: nn.Module, info, values: dict[str, torch.Tensor]) -> list:
    """Pre-hooks multiplying every consumer's input channel by its gate value (the channel axis
    of a Linear on an ``[N, H, W, C]`` input is the last one)."""
    mults: dict[nn.Module, torch.Tensor] = {}
    for g in info.groups:
        for slot in g.consumers:
            m = slot.module
            size = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            mult = mults.setdefault(m, torch.ones(size))
            for unit, cols in slot.positions.items():
                for c in cols:
                    mult[c] = values[g.name][unit]

    def hook(m, args):
        x = args[0]
        axis = x.dim() - 1 if isinstance(m, nn.Linear) else 1
        shape = [1] * x.dim()
        shape[axis] = -1
        return (x * mults[m].view(shape), *args[1:])

    return [m.register_forward_pre_hook(hook) for m in mults]


@pytest.mark.parametrize("factory", MODELS_UNDER_TEST)
def test_fold_gates_into_grouped_and_channel_last_consumers_is_exact(own, factory):
    model = build(own, factory)
    x = _x()
    info = analyse(model, x[:1])
    assert any(s.module.groups > 1 and s.module.groups < s.module.in_channels
               for g in info.groups for s in g.consumers
               if isinstance(s.module, nn.Conv2d)) == (factory != "make_convnext")
    gen = torch.Generator().manual_seed(5)
    values = {g.name: torch.rand(g.size, generator=gen) * 0.9 + 0.1 for g in info.groups}
    reference = copy.deepcopy(model)
    handles = _gated_reference(reference, analyse(reference, x[:1]), values)
    expected = out_of(reference, x)
    for h in handles:
        h.remove()
    fold_gates(info, values)
    torch.testing.assert_close(out_of(model, x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_of(reference, x), expected)  # the gates do change the output


@pytest.mark.parametrize("factory", MODELS_UNDER_TEST)
def test_autopruner_prunes_grouped_and_convnext_models(own, factory):
    model = build(own, factory)
    res = prunekit.prune(model, _x(1), method="autopruner", ratio=0.4, seed=0, data=images(24),
                         **AUTOPRUNER_FAST)
    _check_smaller_valid(model, res)
    assert res.report["method_ungated_groups"] == []


# ------------------------------------------------------------------------------------- CURL
def _scored_info(model: nn.Module, x: torch.Tensor):
    """The model's groups without those normalised over their channels (CURL leaves them out)."""
    info = analyse(model, x[:1])
    left_out = [g.name for g in info.groups if g.normalised]
    return (analyse(model, x[:1], ignored_layers=left_out) if left_out else info), left_out


@pytest.mark.parametrize("factory", MODELS_UNDER_TEST)
def test_curl_kl_scores_are_the_kl_of_the_physically_pruned_model(own, factory):
    """S2 on grouped convs and channel-last Linears: the KL of zeroing channel ``c`` at every
    consumer's input (replicated batch, several channels per forward) == the KL of the model
    with ``c`` removed by the engine, computed here directly."""
    from prunekit.engine import GroupPlan, PruningPlan, apply_plan
    from prunekit.methods.curl import kl_scores

    model = build(own, factory).eval()
    with torch.no_grad():
        model.fc.weight.mul_(30)  # sharper outputs: KLs well above float32 round-off
    x = _x(6)
    info, left_out = _scored_info(model, x)
    assert (left_out == ["stem.0", "down.1"]) == (factory == "make_convnext")
    scores = kl_scores(info, x, calib_images=6, channel_batch=3, batch_size=4)
    assert set(scores) == {g.name for g in info.groups}
    log_p = torch.log_softmax(out_of(model, x).double(), 1)
    checked = []
    for g in info.groups:
        for c in (0, g.size - 1):
            keep = [u for u in range(g.size) if u != c]
            pruned = apply_plan(copy.deepcopy(model), x[:1], PruningPlan([GroupPlan(g.name, g.size, keep)]))
            log_q = torch.log_softmax(out_of(pruned.eval(), x).double(), 1)
            kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
            torch.testing.assert_close(scores[g.name][c], kl, rtol=1e-3, atol=1e-6)
            checked.append(float(kl))
    assert sorted(checked)[len(checked) // 2] > 1e-4  # the removals do change the output
    if factory == "make_convnext":  # the hidden widths of the channel-last MLPs are scored
        assert {"stage1.pwconv1", "stage2.pwconv1"} <= set(scores)


@pytest.mark.parametrize("factory", MODELS_UNDER_TEST)
def test_curl_prunes_grouped_and_convnext_models(own, factory):
    model = build(own, factory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = prunekit.prune(model, _x(1), method="curl", ratio=0.4, data=images(8),
                             calib_images=8, batch_size=8, steps=2)
    pruned = _check_smaller_valid(model, res)
    left_out = res.report["method_normalised_groups_left_out"]
    ours = [w for w in caught if "curl: left" in str(w.message)]
    if factory != "make_convnext":
        assert left_out == [] and ours == []
        return
    # one warning for both rounds, naming the norms; the residual streams are kept whole
    assert len(ours) == 1 and "'stem.1'" in str(ours[0].message) and "'gn'" in str(ours[0].message)
    assert left_out == ["stem.0", "down.1"]
    assert pruned.stem[0].out_channels == 8 and pruned.down[1].out_channels == 16
    assert pruned.gn.num_channels == 16 and pruned.head_norm.normalized_shape == (16,)
    assert pruned.stage1.pwconv1.out_features < 32 and pruned.stage2.pwconv1.out_features < 64
    assert pruned.stage1.pwconv2.in_features == pruned.stage1.pwconv1.out_features


def test_curl_meets_a_macs_target_on_convnext_from_the_mlp_widths_alone(own):
    model = build(own, "make_convnext")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the normalised groups left out
        res = prunekit.prune(model, _x(1), method="curl", target_macs=0.9, data=images(8),
                             calib_images=8, batch_size=8)
    _check_smaller_valid(model, res)
    r = res.report
    assert r["macs_after"] <= 0.9 * r["macs_before"]
    assert res.model.stem[0].out_channels == 8 and res.model.down[1].out_channels == 16


