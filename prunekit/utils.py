"""Small shared helpers: atomic file writes, seeding, devices, progress bars."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A failure inside the block leaves ``path`` untouched (an existing file survives) and
    removes the temporary file, so no half-written output is ever visible.
    """
    final = Path(path)
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory is not writable: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None,
             disable: bool | None = None, leave: bool = False) -> tqdm:
    """A tqdm progress bar on stderr; silent when stderr is not a terminal unless
    ``PRUNEKIT_PROGRESS=1``."""
    if disable is None:
        forced = os.environ.get("PRUNEKIT_PROGRESS")
        disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave,
                file=sys.stderr, dynamic_ncols=True)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a parameterless module)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, handles: Iterable = ()) -> Iterator[torch.nn.Module]:
    """Run a block with ``model`` in eval mode; afterwards remove ``handles`` (hook handles,
    the list may still grow inside the block) and restore the model's previous mode, also when
    the block raises. Gradients are left as they are: wrap in ``torch.no_grad()`` as needed."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def jsonable(value: Any) -> Any:
    """Strict-JSON form of ``value``: non-finite floats -> ``None``, tuples -> lists, tensors and
    NumPy scalars -> Python numbers, dataclasses -> dicts, anything else unknown -> ``str``."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return jsonable(value.item())
    if hasattr(value, "item") and callable(value.item):
        with contextlib.suppress(TypeError, ValueError):
            return jsonable(value.item())
    return str(value)
