"""Reliability benchmark: random-architecture fuzzing of the pruning engine, plus the counts of
the bad-input and interruption suites.

For every seed, :func:`prunekit.testing.fuzz.random_spec` draws a small random CNN (residual
adds, concatenations, depthwise / grouped convs, pooling, flatten -> Linear heads, BN and bias
on/off) and :func:`~prunekit.testing.fuzz.check_architecture` prunes it with every criterion of
``prunekit.criteria.CRITERIA`` at a random ratio and merges forced-identical channels (float64),
checking: output shape, MACs (fresh count = report, below the original), exact removal (pruned
model == original with the removed channels' consumer inputs zeroed), exact merge, checkpoint
reload into a fresh unpruned instance. A typed ``ModelError`` naming a layer is "rejected";
anything else that goes wrong is "failed".

A second, smaller run draws from the *extended* block set (squeeze-excitation, upsampling,
PReLU, GroupNorm, ``torch.chunk``, channel shuffle), beyond what the engine documents; its
failures are findings, reported separately.

Usage::

    python bench/fuzz.py                      # 300 seeds + 60 extended seeds (~8 min, 2 cores)
    python bench/fuzz.py --seeds 20 --extended-seeds 0 --no-suites   # a quick timing
    python bench/fuzz.py --max-minutes 10     # stop early (honestly reported) when time is up

Writes ``bench/results/reliability.json`` and ``bench/results/reliability.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

from prunekit.criteria import CRITERIA  # noqa: E402
from prunekit.testing.fuzz import (  # noqa: E402
    MERGE,
    Outcome,
    architecture_status,
    check_architecture,
    describe,
    random_spec,
    spec_features,
    summarise,
)
from prunekit.utils import atomic_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("tests/test_bad_inputs.py", "tests/test_interruption.py")


class ArchitectureTimeout(BaseException):
    """One architecture's checks ran past ``--time-limit`` (a BaseException, so that the
    per-method ``except Exception`` of the checks does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ArchitectureTimeout` in this (main) thread after ``seconds``."""
    def on_alarm(_signum, _frame):
        raise ArchitectureTimeout(f"ran past the {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def limit_memory(gib: float) -> None:
    """Cap this process's address space, so a runaway architecture raises MemoryError (a
    recorded failure) instead of being killed by the kernel."""
    limit = int(gib * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def fuzz(seeds: range, methods: list[str], *, extended: bool, time_limit_s: float,
         deadline: float, tmp: Path, log=print) -> tuple[dict[int, list[Outcome]], dict[int, dict]]:
    """Run the checks on every seed until ``deadline`` (a ``time.monotonic`` value)."""
    results: dict[int, list[Outcome]] = {}
    specs: dict[int, dict] = {}
    for seed in seeds:
        if time.monotonic() > deadline:
            log(f"time is up: stopping after {len(results)} of {len(seeds)} seeds")
            break
        spec = random_spec(seed, extended=extended)
        specs[seed] = spec
        t0 = time.perf_counter()
        try:
            with time_limit(time_limit_s), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcomes = check_architecture(spec, methods, tmp=tmp)
        except (ArchitectureTimeout, MemoryError) as e:
            outcomes = [Outcome(seed, m, "failed", f"{type(e).__name__}: {e}",
                                seconds=time.perf_counter() - t0) for m in methods]
        results[seed] = outcomes
        status = architecture_status(outcomes)
        log(f"seed {seed:4d} {status:8s} {time.perf_counter() - t0:5.1f}s  {describe(spec)}")
        for o in outcomes:
            if o.status == "failed":
                log(f"    FAILED {o.method}: {o.message[:300]}")
    return results, specs


def run_suites(suites: tuple[str, ...], tmp: Path) -> dict[str, Any]:
    """Run the bad-input and interruption test files; count passed / failed / skipped / xfailed."""
    junit = tmp / "suites.xml"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *suites], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out: dict[str, Any] = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
                           "files": {}}
    if not junit.is_file():
        out["error"] = proc.stdout[-2000:] + proc.stderr[-2000:]
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        file = case.get("classname", "").replace(".", "/") + ".py"
        tags = {child.tag for child in case}
        kind = ("failed" if tags & {"failure", "error"} else
                "xfailed" if any(c.tag == "skipped" and "xfail" in (c.get("type", "") + c.get("message", ""))
                                 for c in case) else
                "skipped" if "skipped" in tags else "passed")
        out["files"].setdefault(file, Counter())[kind] += 1
        out.setdefault("tests", {})[f"{file}::{case.get('name')}"] = kind
        if kind in ("failed", "xfailed"):
            out.setdefault("not_passed", []).append(f"{file}::{case.get('name')} ({kind})")
    out["files"] = {k: dict(v) for k, v in out["files"].items()}
    return out


def _pairs_line(summary: dict[str, Any]) -> str:
    p = summary["pairs_by_status"]
    return f"{summary['pairs']} pairs: {p['passed']} passed, {p['rejected']} rejected, {p['failed']} failed"


def _arch_line(summary: dict[str, Any]) -> str:
    a = summary["architectures_by_status"]
    return (f"{summary['architectures']} architectures: {a['passed']} passed, {a['rejected']} rejected, "
            f"{a['failed']} failed")


def _reasons(results: dict[int, list[Outcome]], status: str) -> Counter:
    """Rejection / failure messages with layer names and numbers blanked, counted per seed."""
    import re

    counts: Counter = Counter()
    for outcomes in results.values():
        seen = set()
        for o in outcomes:
            if o.status == status:
                key = re.sub(r"/\S+", "PATH", o.message)
                key = re.sub(r"'[\w.\-]*'", "'…'", key)
                key = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", key)[:160]
                seen.add(key)
        counts.update(seen)
    return counts


def _counts(payload: dict[str, Any]) -> list[str]:
    """The headline counts: fuzzing, bad inputs, interruptions."""
    core = payload["core"]["summary"]
    lines = ["## Counts", "",
             f"- architectures fuzzed: {core['architectures']} core "
             f"({core['architectures_by_status']['passed']} passed, "
             f"{core['architectures_by_status']['rejected']} rejected with a typed error, "
             f"{core['architectures_by_status']['failed']} failed)"
             + (f" + {payload['extended']['summary']['architectures']} extended" if "extended" in payload
                else ""),
             f"- (architecture, method) pairs: {core['pairs_by_status']['passed']} of {core['pairs']} "
             f"passed, {core['pairs_by_status']['rejected']} rejected, "
             f"{core['pairs_by_status']['failed']} failed"]
    suites = payload.get("suites")
    if suites and suites.get("tests"):
        tests = suites["tests"]
        bad = {k: v for k, v in tests.items() if k.startswith("tests/test_bad_inputs.py")}
        kills = {k: v for k, v in tests.items() if "resumes_identically" in k}
        lines += [f"- bad-input tests: {sum(v == 'passed' for v in bad.values())} of {len(bad)} passed "
                  f"({sum(v == 'skipped' for v in bad.values())} skipped; 88 scenarios, listed in "
                  "docs/reliability.md)",
                  f"- interruptions survived (SIGKILL, then --resume gives the uninterrupted weights): "
                  f"{sum(v == 'passed' for v in kills.values())} of {len(kills)} "
                  + "(" + ", ".join(f"{k.split('::')[1]}: {v}" for k, v in kills.items()) + ")"]
    return [*lines, ""]


def write_report(payload: dict[str, Any], path_json: Path, path_md: Path) -> None:
    """reliability.json (everything) and reliability.md (the counts, the machine)."""
    with atomic_path(path_json) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=str))
    core, ext = payload["core"], payload.get("extended")
    s = payload["settings"]
    lines = [
        "# Reliability: random-architecture fuzzing, bad inputs, interruption",
        "",
        "Written by `bench/fuzz.py` (command: `" + payload["command"] + "`).",
        "",
        *_counts(payload),
        "## Fuzzing (core architecture space)",
        "",
        f"Seeds {s['start']}..{s['start'] + s['seeds'] - 1} requested, "
        f"{core['summary']['architectures']} run"
        + (" (stopped early: time limit)" if core["summary"]["architectures"] < s["seeds"] else "")
        + f"; methods: {', '.join(s['methods'])} (every criterion at a random ratio in [0.3, 0.7], "
          "and the float64 merge of forced-identical channels).",
        "",
        f"- {_arch_line(core['summary'])}",
        f"- {_pairs_line(core['summary'])}",
        f"- mean {core['summary']['seconds_per_architecture']:.2f} s per architecture, "
        f"{core['seconds']:.0f} s in all",
        "",
        "| method | passed | rejected | failed |",
        "|---|---|---|---|",
    ]
    for m, c in core["summary"]["per_method"].items():
        lines.append(f"| {m} | {c['passed']} | {c['rejected']} | {c['failed']} |")
    lines += ["", "Rejections (typed `UnsupportedLayerError` naming the layer), by reason "
              "(architectures):", ""]
    lines += [f"- {n} x {r}" for r, n in core["rejections"].most_common()] or ["- none"]
    lines += ["", "Failures (architectures):", ""]
    lines += [f"- {n} x {r}" for r, n in core["failures"].most_common()] or ["- none"]
    lines += ["", "Feature coverage (architectures that contain the feature / of them passed):", "",
              "| feature | architectures | passed |", "|---|---|---|"]
    for f, (n, ok) in sorted(core["coverage"].items()):
        lines.append(f"| {f} | {n} | {ok} |")
    if ext is not None:
        lines += ["", "## Fuzzing (extended blocks: SE, upsample, PReLU, GroupNorm, chunk, shuffle)",
                  "", "Beyond the architectures the engine documents; failures here are findings.",
                  "", f"- {_arch_line(ext['summary'])}", f"- {_pairs_line(ext['summary'])}",
                  "", "Rejections:", ""]
        lines += [f"- {n} x {r}" for r, n in ext["rejections"].most_common()] or ["- none"]
        lines += ["", "Failures:", ""]
        lines += [f"- {n} x {r}" for r, n in ext["failures"].most_common()] or ["- none"]
        lines += ["", "Failing seeds: " + (", ".join(
            f"{seed} (`{d}`)" for seed, d in ext["failing_seeds"].items()) or "none")]
    suites = payload.get("suites")
    if suites is not None:
        lines += ["", "## Bad-input and interruption suites", "",
                  f"`pytest {' '.join(SUITES)}`: exit code {suites['returncode']}, "
                  f"{suites['seconds']:.0f} s.", "", "| file | passed | xfailed | skipped | failed |",
                  "|---|---|---|---|---|"]
        for file, c in suites.get("files", {}).items():
            lines.append(f"| {file} | {c.get('passed', 0)} | {c.get('xfailed', 0)} | "
                         f"{c.get('skipped', 0)} | {c.get('failed', 0)} |")
        if suites.get("not_passed"):
            lines += ["", "Not passed: " + "; ".join(suites["not_passed"])]
        if suites.get("error"):
            lines += ["", "Error: " + suites["error"]]
    lines += ["", "Machine: `" + json.dumps(payload["machine"]) + "`", ""]
    with atomic_path(path_md) as tmp:
        tmp.write_text("\n".join(lines))


def section(results: dict[int, list[Outcome]], specs: dict[int, dict], seconds: float) -> dict:
    coverage: dict[str, list[int]] = {}
    for seed, outcomes in results.items():
        ok = architecture_status(outcomes) == "passed"
        for f in spec_features(specs[seed]):
            c = coverage.setdefault(f, [0, 0])
            c[0] += 1
            c[1] += int(ok)
    failing = {seed: describe(specs[seed]) for seed, o in results.items()
               if architecture_status(o) == "failed"}
    # compact: every architecture's status and description; the message of every pair that did
    # not pass (a spec is random_spec(seed, extended=...) again, so specs are not stored)
    architectures = {
        seed: {"status": architecture_status(v), "describe": describe(specs[seed]),
               "seconds": round(sum(o.seconds for o in v), 3),
               "ratios": {o.method: o.ratio for o in v if o.ratio is not None},
               "not_passed": {o.method: [o.status, o.message] for o in v if o.status != "passed"}}
        for seed, v in results.items()}
    return {"summary": summarise(results), "seconds": seconds, "rejections": _reasons(results, "rejected"),
            "failures": _reasons(results, "failed"), "coverage": coverage, "failing_seeds": failing,
            "architectures": architectures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=300, help="core architectures to fuzz")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--extended-seeds", type=int, default=60, help="extended-block architectures")
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds per architecture")
    ap.add_argument("--memory-limit-gb", type=float, default=6.0, help="address-space cap (GiB)")
    ap.add_argument("--max-minutes", type=float, default=30.0, help="stop fuzzing after this long")
    ap.add_argument("--no-suites", action="store_true", help="skip the bad-input/interruption tests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    methods = [*CRITERIA, MERGE]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + 60 * args.max_minutes
    payload: dict[str, Any] = {
        "command": " ".join(["python bench/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "settings": {"seeds": args.seeds, "start": args.start, "extended_seeds": args.extended_seeds,
                     "methods": methods, "time_limit_s": args.time_limit,
                     "memory_limit_gb": args.memory_limit_gb, "max_minutes": args.max_minutes},
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.no_suites:  # before the memory cap: pytest starts its own processes
            log("running the bad-input and interruption suites ...")
            payload["suites"] = run_suites(SUITES, tmp)
            log(json.dumps(payload["suites"].get("files")))
        limit_memory(args.memory_limit_gb)
        t0 = time.perf_counter()
        results, specs = fuzz(range(args.start, args.start + args.seeds), methods, extended=False,
                              time_limit_s=args.time_limit, deadline=deadline, tmp=tmp, log=log)
        payload["core"] = section(results, specs, time.perf_counter() - t0)
        if args.extended_seeds > 0:
            t0 = time.perf_counter()
            first = 100_000 + args.start
            results, specs = fuzz(range(first, first + args.extended_seeds), methods, extended=True,
                                  time_limit_s=args.time_limit, deadline=deadline, tmp=tmp, log=log)
            payload["extended"] = section(results, specs, time.perf_counter() - t0)
    payload["wall_seconds"] = time.monotonic() - start
    write_report(payload, args.out / "reliability.json", args.out / "reliability.md")
    log(_arch_line(payload["core"]["summary"]) + "; " + _pairs_line(payload["core"]["summary"]))
    log(f"wrote {args.out / 'reliability.md'}")
    return 1 if payload["core"]["summary"]["architectures_by_status"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
