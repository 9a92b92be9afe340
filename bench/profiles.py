"""Run the `seed` and `default` profiles on full MNIST in one invocation and write the claim table with timings.

Each profile runs through the real flow into a fresh store in a fresh process, as `mnist-ae run` would: the
whole-run time counts from the process start (imports and Prefect's start-up included), and the peak memory is
the process's largest resident set. `default` is reported against `seed` as ratios, since both ran on the same
machine in the same invocation. With `--reference REV`, each profile also runs as `mnist-ae run` at that git
revision (a temporary worktree, this environment's packages) in the same invocation, so the speed-up since REV is
a ratio measured on one machine. The table ends with `bench/speed.py`'s epoch times from the same invocation.

    python bench/profiles.py [--profiles seed,default] [--reference REV] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from flows.server import TemporaryServer
from tasks.config import load_config

MODELS = ("softmax", "ann", "pretrained", "probe")
ROOT = Path(__file__).resolve().parents[1]


def epoch_speed() -> str:
    """bench/speed.py's table: seconds per pretraining epoch, the stage against a bare fit, in this invocation."""
    with tempfile.NamedTemporaryFile(suffix=".md") as out:
        subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--out", out.name], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        return Path(out.name).read_text().replace("# ", "## ", 1)


def run_profile(profile: str, store: Path) -> dict:
    """Run one profile in this process (a child of the benchmark), started as `mnist-ae run` is; summarise it."""
    server = TemporaryServer().start()
    from flows.pipeline import pipeline

    with server.api():
        result = pipeline(profile=profile, store=str(store))
    stages = result["stages"]
    metrics = json.loads((Path(stages["evaluate"]["path"]) / "metrics.json").read_text())
    accuracy = {m: metrics["models"][m]["accuracy"] for m in MODELS if m in metrics["models"]}
    summary = stages["report"]["summary"]
    paired = {" vs ".join(p["models"]): p["p_value"] for p in metrics.get("paired", [])}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"peak_rss_bytes": peak, "stages": {s: r["duration_s"] for s, r in stages.items()}, "accuracy": accuracy,
            "claim_held": summary.get("claim_held"), "paired_p": paired,
            "loss_vs_notebook": summary.get("pretrain_mean_rel_diff"),
            "epochs": {s: stages[s]["summary"].get("epochs_run") for s in ("pretrain", "finetune")}}


def reference_run(revision: str, profile: str) -> float:
    """Seconds of `mnist-ae run --profile PROFILE` into a fresh store, with the code of git `revision`."""
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), revision], cwd=ROOT, check=True)
        try:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", profile,
                            "--store", str(Path(tmp) / "store")], cwd=tree, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - started
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} (Python {platform.python_version()})"


def to_markdown(results: dict[str, dict], reference: str | None) -> str:
    profiles = list(results)
    lines = [f"# Profile benchmark ({datetime.now(UTC):%Y-%m-%d}, {machine()})", "",
             "Test accuracy on the 10,000 MNIST test images:", "",
             "| model | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    for model in MODELS:
        cells = [f"{r['accuracy'][model]:.2%}" if model in r["accuracy"] else "-" for r in results.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("| claim held (pretrained > ANN > softmax) | "
                 + " | ".join(str(r["claim_held"]) for r in results.values()) + " |")
    for pair in ("pretrained vs ann", "ann vs softmax"):
        lines.append(f"| {pair}, McNemar exact p | " + " | ".join(
            f"{r['paired_p'][pair]:.2g}" if pair in r["paired_p"] else "-" for r in results.values()) + " |")
    lines.append("| pretraining loss vs the notebook's log, epochs 1-36 (mean relative difference) | " + " | ".join(
        "-" if r["loss_vs_notebook"] is None else f"{r['loss_vs_notebook']:.1%}" for r in results.values()) + " |")
    lines.append("| epochs run (pretrain / fine-tune) | " + " | ".join(
        f"{r['epochs']['pretrain']} / {r['epochs']['finetune']}" for r in results.values()) + " |")
    lines += ["", "Wall time per stage, seconds:", "", "| stage | " + " | ".join(profiles) + " |",
              "|---|" + "---|" * len(profiles)]
    for stage in next(iter(results.values()))["stages"]:
        lines.append(f"| {stage} | " + " | ".join(f"{r['stages'].get(stage, 0):.1f}" for r in results.values()) + " |")
    lines.append("| whole run, from process start | " + " | ".join(f"{r['wall_s']:.1f}" for r in results.values())
                 + " |")
    lines.append("| peak memory (RSS of the run's process), GB | "
                 + " | ".join(f"{r['peak_rss_bytes'] / 1e9:.2f}" for r in results.values()) + " |")
    if reference:
        lines.append(f"| whole run at `{reference}`, from process start | "
                     + " | ".join(f"{r['reference_s']:.1f}" for r in results.values()) + " |")
        lines.append(f"| whole run, relative to `{reference}` | "
                     + " | ".join(f"{r['wall_s'] / r['reference_s']:.2f}x" for r in results.values()) + " |")
    if "seed" in results and len(results) > 1:
        base = results["seed"]["wall_s"]
        lines += ["", "Whole-run time relative to `seed` (same invocation): "
                  + ", ".join(f"{p} {r['wall_s'] / base:.2f}x" for p, r in results.items() if p != "seed")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="seed,default")
    parser.add_argument("--reference", metavar="REV", help="also run each profile with the code of this git revision")
    parser.add_argument("--out", default="bench/results.md")
    parser.add_argument("--child", nargs=2, metavar=("PROFILE", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_profile(args.child[0], Path(args.child[1]))), flush=True)
        gc.freeze()  # and ends as `mnist-ae` ends (flows.cli.entry)
        return
    profiles = args.profiles.split(",")
    if without := [p for p in profiles if "evaluate" not in load_config(p).stages]:
        parser.error(f"profiles without an evaluate stage cannot be compared: {', '.join(without)}")
    results = {}
    for profile in profiles:
        with tempfile.TemporaryDirectory(prefix=f"bench-{profile}-") as store:
            started = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", profile, store], check=True, text=True,
                                 stdout=subprocess.PIPE, cwd=ROOT).stdout
            results[profile] = {"wall_s": time.perf_counter() - started, **json.loads(out.strip().splitlines()[-1])}
        if args.reference:
            results[profile]["reference_s"] = reference_run(args.reference, profile)
        print(json.dumps({profile: results[profile]}, indent=2))
    Path(args.out).write_text(to_markdown(results, args.reference) + "\n" + epoch_speed())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
