"""ONNX export, verified against PyTorch with ONNX Runtime.

torch 2.x ships two exporters: the TorchScript-based one (``dynamo=False``; fast, deprecated
since torch 2.9 but present in 2.13) and the ``torch.export``-based one (``dynamo=True``; needs
``onnxscript``, slower, the default in new releases). ``exporter="auto"`` tries the TorchScript
one first and falls back to ``torch.export`` when it fails or is gone.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, PrunekitError
from ..utils import atomic_path

__all__ = ["export_onnx", "EXPORTERS"]

EXPORTERS = ("auto", "torchscript", "dynamo")


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None,
                        dynamic_batch: bool) -> None:
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"], "dynamo": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None,
                   dynamic_batch: bool) -> None:
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"], "dynamo": True,
                              "verbose": False, "external_data": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
    # The torch.export-based exporter reports its steps on stdout; keep stdout clean for --json.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)


def _opset_of(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _compare(model: nn.Module, path: Path, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference between ONNX Runtime and PyTorch, and the largest absolute
    PyTorch output (the scale the difference is judged against)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != 1:
        raise PrunekitError(f"the exported graph takes {len(graph_inputs)} inputs instead of 1 "
                            "(the output does not depend on the input as traced)")
    name = graph_inputs[0].name
    worst, scale = 0.0, 0.0
    for x in inputs:
        with torch.inference_mode():
            ref = model(x)
        if not isinstance(ref, torch.Tensor):
            raise PrunekitError("ONNX check supports models with one output tensor")
        got = session.run(None, {name: x.numpy()})[0]
        if tuple(got.shape) != tuple(ref.shape):
            raise PrunekitError(f"ONNX output shape {tuple(got.shape)} differs from PyTorch's "
                                f"{tuple(ref.shape)} (batch {x.shape[0]})")
        ref64 = ref.double().numpy()
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref64), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(ref64), initial=0.0)))
    return worst, scale


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
                check: bool = True, opset: int | None = None, dynamic_batch: bool = True,
                atol: float = 1e-4, exporter: str = "auto") -> dict[str, Any]:
    """Export ``model`` (eval mode, CPU, float32) to ONNX at ``path``, atomically, and verify it.

    Parameters
    ----------
    model : nn.Module
        The network (one input tensor, one output tensor); it is not modified.
    example_input : Tensor [N, C, H, W] or [C, H, W]
        Traced input; a 3-D tensor is taken as one image.
    path : path
        Output ``.onnx`` file; its directory must exist. Nothing is written when export or
        verification fails, and an existing file is left untouched.
    check : bool
        Run the file with ONNX Runtime and compare with PyTorch (on the example batch, and on a
        batch of another size when ``dynamic_batch``).
    opset : int, optional
        ONNX opset; the exporter's default when ``None``.
    dynamic_batch : bool
        Make the batch dimension dynamic (named ``batch``).
    atol : float
        Largest accepted difference between ONNX Runtime and PyTorch outputs: absolute for
        outputs up to 1 in magnitude, relative to the largest output beyond that (float32
        rounding grows with the values; untrained deep nets reach logits of 1e6 and more).
    exporter : {"auto", "torchscript", "dynamo"}
        Which ``torch.onnx.export`` path to use (see the module docstring).

    Returns
    -------
    dict
        ``path``, ``opset``, ``exporter`` (the one that worked), ``dynamic_batch``,
        ``input_shape``, ``file_size_bytes``, ``max_abs_diff`` and ``output_scale`` (the
        largest absolute PyTorch output), both ``None`` without ``check``.

    Raises
    ------
    PrunekitError
        Export failed, or ONNX Runtime's outputs differ from PyTorch's by more than
        ``atol * max(1, output_scale)``.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ConfigError(f"opset must be an integer >= 7, got {opset!r}")
    x = example_input.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = x.contiguous()
    m = copy.deepcopy(model).float().cpu().eval()
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    out = Path(path)
    with atomic_path(out) as tmp:
        errors = []
        used = None
        for name in order:
            try:
                fn = _export_torchscript if name == "torchscript" else _export_dynamo
                fn(m, x, tmp, opset, dynamic_batch)
                used = name
                break
            except Exception as e:  # try the next exporter; report all failures together
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                errors.append(f"{name}: {type(e).__name__}: {msg[:200]}")
        if used is None:
            raise PrunekitError(f"ONNX export to {out} failed ({'; '.join(errors)})")
        diff = scale = None
        if check:
            inputs = [x]
            if dynamic_batch:
                inputs.append(torch.cat([x, x[:1]]))  # another batch size: the axis is dynamic
            diff, scale = _compare(m, tmp, inputs)
            if not diff <= atol * max(1.0, scale):
                raise PrunekitError(f"ONNX export of {out} does not match PyTorch: max abs "
                                    f"difference {diff:.3g} > {atol:g} x max(1, |output| = "
                                    f"{scale:.3g})")
        opset_used = _opset_of(tmp)
        size = tmp.stat().st_size
    return {
        "path": str(out),
        "opset": opset_used,
        "exporter": used,
        "dynamic_batch": dynamic_batch,
        "input_shape": list(x.shape[1:]),
        "file_size_bytes": size,
        "max_abs_diff": diff,
        "output_scale": scale,
    }
