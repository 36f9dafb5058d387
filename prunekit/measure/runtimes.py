"""A model on the runtime it is deployed with: verified outputs and measured latency.

Runtimes (:data:`RUNTIMES`):

* ``nchw``, ``channels_last``, ``deploy``: eager PyTorch in the three settings of
  :data:`prunekit.measure.LAYOUTS`;
* ``compile``: ``torch.compile`` (inductor, CPU) of the deploy setting (BatchNorm folded,
  channels_last), compiled once per batch size (static shapes);
* ``onnxruntime``: the ONNX export run by ONNX Runtime's CPU provider;
* ``openvino``: the same ONNX file compiled by OpenVINO's CPU plugin, per batch size, with
  float32 inference precision (OpenVINO otherwise runs bf16 on CPUs that have it).

Every runtime is first checked against eager PyTorch (float32, NCHW) on a batch: the largest
difference relative to the output scale (``max |y - y_ref| / max |y_ref|``) must be at most
:data:`TOLERANCE` and the arg-max of every sample must agree. Then each batch size is timed
(median and p90 of the per-call wall time) with a fixed number of threads; a pruned model and
its original are timed interleaved (A B B A ...), so slow drifts of a shared machine hit both,
and their ratio is the median of the per-round ratios (:func:`pair_ratio`), with a standard
error that also sees drifts lasting many rounds.

References
----------
.. [1] T.-J. Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
   Applications", ECCV 2018 (latency measured on the target platform, not inferred from MACs).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, PrunekitError
from ..utils import module_device
from .timing import LAYOUTS, _check_budget, _num_threads, _prepare, batched_input, time_calls

__all__ = ["RUNTIMES", "SE_BLOCKS", "TOLERANCE", "RuntimeUnavailable", "Session", "channel_block",
           "check_runtimes", "default_runtimes", "installed", "pair_ratio", "profile_runtimes",
           "slower_cases", "slower_warning", "time_pair", "verify"]

#: every runtime prunekit can verify and time
RUNTIMES = (*LAYOUTS, "compile", "onnxruntime", "openvino")
#: largest accepted ``max |y - y_ref| / max |y_ref|`` against eager PyTorch
TOLERANCE = 1e-4
#: a ratio above ``1 + SLOWER_TOLERANCE`` counts as slower (timing noise stays below it)
SLOWER_TOLERANCE = 0.02
#: runtime -> (module to import, pip package)
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino")}
#: left out of the default set: inductor compiles for minutes on a small CPU
_OPT_IN = ("compile",)


class RuntimeUnavailable(ConfigError):
    """A runtime was asked for whose package (or compiler) is not installed."""


def installed(runtime: str) -> bool:
    """Whether ``runtime`` can run here (its package imports; ``compile`` needs a C++ compiler)."""
    if runtime in LAYOUTS:
        return True
    if runtime == "compile":
        return shutil.which("g++") is not None or shutil.which("c++") is not None
    module, _ = _PACKAGES[runtime]
    return importlib.util.find_spec(module) is not None


def channel_block() -> int:
    """Channels per vector block of this CPU's float32 convolution kernels: 16 where PyTorch
    dispatches to AVX-512 (``torch.backends.cpu.get_cpu_capability()``, which the
    ``ATEN_CPU_CAPABILITY`` variable can lower), else 8.

    OpenVINO's CPU plugin (oneDNN) and ONNX Runtime's NCHWc kernels (MLAS) hold activations in
    blocks of that many channels, so a width between two multiples is padded to the next. On a
    2-core AVX-512 Xeon (``bench/results/efficiency_frontier_resnet20_block.md``) ResNet-20 at
    batch 64, 60 random allocations each way, kept at most 0.90 of its MACs per unit of latency
    at or under 0.7 of the latency on OpenVINO with every width a multiple of 16, 0.80 rounded
    to 8; on ONNX Runtime 0.86 against 0.56."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def default_runtimes() -> list[str]:
    """The runtimes timed when none is named: every installed one except ``compile`` (opt in:
    compiling takes minutes on a small CPU)."""
    return [r for r in RUNTIMES if r not in _OPT_IN and installed(r)]


def check_runtimes(runtimes: str | Sequence[str] | None) -> list[str]:
    """Validate runtime names (a comma-separated string or a sequence; ``None`` or ``"all"``:
    :func:`default_runtimes`).

    Raises
    ------
    ConfigError
        An unknown name.
    RuntimeUnavailable
        A runtime whose package is not installed (the message names the package).
    """
    if runtimes is None or runtimes == "all":
        return default_runtimes()
    names = [n.strip() for n in runtimes.split(",")] if isinstance(runtimes, str) else list(runtimes)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("no runtime given; choose from " + ", ".join(RUNTIMES))
    for n in names:
        if n not in RUNTIMES:
            from ..methods.options import closest  # the one spelling check of the CLI

            near = closest(n, RUNTIMES)
            hint = f"did you mean {near!r}? " if near else ""
            raise ConfigError(f"unknown runtime {n!r}; {hint}choose from {', '.join(RUNTIMES)}")
        if not installed(n):
            if n == "compile":
                raise RuntimeUnavailable("runtime 'compile' (torch.compile, inductor) needs a C++ "
                                         "compiler (g++), which is not installed")
            package = _PACKAGES[n][1]
            raise RuntimeUnavailable(f"runtime {n!r} needs the package {package!r}, which is not "
                                     f"installed: pip install {package}")
    return list(dict.fromkeys(names))


def _export(model: nn.Module, x: torch.Tensor, workdir: Path) -> Path:
    from ..io import export_onnx

    path = workdir / f"model-{id(model)}.onnx"
    if not path.is_file():
        export_onnx(model, x[:2], path, check=False, dynamic_batch=True)
    return path


class Session:
    """``model`` prepared on one runtime: ``session(x)`` returns its output for a batch ``x``
    (a float32 CPU tensor), ``session.caller(x)`` a no-argument callable to time.

    The model is copied (or exported) when the session is made; later changes to ``model`` do
    not reach the session, so comparing it with the changed model exposes a stale export.

    Parameters
    ----------
    model : nn.Module
        The network (one input tensor, one output tensor).
    runtime : str
        One of :data:`RUNTIMES`.
    example_input : Tensor [N, C, H, W]
        A batch the model takes (used to export and compile).
    threads : int
        Intra-op threads of the runtime.
    workdir : path
        Where the ONNX file goes (a temporary directory the caller owns).
    """

    def __init__(self, model: nn.Module, runtime: str, example_input: torch.Tensor, threads: int,
                 workdir: Path) -> None:
        check_runtimes([runtime])
        self.runtime, self.threads = runtime, int(threads)
        x = example_input.detach().cpu().float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        self._compiled: dict[tuple[int, ...], Any] = {}
        if runtime in LAYOUTS or runtime == "compile":
            layout = "deploy" if runtime == "compile" else runtime
            cpu_model = model if module_device(model).type == "cpu" else copy.deepcopy(model).cpu()
            self._module, _ = _prepare(cpu_model, x, layout)
            self._layout = layout
            if runtime == "compile":
                self._module = torch.compile(self._module, dynamic=False)
        else:
            self._onnx = _export(model, x, workdir)
            if runtime == "onnxruntime":
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                self._ort = ort.InferenceSession(str(self._onnx), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
                self._ort_name = self._ort.get_inputs()[0].name
            else:
                import openvino as ov

                self._core = ov.Core()

    def _openvino(self, shape: tuple[int, ...]) -> Any:
        compiled = self._compiled.get(shape)
        if compiled is None:
            model = self._core.read_model(str(self._onnx))
            model.reshape(list(shape))
            compiled = self._core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
            self._compiled[shape] = compiled
        return compiled

    def caller(self, x: torch.Tensor) -> Callable[[], Any]:
        """A no-argument callable running the model once on ``x`` (prepared once here)."""
        x = x.detach().cpu().float().contiguous()
        if self.runtime in LAYOUTS or self.runtime == "compile":
            if self._layout in ("channels_last", "deploy"):
                x = x.contiguous(memory_format=torch.channels_last)
            m = self._module

            def run() -> Any:
                with torch.inference_mode():
                    return m(x)
            return run
        feed = x.numpy()
        if self.runtime == "onnxruntime":
            sess, name = self._ort, self._ort_name
            return lambda: sess.run(None, {name: feed})[0]
        request = self._openvino(tuple(x.shape)).create_infer_request()

        def run_ov() -> Any:
            request.infer({0: feed})
            return request.get_output_tensor(0).data
        return run_ov

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with _num_threads(self.threads):
            out = self.caller(x)()
        if isinstance(out, torch.Tensor):
            return out.detach().float().contiguous().cpu()
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))


def verify(session: Session, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Outputs of ``session`` against eager PyTorch (``model`` in eval mode, float32, NCHW) on
    the batch ``x``: ``max_rel_diff`` (``max |y - y_ref| / max |y_ref|``), ``argmax_agree``
    (fraction of samples with the same arg-max) and ``ok`` (``max_rel_diff <= TOLERANCE`` and
    every arg-max agrees)."""
    from ..utils import eval_mode

    x = x.detach().cpu().float()
    with eval_mode(model), torch.no_grad():
        ref = model.cpu()(x).float()
    if not isinstance(ref, torch.Tensor):
        raise ConfigError("runtime checks need a model with one output tensor")
    out = session(x).reshape(ref.shape)
    scale = float(ref.abs().max())
    diff = float((out - ref).abs().max())
    rel = diff / scale if scale > 0 else diff
    agree = 1.0
    if ref.dim() >= 2:
        agree = float((out.flatten(1).argmax(1) == ref.flatten(1).argmax(1)).float().mean())
    ok = bool(np.isfinite(rel) and rel <= TOLERANCE and agree == 1.0)
    return {"ok": ok, "max_rel_diff": rel, "max_abs_diff": diff, "output_scale": scale,
            "argmax_agree": agree}


#: contiguous blocks of rounds the standard error of a ratio is estimated from (batch means)
SE_BLOCKS = 8


def pair_ratio(ta: Sequence[float], tb: Sequence[float]) -> tuple[float, float]:
    """The ratio of ``tb``'s latency to ``ta``'s from interleaved calls, and its standard error.

    Each round's two calls ran next to each other, so a stretch of the machine running slow
    (another process, a frequency change) slows both; the estimate is the median of the
    per-round ratios ``tb[i] / ta[i]``. Over the windows of one second in
    ``bench/results/ratio_noise.md`` it varied less than the ratio of the two medians in 8 of
    12 settings (down to 0.70 of its spread), more in 4 (up to 1.17 of it).

    The standard error comes from batch means [1]_: the rounds are cut into
    :data:`SE_BLOCKS` contiguous blocks and the spread of the blocks' medians, over the square
    root of their number, is the error. Rounds are not independent on a shared machine: the
    ratio of a ResNet-20 wanders by 0.02-0.05 from one second to the next while a thousand rounds
    per second would make an independent error 0.003; blocks of consecutive rounds see that
    wander, an error computed as if rounds were independent does not. With fewer than
    ``4 * SE_BLOCKS`` rounds it falls back to the independent-rounds error of a median,
    ``1.2533 * s / sqrt(n)`` with ``s`` from the interquartile range (``IQR / 1.349``) [2]_.

    Parameters
    ----------
    ta, tb : sequence of float
        Per-call seconds of the reference and of the timed model, round by round (equal length).

    Returns
    -------
    (ratio, standard_error)
        ``standard_error`` is ``inf`` below four rounds.

    References
    ----------
    .. [1] G. S. Fishman, "Grouping observations in digital simulation", Management Science
       24(5), 1978 (the method of batch means for correlated series).
    .. [2] D. C. Hoaglin, F. Mosteller, J. W. Tukey, "Understanding Robust and Exploratory Data
       Analysis", Wiley 1983 (the median's standard error; the IQR as a robust scale).
    """
    if len(ta) != len(tb) or not ta:
        raise ValueError(f"need equal, non-empty call times, got {len(ta)} and {len(tb)}")
    r = np.asarray(tb, dtype=np.float64) / np.asarray(ta, dtype=np.float64)
    if r.size < 4:
        return float(np.median(r)), float("inf")
    if r.size >= 4 * SE_BLOCKS:
        blocks = [float(np.median(b)) for b in np.array_split(r, SE_BLOCKS)]
        return float(np.median(r)), float(np.std(blocks, ddof=1) / np.sqrt(SE_BLOCKS))
    q1, q3 = np.percentile(r, [25, 75])
    return float(np.median(r)), float(1.2533 * (q3 - q1) / 1.349 / np.sqrt(r.size))


def time_pair(fn_a: Callable[[], Any] | None, fn_b: Callable[[], Any], *, warmup: int = 3,
              min_repeats: int = 7, max_seconds: float = 1.0, max_repeats: int = 1000,
              precision: float | None = None, precision_seconds: float = 30.0,
              ) -> tuple[list[float], list[float]]:
    """Per-call seconds of ``fn_b`` and, when given, ``fn_a`` timed interleaved (rounds alternate
    A B / B A). Without ``fn_a`` this is :func:`prunekit.measure.timing.time_calls`.

    Rounds run until there are ``min_repeats`` of them and ``max_seconds`` have been timed (or
    ``max_repeats`` rounds). With ``precision``, rounds go on while the standard error of the
    ratio (:func:`pair_ratio`) is above ``precision`` and fewer than ``precision_seconds`` have
    been timed in all: a batch of 64 images at 224x224 takes about half a second per call, and
    seven rounds measure its ratio to about +-0.03, more than half the window a latency budget
    accepts.
    """
    _check_budget(warmup, None, min_repeats, max_seconds)
    if precision is not None and not precision > 0:
        raise ConfigError(f"precision must be positive, got {precision!r}")
    if fn_a is None:
        return [], time_calls(fn_b, warmup=warmup, min_repeats=min_repeats, max_seconds=max_seconds,
                              max_repeats=max_repeats)
    started = time.perf_counter()
    for _ in range(warmup):
        fn_a()
        fn_b()
        if time.perf_counter() - started >= max_seconds / 2:
            break
    ta: list[float] = []
    tb: list[float] = []

    def timed(fn: Callable[[], Any], into: list[float]) -> None:
        t0 = time.perf_counter()
        fn()
        into.append(time.perf_counter() - t0)

    rounds = 0
    spent = 0.0
    while True:
        order = ((fn_a, ta), (fn_b, tb)) if rounds % 2 == 0 else ((fn_b, tb), (fn_a, ta))
        for fn, into in order:
            timed(fn, into)
        rounds += 1
        spent += ta[-1] + tb[-1]
        if rounds < min_repeats:
            continue
        if rounds >= max_repeats:
            break
        if spent >= max_seconds and (precision is None or spent >= precision_seconds
                                     or pair_ratio(ta, tb)[1] <= precision):
            break
    return ta, tb


def _stats(times: list[float]) -> dict[str, float]:
    arr = np.asarray(times, dtype=np.float64) * 1e3
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)),
            "repeats": int(arr.size)}


@contextlib.contextmanager
def _workdir(workdir: str | Path | None) -> Iterator[Path]:
    if workdir is not None:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="prunekit-runtimes-") as tmp:
        yield Path(tmp)


def profile_runtimes(model: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int] = (1, 64),
                     runtimes: str | Sequence[str] | None = None, *, original: nn.Module | None = None,
                     threads: int | None = None, max_seconds: float = 1.0, min_repeats: int = 7,
                     check_input: torch.Tensor | None = None, workdir: str | Path | None = None,
                     on_runtime: Callable[[str], None] | None = None,
                     precision: float | None = None) -> dict[str, Any]:
    """Verify and time ``model`` (and ``original``, interleaved) on each runtime.

    Parameters
    ----------
    model : nn.Module
        The network to time (typically the pruned one); it is not modified.
    example_input : Tensor [N, C, H, W] or [C, H, W]
        Sample(s) cycled to build every timed batch.
    batch_sizes : sequence of int
        Batch sizes to time.
    runtimes : str or sequence of str, optional
        Names from :data:`RUNTIMES` (``None``: :func:`default_runtimes`).
    original : nn.Module, optional
        The unpruned network: timed interleaved with ``model`` on every runtime and batch size;
        the result then holds ``ratio`` (``model``'s median over ``original``'s).
    threads : int, optional
        Intra-op threads for every runtime (default: torch's current setting).
    max_seconds : float
        Timed seconds per runtime and batch size (both models together).
    min_repeats : int
        Fewest timed calls (rounds, with ``original``).
    check_input : Tensor, optional
        The batch the outputs are checked on (default: ``example_input`` cycled to 8 samples);
        pass a batch of real images to check the arg-max on real data.
    workdir : path, optional
        Where ONNX exports go (default: a temporary directory).
    on_runtime : callable, optional
        Called with each runtime's name before it is measured (progress).
    precision : float, optional
        With ``original``: keep timing (up to 30 s per runtime and batch size) until the
        ratio's standard error is at most this (:func:`time_pair`).

    Returns
    -------
    dict
        ``threads``, ``batch_sizes`` and ``runtimes``: per runtime ``ok``, ``max_rel_diff``,
        ``argmax_agree``, ``latency_ms.<batch>.{median, p90, repeats}``; with ``original`` also
        ``original_ok``, ``original_latency_ms``, ``ratio.<batch>`` (the median of the per-round
        ratios, :func:`pair_ratio`) and ``ratio_se.<batch>`` (its standard error). A runtime that fails to
        export or compile the model has ``ok: false`` and ``error``. ``slower`` lists the
        runtime and batch sizes where ``model`` measured slower than ``original``
        (:func:`slower_cases`; :func:`slower_warning` makes the one-line warning).
    """
    names = check_runtimes(runtimes)
    sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError("runtimes are timed on models that take one input tensor")
    used = int(threads) if threads is not None else torch.get_num_threads()
    if used < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    check_x = check_input if check_input is not None else batched_input(example_input, 8)
    result: dict[str, Any] = {"threads": used, "batch_sizes": sizes, "runtimes": {}}
    with _workdir(workdir) as wd:
        for name in names:
            if on_runtime is not None:
                on_runtime(name)
            rec: dict[str, Any] = {}
            try:
                sess = Session(model, name, check_x, used, wd)
                rec.update(verify(sess, model, check_x))
                ref = None
                if original is not None:
                    ref = Session(original, name, check_x, used, wd)
                    rec["original_ok"] = verify(ref, original, check_x)["ok"]
            except PrunekitError:
                raise
            except Exception as e:  # noqa: BLE001 - a runtime that cannot take the model
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                result["runtimes"][name] = rec
                continue
            rec["latency_ms"] = {}
            if ref is not None:
                rec["original_latency_ms"], rec["ratio"], rec["ratio_se"] = {}, {}, {}
            for b in sizes:
                xb = batched_input(example_input, b)
                with _num_threads(used):
                    fa = ref.caller(xb) if ref is not None else None
                    ta, tb = time_pair(fa, sess.caller(xb), max_seconds=max_seconds,
                                       min_repeats=min_repeats, precision=precision)
                rec["latency_ms"][str(b)] = _stats(tb)
                if ref is not None:
                    rec["original_latency_ms"][str(b)] = _stats(ta)
                    rec["ratio"][str(b)], rec["ratio_se"][str(b)] = pair_ratio(ta, tb)
            result["runtimes"][name] = rec
    result["slower"] = slower_cases(result)
    return result


def slower_cases(result: dict[str, Any], tolerance: float = SLOWER_TOLERANCE) -> list[dict[str, Any]]:
    """Runtime and batch size of every measurement in a :func:`profile_runtimes` result where the
    model was slower than its original (``ratio > 1 + tolerance``; the tolerance absorbs timing
    noise: two identical models measure within a few percent of each other)."""
    cases = []
    for name, rec in result.get("runtimes", {}).items():
        for b, r in (rec.get("ratio") or {}).items():
            if r > 1.0 + tolerance:
                cases.append({"runtime": name, "batch": int(b), "ratio": r})
    return cases


def slower_warning(result: dict[str, Any], label: str = "the pruned model") -> str | None:
    """One warning line naming every runtime and batch size where ``label`` measured slower than
    the original (:func:`slower_cases`), or ``None``."""
    cases = result.get("slower")
    if cases is None:
        cases = slower_cases(result)
    if not cases:
        return None
    where = ", ".join(f"{c['runtime']} batch {c['batch']} ({c['ratio']:.2f}x)" for c in cases)
    return f"warning: {label} measured slower than the original on {where}"
