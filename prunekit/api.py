"""``prunekit.prune``: one entry point for every method, with measurement and fine-tuning."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from . import methods
from .engine import (
    PruningPlan,
    analyse,
    layer_names,
    leftover_hooks,
    refusal_error,
    refusals_before_copy,
)
from .engine.budget import check_fraction, check_round_to, count_macs_params
from .errors import ConfigError, DataError, ModelError, PrunekitError


@dataclass
class PruneResult:
    """What :func:`prune` returns: the smaller model, its plan (``None`` for the peer) and a
    JSON-serialisable report (MACs/params before and after, per-layer widths, accuracies,
    wall time of each phase)."""

    model: nn.Module
    plan: PruningPlan | None
    report: dict[str, Any] = field(default_factory=dict)
    #: the method's figure data (e.g. csgd's ``"dendrogram"``, slimming's ``"bn_factors"``)
    figures: dict[str, Any] = field(default_factory=dict)


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d / Linear, by name."""
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def split_data(data: Any, pair_only: bool = False) -> tuple[Any, Any]:
    """``(train, test)`` from ``data``: ``None``, one dataset (training / calibration only) or a
    ``(train, test)`` pair (``pair_only``: nothing else is accepted)."""
    if data is None:
        return None, None
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ConfigError("data must be a dataset or a (train, test) pair")
        return data[0], data[1]
    if pair_only:
        raise ConfigError("data must be a (train, test) pair of datasets (either may be None)")
    return data, None


def check_budget(ratio: float | None, target_macs: float | None, optional: bool = False,
                 target_latency: float | None = None) -> None:
    """Exactly one of ``ratio`` / ``target_macs`` / ``target_latency`` (at most one when
    ``optional``: a method that chooses its widths itself), each strictly inside (0, 1)."""
    given = [n for n, v in (("ratio", ratio), ("target_macs", target_macs),
                            ("target_latency", target_latency)) if v is not None]
    names = "ratio or target_macs" if target_latency is None else \
        "ratio, target_macs or target_latency"
    if len(given) > 1:
        raise ConfigError(f"give exactly one of {names} (got {' and '.join(given)})"
                          if target_latency is not None else f"give exactly one of {names}")
    if not given and not optional:
        raise ConfigError(f"give exactly one of {names}")
    if ratio is not None:
        check_fraction("ratio", ratio)
    elif target_macs is not None:
        check_fraction("target MACs", target_macs)
    elif target_latency is not None:
        check_fraction("target latency", target_latency)


def latency_target(method: str, target_latency: float, runtime: str | None, batch_size: int = 1,
                   threads: int | None = None, round_to: int | None = None, progress: Any = None,
                   measure_seconds: float = 1.0) -> Any:
    """The :class:`~prunekit.engine.budget.LatencyTarget` of a ``target_latency`` budget, after
    checking that ``method`` searches its widths through prunekit's budget (criteria, csgd,
    thinet, lasso, autopruner, ...; Torch-Pruning's peers only with ``round_to``) and that
    ``runtime`` is installed."""
    from .engine.budget import LatencyTarget
    from .measure.runtimes import check_runtimes

    spec = methods.spec(method)
    if not spec.round_to:
        ok = ", ".join(n for n, s in methods.specs().items() if s.round_to)
        raise ConfigError(f"a latency budget needs a method whose widths come from prunekit's "
                          f"budget search; {method!r} chooses them by thresholds or step by step "
                          f"(supported: {ok})")
    if method.startswith("tp:") and round_to is None:
        raise ConfigError(f"{method} takes a latency budget only with round_to (--round-to): "
                          "Torch-Pruning's own ratio search knows MACs only")
    if runtime is None:
        raise ConfigError("target_latency needs a runtime (--runtime), e.g. onnxruntime")
    (runtime,) = check_runtimes([runtime])
    return LatencyTarget(target_latency, runtime, batch_size, threads, progress=progress,
                         measure_seconds=measure_seconds)


def check_depth(method: str, target_latency: float | None, depth: int | str) -> int | str:
    """``depth`` (``latency_depth``, ``--depth``) if it applies: a whole number of branches
    per stage, with a latency budget and a method that keeps the top-ranked channels of each
    group (:attr:`~prunekit.methods.registry.MethodSpec.vanishes`); else a ConfigError.
    ``"auto"`` (the default) is ``"auto"`` where a whole number would apply, else 0: one
    branch per stage tried where widths alone pay badly
    (:func:`prunekit.measure.latency_depth.solve_auto`)."""
    if depth == "auto":
        return "auto" if target_latency is not None and methods.spec(method).vanishes else 0
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ConfigError(f"latency_depth (--depth) must be 'auto' or a whole number of "
                          f"branches per stage >= 0, got {depth!r}")
    if not depth:
        return 0
    if target_latency is None:
        raise ConfigError("latency_depth (--depth) applies to a latency budget "
                          "(target_latency, --target-latency)")
    if not methods.spec(method).vanishes:
        ok = ", ".join(n for n, s in methods.specs().items() if s.vanishes)
        raise ConfigError(f"latency_depth (--depth) removes residual branches by keeping no "
                          f"channel of them, which {method!r} cannot plan (supported: {ok})")
    return depth


#: :func:`prune`'s own keywords (offered as suggestions for a misspelt method option)
PRUNE_KEYWORDS = ("model", "example_inputs", "method", "ratio", "target_macs", "data",
                  "finetune_epochs", "distill", "train_config", "ignored_layers", "seed",
                  "evaluate", "round_to", "expand", "refine_labels", "skip_unsupported",
                  "target_latency", "runtime", "latency_batch_size", "latency_threads", "progress",
                  "latency_fractions", "latency_predictor", "latency_depth")

#: training images the output change of removing each residual branch is measured on
DEPTH_IMAGES = 64


def finetune(model: nn.Module, train_set: Any, epochs: int, *, teacher: nn.Module | None = None,
             train_config: Any = None, seed: int = 0, expand: bool = False,
             refine_labels: bool = False) -> float:
    """Fine-tune ``model`` in place for ``epochs`` epochs; returns the seconds spent.

    Parameters
    ----------
    model : nn.Module
        The pruned network.
    train_set : dataset
        Training data.
    epochs : int
        Epochs (0: nothing happens).
    teacher : nn.Module, optional
        Distil from this network (read only).
    train_config : prunekit.train.TrainConfig, optional
        Settings (default ``TrainConfig(lr=0.01)``); epochs and seed are set here.
    seed : int
        Seed of the run.
    expand, refine_labels : bool
        The small-data recipe (:func:`prunekit.train.smalldata.finetune_small_data`):
        training-set expansion and/or soft-label refinement.
    """
    if epochs <= 0:
        return 0.0
    if train_set is None:
        raise ConfigError("fine-tuning needs training data")
    from .train import Hooks, TrainConfig, fit

    cfg = copy.copy(train_config) if train_config is not None else TrainConfig(lr=0.01)
    cfg.epochs, cfg.seed = int(epochs), seed
    t = time.perf_counter()
    if expand or refine_labels:
        from .train.smalldata import finetune_small_data
        if not callable(getattr(train_set, "batch", None)):
            raise DataError("expand / refine_labels (small-data fine-tuning) need an in-memory "
                            f"ImageDataset, got {type(train_set).__name__}")
        finetune_small_data(model, teacher, train_set, epochs, expand=expand,
                            distill=teacher is not None, refine_labels=refine_labels, cfg=cfg, seed=seed)
    else:
        fit(model, train_set, cfg, test_set=None,
            hooks=Hooks(teacher=teacher) if teacher is not None else None)
    model.eval()
    return time.perf_counter() - t


def check_runs(pruned: nn.Module, example_inputs: Any) -> None:
    """:class:`~prunekit.errors.ModelError` naming the failing module when the pruned model no
    longer runs on the example inputs: a module that keeps its own record of a channel count
    (e.g. a ``shape`` tuple used in ``view``) the surgery cannot know about. A typed refusal
    instead of a model that fails later in the user's hands."""
    x = example_inputs
    if isinstance(x, torch.Tensor) and x.dim():
        x = x[:1]
    stack: list[str] = []

    def leave(*_: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for name, m in pruned.named_modules():
        handles.append(m.register_forward_pre_hook(lambda *_, n=name: stack.append(n)))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad():
            pruned(x)
    except Exception as e:  # any failure of the user's forward code
        where = f" in {stack[-1]!r} ({type(dict(pruned.named_modules())[stack[-1]]).__name__})" \
            if stack and stack[-1] else ""
        raise ModelError(f"the pruned model does not run{where}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}; that module keeps a channel count of "
                         "its own that pruning cannot update: leave it out with ignored_layers "
                         "(--ignore) or skip_unsupported") from e
    finally:
        for h in handles:
            h.remove()


def measure(original: nn.Module, pruned: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
    """MACs, params and per-layer widths of ``original`` and ``pruned``, and their fractions."""
    macs0, params0 = count_macs_params(original, example_inputs)
    macs1, params1 = count_macs_params(pruned, example_inputs)
    widths0, widths1 = layer_widths(original), layer_widths(pruned)
    return {"macs_before": macs0, "macs_after": macs1, "params_before": params0,
            "params_after": params1, "macs_fraction": macs1 / macs0, "params_fraction": params1 / params0,
            "widths": {n: [w, widths1.get(n, 0)] for n, w in widths0.items()}}


def prune(model: nn.Module, example_inputs: torch.Tensor | None = None,
          method: str = methods.DEFAULT_METHOD,
          ratio: float | None = None, target_macs: float | None = None, data: Any = None, *,
          finetune_epochs: int = 0, distill: bool = False, train_config: Any = None,
          ignored_layers: list[nn.Module | str | type] | None = None, seed: int = 0,
          evaluate: bool = True, round_to: int | None = None, expand: bool = False,
          refine_labels: bool = False, skip_unsupported: bool = False,
          target_latency: float | None = None, runtime: str | None = None,
          latency_batch_size: int = 1, latency_threads: int | None = None, progress: Any = None,
          latency_fractions: tuple[float, ...] | None = None, latency_predictor: str = "auto",
          latency_depth: int | str = "auto", **method_options: Any) -> PruneResult:
    """Prune ``model`` with ``method`` to a ``ratio`` of removed filters or a ``target_macs``
    fraction of the original MACs.

    The stages are :func:`prunekit.methods` ``run`` (the method), :func:`finetune` and
    :func:`measure`; :func:`prunekit.report.compare` composes the same stages.

    Parameters
    ----------
    model : nn.Module
        A trained network; it is not modified (the method works on a copy).
    example_inputs : Tensor, optional
        An input batch for tracing and counting; defaults to one image of ``data``.
    method : str
        A criterion (``l1``, ``apoz`` ...: one-shot), a method (``csgd``, ``thinet`` ...) or a
        peer (``tp:l1`` ...). See :func:`prunekit.methods.available`.
    ratio, target_macs, target_latency : float
        Exactly one: fraction of filters removed per layer, fraction of MACs kept, or fraction
        of the original's latency kept on ``runtime`` (a method that chooses its widths itself,
        such as ``mrts``, also runs with none). The latency budget is measured on this machine
        (:mod:`prunekit.measure.latency_table`: a cached per-group latency table, the method's
        widths searched against it, or from a batch of 16 on a latency model fitted to
        end-to-end measurements (``latency_predictor``); then measured end to end and
        corrected); the report's
        ``latency_budget`` holds the predicted and measured ratios, and ``speed`` the final
        model timed against the original.
    runtime : str, optional
        With ``target_latency`` (required) or alone: the runtime the result is timed on
        (:data:`prunekit.measure.runtimes.RUNTIMES`); the report's ``speed`` then compares the
        pruned model with the original there, interleaved.
    latency_batch_size, latency_threads : int
        Batch size and threads of those measurements (default 1 and torch's setting). Unless
        ``round_to`` says otherwise, a latency budget tries widths in multiples of the
        runtime's channel block on this CPU first
        (:func:`~prunekit.measure.runtimes.channel_block`: 16 with AVX-512; groups of at most
        that many channels whole), and where those cannot reach the target, multiples of
        :data:`~prunekit.engine.budget.DEFAULT_ROUND_TO`.
    progress : callable(str), optional
        Receives progress lines of the latency measurements.
    latency_fractions : tuple of float, optional
        Candidate widths per group in the latency table (default a quarter, half and three
        quarters; fewer make the table cheaper on large models).
    latency_predictor : {"auto", "table", "model"}
        What allocates the widths of a latency budget: the per-group table, or a model of the
        widths' MACs and memory traffic fitted to end-to-end measurements
        (:mod:`prunekit.measure.latency_model`); ``auto`` (the command line's): the model from
        a latency batch of 16 on.
    latency_depth : int or "auto"
        Up to this many residual branches of each stage may go whole under a latency budget
        (the hidden channels of a residual block: the block becomes its shortcut plus a
        constant; every stage keeps one), before the widths are cut
        (:mod:`prunekit.measure.latency_depth`; one-shot criteria methods). The branches
        removed are those whose removal changes the output least (on ``DEPTH_IMAGES``
        training images) per unit of latency saved. More of the MACs per unit of latency on a
        small network at a low target; 1 was the more accurate after fine-tuning
        (``docs/runtimes.md``). ``"auto"`` (default): widths alone, and one branch per stage
        tried as well where the widths keep under 0.75 of the MACs per unit of latency or
        cannot reach the budget, kept where it keeps 1.1 times the MACs
        (:func:`~prunekit.measure.latency_depth.solve_auto`; methods that cannot remove a
        branch: widths alone). 0: widths alone.
    data : dataset, DataLoader or (train, test), optional
        Calibration / training data; the test set, when given, is used for the accuracies.
        Each may be a prunekit ImageDataset (in memory), a streamed image folder, any
        map-style ``Dataset`` of ``(image, label)`` (or image-only, for methods that need no
        labels) or a ``DataLoader`` (iterated, never materialised): see
        :mod:`prunekit.data.batches`.
    finetune_epochs : int
        Epochs of fine-tuning after surgery (0: none).
    distill : bool
        Fine-tune with knowledge distillation from the original model.
    expand, refine_labels : bool
        Fine-tune with the small-data recipe (:func:`finetune`).
    round_to : int, optional
        Round every pruned group's kept width down to a multiple of this (at least one
        multiple; e.g. 8), see :func:`prunekit.engine.budget.round_width`; with ``target_macs``
        the budget search runs over rounded widths.
    train_config : prunekit.train.TrainConfig, optional
        Fine-tuning settings (epochs are overridden by ``finetune_epochs``).
    ignored_layers : list, optional
        Layers whose output channels are kept: modules of ``model``, names, name patterns
        (``"*.attn"``) or module types (``nn.MultiheadAttention``); a container stands for
        everything in it (:func:`prunekit.engine.resolve_layers`).
    skip_unsupported : bool
        Prune every group the engine supports and leave the others as they are (listed in
        ``report["skipped_unsupported"]``) instead of raising one
        :class:`~prunekit.errors.UnsupportedLayerError` that names every unsupported layer.
    **method_options
        The method's options (``prunekit methods NAME`` lists them); an unknown or misspelt
        one raises :class:`~prunekit.errors.ConfigError` naming the closest valid name.

    Returns
    -------
    PruneResult
    """
    spec = methods.spec(method)
    check_budget(ratio, target_macs, optional=spec.chooses_widths, target_latency=target_latency)
    round_to = check_round_to(round_to)
    methods.check_round_to_supported(method, round_to)
    depth = check_depth(method, target_latency, latency_depth)
    budget: Any = target_macs
    if target_latency is not None:
        block = None
        if round_to is None and spec.round_to:
            from .engine.budget import DEFAULT_ROUND_TO
            from .measure.runtimes import channel_block
            round_to = DEFAULT_ROUND_TO
            block = channel_block()
        budget = latency_target(method, target_latency, runtime, latency_batch_size, latency_threads,
                                round_to, progress)
        budget.block = block
        if latency_fractions is not None:
            budget.fractions = tuple(float(q) for q in latency_fractions)
        from .engine.budget import check_predictor
        budget.predictor = check_predictor(latency_predictor)
        budget.depth = depth
    elif runtime is not None:
        from .measure.runtimes import check_runtimes
        check_runtimes([runtime])
    spec.parse_options(method_options, also_valid=PRUNE_KEYWORDS)  # fail before any work
    train_set, test_set = split_data(data)
    if example_inputs is None:
        if train_set is None:
            raise ConfigError("example_inputs or data is required")
        from .data.batches import first_input
        example_inputs = first_input(train_set)
    if depth and train_set is not None:
        from .data.batches import iter_batches
        budget.calibration = next(iter_batches(train_set, DEPTH_IMAGES, DEPTH_IMAGES))[0]
    if isinstance(finetune_epochs, bool) or int(finetune_epochs) != finetune_epochs or finetune_epochs < 0:
        raise ConfigError(f"finetune_epochs must be a whole number >= 0, got {finetune_epochs}")
    finetune_epochs = int(finetune_epochs)
    if (expand or refine_labels) and finetune_epochs == 0:
        raise ConfigError("expand / refine_labels apply to fine-tuning: give finetune_epochs > 0")
    ignored = layer_names(model, ignored_layers)  # names: they resolve again in the copy
    original = model
    # a large model is checked on its weightless twin first: a refusal comes before copying it
    refused = refusals_before_copy(model, example_inputs, ignored)
    if refused and not skip_unsupported:
        raise refusal_error(refused)
    work = copy.deepcopy(model).eval()
    skipped: list[dict[str, str]] = []
    if skip_unsupported:
        if refused is None:
            info = analyse(work, example_inputs, ignored_layers=ignored, skip_unsupported=True)
            info.groups  # noqa: B018  (traced on first use, which fills info.refused)
            refused = info.refused
        skipped = [r.to_dict() for r in refused]
        ignored += sorted({r.group for r in refused} - set(ignored))
    times: dict[str, float] = {}
    report: dict[str, Any] = {"method": method, "ratio": ratio, "target_macs": target_macs,
                              "round_to": round_to, "skipped_unsupported": skipped,
                              "options": {k: v for k, v in method_options.items()
                                          if isinstance(v, (int, float, str, bool, type(None)))}}
    if evaluate and test_set is not None:
        from .train import evaluate as eval_acc
        t = time.perf_counter()
        report["acc_before"] = eval_acc(work, test_set)
        times["eval_s"] = time.perf_counter() - t

    ctx = methods.PruneContext(work, example_inputs, ratio, budget, train_set, test_set,
                               dict(method_options), ignored, seed,
                               round_to=round_to, original=original)
    t = time.perf_counter()
    try:
        out = spec.run(ctx)
    except ConfigError as e:
        if target_latency is not None and not budget.result and "target MACs" in str(e):
            raise ConfigError(f"{method} does not take a latency budget: its widths do not come "
                              "from prunekit's budget search") from None
        raise
    times["prune_s"] = time.perf_counter() - t
    if target_latency is not None:
        if not budget.result:
            raise ConfigError(f"{method} does not take a latency budget: its widths do not come "
                              "from prunekit's budget search")
        report.update(target_latency=target_latency, runtime=budget.runtime,
                      latency_budget=budget.result)
    pruned = out.model.eval()
    if leftover_hooks(pruned):
        raise PrunekitError(f"internal error: hooks left on {leftover_hooks(pruned)}")
    check_runs(pruned, example_inputs)
    report.update({f"method_{k}": v for k, v in out.extra.items()
                   if isinstance(v, (int, float, str, bool, type(None), list, dict))})
    report["method_train_epochs"] = out.train_epochs
    if evaluate and test_set is not None:
        from .train import evaluate as eval_acc
        report["acc_pruned"] = eval_acc(pruned, test_set)
    if finetune_epochs > 0:
        times["finetune_s"] = finetune(pruned, train_set, finetune_epochs,
                                       teacher=copy.deepcopy(original).eval() if distill else None,
                                       train_config=train_config, seed=seed, expand=expand,
                                       refine_labels=refine_labels)
    if evaluate and test_set is not None:
        from .train import evaluate as eval_acc
        report["acc_final"] = (eval_acc(pruned, test_set) if finetune_epochs > 0
                               else report["acc_pruned"])
    report.update(measure(original, pruned, example_inputs))
    if runtime is not None:  # the result itself, timed end to end against the original
        from .measure.runtimes import profile_runtimes
        t = time.perf_counter()
        rt = profile_runtimes(pruned, example_inputs, [latency_batch_size], [runtime],
                              original=original, threads=latency_threads, max_seconds=1.0)
        rec = rt["runtimes"][runtime]
        report["speed"] = {"runtime": runtime, "batch_size": latency_batch_size,
                           "threads": rt["threads"], "ok": rec.get("ok"),
                           "ratio": (rec.get("ratio") or {}).get(str(latency_batch_size)),
                           "latency_ms": rec.get("latency_ms"),
                           "original_latency_ms": rec.get("original_latency_ms"),
                           "slower": rt["slower"]}
        times["speed_s"] = time.perf_counter() - t
    report.update({"finetune_epochs": finetune_epochs, "distill": distill, "expand": expand,
                   "refine_labels": refine_labels, "times": times})
    return PruneResult(pruned, out.plan, report, out.figures)
