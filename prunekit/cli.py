"""The ``prunekit`` command.

Conventions every command follows (new commands plug in the same way):

* shared options are declared once below as ``Annotated`` aliases (``DataOpt``, ``JsonOpt``,
  ...) and reused in each command's signature;
* a command does its work inside ``with Output(json_) as out:``, reports progress with
  ``out.note(...)`` (stderr) and finishes with ``out.result(obj, summary_lines)``: one JSON
  object on stdout under ``--json``, else the summary lines;
* bad input raises :class:`~prunekit.errors.PrunekitError` (or a typer/click usage error);
  :func:`main` turns it into one ``prunekit: error: ...`` line on stderr and exit code 2;
* files are written through :func:`prunekit.utils.atomic_path` (directly or via
  :func:`prunekit.io.save` / :func:`prunekit.io.export_onnx`), so a failure leaves no partial
  output and an existing file untouched;
* under torchrun only rank 0 prints and writes (:func:`is_main_process`).
"""

import contextlib
import json
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from .errors import CheckpointError, ConfigError, PrunekitError
from .utils import jsonable, resolve_device

app = typer.Typer(
    name="prunekit",
    help="Make trained CNNs physically smaller and faster by removing whole filters.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# ---------------------------------------------------------------------------------------------
# shared options
# ---------------------------------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
TrustCodeOpt = Annotated[bool, typer.Option(
    "--trust-code", help="Allow a checkpoint that names code (a --model file.py:FUNC factory) to "
                         "import and run it to rebuild its model. Only for files you trust.")]
DataOpt = Annotated[str, typer.Option(
    "--data", help="Dataset: fashion-mnist, cifar10, cifar100 or folder:PATH.")]
DataOptionalOpt = Annotated[str | None, typer.Option(
    "--data", help="Dataset: fashion-mnist, cifar10, cifar100 or folder:PATH "
                   "(default: the one the checkpoint was trained on).")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Directory holding the dataset files (default: $PRUNEKIT_DATA, then the "
                       "dataset's usual place).")]
TrainSamplesOpt = Annotated[int | None, typer.Option(
    "--train-samples", min=1, help="Use only the first N training images (quick runs).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; a seeded run is repeatable.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
InputShapeOpt = Annotated[str | None, typer.Option(
    "--input-shape", help="Input shape C,H,W when the checkpoint does not record it (e.g. 3,32,32).")]
CheckpointArg = Annotated[Path, typer.Argument(help="A prunekit checkpoint (.pt).", show_default=False)]
CheckpointOrModelArg = Annotated[Path | None, typer.Argument(
    help="A prunekit checkpoint (.pt); or give --model instead.", show_default=False)]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="Your own model instead of a checkpoint: torchvision:NAME, timm:NAME, "
                    "hf:MODEL_TYPE, path/to/file.py:FUNC, package.module:FUNC or zoo:NAME "
                    "(FUNC returns the nn.Module).")]
WeightsOpt = Annotated[Path | None, typer.Option(
    "--weights", help="With --model: a state dict to load (.pt/.pth, or .safetensors).")]
NumClassesOpt = Annotated[int | None, typer.Option(
    "--num-classes", min=1, help="With --model: the number of classes, passed to the model's "
                                 "builder (when it takes num_classes).")]


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------

def is_main_process() -> bool:
    """True unless this is a non-zero rank under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


class Output:
    """Where a command's output goes.

    Progress notes go to stderr; the result goes to stdout, as one JSON object under
    ``--json`` (while the command runs, anything else printed to stdout is diverted to stderr
    so the JSON stays the only thing there) or as human-readable lines otherwise. On non-zero
    torchrun ranks nothing is printed.
    """

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.main = is_main_process()
        self._stdout: TextIO = sys.stdout
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Output":
        self._stdout = sys.stdout
        if self.json_mode:
            self._stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        from .utils import drop_held_lines, flush_held_lines

        if exc_type is None and self.main:
            flush_held_lines()  # a successful run shows all its notes, before its result
        drop_held_lines()
        self._stack.close()

    def note(self, message: str) -> None:
        """A progress line on stderr (also under ``--json``: stdout stays one JSON object): as
        is on a terminal, prefixed ``prunekit:`` when stderr is a log file or a pipe, hidden with
        ``PRUNEKIT_PROGRESS=0`` (:func:`prunekit.utils.progress_mode`). Commands validate their
        input before the first note, so bad input still leaves exactly one error line."""
        from .utils import hold_line, progress_mode

        mode = progress_mode()
        if not self.main or mode == "off":
            return
        if mode == "bar":
            print(message, file=sys.stderr, flush=True)
        else:  # held until the next progress line, so that an early failure stays one line
            hold_line(f"prunekit: {message}")

    def warn(self, message: str) -> None:
        """A warning line on stderr, whatever the progress setting (after any held notes)."""
        if self.main:
            from .utils import flush_held_lines

            flush_held_lines()
            print(f"prunekit: {message}", file=sys.stderr, flush=True)

    def result(self, obj: dict[str, Any], summary: Sequence[str] = ()) -> None:
        """The command's result: ``obj`` as JSON under ``--json``, else ``summary``."""
        if not self.main:
            return
        from .utils import flush_held_lines

        flush_held_lines()
        if self.json_mode:
            self._stdout.write(json.dumps(jsonable(obj), allow_nan=False) + "\n")
        else:
            for line in summary:
                self._stdout.write(line + "\n")
        self._stdout.flush()


def check_output_path(path: Path, what: str = "output") -> Path:
    """Fail early (before any long work) when ``path`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory")
    if not parent.is_dir():
        raise ConfigError(f"{what} directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{what} directory is not writable: {parent}")
    return path


def check_device(device: str) -> str:
    """Validate a ``--device`` value (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def parse_int_list(text: str, option: str) -> list[int]:
    """``"1,64"`` -> ``[1, 64]``; every value must be a positive integer."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{option} must be positive integers, got {text!r}")
    return values


def parse_sparsity(text: str | None) -> float | str | None:
    """``--sparsity``: ``auto``, ``liu`` or a finite number >= 0."""
    if text is None or text in ("auto", "liu"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--sparsity must be a number >= 0, 'auto' or 'liu', got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"--sparsity must be a finite number >= 0, got {text!r}")
    return value


def dataset_for(meta: dict[str, Any], given: str | None, checkpoint: Path | None) -> str:
    """The dataset named by ``--data`` (``given``), else the one ``checkpoint`` records; a
    model from ``--model`` (no checkpoint) records none, so it needs ``--data``."""
    name = given or meta.get("data")
    if not name:
        raise ConfigError("the checkpoint does not record its dataset; pass --data"
                          if checkpoint is not None else "--model needs --data")
    return name


def input_shape_for(meta: dict[str, Any], override: str | None) -> list[int]:
    """``--input-shape`` if given, else the checkpoint's ``meta["input_shape"]``."""
    if override is not None:
        shape = parse_int_list(override, "--input-shape")
        if len(shape) != 3:
            raise ConfigError(f"--input-shape must be C,H,W, got {override!r}")
        return shape
    shape = meta.get("input_shape")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ConfigError("the checkpoint does not record its input shape; pass --input-shape C,H,W")
    return shape


def example_input(shape: Sequence[int], batch: int = 1, seed: int = 0):
    """A seeded standard-normal batch ``[batch, *shape]`` (data-independent)."""
    import torch

    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def check_forward(model, x, what: str) -> None:
    """One forward pass before any long work: a model that cannot take the data's images is a
    user error (exit 2), not a crash halfway through training."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as exc:
        raise ConfigError(f"{what} cannot take inputs of shape {list(x.shape[1:])}: "
                          f"{str(exc).splitlines()[0]}") from None
    finally:
        model.train(was_training)


def check_finite(model, path: Path) -> None:
    """Refuse a checkpoint whose weights or buffers hold NaN or Inf."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: {name} holds NaN or Inf values")


def load_data(name: str, data_dir: Path | None, train_samples: int | None = None,
              input_shape: Sequence[int] | None = None):
    """``prunekit.data.load`` behind the CLI's data options.

    An image folder (``folder:PATH``, ``images:PATH``) is read at the model's ``input_shape``
    when one is known (else 32 x 32; a non-square ``H, W`` too: each image is resized with its
    aspect ratio kept and centre-cropped), and streamed from disk instead of held in memory
    when it would not fit :func:`prunekit.data.in_memory_limit` (``folder+stream:PATH`` always
    streams).
    """
    from .data import load

    size = None
    if (name.strip().lower().startswith(("folder:", "folder+stream:", "images:"))
            and isinstance(input_shape, (list, tuple)) and len(input_shape) == 3
            and all(isinstance(v, int) and v > 0 for v in input_shape)):
        h, w = int(input_shape[1]), int(input_shape[2])
        size = h if h == w else (h, w)
    return load(name, root=data_dir, train_samples=train_samples, image_size=size)


def load_checkpoint(path: Path, trust_code: bool = False):
    """``(model, meta)`` from a prunekit checkpoint; one that names code to build its model (a
    factory spec) loads only with ``trust_code`` (``--trust-code``)."""
    from .io import load

    return load(path, trust_code=trust_code)


def model_from_cli(checkpoint: Path | None, model_spec: str | None,
                   weights: Path | None, trust_code: bool = False,
                   num_classes: int | None = None) -> tuple[Any, dict[str, Any], str]:
    """``(model, meta, source)`` from exactly one of a checkpoint or ``--model`` (with its
    optional ``--weights`` and ``--num-classes``); a model built from a spec has
    ``meta["model_spec"]``."""
    if (checkpoint is None) == (model_spec is None):
        raise ConfigError("give exactly one of a CHECKPOINT argument or --model SPEC")
    if weights is not None and model_spec is None:
        raise ConfigError("--weights applies to --model (a checkpoint holds its own weights)")
    if num_classes is not None and model_spec is None:
        raise ConfigError("--num-classes applies to --model (a checkpoint records its own)")
    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, trust_code)
        return model, meta, str(checkpoint)
    from .models.spec import build, load_weights

    model = build(model_spec, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    spec = getattr(model, "prunekit_spec", None)
    meta: dict[str, Any] = {"model_spec": spec} if spec is not None else {}
    return model, meta, model_spec


def fmt_count(n: float) -> str:
    """13824 -> ``"13.8K"``, 40_550_000 -> ``"40.55M"``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------

def _train(out: Output, *, model: str, data: str, data_dir: Path | None, train_samples: int | None,
           epochs: int, batch_size: int, lr: float, weight_decay: float, schedule: str,
           label_smoothing: float, seed: int, device: str, out_path: Path, resume: bool,
           max_steps_per_epoch: int | None = None, weights: Path | None = None,
           input_shape: str | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """Train a model (a zoo name or any ``--model`` spec, optionally from ``weights``) and save
    it with its meta; shared by ``train`` and ``demo``."""
    from . import io as pk_io
    from .models import create
    from .train import TrainConfig, fit

    check_output_path(out_path)
    device = check_device(device)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, label_smoothing=label_smoothing, seed=seed, device=device,
                      max_steps_per_epoch=max_steps_per_epoch)
    cfg.validate()
    state_path = Path(f"{out_path}.state")
    if resume and not state_path.is_file():
        raise CheckpointError(f"cannot resume: training state file not found: {state_path}")
    from .models.spec import build, is_zoo, load_weights

    zoo = is_zoo(model)
    if zoo and weights is not None:
        raise ConfigError("--weights applies to a --model spec that is not a zoo name "
                          "(torchvision:, timm:, hf:, file.py:FUNC)")
    if zoo and num_classes is not None:
        raise ConfigError("--num-classes applies to a --model spec that is not a zoo name "
                          "(a zoo model takes the dataset's)")
    shape = input_shape_for({}, input_shape) if input_shape is not None else None
    train_set, test_set = load_data(data, data_dir, train_samples, input_shape=shape)
    from .utils import seed_everything

    seed_everything(seed)  # the initial weights are part of a seeded run
    if zoo:
        net = create(model.split(":", 1)[-1], num_classes=train_set.num_classes,
                     in_channels=train_set.in_channels)
    else:
        net = build(model, num_classes=num_classes if num_classes is not None else train_set.num_classes)
        if weights is not None:
            load_weights(net, weights)
    check_forward(net, train_set.example_input(1), model)
    out.note(f"training {model} on {data} ({len(train_set)} images, {epochs} epoch(s)); "
             f"state file {state_path}")
    result = fit(net, train_set, cfg, test_set=test_set, checkpoint_path=state_path, resume=resume)
    input_shape = [train_set.in_channels, *train_set.image_size]
    meta = {
        "model": model,
        "data": data,
        "num_classes": train_set.num_classes,
        "input_shape": input_shape,
        "train_samples": len(train_set),
        "test_acc": result.test_acc,
        "epochs": result.epochs_run,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "label_smoothing": label_smoothing,
        "seed": seed,
        "seconds_per_epoch": result.seconds_per_epoch,
    }
    if is_main_process():
        pk_io.save(net, out_path, meta=jsonable(meta))
    return {"out": str(out_path), "state": str(state_path), **meta}


@app.command()
def train(
    model: Annotated[str, typer.Option("--model", help="Zoo model name (resnet20, vgg16_bn, ...) or "
                                       "a model spec: torchvision:NAME, timm:NAME, hf:MODEL_TYPE, "
                                       "path/to/file.py:FUNC, package.module:FUNC.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.pt).")],
    weights: WeightsOpt = None,
    input_shape: Annotated[str | None, typer.Option(
        "--input-shape", help="C,H,W the images are read at (an image folder; default 32x32).")] = None,
    num_classes: NumClassesOpt = None,
    data_dir: DataDirOpt = None,
    train_samples: TrainSamplesOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 5e-4,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, step or constant.")] = "cosine",
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", min=0.0)] = 0.0,
    max_steps_per_epoch: Annotated[int | None, typer.Option(
        "--max-steps-per-epoch", min=1, help="Cap optimizer steps per epoch (quick runs).")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <out>.state.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Train a model (from scratch, or from --weights) and save a checkpoint (training state in
    <out>.state)."""
    with Output(json_) as o:
        res = _train(o, model=model, data=data, data_dir=data_dir, train_samples=train_samples,
                     epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                     schedule=schedule, label_smoothing=label_smoothing, seed=seed, device=device,
                     out_path=out, resume=resume, max_steps_per_epoch=max_steps_per_epoch,
                     weights=weights, input_shape=input_shape, num_classes=num_classes)
        acc = res["test_acc"]
        o.result(res, [f"saved {out}: {model} on {data}, test accuracy "
                       f"{'n/a' if acc is None else f'{acc:.2f}%'} after {res['epochs']} epoch(s) "
                       f"({res['seconds_per_epoch']:.1f} s/epoch)"])


@app.command("eval")
def eval_(
    checkpoint: CheckpointOrModelArg = None,
    data: DataOptionalOpt = None,
    data_dir: DataDirOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 512,
    device: DeviceOpt = "auto",
    input_shape: InputShapeOpt = None,
    model_spec: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    trust_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Top-1 accuracy of a checkpoint (or --model SPEC [--weights FILE]) on a dataset's test
    split."""
    from .train import evaluate

    with Output(json_) as o:
        device = check_device(device)
        if model_spec is not None and input_shape is None:
            raise ConfigError("--model needs --input-shape C,H,W")
        model, meta, source = model_from_cli(checkpoint, model_spec, weights, trust_code, num_classes)
        name = dataset_for(meta, data, checkpoint)
        shape = input_shape_for(meta, input_shape) if input_shape is not None else meta.get("input_shape")
        if shape:
            check_forward(model, example_input(shape), source)
        _, test_set = load_data(name, data_dir, input_shape=shape)
        acc = evaluate(model, test_set, batch_size=batch_size, device=resolve_device(device))
        o.result({"checkpoint": source, "data": name, "samples": len(test_set),
                  "test_acc": acc},
                 [f"{source}: test accuracy {acc:.2f}% on {name} ({len(test_set)} images)"])


def profile_summary(name: str, report: dict[str, Any]) -> list[str]:
    """Human-readable lines for a :func:`prunekit.measure.profile` report."""
    lines = [f"{name}: {fmt_count(report['macs'])} MACs, {fmt_count(report['params'])} params, "
             f"file {report['file_size_bytes'] / 1024:.1f} KiB, input {report['input_shape']}"]
    for key, per in report["latency"].items():
        parts = [f"{lay} {per[lay]['median_ms']:.3f} ms" for lay in per if lay != "best"]
        best = per[per["best"]]
        lines.append(f"  batch {key[1:]}: {', '.join(parts)}; best {per['best']} "
                     f"({best['throughput_per_s']:.0f} img/s)")
    if "onnx" in report:
        onnx = report["onnx"]
        parts = [f"batch {k[1:]} {v['median_ms']:.3f} ms" for k, v in onnx["latency"].items()]
        lines.append(f"  onnxruntime: {', '.join(parts)} (max abs diff {onnx['max_abs_diff']:.2g})")
    return lines


TargetLatencyOpt = Annotated[float | None, typer.Option(
    "--target-latency", help="Keep at most this fraction of the original's latency measured on "
                             "--runtime, in (0, 1) (a per-group latency table, cached; from "
                             "--latency-batch 16 on a latency model fitted to end-to-end "
                             "measurements; then measured end to end and corrected).")]
LatencyRuntimeOpt = Annotated[str | None, typer.Option(
    "--runtime", help="Runtime of --target-latency, and where the result is timed against the "
                      "original: nchw, channels_last, deploy, compile, onnxruntime, openvino.")]
LatencyBatchOpt = Annotated[int, typer.Option(
    "--latency-batch", min=1, help="Batch size of the --target-latency / --runtime "
                                   "measurements (--batch-size is a method option).")]
RuntimeOpt = Annotated[str, typer.Option(
    "--runtime", help="Runtimes to verify and time, comma-separated: nchw, channels_last, deploy "
                      "(eager PyTorch), compile (torch.compile), onnxruntime, openvino; 'all' (the "
                      "default): every installed one but compile; 'none': skip.")]
LatencyThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, help="Threads of every latency measurement (default: torch's, all "
                             "cores): the thread count you deploy with; 1 is steadiest on a "
                             "small shared machine.")]
DepthOpt = Annotated[str, typer.Option(
    "--depth", help="With --target-latency: remove up to this many whole residual branches per "
    "stage (those whose removal changes the output least per unit of latency saved; every "
    "stage keeps one) before cutting widths; one-shot criteria methods. 'auto' (default): "
    "widths alone, and one branch per stage tried too where the widths keep under 0.75 of the "
    "MACs per unit of latency or cannot reach the budget (kept where it keeps 1.1x the MACs); "
    "0: widths alone.")]


def parse_depth(text: str | int) -> int | str:
    """``--depth``: ``auto`` or a whole number >= 0 (else a ConfigError)."""
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    try:
        depth = int(value)
    except ValueError:
        depth = -1
    if depth < 0:
        raise ConfigError(f"--depth must be 'auto' or a whole number of branches per stage "
                          f">= 0, got {text!r}")
    return depth


def runtimes_summary(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for the ``runtimes`` part of a profile report."""
    lines = []
    for name, rec in report.get("runtimes", {}).items():
        if "latency_ms" not in rec:
            lines.append(f"  {name}: FAILED ({rec.get('error', 'no output')})")
            continue
        check = "ok" if rec["ok"] else "OUTPUT MISMATCH"
        parts = []
        for b, lat in rec["latency_ms"].items():
            part = f"batch {b} {lat['median']:.3f} ms (p90 {lat['p90']:.3f})"
            if "ratio" in rec:
                part += f", {rec['ratio'][b]:.2f}x the original (+-{rec['ratio_se'][b]:.3f})"
            parts.append(part)
        lines.append(f"  {name} [{check}, rel. diff {rec['max_rel_diff']:.1e}]: {'; '.join(parts)}")
    return lines


@app.command("profile")
def profile_(
    checkpoint: CheckpointOrModelArg = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Also export to ONNX and time ONNX Runtime.")] = False,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,64",
    runtime: RuntimeOpt = "all",
    original: Annotated[Path | None, typer.Option(
        "--original", help="The original (unpruned) checkpoint: timed interleaved with this one "
                           "on every runtime; the result has each runtime's ratio.")] = None,
    input_shape: InputShapeOpt = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads.")] = None,
    max_seconds: Annotated[float, typer.Option(
        "--max-seconds", help="Timed seconds per setting.")] = 1.0,
    precision: Annotated[float | None, typer.Option(
        "--precision", min=1e-6, help="With --original: time on until the standard error of each "
                                      "ratio is at most this (30 s per runtime and batch size at "
                                      "most), e.g. 0.01.")] = None,
    model_spec: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    trust_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """MACs, parameters, file size and measured latency of a checkpoint (or of --model SPEC
    [--weights FILE]).

    Latency is timed in three settings: NCHW, channels_last, and deploy (channels_last with
    every conv -> BatchNorm pair folded into one conv, as inference runtimes run it); and on each
    --runtime, after checking its outputs against PyTorch.
    """
    from .measure import profile
    from .measure.runtimes import check_runtimes, slower_warning

    with Output(json_) as o:
        sizes = parse_int_list(batch_sizes, "--batch-sizes")
        runtimes = None if runtime == "none" else check_runtimes(runtime)
        model, meta, source = model_from_cli(checkpoint, model_spec, weights, trust_code, num_classes)
        shape = input_shape_for(meta, input_shape)
        check_forward(model, example_input(shape), source)
        ref = None
        if original is not None:
            ref, _ = load_checkpoint(original, trust_code)
            if runtimes is None:
                raise ConfigError("--original needs at least one --runtime")
        if precision is not None and ref is None:
            raise ConfigError("--precision needs --original (it is the precision of the ratio)")
        report = profile(model, example_input(shape), sizes, onnx=onnx, checkpoint_path=checkpoint,
                         threads=threads, max_seconds=max_seconds, runtimes=runtimes, original=ref,
                         check_input=example_input(shape, batch=8), precision=precision)
        warning = slower_warning(report)
        if warning:
            o.warn(warning)
        for name, rec in report.get("runtimes", {}).items():
            if not rec.get("ok", True):
                why = rec.get("error") or f"max rel. diff {rec['max_rel_diff']:.1e}"
                o.warn(f"warning: {name}: outputs differ from PyTorch ({why})")
        o.result({"checkpoint": source, **({"original": str(original)} if original else {}), **report},
                 profile_summary(source, report) + runtimes_summary(report))


@app.command()
def export(
    checkpoint: CheckpointOrModelArg = None,
    *,
    onnx: Annotated[Path, typer.Option("--onnx", help="ONNX file to write.")],
    input_shape: InputShapeOpt = None,
    model_spec: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    opset: Annotated[int | None, typer.Option("--opset", min=7, help="ONNX opset.")] = None,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch/--static-batch", help="Dynamic or fixed (1) batch dimension.")] = True,
    trust_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Export a checkpoint (or --model SPEC [--weights FILE]) to ONNX, verified against PyTorch
    with ONNX Runtime."""
    from .io import export_onnx

    with Output(json_) as o:
        check_output_path(onnx)
        model, meta, source = model_from_cli(checkpoint, model_spec, weights, trust_code, num_classes)
        shape = input_shape_for(meta, input_shape)
        check_forward(model, example_input(shape), source)
        info = export_onnx(model, example_input(shape), onnx, opset=opset, dynamic_batch=dynamic_batch)
        o.result({"checkpoint": source, **info},
                 [f"wrote {onnx} (opset {info['opset']}, {info['file_size_bytes'] / 1024:.1f} KiB, "
                  f"max abs diff vs PyTorch {info['max_abs_diff']:.2g})"])


def default_round_to(method: str, round_to: int | None, latency_budget: bool = False,
                     options: dict[str, Any] | None = None) -> Any:
    """``--round-to`` when given; otherwise, for a method that rounds its widths, 8
    (:data:`prunekit.engine.budget.DEFAULT_ROUND_TO`): widths that are multiples of 8 run
    markedly faster on ONNX Runtime and OpenVINO, so a default prune is not slower than the
    original there (Torch-Pruning's peers too, then given our rounded widths; with its global
    ranking a peer keeps its own). ``--round-to 1`` keeps exact widths. With a latency budget
    prunekit's own methods get ``None``: :func:`prunekit.prune` then tries the runtime's channel
    block first (:func:`prunekit.measure.runtimes.channel_block`), then 8."""
    from . import methods as _methods
    from .engine.budget import DEFAULT_ROUND_TO

    if round_to is not None or not _methods.spec(method).round_to:
        return round_to
    if method.startswith("tp:") and (options or {}).get("global_ranking"):
        return None
    if latency_budget and not method.startswith("tp:"):
        return None
    return DEFAULT_ROUND_TO


def with_default_round_to(names: Sequence[str], method_options: dict[str, dict[str, Any]],
                          latency_budget: bool = False) -> dict[str, dict[str, Any]]:
    """``method_options`` with :func:`default_round_to` added for every method that rounds its
    widths and was not given a ``round_to`` (``compare`` / ``demo``: the same widths policy as
    ``prune``)."""
    out = {k: dict(v) for k, v in method_options.items()}
    shared = "round_to" in out.get("*", {})
    for name in names:
        if shared or "round_to" in out.get(name, {}):
            continue
        rt = default_round_to(name, None, latency_budget,
                              {**out.get("*", {}), **out.get(name, {})})
        if rt is not None:
            out.setdefault(name, {})["round_to"] = rt
    return out


def method_options_from_cli(method: str, words: Sequence[str]) -> dict[str, Any]:
    """The method options given on the command line as ``--name value`` / ``--opt name=value``
    (checked against the method's options dataclass; a misspelt flag gets a suggestion)."""
    from . import methods as _methods

    spec = _methods.spec(method)
    flags = [p.opts[0] for p in typer.main.get_command(app).commands["prune"].params if p.opts]
    return spec.options.parse_cli(list(words), method, also_valid=[f[2:].replace("-", "_") for f in flags])


@app.command("prune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Method options: `prunekit methods METHOD` lists them; give them as "
                    "--name value (e.g. --calib-images 256) or --opt name=value.")
def prune_(
    ctx: typer.Context,
    checkpoint: CheckpointOrModelArg = None,
    *,
    method: Annotated[str, typer.Option("--method", help="A method: `prunekit methods` lists them "
                                        "(criteria such as l1 prune in one shot; tp:* are "
                                        "Torch-Pruning's own pruner).")],
    out: Annotated[Path, typer.Option("--out", help="Pruned checkpoint to write (.pt).")],
    ratio: Annotated[float | None, typer.Option(
        "--ratio", help="Fraction of filters removed in every prunable layer, in (0, 1).")] = None,
    target_macs: Annotated[float | None, typer.Option(
        "--target-macs", help="Keep at most this fraction of the original MACs, in (0, 1).")] = None,
    round_to: Annotated[int | None, typer.Option(
        "--round-to", min=1, help="Round every pruned layer's kept width down to a multiple of "
        "this (e.g. 8: faster kernels; default 8, and with --target-latency the CPU's channel "
        "block first: 16 with AVX-512); `prunekit methods` says which methods take it.")] = None,
    data: DataOptionalOpt = None,
    data_dir: DataDirOpt = None,
    train_samples: TrainSamplesOpt = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0,
                                                 help="Fine-tuning epochs after surgery.")] = 0,
    finetune_lr: Annotated[float, typer.Option("--finetune-lr", min=0.0)] = 0.01,
    distill: Annotated[bool, typer.Option(
        "--distill", help="Fine-tune with distillation from the original model.")] = False,
    input_shape: InputShapeOpt = None,
    model_spec: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the method's own training from <out>.state (methods that "
        "checkpoint it).")] = False,
    expand: Annotated[bool, typer.Option(
        "--expand", help="Small-data fine-tuning: expand the training set.")] = False,
    refine_labels: Annotated[bool, typer.Option(
        "--refine-labels", help="Small-data fine-tuning: refine soft labels.")] = False,
    skip_unsupported: Annotated[bool, typer.Option(
        "--skip-unsupported", help="Leave the layers the engine cannot prune (attention, "
        "channel shuffles ...) as they are and prune everything else; the JSON field "
        "skipped_unsupported lists them.")] = False,
    ignore: Annotated[str | None, typer.Option(
        "--ignore", help="Comma-separated layer names or patterns (e.g. '*.attn,head') whose "
        "output channels are kept.")] = None,
    target_latency: TargetLatencyOpt = None,
    runtime: LatencyRuntimeOpt = None,
    latency_batch: LatencyBatchOpt = 1,
    depth: DepthOpt = "auto",
    threads: LatencyThreadsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    trust_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Prune a checkpoint (or your own model: --model SPEC [--weights FILE]) with one method to
    a --ratio, --target-macs or --target-latency (with --runtime) budget."""
    import time

    from . import methods as _methods
    from .api import check_budget, prune
    from .io import save
    from .train import TrainConfig

    with Output(json_) as o:
        spec = _methods.spec(method)  # unknown method: fail before loading anything
        words = list(ctx.args)
        if checkpoint is not None and str(checkpoint).startswith("-"):
            # with --model the checkpoint position is free, and click puts the first unknown
            # option there: it is a (misspelt) option, not a checkpoint
            words.insert(0, str(checkpoint))
            checkpoint = None
        options = method_options_from_cli(method, words)
        check_budget(ratio, target_macs, optional=spec.chooses_widths, target_latency=target_latency)
        _methods.check_round_to_supported(method, round_to)
        round_to = default_round_to(method, round_to, target_latency is not None, options)
        if target_latency is not None:  # method, runtime and package checked before any work
            from .api import latency_target
            latency_target(method, target_latency, runtime, latency_batch, round_to=round_to)
        elif runtime is not None:
            from .measure.runtimes import check_runtimes
            check_runtimes([runtime])
        from .api import check_depth
        depth = check_depth(method, target_latency, parse_depth(depth))
        spec.parse_options(options)
        check_output_path(out)
        state_path = Path(f"{out}.state")
        if resume and not spec.resumable:
            resumable = ", ".join(n for n, s in _methods.specs().items() if s.resumable)
            raise ConfigError(f"--resume applies to methods that checkpoint their own training "
                              f"({resumable}), not {method!r}")
        if resume and not state_path.is_file():
            raise CheckpointError(f"cannot resume: state file not found: {state_path}")
        device = check_device(device)
        if model_spec is not None and checkpoint is None:
            if input_shape is None:
                raise ConfigError("--model needs --input-shape C,H,W")
            if data is None:
                raise ConfigError("--model needs --data")
        t0 = time.perf_counter()
        model, meta, source = model_from_cli(checkpoint, model_spec, weights, trust_code, num_classes)
        check_finite(model, Path(str(weights or checkpoint or source)))
        shape = input_shape_for(meta, input_shape)
        check_forward(model, example_input(shape), source)
        data_name = dataset_for(meta, data, checkpoint)
        train_set, test_set = load_data(data_name, data_dir, train_samples, input_shape=shape)
        load_s = time.perf_counter() - t0
        if spec.resumable:
            options.update(state_path=str(state_path), resume=resume)
        o.note(f"pruning {source} with {method} ...")
        res = prune(model, example_input(shape), method=method, ratio=ratio, target_macs=target_macs,
                    data=(train_set, test_set), finetune_epochs=finetune_epochs, distill=distill,
                    train_config=TrainConfig(lr=finetune_lr, seed=seed, device=device), seed=seed,
                    round_to=round_to, expand=expand, refine_labels=refine_labels,
                    skip_unsupported=skip_unsupported,
                    ignored_layers=[n.strip() for n in (ignore or "").split(",") if n.strip()],
                    target_latency=target_latency, runtime=runtime, latency_batch_size=latency_batch,
                    latency_depth=depth, latency_threads=threads, progress=o.note, **options)
        report = res.report
        speed_lines = _speed_lines(report, o)
        left = report.get("skipped_unsupported") or []
        if left:
            o.note(f"left {len(left)} unsupported group(s) unpruned (--skip-unsupported): "
                   + ", ".join(sorted({r['layer'] for r in left})))
        report["times"]["load_s"] = load_s
        new_meta = {**{k: v for k, v in meta.items() if k in ("data", "input_shape", "model_spec")},
                    **({"input_shape": shape} if model_spec is not None else {}),
                    "data": data_name, "pruned_from": source, "method": method,
                    "test_acc": report.get("acc_final"),
                    "report": {k: v for k, v in report.items() if k != "widths"}}
        t1 = time.perf_counter()
        save(res.model, out, meta=new_meta, plan=res.plan.to_json() if res.plan else None)
        report["times"]["save_s"] = time.perf_counter() - t1
        report["out"] = str(out)
        o.result(report, [
            f"{method}: MACs {fmt_count(report['macs_before'])} -> {fmt_count(report['macs_after'])} "
            f"({report['macs_fraction']:.1%}), params {fmt_count(report['params_before'])} -> "
            f"{fmt_count(report['params_after'])} ({report['params_fraction']:.1%})",
            *([f"accuracy: before {report['acc_before']:.2f}%, right after pruning "
               f"{report['acc_pruned']:.2f}%, final {report['acc_final']:.2f}%"]
              if "acc_final" in report else ["accuracy: not measured (no labelled test set)"]),
            *speed_lines,
            f"saved {out}"])


def _speed_lines(report: dict[str, Any], o: Output) -> list[str]:
    """Summary lines of a prune report's latency budget and speed check; warns (one line) when
    the pruned model measured slower than the original or missed its latency budget."""
    from .measure.runtimes import slower_warning

    lines = []
    lb = report.get("latency_budget")
    if lb:
        lines.append(f"latency budget {lb['target_latency']:.2f} on {lb['runtime']} (batch "
                     f"{lb['batch_size']}, {lb['threads']} thread(s)): predicted "
                     f"{lb['predicted_ratio']:.3f}, measured {lb['measured_ratio']:.3f}"
                     f"{'' if lb['reached'] else ' (NOT reached)'}")
        from .measure.latency_depth import describe
        depth_line = describe(lb)
        if depth_line:
            lines.append(depth_line)
    sp = report.get("speed")
    if sp and sp.get("ratio") is not None:
        lines.append(f"speed on {sp['runtime']} at batch {sp['batch_size']}: {sp['ratio']:.3f}x the "
                     "original's latency")
        warning = slower_warning({"slower": sp.get("slower") or []})
        if warning:
            o.warn(warning)
    if lb and not lb["reached"]:
        o.warn(f"warning: the latency budget {lb['target_latency']:.2f} was not reached on "
               f"{lb['runtime']} at batch {lb['batch_size']} (measured {lb['measured_ratio']:.3f})")
    return lines


@app.command("methods")
def methods_(
    name: Annotated[str | None, typer.Argument(help="One method: list its options.")] = None,
    json_: JsonOpt = False,
) -> None:
    """List the pruning methods, or one method's options (generated from its registration)."""
    from . import methods as _methods

    with Output(json_) as o:
        if name is None:
            table = {n: {"summary": s.summary, "needs_data": s.needs_data, "round_to": s.round_to,
                         "chooses_widths": s.chooses_widths, "resumable": s.resumable}
                     for n, s in _methods.specs().items()}
            o.result({"methods": table}, [f"{n:<12} {t['summary']}" for n, t in table.items()])
            return
        spec = _methods.spec(name)
        opts = [{"name": i.name, "flag": i.flag, "default": i.default, "help": i.help,
                 "accepts": i.constraint} for i in spec.options.describe()]
        lines = [f"{name}: {spec.summary}", ""]
        lines += [f"  {i['flag']:<28} {i['help']} ({i['accepts']}; default {i['default']!r})"
                  for i in opts if i["flag"]]
        o.result({"method": name, "summary": spec.summary, "options": opts}, lines)


def deploy_runtimes(runtime: str | None, onnx: bool) -> list[str]:
    """The runtimes ``compare`` / ``demo`` time every pruned model on: ``--runtime`` (checked),
    else ONNX Runtime and OpenVINO when installed and ``--onnx`` is on."""
    from .measure.runtimes import check_runtimes, installed

    if runtime is not None:
        return [] if runtime == "none" else check_runtimes(runtime)
    return [r for r in ("onnxruntime", "openvino") if onnx and installed(r)]


def _compare_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` result of ``compare``: results.json without the bulky per-layer data."""
    slim = {k: v for k, v in results.items() if k != "methods"}
    slim["methods"] = [{k: v for k, v in e.items() if k not in ("widths", "figures", "settings")}
                       for e in results.get("methods", [])]
    return slim


@app.command("compare")
def compare_(
    checkpoint: CheckpointOrModelArg = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="Comma-separated methods, e.g. l1,taylor,thinet,csgd,tp:l1,tp:taylor.")] = None,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Report directory (created; a rerun resumes there).")] = None,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", help="Fraction of filters removed in every prunable layer, in (0, 1).")] = None,
    target_macs: Annotated[float | None, typer.Option(
        "--target-macs", help="Keep at most this fraction of the original MACs, in (0, 1).")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(
        "--finetune-epochs", min=0, help="Training budget per method in epochs: the method's own "
        "training counts against it, the rest is fine-tuning (default 0).")] = None,
    data: DataOptionalOpt = None,
    data_dir: DataDirOpt = None,
    train_samples: TrainSamplesOpt = None,
    calib_images: Annotated[int | None, typer.Option(
        "--calib-images", min=1, help="Calibration images for data criteria / reconstruction.")] = None,
    distill: Annotated[bool | None, typer.Option(
        "--distill/--no-distill", help="Fine-tune with distillation from the original model.")] = None,
    onnx: Annotated[bool | None, typer.Option(
        "--onnx/--no-onnx", help="Export each pruned model to ONNX and time ONNX Runtime (default on).")
    ] = None,
    finetune_lr: Annotated[float | None, typer.Option("--finetune-lr", min=0.0)] = None,
    latency_seconds: Annotated[float | None, typer.Option(
        "--latency-seconds", min=0.001, help="Timed seconds per latency setting (default 2).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML file with these options as keys (methods, target_macs, ...); "
                         "command-line flags override it.")] = None,
    target_latency: TargetLatencyOpt = None,
    runtime: Annotated[str | None, typer.Option(
        "--runtime", help="Runtimes every pruned model is verified and timed on against the "
                          "original, comma-separated (default with --onnx: onnxruntime and openvino "
                          "when installed; 'none': skip); the first is --target-latency's.")] = None,
    latency_batch: LatencyBatchOpt = 1,
    depth: DepthOpt = "auto",
    threads: LatencyThreadsOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (default 0).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = None,
    input_shape: InputShapeOpt = None,
    model_spec: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    trust_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Compare pruning methods on one checkpoint (or --model SPEC [--weights FILE]) under the
    same MACs and training budgets."""
    from .api import check_budget
    from .report import check_methods, compare, text_table
    from .report.config import parse_methods, read_config
    from .report.render import runtime_lines
    from .train import TrainConfig

    with Output(json_) as o:
        cfg = read_config(config) if config is not None else {}
        flags = {"methods": parse_methods(methods, "--methods") if methods is not None else None,
                 "report": str(report) if report is not None else None, "ratio": ratio,
                 "target_macs": target_macs, "finetune_epochs": finetune_epochs, "data": data,
                 "data_dir": str(data_dir) if data_dir is not None else None,
                 "train_samples": train_samples, "calib_images": calib_images, "distill": distill,
                 "onnx": onnx, "finetune_lr": finetune_lr, "latency_seconds": latency_seconds,
                 "threads": threads, "seed": seed, "device": device}
        opt = {**cfg, **{k: v for k, v in flags.items() if v is not None}}
        if ratio is not None or target_macs is not None:  # a budget flag replaces the file's budget
            opt["ratio"], opt["target_macs"] = ratio, target_macs
        if not opt.get("methods"):
            raise ConfigError("--methods is required (or 'methods' in --config)")
        names = check_methods(opt["methods"])  # unknown method: fail before any work
        check_budget(opt.get("ratio"), opt.get("target_macs"), target_latency=target_latency)
        rts = deploy_runtimes(runtime, opt.get("onnx", True))
        if target_latency is not None and not rts:
            raise ConfigError("--target-latency needs a --runtime")
        latency_depth = parse_depth(depth)  # a bad --depth: fail before loading anything
        if opt.get("report") is None:
            raise ConfigError("--report DIR is required (or 'report' in --config)")
        out_dir = Path(opt["report"])
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--report {out_dir} is not a directory")
        for key, lo in (("finetune_epochs", 0), ("train_samples", 1), ("calib_images", 1)):
            if opt.get(key) is not None and opt[key] < lo:
                raise ConfigError(f"{key} must be >= {lo}, got {opt[key]}")
        dev = check_device(opt.get("device", "auto"))
        method_options = {k: dict(v) for k, v in (opt.get("method_options") or {}).items()}
        if opt.get("calib_images") is not None:
            method_options.setdefault("*", {})["calib_images"] = opt["calib_images"]
        method_options = with_default_round_to(names, method_options, target_latency is not None)
        if model_spec is not None and checkpoint is None and input_shape is None:
            raise ConfigError("--model needs --input-shape C,H,W")
        model, meta, source = model_from_cli(checkpoint, model_spec, weights, trust_code, num_classes)
        shape = input_shape_for(meta, input_shape)
        check_forward(model, example_input(shape), source)
        data_name = dataset_for(meta, opt.get("data"), checkpoint)
        root = Path(opt["data_dir"]) if opt.get("data_dir") else None
        train_set, test_set = load_data(data_name, root, opt.get("train_samples"), input_shape=shape)
        train_config = TrainConfig(lr=opt.get("finetune_lr", 0.01), seed=opt.get("seed", 0), device=dev)
        results = compare(
            model, None, names, target_macs=opt.get("target_macs"), ratio=opt.get("ratio"),
            data=(train_set, test_set), finetune_epochs=opt.get("finetune_epochs", 0),
            out_dir=out_dir, distill=opt.get("distill", False), method_options=method_options,
            seed=opt.get("seed", 0), onnx=opt.get("onnx", True), progress=o.note,
            train_config=train_config, latency_seconds=opt.get("latency_seconds", 2.0),
            meta={"checkpoint": source, "model": meta.get("model") or model_spec, "data": data_name},
            target_latency=target_latency, runtime=rts[0] if target_latency is not None else None,
            latency_batch_size=latency_batch, runtimes=rts, latency_depth=latency_depth,
            threads=opt.get("threads"))
        if len(results["failed"]) == len(names):
            first, why = next(iter(results["failed"].items()))
            raise PrunekitError(f"every method failed (first: {first}: {why}); "
                                f"see {out_dir / 'report.md'}")
        html_path = out_dir / results["paths"]["report_html"]
        o.result(_compare_summary(results),
                 [*text_table(results), "", *runtime_lines(results),
                  f"report: {html_path} (and {out_dir / 'report.md'})"])


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its files.")] = Path(
        "runs/demo"),
    model: Annotated[str, typer.Option("--model", help="Zoo model to train.")] = "resnet8",
    data_dir: DataDirOpt = None,
    train_samples: TrainSamplesOpt = 10000,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs of the base model.")] = 5,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="Methods to compare (default: l1, tp:l1, csgd, thinet, the last two "
                          "when this build has them).")] = None,
    target_macs: Annotated[float, typer.Option(
        "--target-macs", help="Keep at most this fraction of the original MACs.")] = 0.4,
    finetune_epochs: Annotated[int, typer.Option(
        "--finetune-epochs", min=0, help="Training budget per method (epochs).")] = 3,
    latency_seconds: Annotated[float, typer.Option(
        "--latency-seconds", min=0.001, help="Timed seconds per latency setting.")] = 1.0,
    threads: Annotated[int, typer.Option(
        "--threads", min=1, help="Threads of the latency measurements (training uses torch's "
                                 "default); one gives steady ratios on a small machine.")] = 1,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """The main job on the built-in default: train a small ResNet on real Fashion-MNIST (or reuse
    the one cached in --out-dir), then compare pruning methods on it at 40% of the MACs."""
    from . import methods as _methods
    from .report import check_methods, compare, text_table
    from .report.config import parse_methods
    from .report.render import runtime_lines
    from .train import TrainConfig

    with Output(json_) as o:
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out-dir {out_dir} is not a directory")
        if methods is None:
            names = list(_methods.DEMO_METHODS)
        else:
            names = parse_methods(methods, "--methods")
        names = check_methods(names)
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = out_dir / "base.pt"
        want = {"model": model, "data": "fashion-mnist", "epochs": epochs, "seed": seed}
        cached = None
        if ckpt.is_file():
            with contextlib.suppress(PrunekitError):
                cached = load_checkpoint(ckpt)
        if cached is not None and all(cached[1].get(k) == v for k, v in want.items()) and \
                cached[1].get("train_samples") == train_samples:
            net, meta = cached
            o.note(f"reusing the trained {model} in {ckpt} (test accuracy {meta.get('test_acc')}%)")
        else:
            _train(o, model=model, data="fashion-mnist", data_dir=data_dir,
                   train_samples=train_samples, epochs=epochs, batch_size=128, lr=0.1,
                   weight_decay=5e-4, schedule="cosine", label_smoothing=0.0, seed=seed,
                   device=device, out_path=ckpt, resume=False)
            net, meta = load_checkpoint(ckpt)
        train_set, test_set = load_data("fashion-mnist", data_dir, train_samples)
        report_dir = out_dir / "report"
        o.note(f"comparing {', '.join(names)} at {target_macs:.0%} of the MACs, "
               f"{finetune_epochs} training epoch(s) per method; report in {report_dir}")
        results = compare(
            net, None, names, target_macs=target_macs, data=(train_set, test_set),
            finetune_epochs=finetune_epochs, out_dir=report_dir, seed=seed, progress=o.note,
            method_options=with_default_round_to(names, {}), runtimes=deploy_runtimes(None, True),
            train_config=TrainConfig(lr=0.01, seed=seed, device=check_device(device)),
            latency_seconds=latency_seconds, threads=threads,
            meta={"checkpoint": str(ckpt), "model": model, "data": "fashion-mnist"})
        acc = meta.get("test_acc")
        html_path = report_dir / results["paths"]["report_html"]
        o.result({"checkpoint": str(ckpt), "base": meta, "report": str(html_path),
                  **_compare_summary(results)},
                 [f"{model} trained on {meta.get('train_samples')} Fashion-MNIST images for {epochs} "
                  f"epoch(s): test accuracy {'n/a' if acc is None else f'{acc:.2f}%'} on "
                  f"{len(test_set)} test images",
                  f"pruned to at most {target_macs:.0%} of the MACs, {finetune_epochs} training "
                  "epoch(s) per method (own training + fine-tuning):", "",
                  *text_table(results), "", *runtime_lines(results),
                  f"report: {html_path} (and {report_dir / 'report.md'})"])


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def _click_exception_types() -> tuple[type[BaseException], ...]:
    """click's exception base classes (typer >= 0.2x vendors click; older typer uses click)."""
    types: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from typer._click.exceptions import ClickException  # type: ignore[import-not-found]

        types.append(ClickException)
    with contextlib.suppress(ImportError):
        from click.exceptions import ClickException as PlainClickException  # type: ignore

        types.append(PlainClickException)
    return tuple(types)


def _click_abort_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [typer.Abort]
    with contextlib.suppress(ImportError):
        from click.exceptions import Abort  # type: ignore

        types.append(Abort)
    return tuple(types)


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "(no message)"


def _error(message: str, every_rank: bool = False) -> None:
    """One line on stderr. Under torchrun, bad input (the same on every rank) is reported by
    rank 0 only; unexpected errors by every rank, tagged with it."""
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and not every_rank:
        return
    tag = f"[rank {rank}] " if rank != 0 else ""
    print(f"prunekit: error: {tag}{_one_line(message)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Library warnings (deprecations in dependencies) are noise for CLI users; prunekit's own
    (:class:`~prunekit.errors.PrunekitWarning`) are one ``prunekit: warning: ...`` line each
    (also with ``PRUNEKIT_PROGRESS=0``)."""
    import warnings

    from .errors import PrunekitWarning

    if os.environ.get("PRUNEKIT_DEBUG") == "1":
        yield
        return

    def show(message, category, *_args, **_kwargs) -> None:
        from .utils import hold_line

        # held like a note: shown before the next progress line or the result, dropped when
        # the command fails (its error line is then the only one)
        hold_line(f"prunekit: warning: {_one_line(str(message))}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", PrunekitWarning)
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``prunekit`` command line; returns the exit code.

    0: success; 2: bad input (one ``prunekit: error: ...`` line on stderr); 1: an unexpected
    error (one line, plus the traceback when ``PRUNEKIT_DEBUG=1``); 130: interrupted.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    click_errors = _click_exception_types()
    try:
        with _quiet_warnings():
            rv = command.main(args=args, prog_name="prunekit", standalone_mode=False)
    except PrunekitError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    except click_errors as e:
        message = e.format_message()  # type: ignore[attr-defined]
        if type(e).__name__ == "NoArgsIsHelpError":
            print(message)
            return EXIT_OK
        _error(message)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        _error(f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else str(e))
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, *_click_abort_types()):
        _error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("PRUNEKIT_DEBUG") == "1":
            traceback.print_exc()
        _error(f"unexpected {type(e).__name__}: {e} (set PRUNEKIT_DEBUG=1 for the traceback)",
               every_rank=True)
        return EXIT_INTERNAL
    return rv if isinstance(rv, int) else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
