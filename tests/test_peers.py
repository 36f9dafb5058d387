"""Every Torch-Pruning peer (``tp:*``), at one budget on one trained model: a plain, smaller
model whose MACs, counted here by hand, meet the budget; each peer's criterion really decides
which channels go."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit import methods
from prunekit.engine.budget import count_macs_params

# the peers the README quotes; every one must run
PEERS = ["tp:l1", "tp:l2", "tp:taylor", "tp:bn-scale", "tp:random"]
TARGET = 0.5
OPTIONS = {"tp:taylor": {"calib_images": 64}}
DEAD = [3, 11]   # channels of layer1.0's internal group made dead (zero in every layer)
LOUD = [0, 5]    # channels of layer2.0's internal group: 10x the weights, a 1e-4 BN scale


def hand_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per image, counted with forward hooks in Torch-Pruning's convention: conv = output
    elements x in/groups x kh x kw (+ output elements for a bias); linear = in x out (+ out);
    affine BN = 2 per element; ReLU = 1 per element; pooling = 1 per input element."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total += out.numel() if m.bias is not None else 0
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * out.numel()
        elif isinstance(m, nn.ReLU):
            total += out.numel()
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AvgPool2d)):
            total += inp[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def _hooks_of(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
            or getattr(m, "_backward_pre_hooks", None)]


@pytest.fixture(scope="module")
def setup(_trained_resnet8, grating_data):
    """The trained ResNet-8 with two channels of ``layer1.0``'s internal group dead (conv rows,
    BN scale and shift, next conv's input columns all zero: no criterion but ``random`` may
    keep them while live channels go), two of ``layer2.0``'s with large weights but a tiny BN
    scale (magnitude keeps them, BN scale drops them), and each peer's result on it."""
    train, test = grating_data
    model = copy.deepcopy(_trained_resnet8)
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[DEAD] = 0
        block.bn1.weight[DEAD] = 0
        block.bn1.bias[DEAD] = 0
        block.conv2.weight[:, DEAD] = 0
        block = model.layer2[0]
        block.conv1.weight[LOUD] *= 10
        block.conv2.weight[:, LOUD] *= 10
        block.bn1.weight[LOUD] = 1e-4
    state = copy.deepcopy(model.state_dict())
    x = train.example_input(2)
    results = {p: prunekit.prune(model, x, method=p, target_macs=TARGET, data=(train, test),
                                 **OPTIONS.get(p, {}))
               for p in PEERS}
    return model, state, x, results


def test_every_peer_is_available() -> None:
    assert sorted(m for m in methods.available() if m.startswith("tp:")) == sorted(PEERS)


def test_hand_count_is_torch_pruning_count(setup) -> None:
    model, _, x, results = setup
    assert hand_macs(model, x) == count_macs_params(model, x[:1])[0]
    for res in results.values():
        assert hand_macs(res.model, x) == count_macs_params(res.model, x[:1])[0]


@pytest.mark.parametrize("peer", PEERS)
def test_peer_returns_a_plain_smaller_model_within_budget(setup, peer) -> None:
    model, state, x, results = setup
    res = results[peer]
    pruned = res.model
    macs0, macs1 = hand_macs(model, x), hand_macs(pruned, x)
    assert macs1 <= TARGET * macs0                               # the budget, counted by hand
    assert macs1 >= (TARGET - 0.1) * macs0                       # ... not overshot by far
    assert res.report["macs_fraction"] == pytest.approx(macs1 / macs0)
    params0 = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < params0
    # plain: the same class and module names, no hooks, masks, gradients or pruner attributes
    assert type(pruned) is type(model)
    assert [n for n, _ in pruned.named_modules()] == [n for n, _ in model.named_modules()]
    assert not _hooks_of(pruned)
    assert not any(b.dtype == torch.bool for b in pruned.state_dict().values())
    assert all(p.grad is None for p in pruned.parameters())
    assert not any("pruning" in k or "tp_" in k for k in vars(pruned))
    widths0 = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    widths1 = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(widths1[n] <= w for n, w in widths0.items()) and widths1 != widths0
    assert pruned.fc.out_features == 10                         # the classifier is never cut
    with torch.no_grad():
        out = pruned(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert torch.equal(copy.deepcopy(pruned)(x), out)
    # the caller's model is left alone
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("peer", ["tp:l1", "tp:l2", "tp:taylor", "tp:bn-scale"])
def test_peer_criterion_removes_dead_channels_first(setup, peer) -> None:
    """Dead channels score zero under magnitude, Taylor and BN-scale importance alike: each of
    these peers drops them before any live channel of the group."""
    model, _, _, results = setup
    before = model.layer1[0].bn1.num_features
    bn = results[peer].model.layer1[0].bn1
    assert bn.num_features <= before - len(DEAD)                # at least as many as are dead go
    assert int((bn.weight == 0).sum()) == 0, peer


def test_magnitude_and_bn_scale_peers_disagree_where_they_should(setup) -> None:
    """Large weights behind a tiny BN scale: kept by L1 / L2 magnitude, dropped first by BN
    scale (so the criteria are not interchangeable)."""
    _, _, _, results = setup
    for peer in ("tp:l1", "tp:l2"):
        assert int((results[peer].model.layer2[0].bn1.weight == 1e-4).sum()) == len(LOUD), peer
    assert int((results["tp:bn-scale"].model.layer2[0].bn1.weight == 1e-4).sum()) == 0


def test_random_peer_uses_its_seed(setup, grating_data) -> None:
    model, _, x, results = setup
    again = prunekit.prune(model, x, method="tp:random", target_macs=TARGET, seed=0)
    other = prunekit.prune(model, x, method="tp:random", target_macs=TARGET, seed=1)
    first = results["tp:random"].model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))
    same_shape = [k for k, v in first.state_dict().items() if v.shape == other.model.state_dict()[k].shape]
    assert any(not torch.equal(first.state_dict()[k], other.model.state_dict()[k]) for k in same_shape)


def test_taylor_peer_needs_data(setup) -> None:
    model, _, x, _ = setup
    with pytest.raises(prunekit.DataError):
        prunekit.prune(model, x, method="tp:taylor", target_macs=TARGET)
