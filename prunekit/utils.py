"""Small shared helpers: atomic file writes, seeding, devices, progress bars."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import tempfile
import time
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


#: notes waiting to be printed before the next progress line (see :func:`hold_line`)
_HELD: list[tuple[float, str]] = []


def hold_line(line: str | None = None, *, max_age: float = 2.0) -> None:
    """Queue a status ``line`` for a non-terminal stderr; it is printed just before the next
    progress line, or when a later line is queued more than ``max_age`` seconds after it
    (``hold_line()`` with no line only does that check). A command that fails early thus leaves
    only its error line; :func:`drop_held_lines` forgets what is queued."""
    now = time.monotonic()
    if line is not None:
        _HELD.append((now, line))
    if _HELD and now - _HELD[0][0] >= max_age:
        flush_held_lines()


def flush_held_lines(file: Any = None) -> None:
    """Print the queued lines (:func:`hold_line`) now."""
    while _HELD:
        _, line = _HELD.pop(0)
        print(line, file=file or sys.stderr, flush=True)


def drop_held_lines() -> None:
    """Forget the queued lines (the command ended: its result or its error says the rest)."""
    _HELD.clear()


def progress_mode() -> str:
    """How long work is shown on stderr: ``"bar"`` (a terminal: tqdm bars), ``"lines"`` (not a
    terminal, e.g. a log file or a CI job: plain lines at a bounded rate) or ``"off"``.

    ``PRUNEKIT_PROGRESS=0`` turns progress off; ``1`` (or unset) shows it, as bars on a terminal
    and as plain lines elsewhere.
    """
    forced = os.environ.get("PRUNEKIT_PROGRESS")
    if forced == "0":
        return "off"
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        tty = False
    return "bar" if tty else "lines"


class PlainProgress:
    """A progress reporter for a stderr that is not a terminal: plain ``prunekit: ...`` lines.

    A line is printed when at least ``step`` (10 %) more of the work is done since the last
    line and ``min_interval`` seconds have passed (``$PRUNEKIT_PROGRESS_INTERVAL``, else 2, or 0
    under ``PRUNEKIT_PROGRESS=1``),
    or every ``max_interval`` seconds when the
    total is unknown or progress is slow; a final line when the loop ends, if it ran for at least
    ``min_interval`` seconds. Short loops stay silent, so the rate is bounded in both lines per
    loop and lines per second. It offers the part of tqdm's interface prunekit uses (iteration,
    :meth:`update`, :meth:`set_postfix`, :meth:`close`, ``disable``).
    """

    disable = False

    def __init__(self, iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
                 *, step: float = 0.1, min_interval: float | None = None, max_interval: float = 10.0,
                 file: Any = None) -> None:
        if min_interval is None:  # PRUNEKIT_PROGRESS=1 asks for every loop, however short
            default = "0" if os.environ.get("PRUNEKIT_PROGRESS") == "1" else "2"
            try:
                min_interval = float(os.environ.get("PRUNEKIT_PROGRESS_INTERVAL", default))
            except ValueError:
                min_interval = float(default)
        self._clock = time.monotonic
        self.iterable = iterable
        self.desc = desc
        if total is None and iterable is not None:
            with contextlib.suppress(TypeError):
                total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.step, self.min_interval, self.max_interval = step, min_interval, max_interval
        self.file = file
        self.start = self._last_time = self._clock()
        self._last_n = 0
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        self.postfix = {**dict(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        since = now - self._last_time
        if self.total:
            advanced = (self.n - self._last_n) / self.total >= self.step
            due = (advanced and since >= self.min_interval) or since >= self.max_interval
            due = due and self.n < self.total  # the last step is reported by close()
        else:
            due = since >= self.max_interval
        if due:
            self._emit(now)

    def line(self, now: float | None = None) -> str:
        """The line this reporter would print now."""
        now = self._clock() if now is None else now
        parts = [f"prunekit: {self.desc}" if self.desc else "prunekit:"]
        if self.total:
            parts.append(f"{100 * self.n / self.total:.0f}% ({self.n}/{self.total})")
        else:
            parts.append(f"{self.n} done")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"[{now - self.start:.1f} s]")
        return " ".join(parts)

    def _emit(self, now: float) -> None:
        flush_held_lines(self.file)
        print(self.line(now), file=self.file or sys.stderr, flush=True)
        self._last_time, self._last_n = now, self.n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = self._clock()
        if now - self.start >= self.min_interval and self.n != self._last_n:
            self._emit(now)


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
             disable: bool | None = None, leave: bool = False) -> tqdm | PlainProgress:
    """Progress of a long loop on stderr: a tqdm bar on a terminal, plain lines at a bounded
    rate otherwise (:class:`PlainProgress`: a log file, a CI job, ``2>log``), nothing when
    ``disable`` or ``PRUNEKIT_PROGRESS=0`` (see :func:`progress_mode`)."""
    mode = "off" if disable else progress_mode()
    if mode == "lines":
        return PlainProgress(iterable, desc=desc, total=total)
    return tqdm(iterable, desc=desc, total=total, disable=mode == "off", leave=leave,
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
