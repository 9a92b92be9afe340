"""What each ingredient of the `default` recipe adds: accuracy of the pretrained model and of the ANN, and time.

Every variant trains the real stages (pretrain, fine-tune, baselines) on full MNIST in this invocation. The recipe
is chosen on the 5,000 held-out training images only ("val" columns); the test columns are reported for the
record, with the paired McNemar test of pretrained against the ANN trained the same way.

    python bench/recipe.py [--variants default,no-noise,...] [--out bench/recipe.md]
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
from typing import Any

import numpy as np

from tasks.config import PipelineConfig, load_config, parse_overrides
from tasks.data.splits import load_splits
from tasks.ml.inference import predict_with
from tasks.ml.stats import mcnemar_exact
from tasks.stages import baselines, download, finetune, pretrain
from tasks.stages.files import MODEL_FILES
from tasks.store.artifacts import write_manifest

ROOT = Path(__file__).resolve().parents[1]

# Each variant is the `default` profile with these overrides; each removes or changes one ingredient.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "previous default": {
        "pretrain.noise": 0.0, "pretrain.batch_size": 128, "pretrain.epochs": 30, "pretrain.schedule": "constant",
        "pretrain.early_stopping_patience": 3,
        **{f"{s}.{k}": v for s in ("finetune", "baselines") for k, v in
           {"shift": 0, "schedule": "constant", "epochs": 30, "early_stopping_patience": 3, "batch_size": 128,
            "learning_rate": 1e-3}.items()},
    },
    "no denoising": {"pretrain.noise": 0.0},
    "no shifts": {"finetune.shift": 0, "baselines.shift": 0},
    "constant learning rate": {f"{s}.schedule": "constant" for s in ("pretrain", "finetune", "baselines")},
    "classifiers at batch 128 and Adam 1e-3": {f"{s}.{k}": v for s in ("finetune", "baselines")
                                               for k, v in {"batch_size": 128, "learning_rate": 1e-3}.items()},
}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} (Python {platform.python_version()})"


def correct(model_file: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    probabilities, _ = predict_with(model_file, x)
    return probabilities.argmax(axis=1) == y


def run_variant(config: PipelineConfig, data_dir: Path, work: Path, pretrained: dict[str, Path]) -> dict[str, Any]:
    """Train the variant's stages (pretraining shared between variants with the same pretrain section)."""
    split = config.data.split()
    seconds: dict[str, float] = {}
    key = config.pretrain.model_dump_json()
    if key not in pretrained:
        out = Path(tempfile.mkdtemp(dir=work))
        started = time.perf_counter()
        pretrain.run(config.pretrain, split, data_dir, out, seed=config.seed)
        seconds["pretrain"] = time.perf_counter() - started
        write_manifest(out, key=out.name)  # models are loaded only from artifacts a manifest vouches for
        pretrained[key] = out
    stage_dirs = {"pretrain": pretrained[key]}
    for stage, call in (
        ("finetune", lambda o: finetune.run(config.finetune.model_copy(update={"linear_probe": False}), split,
                                            data_dir, stage_dirs["pretrain"], o, seed=config.seed)),
        ("baselines", lambda o: baselines.run(config.baselines, split, data_dir, o, hidden=config.pretrain.hidden,
                                              activation=config.pretrain.activation, seed=config.seed)),
    ):
        out = Path(tempfile.mkdtemp(dir=work))
        started = time.perf_counter()
        call(out)
        seconds[stage] = time.perf_counter() - started
        write_manifest(out, key=out.name)
        stage_dirs[stage] = out
    data = load_splits(data_dir, split)
    files = {"pretrained": stage_dirs["finetune"] / MODEL_FILES["pretrained"][1],
             "ann": stage_dirs["baselines"] / MODEL_FILES["ann"][1]}
    val = {m: correct(f, data.x_val, data.y_val) for m, f in files.items()}
    test = {m: correct(f, data.x_test, data.y_test) for m, f in files.items()}
    b = int(np.sum(test["pretrained"] & ~test["ann"]))
    c = int(np.sum(~test["pretrained"] & test["ann"]))
    return {"val": {m: float(v.mean()) for m, v in val.items()}, "test": {m: float(v.mean()) for m, v in test.items()},
            "p_pretrained_vs_ann": mcnemar_exact(b, c), "seconds": seconds}


def to_markdown(results: dict[str, dict[str, Any]], recipe: dict[str, Any]) -> str:
    lines = [f"# What each ingredient of the `default` recipe adds ({datetime.now(UTC):%Y-%m-%d}, {machine()})", "",
             "Full MNIST: 55,000 training images; the recipe was chosen on the 5,000 held-out images (val) only; "
             "test = the 10,000 test images, McNemar exact p of pretrained against the ANN on them. Seconds are "
             "this machine's, one invocation; \"shared\" reuses the `default` row's pretraining.", "",
             "`default` recipe: " + json.dumps(recipe), "",
             "| variant | val pretrained | val ANN | test pretrained | test ANN | p (test) | pretrain s | "
             "fine-tune s | baselines s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["seconds"]
        pretrain_s = f"{s['pretrain']:.0f}" if "pretrain" in s else "shared"
        lines.append(f"| {name} | {r['val']['pretrained']:.2%} | {r['val']['ann']:.2%} | "
                     f"{r['test']['pretrained']:.2%} | {r['test']['ann']:.2%} | {r['p_pretrained_vs_ann']:.2g} | "
                     f"{pretrain_s} | {s['finetune']:.0f} | {s['baselines']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override applied to every variant (to try a recipe)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "recipe.md")
    args = parser.parse_args()
    extra = parse_overrides(args.set)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        data_dir = Path(work) / "data"
        data_dir.mkdir()
        base = load_config("default", extra)
        download.run(base.data, data_dir)
        pretrained: dict[str, Path] = {}
        for name in args.variants.split(","):
            config = load_config("default", {**extra, **VARIANTS[name]})
            results[name] = run_variant(config, data_dir, Path(work), pretrained)
            print(name, json.dumps(results[name]), flush=True)
    recipe = {s: getattr(base, s).model_dump(exclude={"linear_probe"}) for s in ("pretrain", "finetune", "baselines")}
    args.out.write_text(to_markdown(results, recipe))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
