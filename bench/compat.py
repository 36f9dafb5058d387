"""Which real architectures prunekit prunes, beside Torch-Pruning (issue #17).

For every torchvision classification model, a sample of timm models across families, the
Hugging Face ``transformers`` conv classifiers and torchvision's detection / segmentation
models (their backbone pruned, the whole model run), with random weights:

* **prunekit**: ``prunekit.prune(model, x, method="l1", ratio=0.3)`` -> ``ok`` / ``refused``
  (a typed :class:`prunekit.errors.PrunekitError`, its one-line message) / ``failed`` (any other
  exception, a timeout or the memory cap); MACs kept (prunekit's count), the output's structure
  and finiteness against the unpruned model's, ``prunekit.save`` -> ``prunekit.load(path)``
  (the file alone, no instance, no ``trust_code``) giving the same outputs (max relative
  difference <= 1e-5), ONNX export checked in ONNX Runtime by :func:`prunekit.io.export_onnx`
  (classifiers and segmentation models), wall time and the child's peak RSS;
* **Torch-Pruning**: ``tp.pruner.MetaPruner`` with ``MagnitudeImportance(p=1)``, the same
  ratio and the same protected layers (the classifier; for a backbone, the layers producing
  the features its heads read), then one forward of the whole model.

Each model runs in its own process (forked from the driver, which imports the libraries once),
prunekit first, then Torch-Pruning, under an address-space cap (``--mem-gb``, default 10 GB: the
imported libraries alone map 3.6 GB of it) and a timeout, so one blow-up is one ``failed`` row
(and a Torch-Pruning blow-up keeps prunekit's row). Results go to
``bench/results/compat.{json,md}`` after every model.

Run in the vision environment (``make setup-vision``)::

    OMP_NUM_THREADS=1 nice .venv-vision/bin/python bench/compat.py            # everything
    .venv-vision/bin/python bench/compat.py --only timm:resnet18,hf:resnet    # a few
    .venv-vision/bin/python bench/compat.py --rerun-not-ok                    # after engine work
    .venv-vision/bin/python bench/compat.py --resume                          # finish a stopped run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
RATIO = 0.3
TOL = 1e-5

TIMM = ["resnet18", "resnet50", "seresnet18", "resnext50_32x4d", "res2net50_14w_8s", "regnetx_002",
        "regnety_002", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0",
        "mobilenetv3_large_100", "mixnet_s", "rexnet_100", "fbnetc_100", "convnext_atto",
        "ghostnet_100", "repvgg_a0", "densenet121", "dla34", "dpn68", "cspresnet50",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
        "poolformer_s12", "mobilevit_xs"]
HF = ["resnet", "convnext", "convnextv2", "regnet", "mobilenet_v1", "mobilenet_v2", "efficientnet", "bit"]
DETSEG = {"fasterrcnn_mobilenet_v3_large_fpn": "det", "ssdlite320_mobilenet_v3_large": "det",
          "retinanet_resnet50_fpn": "det", "deeplabv3_resnet50": "seg", "fcn_resnet50": "seg",
          "lraspp_mobilenet_v3_large": "seg"}
# detection models resize their input to min_size (800 by default): a smaller canvas keeps the
# CPU time of the whole-model run low without changing the architecture
DET_KW = {"fasterrcnn_mobilenet_v3_large_fpn": {"min_size": 320, "max_size": 320},
          "retinanet_resnet50_fpn": {"min_size": 320, "max_size": 320}}
#: the libraries each child runs (``--prunekit-only``: prunekit alone, Torch-Pruning's previous
#: row kept)
LIBS: tuple[str, ...] = ("prunekit", "tp")
MAX_PARAMS = 150e6  # larger models are listed, not run (memory and time on this machine)
ONNX_MAX_PARAMS = 30e6


def size_for(spec: str) -> int:
    """Input side: 224 for the models fixed to it (ViT-style patch grids, Swin windows, MaxViT,
    MobileViT), 128 for Inception-v3 (>= 75) and detection/segmentation, else 64."""
    name = spec.split(":", 1)[1]
    if any(k in name for k in ("vit", "deit", "swin", "maxvit", "levit")):
        return 224
    if name in ("inception_v3",) or name in DETSEG:
        return 128
    return 64


def entries() -> list[dict[str, Any]]:
    import torchvision

    rows = [{"spec": f"torchvision:{n}", "group": "torchvision", "kind": "cls"}
            for n in torchvision.models.list_models(module=torchvision.models)]
    rows += [{"spec": f"timm:{n}", "group": "timm", "kind": "cls"} for n in TIMM]
    rows += [{"spec": f"hf:{n}", "group": "hf", "kind": "cls"} for n in HF]
    rows += [{"spec": f"torchvision:{n}", "group": "detection/segmentation", "kind": k}
             for n, k in DETSEG.items()]
    for r in rows:
        r["size"] = size_for(r["spec"])
    return rows


# ---------------------------------------------------------------------------------------------
# one model, in a child process
# ---------------------------------------------------------------------------------------------

def _build(spec: str):
    import torch

    from prunekit.models import build

    torch.manual_seed(0)
    name = spec.split(":", 1)[1]
    return build(spec, **DET_KW.get(name, {})).eval()


def _backbone(model, kind: str):
    """``(module to prune, setter, protected layers)``: the classifier itself, or the backbone
    of a detection / segmentation model with the last conv of every feature its heads read
    protected (their widths are what the heads were built for)."""
    from torch import nn

    if kind == "cls":
        return model, None, None
    bb = model.backbone
    holder, attr = (bb, "body") if hasattr(bb, "body") else (model, "backbone")
    target = getattr(holder, attr)
    if hasattr(target, "return_layers"):  # IntermediateLayerGetter
        outs = [getattr(target, k) for k in target.return_layers]
    else:  # SSDLite's feature extractor: features[0], features[1], then the extra blocks
        outs = [*target.features, *target.extra]
    protected = [[m for m in o.modules() if isinstance(m, nn.Conv2d)][-1] for o in outs]

    def put(new):
        setattr(holder, attr, new)

    return target, put, protected


def _run_whole(model, kind: str, x):
    import torch

    with torch.no_grad():
        if kind == "det":
            return model([xi for xi in x])
        return model(x)


def _structure(out) -> Any:
    """Shapes of a (nested) output, for comparison."""
    import torch

    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, dict):
        return {k: _structure(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_structure(v) for v in out]
    return type(out).__name__


def _tensors(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _same_structure(a, b, kind: str) -> bool:
    if kind == "det":  # the number of boxes depends on the weights: keys and box width only
        return [sorted(d) for d in a] == [sorted(d) for d in b] and \
            all(d["boxes"].shape[-1] == 4 for d in b)
    return _structure(a) == _structure(b)


def _rel_diff(a, b) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return float("inf")
    worst = 0.0
    for x, y in zip(ta, tb, strict=True):
        if x.numel():
            worst = max(worst, float((x - y).abs().max()) / max(1.0, float(y.abs().max())))
    return worst


def _count_macs(model, x, kind: str) -> float | None:
    import torch_pruning as tp

    try:
        macs, _ = tp.utils.count_ops_and_params(model, x)
        return float(macs)
    except Exception:
        return None


def child_prunekit(spec: str, kind: str, size: int) -> dict[str, Any]:
    import torch

    import prunekit
    from prunekit.errors import PrunekitError
    from prunekit.models import OutputAdapter

    t0 = time.perf_counter()
    model = _build(spec)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if kind == "det":
        x = x.sigmoid()  # images in [0, 1]
    row: dict[str, Any] = {"params": params, "build_s": time.perf_counter() - t0}
    if params > MAX_PARAMS:
        return {**row, "status": "skipped", "message": f"{params / 1e6:.0f}M parameters: over this "
                f"bench's {MAX_PARAMS / 1e6:.0f}M cap"}
    reference = _run_whole(model, kind, x)
    target, put, protected = _backbone(model, kind)
    feed = x if kind != "det" else model.transform([xi for xi in x])[0].tensors
    t1 = time.perf_counter()
    try:
        res = prunekit.prune(target, feed, method="l1", ratio=RATIO, ignored_layers=protected,
                             evaluate=False)
    except PrunekitError as e:
        return {**row, "status": "refused", "error": type(e).__name__,
                "message": " ".join(str(e).split()), "prune_s": time.perf_counter() - t1}
    row["prune_s"] = time.perf_counter() - t1
    row["macs_before"], row["macs_after"] = res.report["macs_before"], res.report["macs_after"]
    row["macs_kept"] = res.report["macs_after"] / res.report["macs_before"]
    pruned = res.model.eval()
    if put is not None:
        put(pruned)
        pruned = model.eval()
    out = _run_whole(pruned, kind, x)
    row["output_ok"] = bool(_same_structure(reference, out, kind)
                            and all(torch.isfinite(t).all() for t in _tensors(out)))
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.pt"
        prunekit.save(pruned, path)
        row["file_mb"] = path.stat().st_size / 2**20
        loaded, _ = prunekit.load(path)  # the file alone: a library spec rebuilds it
        if kind == "det":  # compare the features: the boxes depend on thresholds
            with torch.no_grad():
                row["reload_diff"] = _rel_diff(loaded.backbone(feed), pruned.backbone(feed))
        else:
            row["reload_diff"] = _rel_diff(_run_whole(loaded, kind, x), out)
        row["reload_ok"] = row["reload_diff"] <= TOL
        if kind == "det":
            row["onnx"] = "not exported (detection post-processing)"
        elif params > ONNX_MAX_PARAMS:
            row["onnx"] = f"not exported (over {ONNX_MAX_PARAMS / 1e6:.0f}M parameters)"
        else:
            from prunekit.io import export_onnx

            net = OutputAdapter(pruned) if kind == "seg" else pruned
            row["reload_s"] = time.perf_counter() - t2
            t2 = time.perf_counter()
            try:
                info = export_onnx(net, x, Path(tmp) / "p.onnx")
                row["onnx"] = "ok"
                row["onnx_max_abs_diff"] = info["max_abs_diff"]
            except Exception as e:  # noqa: BLE001 - recorded
                row["onnx"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            row["onnx_s"] = time.perf_counter() - t2
    row["status"] = "ok" if row["output_ok"] and row["reload_ok"] else "wrong"
    row["wall_s"] = time.perf_counter() - t0
    return row


def child_tp(spec: str, kind: str, size: int) -> dict[str, Any]:
    import torch
    import torch_pruning as tp
    from torch import nn

    t0 = time.perf_counter()
    model = _build(spec)
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        return {"status": "skipped"}
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if kind == "det":
        x = x.sigmoid()
    reference = _run_whole(model, kind, x)
    target, put, protected = _backbone(model, kind)
    feed = x if kind != "det" else model.transform([xi for xi in x])[0].tensors
    if protected is None:  # the classifier: the last layer whose outputs are the logits
        n_out = _tensors(reference)[0].shape[-1]
        heads = [m for m in target.modules() if (isinstance(m, nn.Linear) and m.out_features == n_out)
                 or (isinstance(m, nn.Conv2d) and m.out_channels == n_out)]
        protected = heads[-1:]
    macs_before = _count_macs(target, feed, kind)
    t1 = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(target, feed, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=RATIO, ignored_layers=protected)
        pruner.step()
    except Exception as e:  # noqa: BLE001 - recorded
        return {"status": "failed", "error": type(e).__name__,
                "message": " ".join(str(e).split())[:300], "prune_s": time.perf_counter() - t1}
    row: dict[str, Any] = {"prune_s": time.perf_counter() - t1}
    macs_after = _count_macs(target, feed, kind)
    if macs_before and macs_after:
        row["macs_kept"] = macs_after / macs_before
    target.eval()
    if put is not None:
        put(target)
    try:
        out = _run_whole(model.eval(), kind, x)
    except Exception as e:  # noqa: BLE001 - recorded
        return {**row, "status": "wrong", "error": type(e).__name__,
                "message": "pruned model does not run: " + " ".join(str(e).split())[:200]}
    ok = _same_structure(reference, out, kind) and all(torch.isfinite(t).all() for t in _tensors(out))
    row["status"] = "ok" if ok else "wrong"
    row["wall_s"] = time.perf_counter() - t0
    return row


def child_main(args: argparse.Namespace) -> None:
    """prunekit, then Torch-Pruning, in this process; the result file is rewritten after each,
    so a Torch-Pruning blow-up (memory cap, timeout) keeps prunekit's row."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    for lib, fn in (("prunekit", child_prunekit), ("tp", child_tp))[:len(LIBS)]:
        t0 = time.perf_counter()
        rows[lib] = {"status": "failed", "error": "killed", "message": "killed (memory cap or timeout)"}
        Path(args.result).write_text(json.dumps(rows, default=float))
        try:
            row = fn(args.spec, args.kind, args.size)
        except MemoryError:
            row = {"status": "failed", "error": "MemoryError", "message": "over the memory cap"}
        except Exception as e:  # noqa: BLE001 - recorded, not raised
            row = {"status": "failed", "error": type(e).__name__,
                   "message": " ".join(str(e).split())[:300]}
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["total_s"] = time.perf_counter() - t0
        rows[lib] = row
        Path(args.result).write_text(json.dumps(rows, default=float))
        if lib == "prunekit" and row["status"] == "skipped":
            rows["tp"] = {"status": "skipped"}
            break
    Path(args.result).write_text(json.dumps(rows, default=float))


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def _child_rows(result: str, why: str) -> dict[str, Any]:
    """The rows a child wrote; a library it did not finish is ``failed`` with ``why``."""
    path = Path(result)
    text = path.read_text() if path.is_file() and path.stat().st_size else ""
    path.unlink(missing_ok=True)
    rows = json.loads(text) if text else {}
    for lib in LIBS:
        if lib not in rows:
            rows[lib] = {"status": "failed", "error": "killed", "message": why or "not run"}
        if rows[lib].get("error") == "killed":
            rows[lib]["message"] = why or rows[lib]["message"]
    return rows


def run_forked(todo: list[dict[str, Any]], jobs: int, mem_gb: float, timeout: float, done) -> None:
    """Run each entry in a forked child of this (single-threaded) process, ``jobs`` at a time.

    The libraries are imported once, before the first fork, so a child starts in milliseconds
    instead of the ~15 s that importing this torch build takes; each child caps its own address
    space (``RLIMIT_AS``) and is killed past ``timeout``. ``done(entry, rows)`` gets each result.
    """
    import signal

    cap = int(mem_gb * 2**30)
    running: dict[int, tuple[dict[str, Any], str, float]] = {}
    queue = list(todo)
    while queue or running:
        while queue and len(running) < max(1, jobs):
            entry = queue.pop(0)
            fd, result = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            pid = os.fork()
            if pid == 0:  # the child
                code = 0
                try:
                    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
                    os.environ["PRUNEKIT_PROGRESS"] = "0"
                    child_main(argparse.Namespace(spec=entry["spec"], kind=entry["kind"],
                                                  size=entry["size"], result=result))
                except BaseException:  # noqa: BLE001 - never return into the parent's loop
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (entry, result, time.monotonic())
        time.sleep(0.2)
        for pid, (entry, result, start) in list(running.items()):
            finished, status = os.waitpid(pid, os.WNOHANG)
            why = ""
            if not finished:
                if time.monotonic() - start <= timeout:
                    continue
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                why = f"over the {timeout:g} s timeout"
            elif status:
                why = f"process died (status {status}; memory cap {mem_gb:g} GB?)"
            del running[pid]
            done(entry, _child_rows(result, why))


def _heavy(spec: str) -> int:
    """A rough size rank from the name, to run the large models last."""
    name = spec.split(":", 1)[1]
    marks = ("b5", "b6", "b7", "_l", "large", "_b", "101", "152", "161", "169", "201", "16gf", "32gf",
             "8gf", "128gf", "wide", "v2_m", "vit_h", "swin_s", "convnext_base", "vgg")
    return sum(m in name for m in marks)


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def _verdict(row: dict[str, Any], key: str, yes: str, no: str) -> str:
    return "" if key not in row else (yes if row[key] else no)


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    rows = doc["models"]
    lines = ["# Compatibility: prunekit vs Torch-Pruning on real architectures", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']}  ",
             f"Versions: {doc['versions']}  ",
             f"Settings: l1 criterion, ratio {RATIO} (fraction of filters removed per prunable layer), "
             "random weights (seed 0), batch 1. Inputs are 64x64 where the model allows it, 224x224 "
             "for the models fixed to it (ViT/DeiT/Swin/MaxViT), 128x128 for Inception-v3 and the "
             "detection/segmentation models (the detectors' own canvas set to 320): the issue's "
             "setting is 224 for all, reduced to keep the whole run within the CPU budget of this "
             "2-core machine (the dependency graph, and so the support, does not depend on the "
             "resolution).  ",
             f"Each model runs in its own (forked) process, address space capped at {doc['mem_gb']:g} GB "
             f"(3.6 GB of it are the imported libraries), {doc['timeout_s']:g} s timeout; peak MiB is "
             "that process's peak RSS (the ~500 MiB of imported libraries included). "
             "Detection/segmentation: the backbone is pruned (the layers producing the features "
             "the heads read are kept, in both libraries), the whole model is run. `reload`: "
             "`prunekit.load(path)` from the file alone reproduces the outputs (max relative "
             f"difference <= {TOL:g}). MACs kept: the pruned part's MACs after / before.", ""]
    summary: dict[str, dict[str, int]] = {}
    for r in rows:
        s = summary.setdefault(r["group"], {})
        for lib in ("prunekit", "tp"):
            key = f"{lib}:{r[lib]['status']}"
            s[key] = s.get(key, 0) + 1
    lines += ["## Summary", "", "| group | models | prunekit ok | refused | failed | wrong | skipped "
              "| Torch-Pruning ok | failed | wrong |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g, s in summary.items():
        n = sum(v for k, v in s.items() if k.startswith("prunekit:"))
        lines.append(f"| {g} | {n} | {s.get('prunekit:ok', 0)} | {s.get('prunekit:refused', 0)} | "
                     f"{s.get('prunekit:failed', 0)} | {s.get('prunekit:wrong', 0)} | "
                     f"{s.get('prunekit:skipped', 0)} | {s.get('tp:ok', 0)} | {s.get('tp:failed', 0)} | "
                     f"{s.get('tp:wrong', 0)} |")
    tp_only = [r["spec"] for r in rows if r["tp"]["status"] == "ok" and r["prunekit"]["status"] != "ok"]
    unclean = [r["spec"] for r in rows if r["prunekit"]["status"] in ("failed", "wrong")]
    seen = {r["spec"] for r in rows}
    try:
        not_run = [e["spec"] for e in entries() if e["spec"] not in seen]
    except ImportError:  # torchvision missing: the list cannot be made
        not_run = []
    if not_run:
        lines += ["", f"Not run yet ({len(not_run)}; `--resume` runs them): {', '.join(not_run)}."]
    lines += ["", f"prunekit unclean failures or wrong outputs: {', '.join(unclean) or 'none'}."]
    refusals = sorted(((r["prunekit"].get("prune_s") or 0.0, r["spec"]) for r in rows
                       if r["prunekit"]["status"] == "refused"), reverse=True)
    if refusals:
        slow = [f"{spec} {t:.1f} s" for t, spec in refusals if t > 10]
        lines += ["", f"Refusals: {len(refusals)}, the slowest {refusals[0][1]} in {refusals[0][0]:.1f} s "
                      "(`prune s`: the `prunekit.prune` call, model building excluded); over 10 s: "
                      f"{', '.join(slow) or 'none'}."]
    lines += ["", f"Torch-Pruning ok where prunekit is not: {', '.join(tp_only) or 'none'}.", ""]
    lines += ["## Per model", "", "| model | input | params | prunekit | MACs kept | output | reload "
              "| ONNX (ORT) | prune s | time s | peak MiB | Torch-Pruning | TP MACs kept | TP s | message |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, t = r["prunekit"], r["tp"]
        earlier = " (earlier run)" if t.get("reused") else ""
        msg = p.get("message") or t.get("message") or ""
        if p.get("message") and t.get("message"):
            msg = f"prunekit: {p['message']} / TP: {t['message']}"
        elif t.get("message"):
            msg = f"TP: {t['message']}"
        lines.append(
            f"| {r['spec']} | {r['size']} | {_fmt(p.get('params', 0) / 1e6, '.1f')}M | {p['status']} | "
            f"{_fmt(p.get('macs_kept'), '.3f')} | {_verdict(p, 'output_ok', 'ok', 'WRONG')} | "
            f"{_verdict(p, 'reload_ok', 'exact', 'DIFFERS')} | "
            f"{p.get('onnx', '')} | {_fmt(p.get('prune_s'), '.1f')} | {_fmt(p.get('total_s'), '.1f')} | "
            f"{_fmt(p.get('peak_rss_mb'), '.0f')} | {t['status']}{earlier} | "
            f"{_fmt(t.get('macs_kept'), '.3f')} | "
            f"{_fmt(t.get('total_s'), '.1f')} | "
            f"{msg.replace('|', '/')[:220]} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    global LIBS, MAX_PARAMS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="Comma-separated specs (default: all).")
    ap.add_argument("--rerun-not-ok", action="store_true",
                    help="Rerun the previous results' rows that are not ok (refused, failed, wrong).")
    ap.add_argument("--markdown-only", action="store_true", help="Rewrite the Markdown from --out.")
    ap.add_argument("--mem-gb", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--jobs", type=int, default=2, help="Models run at the same time.")
    ap.add_argument("--resume", action="store_true", help="Skip the models already in --out.")
    ap.add_argument("--max-params", type=float, default=150e6,
                    help="Models with more parameters are listed as skipped, not run.")
    ap.add_argument("--prunekit-only", action="store_true",
                    help="Run prunekit alone and keep each model's previous Torch-Pruning row.")
    ap.add_argument("--out", type=Path, default=RESULTS / "compat.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    MAX_PARAMS = args.max_params
    if args.prunekit_only:
        LIBS = ("prunekit",)
    if args.child:
        child_main(args)
        return
    if args.markdown_only:
        write_markdown(json.loads(args.out.read_text()), args.out.with_suffix(".md"))
        return
    import timm
    import torch
    import torch_pruning
    import torchvision
    import transformers

    todo = entries()
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        todo = [e for e in todo if e["spec"] in wanted]
    previous = {}
    if args.out.is_file():
        previous = {r["spec"]: r for r in json.loads(args.out.read_text())["models"]}
    command = "OMP_NUM_THREADS=1 nice .venv-vision/bin/python bench/compat.py " + " ".join(sys.argv[1:])
    earlier = json.loads(args.out.read_text()).get("command", "") if args.out.is_file() else ""
    adds = args.resume or args.rerun_not_ok or args.only  # to the earlier results
    doc = {"command": (f"{earlier}; then {command}" if earlier and adds else command),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
           "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
                       f"{timm.__version__}, transformers {transformers.__version__}, torch-pruning "
                       f"{torch_pruning.__version__}",
           "mem_gb": args.mem_gb, "timeout_s": args.timeout, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                  time.gmtime())}
    results = dict(previous)
    order = [e["spec"] for e in entries()]
    if args.rerun_not_ok:  # only models already in the results (with --resume: also the missing)
        todo = [e for e in todo if (e["spec"] in previous or args.resume) and
                previous.get(e["spec"], {}).get("prunekit", {}).get("status") not in ("ok", "skipped")]
    elif args.resume:
        todo = [e for e in todo if e["spec"] not in previous]
    todo.sort(key=lambda e: (e["group"] == "torchvision", _heavy(e["spec"])))  # big ones last
    count = [0]

    def done(e: dict[str, Any], rows: dict[str, Any]) -> None:
        count[0] += 1
        if "tp" not in rows:  # --prunekit-only
            rows["tp"] = {**previous.get(e["spec"], {}).get("tp", {"status": "not run"}), "reused": True}
        row = {**e, **rows}
        results[e["spec"]] = row
        print(f"[{count[0]}/{len(todo)}] {e['spec']}: prunekit {row['prunekit']['status']} "
              f"({row['prunekit'].get('total_s', 0):.0f} s), TP {row['tp']['status']} "
              f"({row['tp'].get('total_s', 0):.0f} s) {row['prunekit'].get('message', '')[:120]}",
              flush=True)
        doc["models"] = sorted(results.values(), key=lambda r: order.index(r["spec"])
                               if r["spec"] in order else len(order))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        write_markdown(doc, args.out.with_suffix(".md"))

    import prunekit.models  # noqa: F401 - imported once here, before the children fork
    torch.set_num_threads(1)
    run_forked(todo, args.jobs, args.mem_gb, args.timeout, done)


if __name__ == "__main__":
    main()
