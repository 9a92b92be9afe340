"""Run the `seed` and `default` profiles on full MNIST in one invocation and write the claim table with timings.

Each profile runs through the real flow into a fresh store, so every stage is computed; `default` is
reported against `seed` as ratios, since both ran on the same machine in the same invocation.

    python bench/profiles.py [--profiles seed,default] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from flows.pipeline import pipeline
from tasks.config import load_config

MODELS = ("softmax", "ann", "pretrained", "probe")


def run_profile(profile: str, store: Path) -> dict:
    started = time.perf_counter()
    result = pipeline(profile=profile, store=str(store))
    wall = time.perf_counter() - started
    stages = result["stages"]
    metrics = json.loads((Path(stages["evaluate"]["path"]) / "metrics.json").read_text())
    accuracy = {m: metrics["models"][m]["accuracy"] for m in MODELS if m in metrics["models"]}
    summary = stages["report"]["summary"]
    paired = {" vs ".join(p["models"]): p["p_value"] for p in metrics.get("paired", [])}
    return {"wall_s": wall, "stages": {s: r["duration_s"] for s, r in stages.items()}, "accuracy": accuracy,
            "claim_held": summary.get("claim_held"), "paired_p": paired,
            "loss_vs_notebook": summary.get("pretrain_mean_rel_diff"),
            "epochs": {s: stages[s]["summary"].get("epochs_run") for s in ("pretrain", "finetune")}}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} (Python {platform.python_version()})"


def to_markdown(results: dict[str, dict]) -> str:
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
    lines.append("| whole run | " + " | ".join(f"{r['wall_s']:.1f}" for r in results.values()) + " |")
    if "seed" in results and len(results) > 1:
        base = results["seed"]["wall_s"]
        lines += ["", "Whole-run time relative to `seed` (same invocation): "
                  + ", ".join(f"{p} {r['wall_s'] / base:.2f}x" for p, r in results.items() if p != "seed")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="seed,default")
    parser.add_argument("--out", default="bench/results.md")
    args = parser.parse_args()
    profiles = args.profiles.split(",")
    if without := [p for p in profiles if "evaluate" not in load_config(p).stages]:
        parser.error(f"profiles without an evaluate stage cannot be compared: {', '.join(without)}")
    results = {}
    for profile in profiles:
        with tempfile.TemporaryDirectory(prefix=f"bench-{profile}-") as store:
            results[profile] = run_profile(profile, Path(store))
        print(json.dumps({profile: results[profile]}, indent=2))
    Path(args.out).write_text(to_markdown(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
