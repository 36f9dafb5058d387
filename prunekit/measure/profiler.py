"""One call that measures everything a deployment cares about: MACs, parameters, latency per
batch size and memory layout (PyTorch, optionally ONNX Runtime) and the file size."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import module_device
from .counting import count
from .timing import LAYOUTS, batched_input, latency, summarize, time_calls

__all__ = ["profile", "onnx_latency"]


def _single_tensor(example_inputs: Any) -> torch.Tensor:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1 \
            and isinstance(example_inputs[0], torch.Tensor):
        return example_inputs[0]
    raise ConfigError("profile() times models that take one input tensor; got "
                      f"{type(example_inputs).__name__}")


def _check_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    sizes = list(batch_sizes)
    if not sizes:
        raise ConfigError("batch_sizes is empty")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"batch sizes must be positive integers, got {b!r}")
    return list(dict.fromkeys(sizes))


def onnx_latency(onnx_path: str | os.PathLike, example_input: torch.Tensor, batch_size: int, *,
                 warmup: int = 3, repeats: int | None = None, min_repeats: int = 5,
                 max_seconds: float = 1.0, threads: int | None = None) -> dict[str, float | int]:
    """Time an ONNX model with ONNX Runtime (CPU) on a batch of ``batch_size`` samples.

    The model must take one input whose batch dimension is dynamic or equals ``batch_size``.
    Returns the same keys as :func:`prunekit.measure.latency` (``layout`` is ``"onnxruntime"``).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    used_threads = threads if threads is not None else torch.get_num_threads()
    opts.intra_op_num_threads = used_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: batched_input(example_input, batch_size).float().cpu().numpy()}
    times = time_calls(lambda: session.run(None, feed), warmup=warmup, repeats=repeats,
                       min_repeats=min_repeats, max_seconds=max_seconds)
    out = summarize(times, batch_size)
    out.update(batch_size=batch_size, layout="onnxruntime", threads=used_threads)
    return out


def profile(model: nn.Module, example_inputs: Any, batch_sizes: Sequence[int] = (1, 64), *,
            onnx: bool = False, checkpoint_path: str | os.PathLike | None = None,
            layouts: Sequence[str] = LAYOUTS, warmup: int = 3, min_repeats: int = 5,
            max_seconds: float = 1.0, threads: int | None = None,
            runtimes: str | Sequence[str] | None = None, original: nn.Module | None = None,
            check_input: torch.Tensor | None = None, precision: float | None = None) -> dict[str, Any]:
    """MACs, parameters, measured latency and file size of ``model``.

    Parameters
    ----------
    model : nn.Module
        The network; it is not modified.
    example_inputs : Tensor [N, C, H, W] (or a 1-tuple of it)
        Sample input; its first sample(s) are cycled to build every batch.
    batch_sizes : sequence of int
        Batch sizes to time, e.g. ``(1, 64)`` for single-image latency and batch throughput.
    onnx : bool
        Also export to ONNX (temporary file), check it against PyTorch and time it with ONNX
        Runtime.
    checkpoint_path : path, optional
        The model's checkpoint, whose size is reported; otherwise the model is saved to a
        temporary file with :func:`prunekit.io.save` and that size is reported.
    layouts : sequence of {"nchw", "channels_last", "deploy"}
        Settings to time (see :data:`prunekit.measure.LAYOUTS`); ``channels_last`` and
        ``deploy`` are skipped for inputs that are not 4-D.
    warmup, min_repeats, max_seconds, threads
        Passed to :func:`prunekit.measure.latency` for every (batch size, layout) setting.
    runtimes : str or sequence of str, optional
        Deployment runtimes to verify and time (:data:`prunekit.measure.runtimes.RUNTIMES`;
        ``"all"``: every installed one but ``compile``). ``None``: none, unless ``original``.
    original : nn.Module, optional
        The unpruned network, timed interleaved with ``model`` on each runtime.
    check_input : Tensor, optional
        A batch (of real images, ideally) on which each runtime's outputs are checked.
    precision : float, optional
        With ``original``: time each runtime and batch size until the ratio's standard error
        is at most this (30 s at most; :func:`prunekit.measure.runtimes.time_pair`).

    Returns
    -------
    dict
        ``{"macs", "params", "input_shape", "device", "latency": {"b1": {"nchw": {...},
        "channels_last": {...}, "deploy": {...}, "best": "<layout>"}, "b64": {...}},
        "file_size_bytes"}``, plus
        ``"onnx": {"max_abs_diff", "output_scale", "opset", "exporter", "file_size_bytes",
        "latency": {"b1": {...}, ...}}``
        when ``onnx`` is true. Each timing has ``median_ms``, ``p90_ms``,
        ``throughput_per_s`` and ``repeats``. With ``runtimes`` (or ``original``) also
        ``"runtimes"``, ``"threads"`` and ``"slower"`` from
        :func:`prunekit.measure.runtimes.profile_runtimes`: per runtime ``ok``,
        ``max_rel_diff``, ``latency_ms.<batch>.{median, p90}`` and, with ``original``,
        ``ratio.<batch>`` (the median per-round ratio) and ``ratio_se.<batch>``.

    Examples
    --------
    >>> report = profile(net, torch.randn(1, 3, 32, 32), batch_sizes=(1,))  # doctest: +SKIP
    >>> report["latency"]["b1"]["best"]                                      # doctest: +SKIP
    'channels_last'
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"profile() needs an nn.Module, got {type(model).__name__}")
    x = _single_tensor(example_inputs)
    sizes = _check_batch_sizes(batch_sizes)
    layouts = list(dict.fromkeys(layouts))
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if x.dim() == 3:  # a single [C, H, W] image
        x = x.unsqueeze(0)
    if x.dim() != 4:
        layouts = [lay for lay in layouts if lay == "nchw"]
    if not layouts:
        raise ConfigError("no memory layout left to time (channels_last and deploy need a 4-D input)")

    if runtimes is not None or original is not None:
        from .runtimes import check_runtimes

        runtimes = check_runtimes(runtimes)  # an unknown / missing runtime fails before any work
    macs, params = count(model, x)
    report: dict[str, Any] = {
        "macs": macs,
        "params": params,
        "input_shape": list(x.shape[1:]),
        "device": str(module_device(model)),
        "latency": {},
    }
    for b in sizes:
        per_layout: dict[str, Any] = {}
        for layout in layouts:
            per_layout[layout] = latency(model, x, b, layout=layout,
                                         warmup=warmup, min_repeats=min_repeats,
                                         max_seconds=max_seconds, threads=threads)
        per_layout["best"] = min(layouts, key=lambda lay: per_layout[lay]["median_ms"])
        report["latency"][f"b{b}"] = per_layout

    from .. import io as pk_io

    with tempfile.TemporaryDirectory(prefix="prunekit-profile-") as tmp:
        if checkpoint_path is not None:
            path = Path(checkpoint_path)
            if not path.is_file():
                raise ConfigError(f"checkpoint not found: {path}")
            report["file_size_bytes"] = path.stat().st_size
        else:
            saved = Path(tmp) / "model.pt"
            pk_io.save(model, saved)
            report["file_size_bytes"] = saved.stat().st_size
        if onnx:
            onnx_path = Path(tmp) / "model.onnx"
            exported = pk_io.export_onnx(model, x, onnx_path, check=True, dynamic_batch=True)
            report["onnx"] = {
                "max_abs_diff": exported["max_abs_diff"],
                "output_scale": exported["output_scale"],
                "opset": exported["opset"],
                "exporter": exported["exporter"],
                "file_size_bytes": exported["file_size_bytes"],
                "latency": {
                    f"b{b}": onnx_latency(onnx_path, x, b, warmup=warmup, min_repeats=min_repeats,
                                          max_seconds=max_seconds, threads=threads)
                    for b in sizes
                },
            }
    if runtimes is not None:
        from .runtimes import profile_runtimes

        rt = profile_runtimes(model, x, sizes, runtimes, original=original, threads=threads,
                              max_seconds=max_seconds, check_input=check_input, precision=precision)
        report.update(threads=rt["threads"], runtimes=rt["runtimes"], slower=rt["slower"])
    return report
