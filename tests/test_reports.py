"""The accuracies prunekit reports (``prune``'s report, ``compare``'s results and checkpoints)
are those of the models it returns, checked with an evaluation written in the tests
(:func:`conftest.top1`), on a trained network where before / pruned / fine-tuned differ; and
the ``distill`` option of fine-tuning really distils from the original network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import gratings, top1

import prunekit
from prunekit.engine import apply_plan
from prunekit.report import compare
from prunekit.train import TrainConfig

TARGET = 0.5
FT = TrainConfig(lr=0.01, batch_size=64)


@pytest.fixture(scope="module")
def data(grating_data):
    """The usual training set; a test set with more pixel noise than the network was trained
    on, so that no accuracy is a trivial 100 % (the original scores about 94 %)."""
    return grating_data[0], gratings(500, seed=2, noise=70.0)


def test_prune_report_accuracies_are_the_models(trained_resnet8, data) -> None:
    train, test = data
    model = trained_resnet8
    state = copy.deepcopy(model.state_dict())
    x = train.example_input(1)
    res = prunekit.prune(model, x, method="l1", target_macs=TARGET, data=(train, test),
                         finetune_epochs=1, train_config=FT)
    r = res.report
    before_finetune = apply_plan(model, x, res.plan)   # l1's plan is the cut alone
    own = {"acc_before": top1(model, test), "acc_pruned": top1(before_finetune, test),
           "acc_final": top1(res.model, test)}
    assert {k: r[k] for k in own} == own
    # distinct on this set-up (about 94 %, then a cut that costs accuracy, then a partial
    # recovery), none of them 100 %, so a swapped, stale, rounded or copied number cannot pass
    assert 80 <= own["acc_before"] < 100 and len(set(own.values())) == 3, own
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # without fine-tuning the final accuracy is the pruned one, and the model is the cut one
    plain = prunekit.prune(model, x, method="l1", target_macs=TARGET, data=(train, test))
    assert plain.report["acc_final"] == plain.report["acc_pruned"] == own["acc_pruned"]
    assert top1(plain.model, test) == own["acc_pruned"]


def test_compare_accuracies_are_the_models(trained_resnet8, data, tmp_path) -> None:
    """``compare``'s accuracies: the original's, each method's right after pruning (the same
    method through ``prune`` without fine-tuning) and after fine-tuning (the checkpoint it
    wrote, loaded back)."""
    train, test = data
    model = trained_resnet8
    x = train.example_input(1)
    methods = ["l1", "tp:l1"]
    results = compare(model, x, methods, target_macs=TARGET, data=(train, test), finetune_epochs=1,
                      out_dir=tmp_path, onnx=False, progress=False, train_config=FT,
                      batch_sizes=(1,), latency_seconds=0.01, report=False)
    acc_before = top1(model, test)
    assert results["original"]["acc"] == acc_before
    for entry, method in zip(results["methods"], methods, strict=True):
        assert entry["status"] == "ok" and entry["method"] == method
        assert entry["acc_before"] == acc_before
        cut = prunekit.prune(model, x, method=method, target_macs=TARGET).model
        assert entry["acc_pruned"] == top1(cut, test)
        loaded, meta = prunekit.load(tmp_path / entry["checkpoint"]["file"])
        assert entry["acc_final"] == meta["test_acc"] == top1(loaded, test)
        assert entry["acc_final"] != entry["acc_pruned"]     # fine-tuning happened and counted


def test_distill_option_fine_tunes_against_the_original(trained_resnet8, data, monkeypatch) -> None:
    """``prune(..., distill=True)``: every fine-tuning step's loss is the distillation loss
    (checked by hand) with the ORIGINAL network's logits of that very batch as soft targets;
    without ``distill`` no distillation loss is computed."""
    import prunekit.train as train_pkg
    import prunekit.train.loop as loop

    train, test = data
    model = trained_resnet8
    x = train.example_input(1)
    seen = {"fit": [], "kd": [], "teacher_out": [], "student_out": []}
    real_fit, real_kd = train_pkg.fit, loop.distillation_loss

    def fit_spy(net, data, cfg, **kw):
        hooks = kw.get("hooks")
        teacher = hooks.teacher if hooks is not None else None
        seen["fit"].append({"net": net, "teacher": teacher, "cfg": copy.copy(cfg)})
        handles = [net.register_forward_hook(lambda m, a, out: seen["student_out"].append(out))]
        if teacher is not None:
            assert teacher is not net

            def check_teacher(m, args, out):
                assert not m.training
                with torch.no_grad():                         # the original's function
                    assert torch.allclose(out, model(args[0]), atol=1e-6)
                seen["teacher_out"].append(out)
            handles.append(teacher.register_forward_hook(check_teacher))
        try:
            return real_fit(net, data, cfg, **kw)
        finally:
            for h in handles:
                h.remove()

    def kd_spy(s, t, y, alpha, temperature, label_smoothing=0.0):
        assert t is seen["teacher_out"][-1] and s is seen["student_out"][-1]
        out = real_kd(s, t, y, alpha, temperature, label_smoothing)
        p = torch.softmax(t.double() / temperature, 1)
        log_q = torch.log_softmax(s.double() / temperature, 1)
        hand = (alpha * temperature ** 2 * (p * (p.log() - log_q)).sum(1).mean()
                + (1 - alpha) * F.cross_entropy(s.double(), y))
        assert float(out.detach()) == pytest.approx(float(hand.detach()), rel=1e-5, abs=1e-6)
        seen["kd"].append((alpha, temperature))
        return out

    monkeypatch.setattr(train_pkg, "fit", fit_spy)
    monkeypatch.setattr(loop, "distillation_loss", kd_spy)
    res = prunekit.prune(model, x, method="l1", target_macs=TARGET, data=(train, test),
                         finetune_epochs=1, distill=True, train_config=FT)
    assert len(seen["fit"]) == 1 and seen["fit"][0]["net"] is res.model
    steps = len(train) // FT.batch_size
    assert seen["kd"] == [(FT.distill_alpha, FT.distill_temperature)] * steps
    assert len(seen["teacher_out"]) == steps
    assert res.report["distill"] is True
    assert res.report["acc_final"] == top1(res.model, test)
    # the same run without distill: cross-entropy only
    seen["kd"].clear()
    prunekit.prune(model, x, method="l1", target_macs=TARGET, data=(train, test), finetune_epochs=1,
                   train_config=FT)
    assert seen["fit"][-1]["teacher"] is None and seen["kd"] == []
