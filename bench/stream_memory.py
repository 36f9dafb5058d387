"""Streamed image folders (issue #16, item 3): peak memory of ``prunekit prune`` stays flat when
the folder doubles.

Generates a folder of synthetic 64x64 RGB PNGs (``train/``: N images in 10 classes, ``test/``:
T = N/10) and one with twice as many files (``train/``: 2N + T, the same ``test/``: what the
methods read grows, the evaluation stays the same), makes a ResNet-8 checkpoint for 3x64x64
inputs, and runs the CLI

    prunekit prune CKPT --data folder+stream:FOLDER --method thinet|csgd ...

on each, as a child process, measuring its peak resident set (``wait4`` rusage: the largest
process of the run, the DataLoader workers included), the peak proportional set size of the
whole process tree (sampled every 50 ms from ``/proc``: workers share pages with their parent,
PSS counts them once) and the wall time. The same runs with the folder held in memory
(``folder:FOLDER`` with ``PRUNEKIT_IN_MEMORY_LIMIT`` raised) show what streaming saves.

    .venv/bin/python bench/stream_memory.py                 # N = 5000 (about 8 minutes here)
    .venv/bin/python bench/stream_memory.py --n 500 --name stream_memory_quick   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="training images of the smaller folder")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--methods", default="thinet,csgd")
    p.add_argument("--modes", default="stream,memory")
    p.add_argument("--workers", type=int, default=None,
                   help="PRUNEKIT_NUM_WORKERS for the runs (default: prunekit's own choice)")
    p.add_argument("--tmp", default=None, help="where to write the folders (default: a temp dir)")
    p.add_argument("--name", default="stream_memory")
    return p.parse_args(argv)


# ------------------------------------------------------------------ data and checkpoint
def _image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A smooth class-dependent colour grating with noise (compresses like a photo, not like
    white noise)."""
    r = np.arange(size, dtype=np.float64)
    rows, cols = np.meshgrid(r, r, indexing="ij")
    angle = np.pi * (label % 5) / 5
    period = 6.0 if label < 5 else 12.0
    u = cols * np.cos(angle) + rows * np.sin(angle)
    wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    colour = np.array([0.5 + 0.5 * np.sin(label), 0.5 + 0.5 * np.cos(label), 0.6])
    img = 128 + 90 * wave[:, :, None] * colour[None, None, :]
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_folder(root: Path, n_train: int, n_test: int, size: int, seed: int = 0) -> Path:
    """``root/train/<class>/`` with ``n_train`` PNGs and ``root/test/<class>/`` with ``n_test``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            label = k % CLASSES
            d = root / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(rng, label, size), mode="RGB").save(d / f"{k:06d}.png")
    return root


def link_part(big: Path, small: Path, n_train: int, n_test: int) -> Path:
    """``small``: hard links to the first ``n_train`` training and ``n_test`` test images of
    ``big`` (the same files, no second copy on disk)."""
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            src = big / split / f"c{k % CLASSES}" / f"{k:06d}.png"
            dst = small / split / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    return small


def make_checkpoint(path: Path, size: int) -> Path:
    import torch

    from prunekit.io import save
    from prunekit.models import create

    torch.manual_seed(0)
    model = create("resnet8", num_classes=CLASSES, in_channels=3).eval()
    save(model, path, meta={"input_shape": [3, size, size]})
    return path


# ------------------------------------------------------------------ measuring a child
def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its exit code, peak RSS (MiB), peak tree PSS (MiB), wall seconds, output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"pss": 0, "procs": 1}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = _tree(proc.pid)
            peak["pss"] = max(peak["pss"], sum(_pss_kib(p) for p in pids))
            peak["procs"] = max(peak["procs"], len(pids))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"code": proc.returncode, "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_tree_pss_mib": peak["pss"] / 1024, "max_processes": peak["procs"],
            "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "stdout": "".join(out), "stderr": "".join(err)}


METHOD_ARGS = {
    "thinet": ["--calib-images", "500"],
    "csgd": ["--survey-samples", "500", "--centripetal-epochs", "1", "--max-steps-per-epoch", "10",
             "--batch-size", "64", "--recalibrate-samples", "512"],
}


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    tmp = Path(tempfile.mkdtemp(prefix="prunekit-stream-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        n_test = args.n // 10
        sizes = {"N": (args.n, n_test), "2N": (2 * args.n + n_test, n_test)}
        big = make_folder(tmp / "imgs_2N", *sizes["2N"], args.size)
        small = link_part(big, tmp / "imgs_N", *sizes["N"])
        gen_s = time.perf_counter() - t0
        ckpt = make_checkpoint(tmp / "resnet8_64.pt", args.size)
        print(f"generated {sum(sizes['2N'])} PNGs ({sum(sizes['N'])} linked again) in {gen_s:.0f}s "
              f"under {tmp}", file=sys.stderr)
        exe = str(Path(sys.executable).parent / "prunekit")
        rows = []
        for mode in modes:
            for method in methods:
                for folder, (n, t) in ((small, sizes["N"]), (big, sizes["2N"])):
                    spec = f"folder+stream:{folder}" if mode == "stream" else f"folder:{folder}"
                    env = {**os.environ, "OMP_NUM_THREADS": "1"}
                    if mode == "memory":
                        env["PRUNEKIT_IN_MEMORY_LIMIT"] = "64G"
                    if args.workers is not None:
                        env["PRUNEKIT_NUM_WORKERS"] = str(args.workers)
                    cmd = [exe, "prune", str(ckpt), "--method", method, "--ratio", "0.5",
                           "--data", spec, "--out", str(tmp / f"{method}_{mode}_{n}.pt"),
                           "--seed", "0", "--device", "cpu", "--json", *METHOD_ARGS[method]]
                    r = run_measured(cmd, env)
                    if r["code"] != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed ({r['code']}):\n{r['stderr'][-3000:]}")
                    report = json.loads(r["stdout"])
                    row = {"method": method, "data": mode, "train_images": n, "test_images": t,
                           "files": n + t, "peak_rss_mib": r["peak_rss_mib"],
                           "peak_tree_pss_mib": r["peak_tree_pss_mib"],
                           "processes": r["max_processes"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                           "load_s": report["times"].get("load_s"),
                           "prune_s": report["times"].get("prune_s"),
                           "macs_fraction": report["macs_fraction"]}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
        flat = {}
        for mode in modes:
            for method in methods:
                a, b = (next(r for r in rows if r["method"] == method and r["data"] == mode
                             and r["train_images"] == sizes[k][0]) for k in ("N", "2N"))
                flat[f"{method}_{mode}"] = {
                    "rss_growth_mib": b["peak_rss_mib"] - a["peak_rss_mib"],
                    "rss_ratio": b["peak_rss_mib"] / a["peak_rss_mib"],
                    "pss_growth_mib": b["peak_tree_pss_mib"] - a["peak_tree_pss_mib"]}
        workers = args.workers
        if workers is None:
            from prunekit.data.stream import default_workers
            workers = default_workers()
        command = " ".join(["bench/stream_memory.py", *(argv if argv is not None else sys.argv[1:])])
        example = ("prunekit prune resnet8_64.pt --method METHOD --ratio 0.5 --data "
                   "folder+stream:imgs_N --seed 0 --device cpu --json ...")
        settings = {"n": args.n, "folders": {k: {"train": v[0], "test": v[1]} for k, v in sizes.items()},
                    "size": args.size, "classes": CLASSES, "methods": methods,
                    "modes": modes, "workers": workers, "model": "resnet8 (width 1, random init), "
                    "3x64x64", "method_args": METHOD_ARGS, "generate_s": round(gen_s, 1),
                    "OMP_NUM_THREADS": 1}
        m = machine()
        notes = (f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, "
                 f"{m['platform']}, {m['date']}. Settings: N = {args.n}, {args.size}x{args.size} "
                 f"RGB PNGs, ResNet-8 for 3x{args.size}x{args.size}, ratio 0.5, method options "
                 f"{json.dumps(METHOD_ARGS)}.\n\n"
                 f"Command: `.venv/bin/python {command}` (runs `{example}` per row, as a child "
                 "process). `peak_rss_mib`: the run's largest process (wait4 rusage, DataLoader "
                 "workers included); `peak_tree_pss_mib`: the whole process tree, shared pages "
                 "counted once (sampled every 50 ms). `stream`: `folder+stream:PATH`, decoded "
                 f"per batch in {workers} worker process(es); `memory`: `folder:PATH` held in "
                 "memory as uint8 (`PRUNEKIT_IN_MEMORY_LIMIT=64G`; at these sizes `folder:PATH` "
                 "stays in memory by default, the 2 GiB bound is far away). The N folder has N "
                 "training and N/10 test images; the 2N folder twice as many files: 2N + N/10 "
                 "training images and the same test images (the accuracy evaluations, whose "
                 "batches are 512 images, stay the same). Wall times come from a shared 2-core "
                 "machine with other jobs running: compare `cpu_s`. The in-memory growth matches "
                 "the float64 copy of every training pixel that the in-memory loader's mean/std "
                 "takes (8 bytes a pixel: about 1 GiB for the 2N training set), on top of the "
                 "uint8 images.\n\n"
                 "Peak memory growth when the folder doubles: "
                 + "; ".join(f"{k}: {v['rss_growth_mib']:+.1f} MiB RSS ({v['rss_ratio']:.3f}x), "
                             f"{v['pss_growth_mib']:+.1f} MiB tree PSS" for k, v in flat.items()))
        columns = ["method", "data", "train_images", "test_images", "files", "peak_rss_mib",
                   "peak_tree_pss_mib", "processes", "wall_s", "cpu_s", "load_s", "prune_s", "macs_fraction"]
        js, md = write_results(args.name, {"settings": settings, "command": command,
                                           "growth": flat}, rows, columns,
                               "Peak memory of `prunekit prune` on an image folder and on one "
                               "twice its size", notes)
        print(f"wrote {js} and {md}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
