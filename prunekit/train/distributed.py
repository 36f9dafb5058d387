"""torchrun support: process group, DDP wrapping, and the collectives the trainer needs.

:func:`prunekit.train.fit` launched by ``torchrun --nproc_per_node N`` (environment variable
``WORLD_SIZE > 1``) creates the process group itself (gloo on CPU, NCCL on CUDA) unless the
caller already did. A group that fit created is kept for the rest of the process and
destroyed at interpreter exit, never after one fit: methods call fit several times (train,
then fine-tune; prune/fine-tune loops), and re-creating the default group under torchrun
re-reads the previous group's stale rendezvous keys from the launcher's store and hangs
(observed with torch 2.13 and gloo). A group the caller created is never destroyed here.

BatchNorm caveat: under DDP every rank normalises with the statistics of its own slice of
the global batch. On CUDA the model's BatchNorm layers are swapped for
:class:`torch.nn.SyncBatchNorm` for the run (and swapped back afterwards), so the statistics
are those of the global batch, as in one process. gloo has no SyncBatchNorm, so on CPU a
multi-process run of a BatchNorm model is close to, but not bit-for-bit, the single-process
run; models without BatchNorm match it up to float rounding.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from ..utils import resolve_device


@dataclass
class DistContext:
    """Where this process trains and how it fits in the process group (``world == 1``: alone)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    created: bool = False  # this process group was created by setup()
    _swapped: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    @classmethod
    def setup(cls, device: str | torch.device = "auto") -> DistContext:
        """Resolve the device and join (or create) the process group when under torchrun."""
        dev = resolve_device(device)
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        joined = dist.is_available() and dist.is_initialized()
        if env_world <= 1 and not joined:
            return cls(dev)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not joined:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            atexit.register(_destroy_at_exit)
        return cls(dev, dist.get_rank(), dist.get_world_size(), created=not joined)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself alone; in a group, SyncBatchNorm (CUDA) and DDP around it."""
        if self.world == 1:
            return model
        if self.device.type == "cuda":
            self._swap_in_sync_bn(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def unwrap(self) -> None:
        """Put the model's original BatchNorm modules back (with the trained state)."""
        for parent, name, original in reversed(self._swapped):
            original.load_state_dict(getattr(parent, name).state_dict())
            setattr(parent, name, original)
        self._swapped.clear()

    def _swap_in_sync_bn(self, model: nn.Module) -> None:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                    self._swapped.append((parent, name, child))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``t`` in place across ranks; a no-op alone."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def rank0_flag(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank (so all ranks take the same branch)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.world > 1:
            for b in model.buffers():
                dist.broadcast(b, 0)

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's ``[lo, hi)`` slice of ``n`` items split as evenly as possible."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)


def _destroy_at_exit() -> None:
    """Leave the group together: a barrier first, so no rank tears down its gloo pairs while a
    peer still talks to them (a rank that exits early makes the other abort with
    ``terminate called without an active exception``)."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":  # a bounded wait: a peer that died must not hang exit
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            dist.barrier()
    except RuntimeError:  # a peer is already gone: nothing left to wait for
        pass
    dist.destroy_process_group()
