"""Compare pruning methods side by side: same model, data, MACs budget and training budget.

:func:`compare` prunes a fresh copy of the model with every method, fine-tunes it within the
shared training budget, measures it (accuracy, MACs, params, CPU and ONNX Runtime latency,
checkpoint size, wall time) and writes everything to a report directory. The per-method
results are written as soon as each method finishes, so an interrupted comparison resumes
where it stopped. ``docs/compare.md`` spells out the rules (the training budget in
particular) and the files written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import methods as _methods
from ..api import check_budget, check_depth, finetune, prune, split_data
from ..errors import ConfigError, DataError, PrunekitError
from ..utils import atomic_path, jsonable

__all__ = ["SCHEMA", "check_methods", "compare", "fit_budget", "finetune_epochs_left", "slug", "machine_info"]

#: Version of the ``results.json`` / ``methods/<slug>.json`` layout.
SCHEMA = 1

Notify = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def slug(method: str) -> str:
    """A file-name-safe form of a method name: ``"tp:l1"`` -> ``"tp-l1"``.

    Only letters, digits, ``_``, ``.`` and ``-`` are kept; anything else becomes ``-`` (a colon
    in a relative link would read as a URL scheme in Markdown and HTML).
    """
    return re.sub(r"[^A-Za-z0-9_.-]", "-", method)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


def _roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (so stored and fresh settings compare equal)."""
    return json.loads(json.dumps(jsonable(obj)))


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: OS, Python, torch, ONNX Runtime, CPU, threads, date."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ort = None
    with contextlib.suppress(ImportError):
        import onnxruntime

        ort = onnxruntime.__version__
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort, "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _fingerprint_model(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of the state dict (16 hex digits)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _describe_data(dataset: Any) -> dict[str, Any] | None:
    """Name, size and a content hash of a dataset (``None`` for no dataset)."""
    if dataset is None:
        return None
    from ..data.batches import count, is_loader

    name = getattr(dataset.dataset if is_loader(dataset) else dataset, "name", type(dataset).__name__)
    try:
        samples: int | None = count(dataset)
    except DataError:  # a loader without a length
        samples = None
    out: dict[str, Any] = {"name": name, "samples": samples}
    images, targets = getattr(dataset, "images", None), getattr(dataset, "targets", None)
    if isinstance(images, torch.Tensor) and isinstance(targets, torch.Tensor):
        h = hashlib.sha256()
        for t in (images, targets):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out["sha256"] = h.hexdigest()[:16]
    return out


class _Notes:
    """Progress lines: to a callable, to stderr (``True``) or nowhere (``False``)."""

    def __init__(self, progress: bool | Notify) -> None:
        self.fn: Notify | None = progress if callable(progress) else (
            (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None)

    def __call__(self, message: str) -> None:
        if self.fn is not None:
            self.fn(message)


# ---------------------------------------------------------------------------------------------
# the training budget
# ---------------------------------------------------------------------------------------------

def fit_budget(method: str, budget: int, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options that fit ``method``'s own training into a budget of ``budget`` epochs.

    Only options the caller did not set are returned (the caller's values always win; a
    method that then trains more than the budget is reported as over budget):

    each method's registration says which option is its own training
    (:meth:`prunekit.methods.MethodSpec.budget_options`): e.g. csgd's ``centripetal_epochs``
    becomes ``min(default, budget)``; a method that trains nothing itself has nothing to fit.

    Parameters
    ----------
    method : str
        Method name.
    budget : int
        Total training epochs allowed per method (``finetune_epochs`` of :func:`compare`).
    options : mapping
        The options the caller gives the method.

    Returns
    -------
    dict
        Option name -> fitted value.
    """
    return _methods.spec(method).budget_options(int(budget), options)


def finetune_epochs_left(budget: int, own_epochs: float) -> tuple[int, bool]:
    """Fine-tuning epochs left after a method's own training, and whether it overran.

    ``floor(budget - own_epochs)`` epochs (a whole number, so own + fine-tuning never exceeds
    the budget); 0 and ``True`` when the method alone trained more than ``budget`` epochs.
    """
    over = own_epochs > budget + 1e-9
    return (0 if over else int(math.floor(budget - own_epochs + 1e-9))), over


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

def _latency(original: nn.Module, pruned: nn.Module, x: torch.Tensor, batch_sizes: Sequence[int],
             seconds: float, threads: int | None = None) -> dict[str, Any]:
    """Pruned vs original, back to back, per batch size and layout; ``best`` is the layout in
    which the pruned model is fastest (the ratio reported for it is in that same layout)."""
    from ..measure import LAYOUTS, compare_latency

    out: dict[str, Any] = {}
    for b in batch_sizes:
        per: dict[str, Any] = {}
        for layout in LAYOUTS:
            r = compare_latency(original, pruned, x, b, layout, max_seconds=seconds,
                                threads=threads)
            per[layout] = {"original_ms": r["median_ms_a"], "pruned_ms": r["median_ms_b"],
                           "ratio": r["ratio"], "repeats": r["repeats"], "threads": r["threads"]}
        per["best"] = min(LAYOUTS, key=lambda lay: per[lay]["pruned_ms"])
        out[f"b{b}"] = per
    return out


def _onnx(pruned: nn.Module, x: torch.Tensor, path: Path, original_onnx: Path | None,
          batch_sizes: Sequence[int], seconds: float, threads: int | None = None) -> dict[str, Any]:
    """Export ``pruned`` to ``path`` (verified against PyTorch) and time it with ONNX Runtime
    right after the original's export, per batch size."""
    from ..io import export_onnx
    from ..measure import onnx_latency

    info = export_onnx(pruned, x, path, check=True, dynamic_batch=True)
    out: dict[str, Any] = {"file": path.name, "file_size_bytes": info["file_size_bytes"],
                           "max_abs_diff": info["max_abs_diff"], "opset": info["opset"],
                           "exporter": info["exporter"], "latency": {}}
    threads = threads or torch.get_num_threads()
    for b in batch_sizes:
        rec: dict[str, Any] = {}
        if original_onnx is not None:
            rec["original_ms"] = onnx_latency(original_onnx, x, b, max_seconds=seconds / 2,
                                              threads=threads)["median_ms"]
        rec["pruned_ms"] = onnx_latency(path, x, b, max_seconds=seconds / 2, threads=threads)["median_ms"]
        if "original_ms" in rec and rec["original_ms"] > 0:
            rec["ratio"] = rec["pruned_ms"] / rec["original_ms"]
        out["latency"][f"b{b}"] = rec
    return out


# ---------------------------------------------------------------------------------------------
# one method
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
    """What every method of one comparison shares."""

    original: nn.Module
    x: torch.Tensor
    train_set: Any
    test_set: Any
    ratio: float | None
    target_macs: float | None
    budget: int
    distill: bool
    train_config: Any
    seed: int
    onnx: bool
    batch_sizes: list[int]
    latency_seconds: float
    out_dir: Path
    original_onnx: Path | None
    acc_before: float | None
    meta: dict[str, Any]
    note: _Notes
    #: ``target_latency`` budget (with ``runtime`` and ``latency_batch_size``) and the runtimes
    #: every pruned model is verified and timed on against the original (#18)
    target_latency: float | None = None
    runtime: str | None = None
    latency_batch_size: int = 1
    runtimes: list[str] = dataclasses.field(default_factory=list)
    #: intra-op threads of every latency measurement (None: torch's current setting)
    threads: int | None = None
    #: whole residual branches per stage the latency budget may remove (``latency_depth``)
    latency_depth: int | str = 0


def _evaluate(model: nn.Module, test_set: Any) -> float | None:
    if test_set is None:
        return None
    from ..train import evaluate

    return evaluate(model, test_set)


def _run_method(run: _Run, method: str, options: dict[str, Any], fitted: dict[str, Any],
                settings: dict[str, Any]) -> dict[str, Any]:
    """Prune, fine-tune within the budget, measure and save one method; its result entry."""
    from ..io import save

    name = slug(method)
    t_start = time.perf_counter()
    torch.manual_seed(run.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = prune(run.original, run.x, method=method, ratio=run.ratio, target_macs=run.target_macs,
                    data=(run.train_set, run.test_set), finetune_epochs=0, seed=run.seed,
                    evaluate=False, target_latency=run.target_latency,
                    runtime=run.runtime if run.target_latency is not None else None,
                    latency_batch_size=run.latency_batch_size, latency_threads=run.threads,
                    latency_depth=run.latency_depth,
                    progress=run.note, **options)
        rep = res.report
        pruned = res.model.cpu().eval()
        times = dict(rep.get("times", {}))
        own = float(rep.get("method_train_epochs") or 0.0)
        ft, over = finetune_epochs_left(run.budget, own)
        if over:
            run.note(f"  {method}: trained {own:g} epoch(s) by itself, more than the budget of "
                     f"{run.budget}; no fine-tuning")
        t = time.perf_counter()
        acc_pruned = _evaluate(pruned, run.test_set)
        times["eval_s"] = time.perf_counter() - t
        acc_final = acc_pruned
        if ft > 0:
            run.note(f"  {method}: fine-tuning {ft} epoch(s)")
            times["finetune_s"] = finetune(pruned, run.train_set, ft, train_config=run.train_config,
                                           seed=run.seed, teacher=copy.deepcopy(run.original)
                                           if run.distill else None)
            pruned = pruned.cpu().eval()
            acc_final = _evaluate(pruned, run.test_set)
    warn_msgs = list(dict.fromkeys(  # the methods' own warnings, not the libraries' noise
        str(w.message) for w in caught if issubclass(w.category, (RuntimeWarning, UserWarning))
        and f"{os.sep}prunekit{os.sep}" in str(w.filename)))
    for msg in warn_msgs:
        run.note(f"  warning: {msg}" if msg.startswith(f"{method}:") else f"  {method}: warning: {msg}")

    extra = {k[len("method_"):]: v for k, v in rep.items() if k.startswith("method_")}
    extra.pop("factors", None)  # the figure data below carries them
    figures = jsonable(res.figures)

    run.note(f"  {method}: measuring latency")
    t = time.perf_counter()
    latency = _latency(run.original, pruned, run.x, run.batch_sizes, run.latency_seconds,
                       run.threads)
    onnx: dict[str, Any] | None = None
    if run.onnx:
        try:
            onnx = _onnx(pruned, run.x, run.out_dir / f"{name}.onnx", run.original_onnx,
                         run.batch_sizes, run.latency_seconds, run.threads)
        except PrunekitError as e:  # the pruned model itself is fine; record why ONNX is not
            onnx = {"error": str(e)}
            run.note(f"  {method}: ONNX export failed: {e}")
    runtimes: dict[str, Any] | None = None
    if run.runtimes:
        from ..measure.runtimes import profile_runtimes, slower_warning

        real = getattr(run.test_set, "example_input", None)  # outputs checked on real images
        check_x = real(8) if callable(real) else None
        runtimes = profile_runtimes(pruned, run.x, run.batch_sizes, run.runtimes, original=run.original,
                                    max_seconds=run.latency_seconds, check_input=check_x,
                                    threads=run.threads)
        warning = slower_warning(runtimes, f"{method}'s pruned model")
        if warning:
            run.note(f"  {warning}")
    times["measure_s"] = time.perf_counter() - t

    ckpt = run.out_dir / f"{name}.pt"
    meta = {**run.meta, "method": method, "test_acc": acc_final,
            "input_shape": list(run.x.shape[1:]), "macs_fraction": rep["macs_fraction"]}
    save(pruned, ckpt, meta=jsonable(meta), plan=res.plan.to_json() if res.plan is not None else None)
    wall = time.perf_counter() - t_start
    return {
        "method": method, "slug": name, "status": "ok", "settings": settings,
        "acc_before": run.acc_before, "acc_pruned": acc_pruned, "acc_final": acc_final,
        "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
        "macs_fraction": rep["macs_fraction"], "params_before": rep["params_before"],
        "params_after": rep["params_after"], "params_fraction": rep["params_fraction"],
        "budget": {"epochs": run.budget, "method_epochs": own, "finetune_epochs": ft,
                   "total_epochs": own + ft, "over_budget": over, "fitted_options": fitted},
        "latency": latency, "onnx": onnx, "runtimes": runtimes,
        "latency_budget": rep.get("latency_budget"),
        "checkpoint": {"file": ckpt.name, "file_size_bytes": ckpt.stat().st_size},
        "wall_s": wall, "times": times, "widths": rep["widths"], "extra": extra,
        "figures": figures, "warnings": warn_msgs, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),  # a resumed entry may come from another machine or day
    }


# ---------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------

def _stored(path: Path, settings: dict[str, Any], out_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The stored result at ``path`` if it is complete and was made with ``settings``; else
    ``None`` and why it must be redone (empty when there is no stored result)."""
    if not path.is_file():
        return None, ""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, "its result file is unreadable"
    if not isinstance(entry, dict) or entry.get("status") != "ok":
        return None, "it failed last time" if isinstance(entry, dict) else "its result file is invalid"
    old = entry.get("settings")
    if old != settings:
        keys = sorted(k for k in set(settings) | set(old or {})
                      if (old or {}).get(k) != settings.get(k)) if isinstance(old, dict) else ["all"]
        return None, f"its settings changed ({', '.join(keys)})"
    missing = [f for f in (entry.get("checkpoint", {}).get("file"),
                           (entry.get("onnx") or {}).get("file")) if f and not (out_dir / f).is_file()]
    if missing:
        return None, f"{', '.join(missing)} is missing"
    return entry, ""


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------

def check_methods(methods: Sequence[str] | str) -> list[str]:
    """Validate a comparison's method list (names known, none twice) before any work.

    Parameters
    ----------
    methods : sequence of str or str
        Method names, or one comma-separated string.

    Returns
    -------
    list of str

    Raises
    ------
    ConfigError
        Empty list, an unknown method (named, with the available ones), a duplicate.
    """
    if isinstance(methods, str):
        methods = methods.split(",")
    names = [str(m).strip() for m in methods]
    if not names or any(not n for n in names):
        raise ConfigError(f"methods must be a non-empty list of method names, got {list(methods)!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"method(s) listed twice: {', '.join(dup)}")
    for n in names:
        _methods.get(n)  # ConfigError naming the unknown method and the available ones
    slugs = [slug(n) for n in names]
    clash = sorted({s for s in slugs if slugs.count(s) > 1})
    if clash:
        raise ConfigError(f"methods whose file names clash: {', '.join(clash)}")
    return names


def _accepted_options(method: str) -> set[str]:
    """What a method's entry of ``method_options`` may hold: its options, and ``round_to`` (a
    :func:`~prunekit.prune` keyword that compare passes through)."""
    return set(_methods.spec(method).options.names()) | {"round_to"}


def _check_options(method_options: Mapping[str, Any] | None, names: list[str]) -> dict[str, dict]:
    opts = dict(method_options or {})
    for k in opts:
        if k != "*" and k not in names:
            try:
                _methods.get(k)
            except ConfigError:
                raise ConfigError(f"method_options names an unknown method {k!r} (key options by "
                                  "method name, or '*' for every method)") from None
    for k, v in opts.items():
        if not isinstance(v, Mapping):
            raise ConfigError(f"method_options[{k!r}] must be a mapping of option -> value, "
                              f"got {type(v).__name__}")
    shared = dict(opts.get("*") or {})
    accepted = {n: _accepted_options(n) for n in names}
    for key in shared:
        if not any(key in a for a in accepted.values()):
            from ..methods.options import unknown_option
            raise unknown_option(key, ", ".join(names), set().union(*accepted.values()))
    return {k: dict(v) for k, v in opts.items() if k == "*" or k in names}  # others: not compared


def compare(model: nn.Module, example_inputs: torch.Tensor | None, methods: Sequence[str], *,
            target_macs: float | None = None, ratio: float | None = None, data: Any = None,
            finetune_epochs: int = 0, out_dir: str | os.PathLike, distill: bool = False,
            method_options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
            onnx: bool = True, progress: bool | Notify = True, train_config: Any = None,
            batch_sizes: Sequence[int] = (1, 64), latency_seconds: float = 2.0,
            meta: Mapping[str, Any] | None = None, report: bool = True,
            target_latency: float | None = None, runtime: str | None = None,
            latency_batch_size: int = 1, runtimes: Sequence[str] | None = None,
            latency_depth: int | str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Prune ``model`` with each of ``methods`` under the same budgets; measure and report.

    Every method starts from a fresh copy of ``model``. The MACs budget (``target_macs`` or
    ``ratio``) is the same for all; so is the training budget ``B = finetune_epochs``: the
    epochs a method trains by itself (its ``MethodOutput.train_epochs``: csgd's centripetal
    epochs, slimming's sparsity epochs, taylor's fine-tuning between steps ...) count against
    ``B`` and the pruned model is then fine-tuned for ``floor(B - own)`` epochs. Options that
    set a method's own training length default to values that fit in ``B``
    (:func:`fit_budget`); a method that still trains more than ``B`` is run, not fine-tuned,
    and flagged ``over_budget``.

    Parameters
    ----------
    model : nn.Module
        The trained network; it is not modified.
    example_inputs : Tensor [1, C, H, W], optional
        Input for tracing, counting and timing; defaults to the first training image.
    methods : sequence of str
        Method names as accepted by :func:`prunekit.prune` (``"l1"``, ``"csgd"``,
        ``"tp:l1"`` ...), or one comma-separated string. All are validated before any work.
    target_macs, ratio : float
        Exactly one: the fraction of the original MACs kept, or of filters removed per layer.
    data : (train, test)
        Training / calibration set and test set (:class:`~prunekit.data.ImageDataset`); the
        test set gives the accuracies.
    finetune_epochs : int
        The training budget ``B`` per method (see above).
    out_dir : path
        Report directory (created if needed); see ``docs/compare.md`` for what goes in it.
    distill : bool
        Fine-tune with knowledge distillation from the original model.
    method_options : mapping, optional
        ``{method: {option: value}}``; the key ``"*"`` gives options to every method that takes
        them (e.g. ``calib_images``; each must be an option of at least one compared method).
    seed : int
        Seed of every method's pruning and fine-tuning.
    onnx : bool
        Export every pruned model to ONNX and time it with ONNX Runtime.
    progress : bool or callable(str)
        Progress lines: ``True`` on stderr, a callable receives them, ``False`` silences them.
    train_config : prunekit.train.TrainConfig, optional
        Fine-tuning settings (default ``TrainConfig(lr=0.01)``; epochs and seed are set here).
    batch_sizes : sequence of int
        Batch sizes timed (PyTorch CPU and ONNX Runtime).
    latency_seconds : float
        Timed seconds per (batch size, layout) setting of the back-to-back comparison.
    meta : mapping, optional
        Facts shown in the report and stored in each checkpoint (checkpoint path, dataset ...).
    report : bool
        Write ``report.md``, ``report.html`` and the figures at the end.
    target_latency, runtime, latency_batch_size
        A measured latency budget instead of ``target_macs`` / ``ratio``: at most that fraction
        of the original's latency on ``runtime`` at that batch size (see
        :func:`prunekit.prune`); each entry then has ``latency_budget``.
    runtimes : sequence of str, optional
        Runtimes (:data:`prunekit.measure.runtimes.RUNTIMES`) on which every pruned model is
        verified and timed against the original, interleaved; each entry then has
        ``runtimes`` (see :func:`prunekit.measure.runtimes.profile_runtimes`).
    latency_depth : int or "auto"
        With ``target_latency``: remove up to this many whole residual branches per stage
        before cutting widths (see :func:`prunekit.prune`); every method must take it (the
        one-shot criteria). ``"auto"`` (default): each method as :func:`prunekit.prune` does
        (widths alone for a method that cannot remove a branch). Each entry's
        ``latency_budget.depth`` names the branches removed, ``latency_budget.depth_auto``
        what ``"auto"`` tried.
    threads : int, optional
        Intra-op threads of every latency measurement: eager PyTorch, the ONNX Runtime
        columns, the deployment runtimes and the latency budget (default: torch's current
        setting). One thread gives steady ratios on a small shared machine.

    Returns
    -------
    dict
        What ``results.json`` holds: ``schema``, ``settings``, ``machine``, ``original``
        (MACs, params, accuracy, file sizes), ``methods`` (one entry per method, in order, with
        ``status`` ``"ok"`` or ``"failed"``), ``skipped`` (methods reused from an earlier run),
        ``redone`` (method -> why a stored result was not reused), ``failed`` (method -> error),
        ``paths``.

    Raises
    ------
    ConfigError
        Unknown method (in ``methods`` or ``method_options``), bad budget, ``out_dir`` a file,
        ``latency_depth`` with a method that cannot remove a branch.
    """
    names = check_methods(methods)
    check_budget(ratio, target_macs, target_latency=target_latency)
    from ..measure.runtimes import check_runtimes
    rts = check_runtimes(runtimes) if runtimes is not None and len(runtimes) else []
    if target_latency is not None:
        from ..api import latency_target
        for name in names:  # every method must take the latency budget: fail before any work
            latency_target(name, target_latency, runtime, latency_batch_size, round_to=8)
    for name in names:  # every method must be able to remove a branch: fail before any work
        check_depth(name, target_latency, latency_depth)
    # each method's own: "auto" is widths alone for a method that cannot remove a branch
    depth = latency_depth if target_latency is not None else 0
    if isinstance(finetune_epochs, bool) or int(finetune_epochs) != finetune_epochs or finetune_epochs < 0:
        raise ConfigError(f"finetune_epochs must be a whole number >= 0, got {finetune_epochs!r}")
    budget = int(finetune_epochs)
    options = _check_options(method_options, names)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ConfigError(f"threads must be a whole number >= 1, got {threads!r}")
    if not (isinstance(latency_seconds, (int, float)) and latency_seconds > 0):
        raise ConfigError(f"latency_seconds must be positive, got {latency_seconds!r}")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes must be positive integers, got {list(batch_sizes)!r}")
    train_set, test_set = split_data(data, pair_only=True)
    if budget > 0 and train_set is None:
        raise ConfigError("a training budget (finetune_epochs > 0) needs training data")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report directory {out} is a file")
    if example_inputs is None:
        if train_set is None:
            raise ConfigError("example_inputs or training data is required")
        from ..data.batches import first_input
        example_inputs = first_input(train_set)
    x = example_inputs.detach().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = x[:1].contiguous()

    note = _Notes(progress)
    (out / "methods").mkdir(parents=True, exist_ok=True)
    original = copy.deepcopy(model).cpu().eval()

    from ..engine.budget import count_macs_params
    from ..io import export_onnx, save

    macs0, params0 = count_macs_params(original, x)
    t = time.perf_counter()
    acc_before = _evaluate(original, test_set)
    eval_s = time.perf_counter() - t
    save(original, out / "original.pt", meta=jsonable({**(meta or {}), "input_shape": list(x.shape[1:])}))
    original_info: dict[str, Any] = {
        "macs": macs0, "params": params0, "acc": acc_before, "eval_s": eval_s,
        "model": type(original).__name__, "arch": getattr(original, "prunekit_arch", None),
        "input_shape": list(x.shape[1:]), "checkpoint": {
            "file": "original.pt", "file_size_bytes": (out / "original.pt").stat().st_size}}
    original_onnx = None
    if onnx:
        info = export_onnx(original, x, out / "original.onnx", check=True, dynamic_batch=True)
        original_onnx = out / "original.onnx"
        original_info["onnx"] = {"file": "original.onnx", "file_size_bytes": info["file_size_bytes"],
                                 "opset": info["opset"], "exporter": info["exporter"]}

    common = {
        "schema": SCHEMA, "ratio": ratio, "target_macs": target_macs, "budget_epochs": budget,
        "distill": bool(distill), "seed": int(seed), "onnx": bool(onnx), "batch_sizes": sizes,
        **({"target_latency": target_latency, "runtime": runtime,
            "latency_batch_size": latency_batch_size} if target_latency is not None else {}),
        **({"latency_depth": depth} if depth else {}),
        **({"threads": threads} if threads is not None else {}),
        **({"runtimes": rts} if rts else {}),
        "train_config": jsonable(train_config) if train_config is not None else None,
        "model": _fingerprint_model(original), "train_data": _describe_data(train_set),
        "test_data": _describe_data(test_set), "input_shape": list(x.shape[1:]),
    }
    run = _Run(original, x, train_set, test_set, ratio, target_macs, budget, bool(distill),
               train_config, int(seed), bool(onnx), sizes, float(latency_seconds), out,
               original_onnx, acc_before, dict(meta or {}), note, target_latency, runtime,
               int(latency_batch_size), rts, threads, depth)

    entries: list[dict[str, Any]] = []
    skipped: list[str] = []
    redone: dict[str, str] = {}
    failed: dict[str, str] = {}
    for i, method in enumerate(names, 1):
        takes = _accepted_options(method)
        given = {**{k: v for k, v in options.get("*", {}).items() if k in takes},
                 **options.get(method, {})}
        fitted = fit_budget(method, budget, given)
        opts = {**given, **fitted}
        settings = _roundtrip({**common, "method": method, "options": opts})
        path = out / "methods" / f"{slug(method)}.json"
        stored, why = _stored(path, settings, out)
        if stored is not None:
            note(f"[{i}/{len(names)}] {method}: done in an earlier run, reusing {path}")
            entries.append(stored)
            skipped.append(method)
            continue
        if why:
            redone[method] = why
            note(f"[{i}/{len(names)}] {method}: redoing: {why}")
        fit_txt = f" (fitted to the budget: {fitted})" if fitted else ""
        note(f"[{i}/{len(names)}] {method}: pruning{fit_txt}")
        t0 = time.perf_counter()
        try:
            entry = _run_method(run, method, opts, fitted, settings)
        except PrunekitError as e:
            failed[method] = str(e)
            entry = {"method": method, "slug": slug(method), "status": "failed", "settings": settings,
                     "error": str(e), "error_type": type(e).__name__,
                     "wall_s": time.perf_counter() - t0,
                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            note(f"[{i}/{len(names)}] {method}: FAILED: {e}")
        else:
            note(f"[{i}/{len(names)}] {method}: done in {entry['wall_s']:.0f} s, MACs "
                 f"{entry['macs_fraction']:.1%}, accuracy {_fmt_acc(entry['acc_final'])}")
        _write_json(path, entry)
        entries.append(entry)

    results: dict[str, Any] = {
        "schema": SCHEMA, "title": "Pruning methods compared",
        "settings": {**common, "methods": names, "method_options": options,
                     "latency_seconds": float(latency_seconds), "meta": dict(meta or {})},
        "machine": machine_info(), "original": original_info, "methods": entries,
        "skipped": skipped, "redone": redone, "failed": failed,
        "paths": {"dir": str(out), "results": "results.json", "report_md": "report.md",
                  "report_html": "report.html"},
    }
    results = _roundtrip(results)
    _write_json(out / "results.json", results)
    if report:
        from .render import write_report

        results["paths"].update(write_report(results, out))
        _write_json(out / "results.json", results)
    note(f"report written to {out}")
    return results


def _fmt_acc(acc: float | None) -> str:
    return "n/a" if acc is None else f"{acc:.2f}%"
