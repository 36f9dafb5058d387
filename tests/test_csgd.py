"""Similarity-learning centripetal pruning (seed 000): survey, similarity, clustering,
centripetal training, exact merge, and the method end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import top1

import prunekit
from prunekit.engine import analyse, make_identical
from prunekit.errors import ConfigError, DataError
from prunekit.methods import csgd
from prunekit.models import create
from prunekit.testing import randomise_bn

torch.set_num_threads(1)




def _model(name: str, seed: int = 0, in_channels: int = 3, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = create(name, num_classes=10, in_channels=in_channels, **kw).eval()
    randomise_bn(m, torch.Generator().manual_seed(seed))
    return m


def _planted(c_per: list[int], n: int, noise: float, seed: int = 0):
    """Survey vectors of channels that are noisy affine copies of a few base signals,
    channel order shuffled; returns (vectors, true clusters)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((len(c_per), n))
    labels = np.repeat(np.arange(len(c_per)), c_per)
    perm = rng.permutation(len(labels))
    labels = labels[perm]
    scale = rng.uniform(0.5, 3.0, len(labels))[:, None]
    offset = rng.uniform(-2, 2, len(labels))[:, None]
    v = scale * (base[labels] + noise * rng.standard_normal((len(labels), n))) + offset
    truth = sorted((sorted(np.flatnonzero(labels == k).tolist()) for k in range(len(c_per))),
                   key=lambda c: c[0])
    return torch.from_numpy(v).float(), truth


def _naive_agglomerative(v: np.ndarray, n: int) -> list[list[int]]:
    """Seed 000 S2 literally: recompute every cluster mean and the full Pearson matrix at each
    merge; merge the most similar pair (row-major first on ties)."""
    clusters = [[i] for i in range(len(v))]
    while len(clusters) > n:
        means = np.stack([v[c].mean(0) for c in clusters])
        s = np.corrcoef(means)
        np.fill_diagonal(s, -np.inf)
        i, j = np.unravel_index(np.argmax(s), s.shape)
        a, b = min(i, j), max(i, j)
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return sorted((sorted(c) for c in clusters), key=lambda c: c[0])


def _is_partition(clusters, c: int, n: int) -> bool:
    flat = [i for cl in clusters for i in cl]
    return (len(clusters) == n and all(cl for cl in clusters) and sorted(flat) == list(range(c))
            and all(cl == sorted(cl) for cl in clusters)
            and [cl[0] for cl in clusters] == sorted(cl[0] for cl in clusters))


# ------------------------------------------------------------------------------ S1/S2 kernels
def test_similarity_equals_numpy_corrcoef():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((20, 50)) * rng.uniform(0.1, 10, (20, 1)) + rng.uniform(-5, 5, (20, 1))
    sim = csgd.similarity(torch.from_numpy(v))
    assert sim.shape == (20, 20) and sim.dtype == torch.float64
    np.testing.assert_allclose(sim.numpy(), np.corrcoef(v), atol=1e-12)
    # the document's raw formula (E[gp gq] - E[gp]E[gq]) / sqrt(Var gp Var gq) agrees too
    e = v @ v.T / v.shape[1] - np.outer(v.mean(1), v.mean(1))
    np.testing.assert_allclose(sim.numpy(), e / np.sqrt(np.outer(v.var(1), v.var(1))), atol=1e-9)


def test_similarity_of_constant_vectors_is_defined():
    v = np.random.default_rng(1).standard_normal((5, 30))
    v[1] = 0.0
    v[3] = 0.1  # constant, not exactly representable: round-off must not create a correlation
    sim = csgd.similarity(v)
    assert torch.isfinite(sim).all()
    assert torch.equal(torch.diagonal(sim), torch.ones(5, dtype=torch.float64))
    assert sim[1, [0, 2, 3, 4]].abs().max() == 0 and sim[3, [0, 1, 2, 4]].abs().max() == 0


def test_agglomerative_is_the_documented_algorithm():
    rng = np.random.default_rng(2)
    for _ in range(25):
        c, n = int(rng.integers(1, 30)), int(rng.integers(4, 24))
        v = rng.standard_normal((c, n))
        for k in {1, max(1, c // 3), max(1, c // 2), c}:
            assert csgd.cluster(v, k) == _naive_agglomerative(v, k)


@pytest.mark.parametrize("method", ["agglomerative", "kmeans"])
def test_cluster_recovers_planted_clusters(method):
    v, truth = _planted([5, 3, 7, 1, 4, 2], n=120, noise=0.05)
    assert csgd.cluster(v, len(truth), method) == truth


def test_even_split_is_consecutive_chunks():
    assert csgd.cluster(torch.randn(10, 4), 4, "even") == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert csgd.cluster(torch.randn(8, 4), 4, "even") == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("method", csgd.CLUSTERING_METHODS)
def test_cluster_always_returns_a_partition(method):
    rng = np.random.default_rng(3)
    for _ in range(12):
        c, n = int(rng.integers(1, 40)), int(rng.integers(2, 20))
        v = rng.standard_normal((c, n))
        if c > 3:  # duplicates and constant rows: ties and zero-variance vectors
            v[1] = v[0]
            v[2] = 7.0
            v[3] = 7.0
        for k in sorted({1, int(rng.integers(1, c + 1)), c}):
            assert _is_partition(csgd.cluster(v, k, method, seed=1), c, k), (c, k)


def test_merge_tree_replays_the_clustering():
    v = np.random.default_rng(4).standard_normal((25, 16))
    tree = csgd.merge_tree(v)
    assert tree.shape == (24, 4) and tree[-1, 3] == 25
    for n in (1, 7, 19, 25):  # cutting the tree after C - n merges gives cluster(v, n)
        parts: dict[int, list[int]] = {i: [i] for i in range(25)}
        for t, (a, b, _, _) in enumerate(tree[:25 - n]):
            parts[25 + t] = parts.pop(int(a)) + parts.pop(int(b))
        assert sorted(sorted(c) for c in parts.values()) == csgd.cluster(v, n)


def test_bad_cluster_counts_and_methods_raise():
    v = torch.randn(6, 10)
    for bad in (0, 7, -1, 2.5, True):
        with pytest.raises(ConfigError):
            csgd.cluster(v, bad)
    with pytest.raises(ConfigError):
        csgd.cluster(v, 3, "spectral")
    with pytest.raises(ConfigError):
        csgd.cluster(torch.randn(6), 3)


def test_agglomerative_scales_to_2048_channels():
    """2048 channels into 1280 clusters finishes (its speed: bench/selection_scaling.py) and
    yields a partition."""
    v = torch.randn(2048, 256)
    clusters = csgd.cluster(v, 1280)
    assert _is_partition(clusters, 2048, 1280)


# ------------------------------------------------------------------------------ S1 survey
def _manual_gap(model: nn.Module, module: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    maps = []
    h = module.register_forward_hook(lambda _m, _i, out: maps.append(out.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    m = maps[0].clamp_min(0) if relu else maps[0]
    return m.mean((2, 3)).t()  # [C, N]


@pytest.mark.parametrize("statistic", csgd.STATISTICS)
def test_survey_is_the_gap_of_each_producers_batchnorm(statistic):
    model = _model("resnet8", in_channels=1)
    x = torch.randn(37, 1, 12, 12)
    info = analyse(model, x[:2])
    stats: dict = {}
    raw = csgd.survey(model, x, samples=37, batch_size=8, info=info, standardize=False, stats=stats,
                      statistic=statistic)
    if statistic == "gap":  # the default
        torch.testing.assert_close(raw, csgd.survey(model, x, samples=37, info=info, standardize=False))
    relu = statistic == "relu-gap"
    # a plain layer: layer1.0.conv1 -> layer1.0.bn1, vectors [C, N]
    expect = _manual_gap(model, model.layer1[0].bn1, x, relu)
    torch.testing.assert_close(raw["layer1.0.conv1"], expect, atol=1e-5, rtol=1e-5)
    assert (raw["layer1.0.conv1"].min() >= 0) == relu
    # the coupled stage-1 trunk: stem and block output, each through its own BatchNorm
    trunk = info.group_of("conv1")
    assert raw[trunk.name].shape == (16, 37 * len(trunk.producers))
    torch.testing.assert_close(raw[trunk.name][:, :37], _manual_gap(model, model.bn1, x, relu),
                               atol=1e-5, rtol=1e-5)
    assert stats["bytes"] == sum(g.size * 37 * 4 * len(g.producers) for g in info.groups)
    assert stats["samples"] == 37
    # standardised blocks: the correlation of a coupled group is the mean per-producer correlation
    std = csgd.survey(model, x, samples=37, batch_size=16, info=info, statistic=statistic)[trunk.name]
    blocks = raw[trunk.name].double().split(37, dim=1)
    per_producer = torch.stack([csgd.similarity(b) for b in blocks]).mean(0)
    torch.testing.assert_close(csgd.similarity(std), per_producer, atol=1e-5, rtol=0)
    assert not model.training and not prunekit.engine.leftover_hooks(model)


def test_survey_without_a_following_batchnorm_hooks_the_producer():
    model = _model("densenet40", width=0.5)
    x = torch.randn(6, 3, 16, 16)
    info = analyse(model, x[:2])
    conv = info.groups[1].producers[0]  # a dense layer's conv: its BNs sit behind concatenations
    out = csgd.survey(model, x, layers=[conv.module], samples=6, info=info, standardize=False)
    assert list(out) == [info.groups[1].name]
    torch.testing.assert_close(out[info.groups[1].name], _manual_gap(model, conv.module, x))
    with pytest.raises(ConfigError, match="statistic"):
        csgd.survey(model, x, layers=[conv.module], samples=6, info=info, statistic="max")


# ------------------------------------------------------------------------------ S3
def test_centripetal_gradient_is_the_update_equation():
    torch.manual_seed(0)
    w, g = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    clusters = [[0, 2, 5], [1, 4]]  # 3 in no cluster
    out = csgd.centripetal_gradient(w, g, clusters, weight_decay=0.01, epsilon=0.3)
    for c in clusters:
        for j in c:
            expect = g[c].mean(0) + 0.01 * w[j] + 0.3 * (w[j] - w[c].mean(0))
            torch.testing.assert_close(out[j], expect)
    torch.testing.assert_close(out[3], g[3] + 0.01 * w[3])


def _clusters_for(info, ratio=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in info.groups:
        n = max(1, int(g.size * (1 - ratio)))
        perm = torch.randperm(g.size, generator=gen).tolist()
        out[g.name] = sorted((sorted(perm[i::n]) for i in range(n)), key=lambda c: c[0])
    return out


def test_transform_rewrites_every_per_channel_parameter():
    model = _model("resnet8", in_channels=1)
    x = torch.randn(4, 1, 12, 12)
    info = analyse(model, x)
    clusters = {"layer1.0.conv1": [[0, 3, 5], [1, 2]] + [[i] for i in (4, *range(6, 16))]}
    t = csgd.CentripetalTransform(info, clusters, weight_decay=1e-3, epsilon=0.2, bn_epsilon_scale=0.1)
    assert {id(p) for p in t.parameters()} == {id(model.layer1[0].conv1.weight),
                                               id(model.layer1[0].bn1.weight), id(model.layer1[0].bn1.bias)}
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    t(model)
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    c = [0, 3, 5]
    g0, w0 = before["layer1.0.conv1.weight"], conv.weight.detach()
    expect = g0[c].mean(0) + 1e-3 * w0[0] + 0.2 * (w0[0] - w0[c].mean(0))
    torch.testing.assert_close(conv.weight.grad[0], expect)
    gb, wb = before["layer1.0.bn1.weight"], bn.weight.detach()
    torch.testing.assert_close(bn.weight.grad[3], gb[c].mean() + 1e-3 * wb[3] + 0.02 * (wb[3] - wb[c].mean()))
    torch.testing.assert_close(conv.weight.grad[4], g0[4] + 1e-3 * w0[4])  # a singleton: plain decay
    for name, p in model.named_parameters():  # everything else untouched
        if not name.startswith(("layer1.0.conv1.", "layer1.0.bn1.")):
            assert torch.equal(p.grad, before[name]), name


def test_transform_sum_gradient_ablation():
    model = _model("resnet8", in_channels=1)
    x = torch.randn(4, 1, 12, 12)
    info = analyse(model, x)
    clusters = {"layer1.0.conv1": [[0, 3, 5], [1, 2]] + [[i] for i in (4, *range(6, 16))]}
    t = csgd.CentripetalTransform(info, clusters, weight_decay=0.0, epsilon=0.0, gradient="sum")
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    g0 = model.layer1[0].conv1.weight.grad.clone()
    t(model)
    g = model.layer1[0].conv1.weight.grad
    torch.testing.assert_close(g[3], g0[[0, 3, 5]].sum(0))
    torch.testing.assert_close(g[4], g0[4])
    with pytest.raises(prunekit.ConfigError):
        csgd.CentripetalTransform(info, clusters, 0.0, 0.0, gradient="median")


def test_centripetal_training_shrinks_intra_cluster_distance():
    model = _model("resnet8", in_channels=1)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))
    info = analyse(model, x[:2])
    clusters = _clusters_for(info)
    t = csgd.CentripetalTransform(info, clusters, weight_decay=5e-4, epsilon=3.0, bn_epsilon_scale=1.0)
    own = {id(p) for p in t.parameters()}
    rest = [p for p in model.parameters() if id(p) not in own]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": 5e-4},
                           {"params": t.parameters(), "weight_decay": 0.0}], lr=0.05, momentum=0.9)
    d0 = csgd.max_intra_distance(model, clusters, info=info)
    assert d0 == pytest.approx(t.max_distance())
    model.train()
    dists = []
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        t(model)
        opt.step()
        dists.append(t.max_distance())
    assert dists[-1] < 0.5 * d0 and dists[-1] < dists[0]


def test_centripetal_step_collapses_clusters_in_one_plain_step():
    """With plain SGD and lr * (eta + eps) = 1 the update puts every member on its centre."""
    model = _model("resnet8", in_channels=1)
    x = torch.randn(4, 1, 12, 12)
    info = analyse(model, x)
    by_group = _clusters_for(info)
    clusters = {g.producers[-1].module: by_group[g.name] for g in info.groups}
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    t = csgd.centripetal_step(model, clusters, weight_decay=0.0, epsilon=10.0, bn_epsilon_scale=1.0,
                              info=info)
    with torch.no_grad():
        for p in t.parameters():
            p -= 0.1 * p.grad
    assert t.max_distance() < 1e-5 < csgd.max_intra_distance(_model("resnet8", in_channels=1), by_group, x)


@pytest.mark.parametrize("name,kw", [("densenet40", {"width": 0.5}), ("mobilenetv2", {"width": 0.25})])
def test_trained_then_recalibrated_clusters_merge_exactly(name, kw):
    """S3 -> S4 without make_identical: a plain step with lr * eps = 1 puts every member of
    every producer and channel-wise layer (DenseNet's BNs behind concatenations, MobileNet's
    depthwise kernels) on its cluster centre; recalibrated BN statistics then agree too."""
    model = _model(name, **kw).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    info = analyse(model, x[:2])
    by_group = _clusters_for(info, ratio=0.5, seed=1)
    model.train()
    nn.functional.cross_entropy(model(x), torch.arange(8) % 10).backward()
    t = csgd.centripetal_step(model, by_group, weight_decay=0.0, epsilon=10.0, bn_epsilon_scale=1.0,
                              info=info)
    with torch.no_grad():
        for p in t.parameters():
            p -= 0.1 * p.grad
    assert t.max_distance() < 1e-9
    assert csgd.recalibrate_bn(model, x, samples=8, batch_size=4) == 8
    assert t.max_buffer_distance() < 1e-9
    model.eval()
    ref = model(x).detach()
    out = csgd.merge(model, x[:2], by_group, info=info)(x).detach()
    assert ((out - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 1e-5


def test_auto_epsilon_converges_on_the_planned_schedule():
    lrs = [0.01 * 0.5 * (1 + np.cos(np.pi * s / 1400)) for s in range(1400)]
    eps, ok = csgd.auto_epsilon(lrs, weight_decay=5e-4, bn_epsilon_scale=0.1, shrink=1e-7)
    assert ok and 0 < eps < 1 / 0.01
    k = np.array([5e-4 + 0.1 * eps, 5e-4 + 0.1 * eps * 0.9])
    reached = csgd._simulate_difference(np.array(lrs[:840]), k, 0.9, True)
    assert reached[0] <= 1e-7 < reached[1]  # the smallest epsilon that does it
    _, ok_short = csgd.auto_epsilon(lrs[:10], weight_decay=5e-4, bn_epsilon_scale=0.1, shrink=1e-7)
    assert not ok_short


# ------------------------------------------------------------------------------ S4
@pytest.mark.parametrize("name,kw", [("resnet20", {}), ("densenet40", {"width": 0.5}),
                                     ("mobilenetv2", {"width": 0.25})])
def test_merge_of_identical_members_is_exact(name, kw):
    model = _model(name, **kw).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    info = analyse(model, x)
    by_group = _clusters_for(info, ratio=0.375)
    for g in info.groups:
        make_identical(g, by_group[g.name])
    # keyed by a producing conv: the last producer of each (possibly coupled) group
    clusters = {g.producers[-1].module: by_group[g.name] for g in info.groups}
    assert csgd.max_intra_distance(model, clusters, x) == 0.0
    ref = model(x).detach()
    state = copy.deepcopy(model.state_dict())
    pruned = csgd.merge(model, x, clusters)
    out = pruned(x).detach()
    assert ((out - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 1e-5
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # original untouched


def test_merge_validates_its_clusters():
    model = _model("resnet20")
    x = torch.randn(2, 3, 16, 16)
    halves = [[i, i + 8] for i in range(8)]
    pairs = [[2 * i, 2 * i + 1] for i in range(8)]
    same = csgd.merge(model, x, {model.conv1: halves, "layer1.0.conv2": halves})  # coupled: agree
    assert same.conv1.out_channels == 8
    with pytest.raises(ConfigError, match="different clusterings"):
        csgd.merge(model, x, {model.conv1: halves, model.layer1[0].conv2: pairs})
    with pytest.raises(ConfigError, match="partition"):
        csgd.merge(model, x, {model.conv1: [[0, 1], [1, 2]]})
    with pytest.raises(ConfigError, match="does not produce"):
        csgd.merge(model, x, {model.bn1: halves})


# ------------------------------------------------------------------------------ the method
@pytest.fixture
def data(grating_data):
    """Learnable synthetic images (the method needs no real ones): 512 to train, 500 to test."""
    return grating_data


def test_end_to_end_merge_keeps_accuracy(trained_resnet8, data):
    """On a trained network: S3 makes each cluster's members identical and the merge then
    removes them without changing a single test prediction; accuracies in the report are the
    ones the returned model (and the S3-trained network) really have."""
    train, test = data
    model = trained_resnet8
    state = copy.deepcopy(model.state_dict())
    x = train.example_input(2)
    res = prunekit.prune(model, x, method="csgd", ratio=0.375, data=(train, test),
                         centripetal_epochs=1, batch_size=32, lr=0.05, bn_epsilon_scale=1.0,
                         survey_samples=256, recalibrate_samples=512)
    r = res.report
    assert r["method_converged"] and r["method_max_intra_distance"] < 1e-5
    assert r["acc_before"] == top1(model, test) >= 90.0
    assert r["method_acc_before_merge"] >= 50.0          # far above chance (10 %): not vacuous
    assert r["method_acc_after_merge"] == r["method_acc_before_merge"]
    assert r["acc_pruned"] == r["method_acc_after_merge"] == top1(res.model, test)
    assert r["method_train_epochs"] == 1
    assert r["macs_fraction"] < 0.5 and r["method_survey_bytes"] > 0
    info = analyse(model, x)
    for g in info.groups:
        assert sum(r["method_cluster_sizes"][g.name]) == g.size
        assert len(r["method_cluster_sizes"][g.name]) == g.size - round(0.375 * g.size)
    assert all(gp.merge for gp in res.plan)
    widths = {g.name: len(r["method_cluster_sizes"][g.name]) for g in info.groups}
    assert {gp.group: len(gp.keep) for gp in res.plan} == widths
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert res.model(x).shape == (2, 10)


def test_centripetal_distill_trains_s3_against_the_original(trained_resnet8, data, monkeypatch):
    """``centripetal_distill`` routes S3's loss through distillation from the unpruned model
    (called on every step, with the original's logits) and the merge stays exact."""
    import prunekit.train.loop as loop

    train, test = data
    model = trained_resnet8
    x = train.example_input(2)
    seen: list[tuple[int, ...]] = []
    real = loop.distillation_loss

    def spy(student, teacher, *args, **kwargs):
        assert not teacher.requires_grad  # the frozen original, not the student
        seen.append(tuple(teacher.shape))
        return real(student, teacher, *args, **kwargs)

    monkeypatch.setattr(loop, "distillation_loss", spy)
    kw = dict(ratio=0.375, data=(train, test), centripetal_epochs=1, batch_size=32, lr=0.05,
              survey_samples=64, recalibrate_samples=128)
    res = prunekit.prune(model, x, method="csgd", centripetal_distill=True, **kw)
    assert seen == [(32, 10)] * (len(train) // 32)
    r = res.report
    assert r["method_converged"]
    assert abs(r["method_acc_after_merge"] - r["method_acc_before_merge"]) <= 0.05
    plain = prunekit.prune(model, x, method="csgd", **kw)
    assert len(seen) == len(train) // 32  # no distillation without the option
    assert not torch.equal(res.model(x), plain.model(x))


def test_target_macs_and_warning_when_not_converged(data):
    train, _ = data
    model = _model("resnet8", in_channels=1)
    x = train.example_input(1)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = prunekit.prune(model, x, method="csgd", target_macs=0.5, data=train,
                             centripetal_epochs=0, survey_samples=64, clustering="kmeans")
    assert res.report["macs_fraction"] <= 0.5
    assert res.report["method_converged"] is False and res.report["method_train_epochs"] == 0


def test_method_options_are_validated(data):
    train, _ = data
    model = _model("resnet8", in_channels=1)
    x = train.example_input(1)
    for bad in ({"clustering": "spectral"}, {"epsilon": -1.0}, {"centripetal_epochs": 1.5},
                {"tolerance": 0}, {"centripetl_epochs": 2}, {"centripetal_distill": "yes"},
                {"survey_statistic": "max"}):
        with pytest.raises(ConfigError):
            prunekit.prune(model, x, method="csgd", ratio=0.5, data=train, **bad)
    with pytest.raises(DataError):
        prunekit.prune(model, x, method="csgd", ratio=0.5)
