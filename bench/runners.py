"""Time a whole run with each task runner, in one invocation, and check that they compute the same models.

Each runner runs `mnist-ae run` as a new process into a fresh store, so the time covers everything a user
waits for: Prefect's start-up, the Dask cluster's start-up, every stage computed, the report. Runners take
turns (`--rounds`), so a slow spell on the machine does not fall on one runner only.

    python bench/runners.py [--profile default] [--rounds 1] [--out bench/runners.md]
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
from datetime import UTC, datetime
from pathlib import Path

from tasks.runs.run_log import RUN_LOG_FILE

RUNNERS = ("sequential", "dask")
CLI = Path(sys.executable).with_name("mnist-ae")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(profile: str, runner: str) -> dict:
    """One fresh-store run through the command line: wall time, CPU use, stage times and test accuracies."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{runner}-") as store:
        cpu, started = children_cpu_s(), time.perf_counter()
        proc = subprocess.run([str(CLI), "run", "--profile", profile, "--runner", runner, "--store", store],
                              capture_output=True, text=True)
        wall, cpu = time.perf_counter() - started, children_cpu_s() - cpu
        if proc.returncode:
            sys.exit(f"{runner} run failed:\n{proc.stderr[-4000:]}")
        (record,) = [json.loads(line) for line in (Path(store) / RUN_LOG_FILE).read_text().splitlines()]
    return {"wall_s": wall, "cpu_percent": 100 * cpu / wall, "accuracy": record["accuracy"],
            "stages": {s: v["duration_s"] for s, v in record["stages"].items()}}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} (Python {platform.python_version()})"


def to_markdown(profile: str, runs: dict[str, list[dict]]) -> str:
    wall = {r: statistics.median(x["wall_s"] for x in runs[r]) for r in RUNNERS}
    lines = [f"# Task runner benchmark ({datetime.now(UTC):%Y-%m-%d}, {machine()})", "",
             f"`mnist-ae run --profile {profile} --runner R` into a fresh store, {len(runs['dask'])} run(s) per "
             "runner taking turns in one invocation; whole-run wall time includes Prefect's and Dask's start-up.", "",
             "| | " + " | ".join(RUNNERS) + " |", "|---|" + "---|" * len(RUNNERS),
             "| whole run, wall time (median) | " + " | ".join(f"{wall[r]:.1f} s" for r in RUNNERS) + " |",
             "| CPU use (of one core) | " + " | ".join(
                 f"{statistics.median(x['cpu_percent'] for x in runs[r]):.0f} %" for r in RUNNERS) + " |"]
    for stage in runs["sequential"][0]["stages"]:
        lines.append(f"| {stage}, s | " + " | ".join(
            f"{statistics.median(x['stages'][stage] for x in runs[r]):.1f}" for r in RUNNERS) + " |")
    models = runs["sequential"][0]["accuracy"]
    for model in models:
        lines.append(f"| {model} accuracy | " + " | ".join(
            f"{runs[r][0]['accuracy'][model]:.2%}" for r in RUNNERS) + " |")
    same = all(x["accuracy"] == runs["sequential"][0]["accuracy"] for r in RUNNERS for x in runs[r])
    lines += ["", f"Dask / sequential wall time: **{wall['dask'] / wall['sequential']:.2f}x**. "
              f"Accuracies identical across runners and runs: {same}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="bench/runners.md")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {r: [] for r in RUNNERS}
    for _ in range(args.rounds):
        for runner in RUNNERS:
            runs[runner].append(timed_run(args.profile, runner))
            print(json.dumps({runner: runs[runner][-1]}), flush=True)
    Path(args.out).write_text(to_markdown(args.profile, runs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
