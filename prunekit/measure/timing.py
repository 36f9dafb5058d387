"""Wall-clock latency of eval-mode inference, measured rather than inferred from MACs.

Every timing runs the model in eval mode under :func:`torch.inference_mode` after a few
warm-up calls. The number of timed repeats adapts to the model: at least ``min_repeats``,
then more until ``max_seconds`` of timed work has accumulated (or ``max_repeats``), so a tiny
net is timed hundreds of times and a large one a handful of times in about the same wall time.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..utils import module_device
from .deploy import fold_batchnorm

__all__ = ["LAYOUTS", "latency", "compare_latency", "batched_input", "time_calls", "summarize"]

#: Settings the profiler times: plain contiguous NCHW; NHWC via channels_last; and "deploy":
#: channels_last with every conv -> BatchNorm pair folded into one conv
#: (:func:`prunekit.measure.deploy.fold_batchnorm`), as inference runtimes run a network.
LAYOUTS = ("nchw", "channels_last", "deploy")


def batched_input(example_input: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A contiguous batch of ``batch_size`` samples made by cycling ``example_input``.

    Parameters
    ----------
    example_input : Tensor [N, ...] or [C, H, W]
        One or more samples; a 3-D tensor is taken as a single image.
    batch_size : int
        Samples in the returned batch (>= 1).
    """
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError(f"latency needs one example input tensor, got {type(example_input).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    x = example_input.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ConfigError(f"example input has no samples: shape {tuple(example_input.shape)}")
    if x.shape[0] < batch_size:
        reps = math.ceil(batch_size / x.shape[0])
        x = x.repeat((reps,) + (1,) * (x.dim() - 1))
    return x[:batch_size].contiguous()


def _check_layout(layout: str, x: torch.Tensor) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout in ("channels_last", "deploy") and x.dim() != 4:
        raise ConfigError(f"{layout} needs a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")


def _prepare(model: nn.Module, x: torch.Tensor, layout: str) -> tuple[nn.Module, torch.Tensor]:
    """An eval-mode copy of ``model`` and the input, both in ``layout``, on the model's device."""
    _check_layout(layout, x)
    device = module_device(model)
    m = fold_batchnorm(model) if layout == "deploy" else copy.deepcopy(model).eval()
    x = x.to(device)
    if layout in ("channels_last", "deploy"):
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return m, x


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None`` leaves it alone)."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _check_budget(warmup: int, repeats: int | None, min_repeats: int, max_seconds: float) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {warmup!r}")
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        raise ConfigError(f"repeats must be a positive integer or None, got {repeats!r}")
    if isinstance(min_repeats, bool) or not isinstance(min_repeats, int) or min_repeats < 1:
        raise ConfigError(f"min_repeats must be a positive integer, got {min_repeats!r}")
    if not max_seconds > 0:
        raise ConfigError(f"max_seconds must be positive, got {max_seconds!r}")


def time_calls(fn: Callable[[], object], *, warmup: int = 3, repeats: int | None = None,
               min_repeats: int = 5, max_seconds: float = 1.0, max_repeats: int = 1000,
               sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds taken by each timed call of ``fn``.

    ``repeats`` fixes the count; ``None`` adapts it: at least ``min_repeats`` calls, then more
    until ``max_seconds`` of timed calls have accumulated or ``max_repeats`` is reached. When
    adapting, the warm-up also stops early (after at least one call) once it has taken
    ``max_seconds / 2``.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs after every call, inside the timing.
    """
    _check_budget(warmup, repeats, min_repeats, max_seconds)
    sync = sync or (lambda: None)
    started = time.perf_counter()
    for _ in range(warmup):
        fn()
        if repeats is None and time.perf_counter() - started >= max_seconds / 2:
            break  # a slow model is warm after one call; do not spend the budget warming up
    sync()
    times: list[float] = []
    total = 0.0
    while True:
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
        n = len(times)
        if repeats is not None:
            if n >= repeats:
                break
        elif n >= min_repeats and (total >= max_seconds or n >= max_repeats):
            break
    return times


def summarize(times: list[float], batch_size: int) -> dict[str, float | int]:
    """``median_ms``, ``p90_ms``, ``throughput_per_s`` (samples per second at the median) and
    ``repeats`` from per-call durations in seconds."""
    arr = np.asarray(times, dtype=np.float64)
    median = float(np.median(arr))
    return {
        "median_ms": median * 1e3,
        "p90_ms": float(np.percentile(arr, 90)) * 1e3,
        "throughput_per_s": batch_size / median if median > 0 else float("inf"),
        "repeats": int(arr.size),
    }


def latency(model: nn.Module, example_input: torch.Tensor, batch_size: int, *,
            channels_last: bool = False, warmup: int = 3, repeats: int | None = None,
            min_repeats: int = 5, max_seconds: float = 1.0,
            threads: int | None = None, layout: str | None = None) -> dict[str, float | int]:
    """Time eval-mode inference of ``model`` on a batch of ``batch_size`` samples.

    The model is deep-copied (the caller's module, its mode and memory format are untouched)
    and runs on its own device; CUDA work is synchronised inside each timing.

    Parameters
    ----------
    model : nn.Module
        The network to time.
    example_input : Tensor [N, C, H, W] or [C, H, W]
        Sample(s) cycled to build the batch.
    batch_size : int
        Samples per forward call.
    channels_last : bool
        Convert the copy and the input to ``torch.channels_last`` (NHWC) first; narrow pruned
        CNNs are often much faster this way on CPU.
    warmup : int
        Untimed calls before timing (fewer, but at least one, when adapting and they take
        more than ``max_seconds / 2``).
    repeats : int, optional
        Timed calls; ``None`` adapts (see ``min_repeats`` and ``max_seconds``).
    min_repeats : int
        Fewest timed calls when adapting.
    max_seconds : float
        Timed work to accumulate when adapting (seconds).
    threads : int, optional
        Intra-op CPU threads during the measurement; ``None`` keeps torch's setting.
    layout : {"nchw", "channels_last", "deploy"}, optional
        Overrides ``channels_last``; "deploy" also folds BatchNorm into the convs first
        (see :data:`LAYOUTS`).

    Returns
    -------
    dict
        ``median_ms`` and ``p90_ms`` per batch, ``throughput_per_s`` (samples per second at the
        median), ``repeats`` (timed calls), ``batch_size``, ``layout`` and ``threads``.
    """
    if layout is None:
        layout = "channels_last" if channels_last else "nchw"
    x = batched_input(example_input, batch_size)
    m, x = _prepare(model, x, layout)
    sync = _sync_for(x.device)
    with _num_threads(threads), torch.inference_mode():
        times = time_calls(lambda: m(x), warmup=warmup, repeats=repeats, min_repeats=min_repeats,
                           max_seconds=max_seconds, sync=sync)
        used_threads = torch.get_num_threads()
    out = summarize(times, batch_size)
    out.update(batch_size=batch_size, layout=layout, threads=used_threads)
    return out


def compare_latency(model_a: nn.Module, model_b: nn.Module, example_input: torch.Tensor,
                    batch_size: int, layout: str = "nchw", *, warmup: int = 3,
                    repeats: int | None = None, min_repeats: int = 7, max_seconds: float = 2.0,
                    threads: int | None = None) -> dict[str, float | int | str]:
    """Time two models back to back, interleaved, in the same layout; report the ratio.

    Each round times ``a`` then ``b``, the next ``b`` then ``a`` (so slow drifts of the machine,
    such as another process starting, hit both models alike). Use it for pruned-vs-original
    speed-ups: ``ratio`` below 1 means ``model_b`` is faster.

    Parameters
    ----------
    model_a, model_b : nn.Module
        Typically the original and the pruned model; they need not share a device.
    example_input : Tensor [N, C, H, W] or [C, H, W]
        Sample(s) cycled to build the batch (must suit both models).
    batch_size : int
        Samples per forward call.
    layout : {"nchw", "channels_last", "deploy"}
        Memory layout (and BatchNorm folding for "deploy") used for both models.
    warmup, repeats, min_repeats, max_seconds, threads
        As in :func:`latency`; ``repeats`` and ``min_repeats`` count rounds (one call of each
        model), ``max_seconds`` the timed work of both models together.

    Returns
    -------
    dict
        ``median_ms_a``, ``median_ms_b``, ``p90_ms_a``, ``p90_ms_b``,
        ``ratio`` = ``median_ms_b / median_ms_a``, ``repeats``, ``batch_size``, ``layout``,
        ``threads``.
    """
    x = batched_input(example_input, batch_size)
    ma, xa = _prepare(model_a, x, layout)
    mb, xb = _prepare(model_b, x, layout)
    sync_a, sync_b = _sync_for(xa.device), _sync_for(xb.device)
    _check_budget(warmup, repeats, min_repeats, max_seconds)
    times_a: list[float] = []
    times_b: list[float] = []

    def timed(m: nn.Module, inp: torch.Tensor, sync: Callable[[], None], into: list[float]) -> None:
        t0 = time.perf_counter()
        m(inp)
        sync()
        into.append(time.perf_counter() - t0)

    with _num_threads(threads), torch.inference_mode():
        started = time.perf_counter()
        for _ in range(warmup):
            ma(xa)
            mb(xb)
            if repeats is None and time.perf_counter() - started >= max_seconds / 2:
                break
        sync_a()
        sync_b()
        rounds = 0
        while True:
            if rounds % 2 == 0:
                timed(ma, xa, sync_a, times_a)
                timed(mb, xb, sync_b, times_b)
            else:
                timed(mb, xb, sync_b, times_b)
                timed(ma, xa, sync_a, times_a)
            rounds += 1
            if repeats is not None:
                if rounds >= repeats:
                    break
            elif rounds >= min_repeats and (sum(times_a) + sum(times_b) >= max_seconds
                                            or rounds >= 1000):
                break
        used_threads = torch.get_num_threads()
    sa, sb = summarize(times_a, batch_size), summarize(times_b, batch_size)
    return {
        "median_ms_a": sa["median_ms"],
        "median_ms_b": sb["median_ms"],
        "p90_ms_a": sa["p90_ms"],
        "p90_ms_b": sb["p90_ms"],
        "ratio": sb["median_ms"] / sa["median_ms"] if sa["median_ms"] > 0 else float("nan"),
        "repeats": rounds,
        "batch_size": batch_size,
        "layout": layout,
        "threads": used_threads,
    }
