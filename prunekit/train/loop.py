"""The training loop (:func:`fit`) and top-1 evaluation (:func:`evaluate`).

One optimizer step, in order: gather the global batch by index, augment it, take this
rank's slice, forward, loss (cross-entropy or distillation) + regulariser, backward (DDP
all-reduces the gradients), ``Hooks.grad_transform``, SGD step, ``Hooks.post_step``,
scheduler step. The
method-specific parts are the :class:`~prunekit.train.Hooks` callables.

Repeatability: the data order and the augmentation of epoch ``e`` come from CPU
generators seeded from ``(cfg.seed, e)``, so resuming from an epoch boundary replays exactly
what an uninterrupted run does, and every rank draws the same numbers for the whole global
batch (a multi-process run matches one process with the same global batch).

Data: an indexable dataset (an :class:`~prunekit.data.ImageDataset`, gathered in memory, or any
map-style dataset, collated -- in worker processes when it has ``num_workers``, as a streamed
image folder does) is read by index in the seeded order above. A ``DataLoader`` is iterated
as it is, once per epoch, in its own order and batch size (``cfg.batch_size`` does not apply);
exact resume and the global-batch sharding across ranks need an indexable dataset (see
:func:`fit`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..data.augment import random_crop_flip
from ..data.batches import _split, count, index_batches, is_empty, is_loader, labels_of
from ..errors import ConfigError, DataError, TrainingError
from ..utils import module_device, progress, resolve_device, seed_everything
from .config import Hooks, TrainConfig, TrainResult
from .distributed import DistContext
from .losses import distillation_loss
from .schedule import make_optimizer, make_scheduler
from .state import read_state, restore_state, save_state

Step = tuple[torch.Tensor, torch.Tensor, float]


def epoch_steps(train_set, batch_size: int, max_steps: int | None = None) -> int:
    """Optimizer steps :func:`fit` takes per epoch on ``train_set``.

    ``len(loader)`` batches for a ``DataLoader``; else ``N // min(batch_size, N)`` (at least 1;
    the incomplete last batch is dropped); at most ``max_steps`` either way.
    """
    if is_loader(train_set):
        try:
            steps = len(train_set)
        except TypeError:  # an IterableDataset without __len__
            if max_steps is None:
                raise ConfigError("a DataLoader without a length (an IterableDataset) needs "
                                  "max_steps_per_epoch to plan the schedule") from None
            steps = max_steps
    else:
        n = count(train_set)
        steps = max(1, n // max(1, min(batch_size, n)))
    return min(steps, max_steps) if max_steps is not None else steps


def fit(model: nn.Module, train_set, cfg: TrainConfig | None = None, *, test_set=None,
        hooks: Hooks | None = None, checkpoint_path: str | os.PathLike | None = None,
        resume: bool = False) -> TrainResult:
    """Train ``model`` in place with SGD; return the per-epoch history and final accuracy.

    Parameters
    ----------
    model : nn.Module
        Trained in place, moved to ``cfg.device``, left in ``eval()`` mode.
    train_set : ImageDataset, Dataset or DataLoader
        An :class:`~prunekit.data.ImageDataset` (batches gathered with ``.batch(idx)``), any
        map-style dataset of ``(image tensor, label)`` pairs (collated like a DataLoader; with
        ``num_workers`` worker processes when it has that attribute), or a ``DataLoader``
        iterated once per epoch (its batch size and order; ``cfg.batch_size`` is ignored and
        ``cfg.max_steps_per_epoch`` still caps the steps).
    cfg : TrainConfig, optional
        The run's settings (defaults: ``TrainConfig()``).
    test_set : dataset, optional
        Evaluated every ``cfg.eval_every`` epochs and at the end.
    hooks : Hooks, optional
        Gradient transform, regulariser, teacher, progress fields, epoch callback.
    checkpoint_path : path, optional
        Training-state file written atomically after every epoch (rank 0 only).
    resume : bool
        Continue from ``checkpoint_path``; the final weights equal an uninterrupted run's.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        A bad setting, ``resume`` without ``checkpoint_path``, or a ``DataLoader`` under
        ``torchrun`` whose sampler is not a ``DistributedSampler``.
    DataError
        An empty training set, or one without labels.
    CheckpointError
        ``resume`` with a missing, corrupt or mismatching state file.
    TrainingError
        A non-finite loss or weights; the last good state file is left as it was.

    Notes
    -----
    Launched by ``torchrun`` (``WORLD_SIZE > 1``), ``fit`` joins or creates the process group
    (gloo on CPU, NCCL on CUDA; one it creates lives until the process exits, so later fit
    calls reuse it), wraps the model in DistributedDataParallel and gives each rank
    an even slice of every global batch of ``cfg.batch_size`` samples (uneven slices are
    weighted so the gradient is still the global-batch mean). Statistics, evaluation and
    early-stop decisions are global and identical on every rank; only rank 0 writes the state
    file and shows progress; every rank reads it on resume (a shared file system). See
    :mod:`prunekit.train.distributed` for the BatchNorm caveat on CPU.

    With a ``DataLoader`` the order and batches are the loader's: a resume restarts at the
    saved epoch with the saved weights and optimizer, but replays the data exactly only if the
    loader's order is itself repeatable (seeded sampler); under ``torchrun`` each rank iterates
    its own loader, which must shard the data with a ``DistributedSampler`` (its epoch is set
    every epoch) -- the global-batch slicing above needs an indexable dataset.

    Examples
    --------
    >>> result = fit(model, train, TrainConfig(epochs=30), test_set=test)  # doctest: +SKIP
    >>> result.test_acc  # doctest: +SKIP
    93.4
    """
    cfg = cfg if cfg is not None else TrainConfig()
    cfg.validate()
    if resume and checkpoint_path is None:
        raise ConfigError("resume=True needs a checkpoint_path")
    if is_empty(train_set):
        raise DataError("the training set is empty")
    ctx = DistContext.setup(cfg.device)
    try:
        if is_loader(train_set):
            if ctx.world > 1 and not isinstance(train_set.sampler, DistributedSampler):
                raise ConfigError(
                    f"training from a DataLoader in {ctx.world} processes needs the loader to "
                    "shard the data itself (sampler=DistributedSampler(dataset)); or pass the "
                    "dataset, which fit shards by global batch")
        elif min(cfg.batch_size, count(train_set)) < ctx.world:
            raise ConfigError(f"batch_size {cfg.batch_size} (or the training set) is smaller than "
                              f"the {ctx.world} processes it is split across")
        run = _Run(model, train_set, test_set, cfg, hooks or Hooks(), ctx, checkpoint_path)
        return run.run(resume)
    finally:
        ctx.unwrap()


def evaluate(model: nn.Module, dataset, batch_size: int = 512,
             device: str | torch.device = "auto") -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, in percent (0..100).

    ``dataset``: an ImageDataset, a map-style dataset of ``(image, label)`` pairs or a
    ``DataLoader`` (iterated once, in its own batch size). ``device="auto"`` evaluates where
    the model's parameters already are; any other value moves the model there first. The
    model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dev = module_device(model) if device == "auto" else resolve_device(device)
    return _accuracy(model.to(dev), dataset, batch_size, DistContext(dev))


class _Run:
    """One call of :func:`fit`: the objects it builds and the loop over epochs."""

    def __init__(self, model: nn.Module, train_set, test_set, cfg: TrainConfig, hooks: Hooks,
                 ctx: DistContext, checkpoint_path: str | os.PathLike | None) -> None:
        seed_everything(cfg.seed)
        self.cfg, self.hooks, self.ctx, self.device = cfg, hooks, ctx, ctx.device
        self.train_set, self.test_set = train_set, test_set
        self.loader: DataLoader | None = train_set if is_loader(train_set) else None
        self.path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.model = model.to(self.device)
        self.net = ctx.wrap(self.model)
        self.teacher = hooks.teacher.to(self.device).eval() if hooks.teacher is not None else None
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.batch = min(cfg.batch_size, count(train_set)) if self.loader is None else None
        self.steps = epoch_steps(train_set, cfg.batch_size, cfg.max_steps_per_epoch)
        self.opt = make_optimizer(self.model, cfg, hooks.no_weight_decay)
        self.sched = make_scheduler(self.opt, cfg, self.steps)
        self.scaler = torch.amp.GradScaler("cuda" if self.device.type == "cuda" else "cpu",
                                           enabled=self.amp and self.device.type == "cuda")
        self.flush_every = 1 if self.device.type == "cpu" else 16  # host syncs on GPU are costly
        self.history: list[dict] = []

    def run(self, resume: bool) -> TrainResult:
        cfg, start, stopped = self.cfg, 0, False
        if resume:
            start, stopped = self._resume()
        for epoch in range(start, cfg.epochs):
            if stopped:
                break
            lr, t0 = self.opt.param_groups[0]["lr"], time.perf_counter()
            loss, acc = self._train_epoch(epoch)
            record = {"epoch": epoch + 1, "loss": loss, "train_acc": acc, "test_acc": None,
                      "lr": lr, "seconds": time.perf_counter() - t0}
            self.ctx.sync_buffers(self.model)  # all ranks now hold rank 0's model
            if self.test_set is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
                record["test_acc"] = self._test()
            record.update(self._postfix())
            self.history.append(record)
            if self.hooks.on_epoch_end is not None:
                stopped = bool(self.hooks.on_epoch_end(epoch + 1, self.model, record))
            stopped = self.ctx.rank0_flag(stopped)
            self._save(epoch + 1, stopped)
        last = self.history[-1] if self.history else {}
        test_acc = last.get("test_acc")
        if self.test_set is not None and test_acc is None:
            test_acc = self._test()
        self.model.eval()
        per_epoch = float(np.mean([r["seconds"] for r in self.history])) if self.history else 0.0
        return TrainResult(history=self.history, test_acc=test_acc, epochs_run=len(self.history),
                           stopped_early=stopped, seconds_per_epoch=per_epoch)

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass; returns (mean loss, train accuracy %) over all ranks' samples."""
        aug = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch, 1))
        batches = self._loader_steps(epoch, aug) if self.loader is not None else self._index_steps(epoch, aug)
        self.net.train()
        totals, pending = torch.zeros(3, dtype=torch.float64), []
        bar = progress(range(self.steps), desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                       disable=None if self.ctx.is_main else True)
        step = -1
        for step in bar:
            item = next(batches, None)
            if item is None:  # a loader that yielded fewer batches than its length
                break
            pending.append(self._step(*item))
            if len(pending) == self.flush_every or step + 1 == self.steps:
                totals += self._flush(pending, epoch, step + 1 - len(pending))
                pending = []
                if not bar.disable:
                    self._show(bar, totals)
        if pending:
            totals += self._flush(pending, epoch, step - len(pending))
        bar.close()
        batches.close()  # stops a loader's workers when the epoch ends early
        if totals[2] == 0:
            raise DataError("the training data yielded no batch")
        return float(totals[0] / totals[2]), float(100 * totals[1] / totals[2])

    def _index_steps(self, epoch: int, aug: torch.Generator):
        """This epoch's batches of an indexable dataset, in the seeded global order."""
        order = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, epoch, 0))
        perm = torch.randperm(count(self.train_set), generator=order)
        idx = [perm[step * self.batch:(step + 1) * self.batch] for step in range(self.steps)]
        for (x, y), i in zip(index_batches(self.train_set, idx), idx, strict=True):
            yield self._local_batch(x, labels_of(y, "training"), len(i), aug)

    def _loader_steps(self, epoch: int, aug: torch.Generator):
        """This epoch's batches of a DataLoader, as it yields them (this rank's own shard)."""
        sampler = self.loader.sampler
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
        for item in self.loader:
            x, y = _split(item)
            y = labels_of(y, "training")
            if self.cfg.augment:
                x = random_crop_flip(x.to(self.device, non_blocking=True), self.cfg.padding,
                                     self.cfg.flip, generator=aug)
            yield x.to(self.device, non_blocking=True), y.to(self.device), 1.0

    def _show(self, bar, totals: torch.Tensor) -> None:
        loss, acc, lr = totals[0] / totals[2], 100 * totals[1] / totals[2], self.opt.param_groups[0]["lr"]
        fields = {"loss": f"{loss:.4f}", "acc": f"{acc:.2f}", "lr": f"{lr:.4g}", **self._postfix()}
        bar.set_postfix(fields, refresh=False)

    def _local_batch(self, x: torch.Tensor, y: torch.Tensor, n: int, aug: torch.Generator) -> Step:
        """Augment the gathered GLOBAL batch of ``n`` samples, then keep this rank's slice."""
        if self.cfg.augment:
            if self.ctx.world == 1:
                x = x.to(self.device, non_blocking=True)  # augment on the device
            x = random_crop_flip(x, self.cfg.padding, self.cfg.flip, generator=aug)
        lo, hi = self.ctx.shard(n)
        weight = (hi - lo) * self.ctx.world / n  # 1.0 when the split is even
        return x[lo:hi].to(self.device, non_blocking=True), y[lo:hi].to(self.device), weight

    def _step(self, x: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
        """Forward, backward, hooks and optimizer step; returns [loss*n, correct, n]."""
        cfg, hooks = self.cfg, self.hooks
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.net(x)
            if self.teacher is not None:
                with torch.no_grad():
                    soft = self.teacher(x)
                loss = distillation_loss(logits, soft, y, cfg.distill_alpha, cfg.distill_temperature,
                                         cfg.label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        # Scaling by the rank's share makes DDP's gradient mean equal the global batch mean.
        total = loss * weight if weight != 1.0 else loss
        reg = None
        if hooks.regularizer is not None:
            reg = torch.as_tensor(hooks.regularizer(self.model), device=self.device)
            total = total + reg
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if hooks.grad_transform is not None:
            self.scaler.unscale_(self.opt)
            hooks.grad_transform(self.model)
        self.scaler.step(self.opt)
        self.scaler.update()
        if hooks.post_step is not None:
            with torch.no_grad():
                hooks.post_step(self.model)
        self.sched.step()
        shown = loss.detach().float() + (reg.detach().float() if reg is not None else 0.0)
        n = torch.full((), float(len(y)), device=self.device)
        return torch.stack([shown * n, (logits.detach().argmax(1) == y).sum().float(), n])

    def _flush(self, pending: list[torch.Tensor], epoch: int, first_step: int) -> torch.Tensor:
        """Sum the pending steps' statistics over ranks; raise on a non-finite loss or weight."""
        rows = self.ctx.sum_(torch.stack(pending)).double().cpu()
        bad = (~torch.isfinite(rows[:, 0])).nonzero()
        if len(bad):
            self._diverged("loss", epoch, first_step + int(bad[0]))
        # DDP keeps the parameters identical on every rank, so this local check agrees everywhere.
        weights = torch.stack([p.detach().float().sum() for p in self.model.parameters()]).sum()
        if not bool(torch.isfinite(weights)):
            self._diverged("weights after the optimizer step", epoch, first_step + len(pending) - 1)
        return rows.sum(0)

    def _diverged(self, what: str, epoch: int, step: int) -> None:
        if self.path is not None and self.path.is_file():
            kept = f"last good checkpoint kept at {self.path}"
        else:
            kept = "no good checkpoint was written" if self.path else "no checkpoint_path was given"
        raise TrainingError(f"non-finite {what} at epoch {epoch + 1} step {step + 1}; {kept}")

    def _test(self) -> float:
        return _accuracy(self.model, self.test_set, self.cfg.eval_batch_size, self.ctx)

    def _postfix(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.hooks.postfix().items()} if self.hooks.postfix else {}

    def _save(self, epoch: int, stopped: bool) -> None:
        if self.path is not None and self.ctx.is_main:
            save_state(self.path, model=self.model, optimizer=self.opt, scheduler=self.sched,
                       scaler=self.scaler, epoch=epoch, history=self.history, cfg=self.cfg,
                       stopped_early=stopped)

    def _resume(self) -> tuple[int, bool]:
        state = read_state(self.path)
        restore_state(state, self.path, model=self.model, optimizer=self.opt, scheduler=self.sched,
                      scaler=self.scaler, cfg=self.cfg)
        self.history = list(state.get("history", []))
        return int(state["epoch"]), bool(state.get("stopped_early", False))


def _accuracy(model: nn.Module, dataset, batch_size: int, ctx: DistContext) -> float:
    """Top-1 accuracy in percent; under DDP each rank scores a shard and the counts are summed
    (a DataLoader: summed when its sampler is a DistributedSampler, else every rank scores all
    of it)."""
    if dataset is None:
        raise DataError("cannot evaluate without a dataset")
    summed = True
    if is_loader(dataset):
        batches = (_split(item) for item in dataset)
        summed = isinstance(dataset.sampler, DistributedSampler)
    else:
        lo, hi = ctx.shard(count(dataset))
        batches = index_batches(dataset, list(torch.arange(lo, hi).split(batch_size)))
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [correct, seen]
    with torch.no_grad():
        for x, y in batches:
            y = labels_of(y, "evaluation").to(ctx.device)
            counts[0] += (model(x.to(ctx.device, non_blocking=True)).argmax(1) == y).sum()
            counts[1] += len(y)
    model.train(was_training)
    correct, seen = (ctx.sum_(counts) if summed else counts).tolist()
    if seen == 0:
        raise DataError("cannot evaluate on an empty dataset")
    return 100.0 * correct / seen


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch, stream): 0 data order, 1 augmentation."""
    sequence = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, stream])
    return int(sequence.generate_state(1, np.uint64)[0] >> 1)
