"""Resume tests that can tell a resume from a seeded restart (library level).

A run interrupted after epoch ``k`` of ``N`` and resumed with the same seed ends with the
weights of an uninterrupted run whether it continued from the state file or silently started
again from scratch, so equality alone proves little. These tests therefore

* change the saved state after the interruption (a weight tensor x1.5, the momentum buffers
  negated, a BatchNorm running mean shifted, the stored epoch counter) and check that the
  resumed run FOLLOWS the change: it equals an uninterrupted run that got the same change in
  memory at the same epoch boundary (or, for the running mean, an exact prediction), and it
  differs from the unchanged run;
* count the epochs actually trained after the resume (``on_epoch_end`` fires once per epoch
  trained): resuming after epoch ``k`` of ``N`` trains exactly epochs ``k+1 .. N``;
* do the same for csgd's centripetal phase through ``prunekit.prune(..., method="csgd",
  state_path=..., resume=...)``.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

import pytest
import torch
from test_train import quick, same_state, synthetic, tiny_cnn

import prunekit
import prunekit.train as pk_train
from prunekit.data.dataset import ImageDataset
from prunekit.models import create
from prunekit.train import Hooks, fit
from prunekit.train import loop as train_loop


class Crash(Exception):
    pass


def cfg3():
    """3 epochs of 4 steps: small enough for a fraction of a second per run."""
    return quick(epochs=3, batch_size=16, max_steps_per_epoch=4)


def interrupted(path, k: int, cfg, data, model=None) -> None:
    """Run fit until the state file holds epoch ``k``, then crash (as a SIGKILL would)."""

    def crash_after_k(epoch, _model, _record):
        if epoch == k + 1:  # on_epoch_end runs before the state of this epoch is saved
            raise Crash

    with pytest.raises(Crash):
        fit(model if model is not None else tiny_cnn(), data, cfg, checkpoint_path=path,
            hooks=Hooks(on_epoch_end=crash_after_k))
    assert torch.load(path, weights_only=True)["epoch"] == k


def edit_state(path, change) -> None:
    """Load the state file as plain tensors, apply ``change(state)``, write it back."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def resume_counting(path, cfg, data, model=None):
    """Resume; return (model, result, the epochs on_epoch_end saw, i.e. the epochs trained)."""
    trained: list[int] = []
    model = model if model is not None else tiny_cnn(seed=123)  # init must come from the file
    result = fit(model, data, cfg, checkpoint_path=path, resume=True,
                 hooks=Hooks(on_epoch_end=lambda epoch, m, r: trained.append(epoch)))
    return model, result, trained


# ----------------------------------------------------------------------------- fit
@pytest.mark.parametrize("k", [1, 2])
def test_resume_after_epoch_k_trains_exactly_the_remaining_epochs(tmp_path, k):
    data, cfg = synthetic(96), cfg3()
    reference = tiny_cnn()
    full = fit(reference, data, cfg)
    path = tmp_path / "state.pt"
    interrupted(path, k, cfg, data)

    def mark_history(state):  # records of epochs 1..k must come from the file, not be retrained
        for record in state["history"]:
            record["from_file"] = True

    edit_state(path, mark_history)
    model, result, trained = resume_counting(path, cfg, data)
    assert trained == list(range(k + 1, 4))  # exactly N - k epochs: k+1 .. N
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.epochs_run == 3
    assert [r.get("from_file", False) for r in result.history] == [True] * k + [False] * (3 - k)
    assert same_state(model, reference)
    assert [r["loss"] for r in result.history[k:]] == [r["loss"] for r in full.history[k:]]


def _scale_first_conv_file(state):
    state["model"]["0.weight"].mul_(1.5)


def _scale_first_conv_live(model, _opt):
    with torch.no_grad():
        model[0].weight.mul_(1.5)


def _negate_momentum_file(state):
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert len(buffers) == 6  # conv w/b, bn w/b, linear w/b
    for b in buffers:
        b.mul_(-1)


def _negate_momentum_live(_model, opt):
    for s in opt.state.values():
        s["momentum_buffer"].mul_(-1)


@pytest.mark.parametrize("file_change, live_change", [
    (_scale_first_conv_file, _scale_first_conv_live),
    (_negate_momentum_file, _negate_momentum_live),
], ids=["weight-x1.5", "momentum-negated"])
def test_resume_follows_a_perturbed_state(tmp_path, monkeypatch, file_change, live_change):
    """The resumed run equals an uninterrupted run given the same change in memory at the end
    of epoch 1 (bit for bit), and differs from the unchanged run: it continued from the file."""
    data, cfg = synthetic(96), cfg3()
    plain = tiny_cnn()
    fit(plain, data, cfg)

    optimizers = []  # the reference run's optimizer, to change its momentum buffers in memory
    real_make = train_loop.make_optimizer

    def capture(*args, **kwargs):
        optimizers.append(real_make(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(train_loop, "make_optimizer", capture)

    def change_after_epoch_1(epoch, model, _record):
        if epoch == 1:
            live_change(model, optimizers[-1])

    expected = tiny_cnn()
    fit(expected, data, cfg, hooks=Hooks(on_epoch_end=change_after_epoch_1))
    monkeypatch.undo()
    assert not same_state(expected, plain)  # the change matters

    path = tmp_path / "state.pt"
    interrupted(path, 1, cfg, data)
    edit_state(path, file_change)
    model, result, trained = resume_counting(path, cfg, data)
    assert trained == [2, 3]
    assert same_state(model, expected)


def test_resume_follows_a_shifted_running_mean_exactly(tmp_path):
    """BatchNorm's running mean does not enter training-mode forward passes, so shifting the
    saved one by +1 leaves every parameter as in the uninterrupted run and leaves exactly
    0.9**8 of the shift in the final running mean (8 steps after the resume, momentum 0.1)."""
    data, cfg = synthetic(96), cfg3()
    plain = tiny_cnn()
    fit(plain, data, cfg)
    path = tmp_path / "state.pt"
    interrupted(path, 1, cfg, data)
    edit_state(path, lambda s: s["model"]["1.running_mean"].add_(1.0))
    model, _, trained = resume_counting(path, cfg, data)
    assert trained == [2, 3]
    got, ref = model.state_dict(), plain.state_dict()
    for key in ref:
        if key != "1.running_mean":
            assert torch.equal(got[key], ref[key]), key
    torch.testing.assert_close(got["1.running_mean"] - ref["1.running_mean"],
                               torch.full((6,), 0.9 ** 8), atol=1e-6, rtol=0)


def test_resume_follows_the_stored_epoch_counter(tmp_path):
    """The stored epoch, not the history length or anything else, says where to continue."""
    data, cfg = synthetic(96), cfg3()
    plain = tiny_cnn()
    fit(plain, data, cfg)
    path = tmp_path / "state.pt"
    interrupted(path, 1, cfg, data)
    edit_state(path, lambda s: s.update(epoch=2))  # claims epoch 2 done; weights are epoch 1's
    model, result, trained = resume_counting(path, cfg, data)
    assert trained == [3]
    assert [r["epoch"] for r in result.history] == [1, 3]
    assert not same_state(model, plain)  # one epoch of training fewer than the full run
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_resume_restores_the_global_rng(tmp_path):
    """Dropout draws from the global RNG, which the state file carries (``rng.torch``): replace
    it after epoch 1 with the state of ``torch.manual_seed(999)`` and the resumed run equals an
    uninterrupted run that called ``torch.manual_seed(999)`` at the end of epoch 1."""

    def dropout_cnn() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(2),
                                   torch.nn.Flatten(), torch.nn.Linear(24, 4))

    data, cfg = synthetic(96), cfg3()
    plain, expected = dropout_cnn(), dropout_cnn()
    fit(plain, data, cfg)

    def reseed_after_epoch_1(epoch, _model, _record):
        if epoch == 1:
            torch.manual_seed(999)

    fit(expected, data, cfg, hooks=Hooks(on_epoch_end=reseed_after_epoch_1))
    assert not same_state(expected, plain)  # the dropout masks depend on the global RNG

    path = tmp_path / "state.pt"
    interrupted(path, 1, cfg, data, model=dropout_cnn())
    reseeded = torch.manual_seed(999).get_state()
    edit_state(path, lambda s: s["rng"].update(torch=reseeded))
    model, _, trained = resume_counting(path, cfg, data, model=dropout_cnn())
    assert trained == [2, 3]
    assert same_state(model, expected)


# ----------------------------------------------------------------------------- csgd
def _calib(n: int = 32, size: int = 16) -> ImageDataset:
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 120, (n, 1, size, size), generator=g) + 30 * labels.view(-1, 1, 1, 1)
    return ImageDataset(images.to(torch.uint8), labels, mean=(0.5,), std=(0.25,), num_classes=4,
                        name="calib")


CSGD = {"centripetal_epochs": 3, "survey_samples": 16, "batch_size": 16, "max_steps_per_epoch": 2,
        "recalibrate_samples": 16}


def chain_epoch_hook(monkeypatch, on_epoch_end) -> None:
    """Make every ``prunekit.train.fit`` call (csgd's, the CLI's) also call
    ``on_epoch_end(epoch, model, record)`` after the caller's own hook, once per epoch trained.

    csgd and the CLI look ``fit`` up on :mod:`prunekit.train` when they run; a copy bound at
    import time elsewhere is patched too, so a refactor cannot silently bypass the hook."""
    real_fit = pk_train.fit

    def fit_with_hook(model, train_set, cfg=None, *, hooks=None, **kwargs):
        hooks = hooks if hooks is not None else Hooks()
        inner = hooks.on_epoch_end

        def chained(epoch, m, record):
            stop = bool(inner(epoch, m, record)) if inner is not None else False
            on_epoch_end(epoch, m, record)
            return stop

        return real_fit(model, train_set, cfg, hooks=dataclasses.replace(hooks, on_epoch_end=chained),
                        **kwargs)

    monkeypatch.setattr(pk_train, "fit", fit_with_hook)
    for module in ("prunekit.cli", "prunekit.methods.csgd"):
        if getattr(sys.modules.get(module), "fit", None) is real_fit:
            monkeypatch.setattr(f"{module}.fit", fit_with_hook)


def _csgd(monkeypatch, on_epoch_end=None, **options):
    """prunekit.prune with csgd on a fixed resnet8, ``on_epoch_end`` chained after csgd's hook."""
    with monkeypatch.context() as m:
        if on_epoch_end is not None:
            chain_epoch_hook(m, on_epoch_end)
        torch.manual_seed(0)
        model = create("resnet8", num_classes=4, in_channels=1).eval()
        x = torch.zeros(2, 1, 16, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "clusters did not converge" on this tiny schedule
            return prunekit.prune(model, x, method="csgd", ratio=0.5, data=_calib(), seed=3,
                                  evaluate=False, **CSGD, **options)


def _same_result(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return (a.plan.to_json() == b.plan.to_json() and sa.keys() == sb.keys()
            and all(torch.equal(sa[k], sb[k]) for k in sa))


def _interrupted_csgd(monkeypatch, path) -> None:
    def crash_in_epoch_2(epoch, _m, _r):
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        _csgd(monkeypatch, crash_in_epoch_2, state_path=str(path))
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_csgd_resume_trains_the_remaining_centripetal_epochs(tmp_path, monkeypatch):
    reference = _csgd(monkeypatch)
    path = tmp_path / "csgd.state"
    _interrupted_csgd(monkeypatch, path)
    trained: list[int] = []
    resumed = _csgd(monkeypatch, lambda epoch, m, r: trained.append(epoch), state_path=str(path),
                    resume=True)
    assert trained == [2, 3]
    assert _same_result(resumed, reference)
    ref_report, got_report = reference.report, resumed.report
    for key in ("centripetal_epochs_run", "distance_history", "max_intra_distance"):
        assert got_report[f"method_{key}"] == ref_report[f"method_{key}"], key
    assert got_report["method_centripetal_epochs_run"] == 3
    assert len(got_report["method_distance_history"]) == 3


def test_csgd_resume_follows_a_perturbed_state(tmp_path, monkeypatch):
    """Scale the first conv's weight in csgd's state file after epoch 1: the resumed run equals
    an uninterrupted csgd run whose network got the same change in memory after epoch 1."""
    plain = _csgd(monkeypatch)

    def scale_after_epoch_1(epoch, model, _record):
        if epoch == 1:
            with torch.no_grad():
                model.conv1.weight.mul_(1.5)

    expected = _csgd(monkeypatch, scale_after_epoch_1)
    assert not _same_result(expected, plain)

    path = tmp_path / "csgd.state"
    _interrupted_csgd(monkeypatch, path)
    edit_state(path, lambda s: s["model"]["conv1.weight"].mul_(1.5))
    trained: list[int] = []
    resumed = _csgd(monkeypatch, lambda epoch, m, r: trained.append(epoch), state_path=str(path),
                    resume=True)
    assert trained == [2, 3]
    assert _same_result(resumed, expected)
