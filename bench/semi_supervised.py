"""Measure the study's semi-supervised models against the supervised ones at one label budget, on real MNIST.

Trains the study's cells (`tasks.study.cells.train`, the code the study runs) for each seed: the supervised
network from scratch (ann), the pretrained encoder fine-tuned on the labels (pretrained), and the two
semi-supervised models (semi-pretrained, semi-scratch). The autoencoder is pretrained once with the `default`
profile's settings. Test accuracy and seconds per cell go to a Markdown table.

    python bench/semi_supervised.py [--budget 100] [--seeds 5] [--set study.semi.vat.epsilon=3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tasks.config import load_config
from tasks.data.splits import load_splits
from tasks.ml.saved import load_autoencoder
from tasks.stages import download, pretrain
from tasks.store.artifacts import Store
from tasks.study import cells as study

MODELS = ("ann", "pretrained", "semi-pretrained", "semi-scratch")


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{platform.machine()}, {os.cpu_count()} cores, {simd}, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="bench/semi_supervised.md")
    args = parser.parse_args()
    config = load_config("default", args.overrides)
    study_cfg = config.study.model_copy(update={"budgets": (args.budget,), "seeds": args.seeds,
                                                "models": tuple(args.models)})
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-semi-") as tmp:
        store = Store(Path(tmp) / "store")
        data_dir = Path(store.materialize("download", "data", {}, lambda out: download.run(config.data, out)).path)
        started = time.perf_counter()
        pretrain_dir = Path(store.materialize("pretrain", "ae", {}, lambda out: pretrain.run(
            config.pretrain, config.data.split(), data_dir, out, seed=config.seed)).path)
        pretrain_s = time.perf_counter() - started
        data = load_splits(data_dir, config.data.split())
        autoencoder = load_autoencoder(pretrain_dir)
        for cell in study.grid(study_cfg, config.baselines.init):
            chosen = study.labeled_subset(data.y_train, cell.budget, cell.seed)
            started = time.perf_counter()
            model, _, plan = study.train(cell, data.x_train[chosen], data.y_train[chosen], config.pretrain.hidden,
                                         config.pretrain.activation, autoencoder,
                                         data.x_train if cell.semi else None)
            seconds = time.perf_counter() - started
            predicted = study.predict_classes(model, data.x_test, cell.name)
            results.append({"model": cell.model, "seed": cell.seed, "steps": plan.steps, "seconds": seconds,
                            "accuracy": float(np.mean(predicted == data.y_test)), "load": os.getloadavg()[0]})
            print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(to_markdown(args, results, pretrain_s))
    print(f"wrote {args.out}")


def to_markdown(args: argparse.Namespace, results: list[dict], pretrain_s: float) -> str:
    lines = [f"# Semi-supervised fine-tuning at {args.budget:,} labels ({datetime.now(UTC):%Y-%m-%d}, {machine()})",
             "", f"`python bench/semi_supervised.py --budget {args.budget} --seeds {args.seeds}"
             f"{''.join(f' --set {o}' for o in args.overrides)}`: the study's cells on the full test set (10,000 "
             f"images), the autoencoder pretrained once with the `default` profile ({pretrain_s:.0f} s).", "",
             "| model | steps | mean | min | per seed | s per cell (median) |", "|---|---|---|---|---|---|"]
    for model in args.models:
        rows = [r for r in results if r["model"] == model]
        accuracies = [r["accuracy"] for r in rows]
        lines.append(f"| {model} | {rows[0]['steps']} | {statistics.mean(accuracies):.2%} | {min(accuracies):.2%} | "
                     + ", ".join(f"{a:.2%}" for a in accuracies)
                     + f" | {statistics.median(r['seconds'] for r in rows):.1f} |")
    by = {(r["model"], r["seed"]): r["accuracy"] for r in results}
    if {"ann", "semi-pretrained", "semi-scratch"} <= set(args.models):
        seeds = range(args.seeds)
        best = max(("semi-pretrained", "semi-scratch"), key=lambda m: statistics.mean(by[m, s] for s in seeds))
        lines += ["", f"The better semi-supervised model (by its mean): {best}, "
                  f"{statistics.mean(by[best, s] for s in seeds):.2%}; above the supervised network from scratch "
                  f"(ann) in every seed: {all(by[best, s] > by['ann', s] for s in seeds)}."]
    load = statistics.median(r["load"] for r in results)
    lines += ["", f"Median load average while training: {load:.1f} on {os.cpu_count()} cores (above 2 means other "
              "work shared the machine and the seconds are inflated; compare seconds within one table)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
