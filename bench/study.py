"""Time the label-efficiency study's default grid end to end and record its accuracies and verdicts.

Each runner runs `mnist-ae study` as a new process into a fresh store, so the time covers everything a user
waits for: Prefect's start-up, download, validation, pretraining, every cell, the report. The machine's load
average is recorded before and after, since other work on a shared machine slows every number down.

    python bench/study.py [--profile default] [--runners sequential] [--out bench/study.md] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from tasks.document import percent
from tasks.study.report import recipe_counts

CLI = Path(sys.executable).with_name("mnist-ae")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def manifests(store: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / stage).glob("*/manifest.json"))]


def timed_study(profile: str, runner: str, overrides: list[str]) -> dict:
    """One fresh-store study through the command line: wall time, CPU, stage and cell times, the report's results."""
    with tempfile.TemporaryDirectory(prefix=f"bench-study-{runner}-") as tmp:
        store = Path(tmp)
        load_before = os.getloadavg()[0]
        cpu, started = children_cpu_s(), time.perf_counter()
        proc = subprocess.run([str(CLI), "study", "--profile", profile, "--runner", runner, "--store", str(store),
                               *(f"--set={o}" for o in overrides)], capture_output=True, text=True)
        wall, cpu = time.perf_counter() - started, children_cpu_s() - cpu
        if proc.returncode:
            sys.exit(f"{runner} study failed:\n{proc.stderr[-4000:]}")
        report = Path(proc.stdout.split("report: ")[-1].strip())
        cell_seconds: dict[str, float] = defaultdict(float)
        for manifest in manifests(store, "study-cell"):
            cell_seconds[manifest["summary"]["model"]] += manifest["duration_s"]
        return {"runner": runner, "wall_s": wall, "cpu_s": cpu, "cpu_percent": 100 * cpu / wall,
                "load": [load_before, os.getloadavg()[0]],
                "stages": {s: manifests(store, s)[0]["duration_s"] for s in ("download", "validate", "pretrain")},
                "cells": len(manifests(store, "study-cell")), "cell_seconds": dict(cell_seconds),
                "results": json.loads((report.parent / "study.json").read_text())}


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{platform.machine()} {vector}, {os.cpu_count()} cores, {platform.system()} "
            f"(Python {platform.python_version()})")


def to_markdown(profile: str, overrides: list[str], runs: list[dict]) -> str:
    first = runs[0]
    lines = [f"# Label-efficiency study benchmark ({datetime.now(UTC):%Y-%m-%d}, {machine()})", "",
             f"`mnist-ae study --profile {profile}{''.join(f' --set {o}' for o in overrides)} --runner R` into a "
             "fresh store, one invocation; wall time covers Prefect's start-up, download, validation, pretraining, "
             "every cell and the report.", "",
             "| | " + " | ".join(r["runner"] for r in runs) + " |", "|---|" + "---|" * len(runs),
             "| whole study, wall time | " + " | ".join(f"{r['wall_s']:.0f} s" for r in runs) + " |",
             "| CPU time (user + system) | " + " | ".join(f"{r['cpu_s']:.0f} s" for r in runs) + " |",
             "| CPU use (of one core) | " + " | ".join(percent(r["cpu_percent"] / 100, 0) for r in runs) + " |",
             "| load average (1 min) before / after | " + " | ".join(
                 f"{r['load'][0]:.1f} / {r['load'][1]:.1f}" for r in runs) + " |",
             "| cells | " + " | ".join(str(r["cells"]) for r in runs) + " |"]
    for stage in first["stages"]:
        lines.append(f"| {stage}, s | " + " | ".join(f"{r['stages'][stage]:.1f}" for r in runs) + " |")
    for model in first["cell_seconds"]:
        lines.append(f"| {model} cells, s (sum) | " + " | ".join(
            f"{r['cell_seconds'][model]:.1f}" for r in runs) + " |")
    lines.append("| all cells / pretraining (same run) | " + " | ".join(
        f"{sum(r['cell_seconds'].values()) / r['stages']['pretrain']:.2f}x" for r in runs) + " |")
    if len(runs) > 1:
        lines += ["", f"{runs[1]['runner']} / {first['runner']} wall time: "
                  f"**{runs[1]['wall_s'] / first['wall_s']:.2f}x**. Accuracies identical across runners: "
                  f"{all(r['results']['accuracy'] == first['results']['accuracy'] for r in runs)}."]
    lines += ["", "## Test accuracy, mean over seeds (95 % interval)", "",
              "| labels | model | mean | 95 % interval | per seed | recipe chosen (seeds) |",
              "|---|---|---|---|---|---|"]
    for row in first["results"]["accuracy"]:
        interval = "" if row["low"] is None else f"{percent(row['low'])} to {percent(row['high'])}"
        seeds = ", ".join(percent(a) for a in row["seeds"].values())
        lines.append(f"| {row['budget']:,} | {row['model']} | {percent(row['mean'])} | {interval} | {seeds} | "
                     f"{recipe_counts(row.get('recipes', {}))} |")
    lines += ["", "## Verdicts", ""] + [f"- {v['sentence']}" for v in first["results"]["verdicts"]]
    spread = statistics.median(r["load"][0] for r in runs)
    lines += ["", f"Median load average at the start: {spread:.1f} on {os.cpu_count()} cores "
              "(above 2 means other work shared the machine and the times are inflated)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--runners", nargs="+", default=["sequential"], choices=["sequential", "dask"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="bench/study.md")
    args = parser.parse_args()
    runs = []
    for runner in args.runners:
        runs.append(timed_study(args.profile, runner, args.overrides))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "results"}), flush=True)
    Path(args.out).write_text(to_markdown(args.profile, args.overrides, runs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
