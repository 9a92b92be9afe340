"""The label-efficiency study's report: accuracy against labels, the recipes chosen, and a verdict per budget.

A budget's verdict compares the pretrained model (and any other model that is not a baseline, the better of
them) with the best-tuned network from scratch (the ANN). It says "sure" only when both the test set's McNemar
test (seeds pooled) and the 95 % interval of the paired per-seed differences exclude no difference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import t as student_t

from tasks import document
from tasks.config import StudyConfig
from tasks.document import percent
from tasks.ml.stats import mcnemar_exact
from tasks.pipeline.contract import Contract
from tasks.stages.files import REPORT_NAME, STUDY_FIGURE_FILE, STUDY_RESULTS_FILE
from tasks.store.artifacts import Store
from tasks.study.cells import load_predictions

STAGE = "study-report"
TITLE = "Label-efficiency study: where does autoencoder pretraining pay off?"
LABELS = {"pretrained": "pretrained encoder, fine-tuned", "ann": "same network from scratch (ANN)",
          "softmax": "softmax regression", "semi-pretrained": "pretrained encoder, semi-supervised (VAT)",
          "semi-scratch": "same network from scratch, semi-supervised (VAT)"}
COLORS = {"pretrained": "C0", "ann": "C1", "softmax": "C2", "semi-pretrained": "C3", "semi-scratch": "C4"}
CONFIDENCE = 0.95
REFERENCE = "ann"  # every verdict is against the best-tuned network from scratch
BASELINES = (REFERENCE, "softmax")
# One more question where both are trained: does the pretrained start still help once fine-tuning uses the
# unlabeled images? The semi-supervised model from the pretrained encoder against the same model from a random start.
STARTS = ("semi-pretrained", "semi-scratch")


def label(model: str) -> str:
    return LABELS.get(model, model)


@dataclass(frozen=True)
class CellResult:
    """One trained cell as the report needs it: which cell, its test accuracy, its predictions' file, its recipe."""

    model: str
    budget: int
    seed: int
    accuracy: float
    path: Path
    recipe: str = ""

    @classmethod
    def of(cls, summary: dict[str, Any], path: str | Path) -> CellResult:
        return cls(summary["model"], int(summary["budget"]), int(summary["seed"]), float(summary["accuracy"]),
                   Path(path), summary.get("recipe_name", ""))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None,
                                                                                      float | None]:
    """Mean and Student-t interval over seeds; no interval from a single seed."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    half = float(student_t.ppf((1 + confidence) / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def summarize(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    """One row per (budget, model): accuracy and recipe per seed, mean and 95 % interval over seeds."""
    rows = []
    models = list(dict.fromkeys([*LABELS, *sorted({c.model for c in cells})]))
    for budget in sorted({c.budget for c in cells}):
        for model in (m for m in models if any(c.model == m and c.budget == budget for c in cells)):
            found = sorted((c for c in cells if c.model == model and c.budget == budget), key=lambda c: c.seed)
            mean, low, high = mean_interval([c.accuracy for c in found])
            rows.append({"budget": budget, "model": model, "mean": mean, "low": low, "high": high,
                         "seeds": {c.seed: c.accuracy for c in found}, "recipes": {c.seed: c.recipe for c in found}})
    return rows


def challengers(cells: Sequence[CellResult], budget: int) -> list[str]:
    """The models a budget's verdicts judge: the pretrained one, and the best (by mean) of any other non-baseline."""
    means = {m: float(np.mean([c.accuracy for c in cells if c.model == m and c.budget == budget]))
             for m in sorted({c.model for c in cells if c.budget == budget})}
    others = sorted((m for m in means if m not in (*BASELINES, "pretrained")), key=lambda m: -means[m])
    return [m for m in ("pretrained", *others[:1]) if m in means]


def compare(cells: Sequence[CellResult], y_true: np.ndarray, alpha: float) -> list[dict[str, Any]]:
    """Per budget and challenger: McNemar's exact test against the ANN on the same test images, per seed and
    pooled, and the interval of the paired per-seed differences; where both semi-supervised models trained, the
    same for the pretrained start against the random one."""
    by = {(c.model, c.budget, c.seed): c for c in cells}
    verdicts = []
    for budget in sorted({c.budget for c in cells}):
        questions = [(model, REFERENCE) for model in challengers(cells, budget)] + [STARTS]
        for model, reference in questions:
            seeds = sorted(s for (m, b, s) in by if m == model and b == budget and (reference, b, s) in by)
            if seeds:
                verdicts.append(_compared(model, budget, [(by[model, budget, s], by[reference, budget, s])
                                                          for s in seeds], y_true, alpha, reference))
    return verdicts


def _compared(model: str, budget: int, pairs: list[tuple[CellResult, CellResult]], y_true: np.ndarray,
              alpha: float, reference: str = REFERENCE) -> dict[str, Any]:
    per_seed: list[dict[str, Any]] = []
    for mine, theirs in pairs:
        right_mine = load_predictions(mine.path) == y_true
        right_theirs = load_predictions(theirs.path) == y_true
        b, c = int(np.sum(right_mine & ~right_theirs)), int(np.sum(right_theirs & ~right_mine))
        per_seed.append({"seed": mine.seed, "challenger_only": b, "reference_only": c, "p_value": mcnemar_exact(b, c),
                         "difference": mine.accuracy - theirs.accuracy})
    only_mine, only_theirs = sum(s["challenger_only"] for s in per_seed), sum(s["reference_only"] for s in per_seed)
    row: dict[str, Any] = {"budget": budget, "model": model, "reference": reference, "seeds": per_seed,
                           "challenger_only": only_mine, "reference_only": only_theirs,
                           "p_value": mcnemar_exact(only_mine, only_theirs), "alpha": alpha,
                           "challenger": float(np.mean([m.accuracy for m, _ in pairs])),
                           "reference_accuracy": float(np.mean([r.accuracy for _, r in pairs]))}
    row["difference"], row["low"], row["high"] = mean_interval([s["difference"] for s in per_seed])
    row["sentence"] = verdict(row)
    return row


def verdict(row: dict[str, Any]) -> str:
    """One plain sentence: did the challenger do better than its reference at this budget (the best-tuned ANN, or
    for the pretrained semi-supervised model the same model from a random start), and how sure we are.

    "Sure" needs both tests: the test set's McNemar test (seeds pooled) and the seeds' spread (the interval of the
    paired differences excludes zero, on the same side).
    """
    seeds, alpha, model = row["seeds"], row["alpha"], row.get("model", "pretrained")
    k = len(seeds)
    points = 100 * row["difference"]
    interval = ("" if row["low"] is None
                else f", 95 % interval {100 * row['low']:+.2f} to {100 * row['high']:+.2f}")
    ahead = sum(s["difference"] > 0 for s in seeds)
    starts = row.get("reference", REFERENCE) != REFERENCE
    against = "the same model from a random start" if starts else "the best-tuned network from scratch"
    numbers = (f"{percent(row['challenger'])} against {percent(row['reference_accuracy'])} for {against}, "
               f"{points:+.2f} points (mean of {k} seed{'s' if k > 1 else ''}{interval}; "
               f"ahead in {ahead} of {k}; McNemar p = {row['p_value']:.2g} with the seeds pooled)")
    subject = ("starting the semi-supervised model from the pretrained encoder" if starts
               else "pretraining" if model == "pretrained" else label(model))
    significant = row["p_value"] < alpha
    spread = row["low"] is not None and (row["low"] > 0 or row["high"] < 0)
    if not significant and not spread:
        return (f"With {row['budget']:,} labels, {subject} made no measurable difference: {numbers}. "
                "The difference is within noise.")
    helped = (row["challenger_only"] > row["reference_only"]) if significant else row["difference"] > 0
    word = (("helped" if helped else "hurt") if model == "pretrained" or starts
            else ("did better" if helped else "did worse"))
    if significant and spread:
        sure = (f"We are sure: both the test set's McNemar test (p < {alpha:g}) and the spread over seeds exclude "
                "no difference.")
    elif significant:
        sure = ("Not sure: the test set's McNemar test finds a difference, but over seeds the interval "
                + ("needs more than one seed." if row["low"] is None else "includes no difference."))
    else:
        sure = (f"Not sure: the seeds agree, but the test set's McNemar test does not find the difference "
                f"(p >= {alpha:g}).")
    return f"With {row['budget']:,} labels, {subject} {word}: {numbers}. {sure}"


def recipe_counts(recipes: dict[int, str]) -> str:
    """How often each recipe won over the seeds: `head zeros (3 of 5), head glorot_uniform (2 of 5)`."""
    names = [r or "the study's own settings" for r in recipes.values()]
    return ", ".join(f"{name} ({names.count(name)} of {len(names)})" for name in dict.fromkeys(names))


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy against labeled images on a log axis: one point per seed, the mean and its 95 % interval."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        shift = 1.0 + 0.04 * (i - (len(models) - 1) / 2)  # side by side at each budget, on the log axis
        budgets = [r["budget"] * shift for r in mine]
        for budget, r in zip(budgets, mine, strict=True):
            seeds = list(r["seeds"].values())
            ax.plot([budget] * len(seeds), [100 * a for a in seeds], ".", color=COLORS.get(model, f"C{i + 3}"),
                    alpha=0.45)
        means = [100 * r["mean"] for r in mine]
        errors = np.array([[100 * (r["mean"] - r["low"]) if r["low"] is not None else 0.0 for r in mine],
                           [100 * (r["high"] - r["mean"]) if r["high"] is not None else 0.0 for r in mine]])
        ax.errorbar(budgets, means, yerr=errors, fmt="-o", color=COLORS.get(model, f"C{i + 3}"), capsize=3,
                    markersize=4, label=f"{label(model)} (mean, 95 % interval)")
    budgets = sorted({r["budget"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("labeled training images (log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def blocks_of(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]], protocol: list[str],
              n_test: int) -> list[document.Block]:
    """The report as document blocks."""
    accuracy = document.Table(
        ("labels", "model", "mean accuracy", "95 % interval", "per seed", "recipe chosen"),
        tuple((f"{r['budget']:,}", label(r["model"]), percent(r["mean"]),
               "" if r["low"] is None else f"{percent(r['low'])} to {percent(r['high'])}",
               ", ".join(percent(a) for a in r["seeds"].values()), recipe_counts(r.get("recipes", {})))
              for r in rows))
    tests = document.Table(
        ("labels", "model", "against", "seed", "only it right", "only the other right", "difference, points",
         "McNemar exact p"),
        tuple(row for v in verdicts for row in (
            *((f"{v['budget']:,}", v["model"], v["reference"], str(s["seed"]), str(s["challenger_only"]),
               str(s["reference_only"]), f"{100 * s['difference']:+.2f}", f"{s['p_value']:.2g}") for s in v["seeds"]),
            (f"{v['budget']:,}", v["model"], v["reference"], "pooled", str(v["challenger_only"]),
             str(v["reference_only"]), f"{100 * v['difference']:+.2f}", f"{v['p_value']:.2g}"))))
    return [
        document.Heading(TITLE, 1),
        document.Heading("Verdicts"),
        document.Bullets(tuple(v["sentence"] for v in verdicts) or ("No budget has both models to compare.",)),
        document.Heading("Accuracy against labels"),
        document.Image(STUDY_FIGURE_FILE, "test accuracy against labeled training images",
                       f"Each dot is one seed; lines join the means over seeds, bars are 95 % intervals "
                       f"(Student t). Test set: {n_test:,} images."),
        accuracy,
        document.Heading("Model against model, on the same test images"),
        tests,
        document.Heading("Protocol"),
        document.Bullets(tuple(protocol)),
        document.Paragraph(
            "For orientation, published numbers for fully connected networks on MNIST: a plain network trained "
            "on 100 labels errs on about 25.8 % of the test set (Kingma et al. 2014), while the best "
            "semi-supervised networks of that kind reach about 1 % error with 100 labels (ladder networks, "
            "Rasmus et al. 2015; Pezeshki et al. 2016)."),
    ]


def write(cfg: StudyConfig, cells: Sequence[CellResult], y_true: np.ndarray, protocol: list[str],
          out: Path) -> dict[str, Any]:
    """Write `report.md`, the self-contained `report.html`, the figure and `study.json` into `out`."""
    if not cells:
        raise ValueError("the study has no cells to report")
    rows = summarize(cells)
    verdicts = compare(cells, y_true, cfg.alpha)
    plot(rows, out / STUDY_FIGURE_FILE)
    document.render(blocks_of(rows, verdicts, protocol, len(y_true)), out, REPORT_NAME)
    (out / STUDY_RESULTS_FILE).write_text(json.dumps({"accuracy": rows, "verdicts": verdicts}, indent=2, default=str))
    return {"verdicts": [v["sentence"] for v in verdicts],
            "table": [{"labels": r["budget"], "model": r["model"], "mean accuracy": round(r["mean"], 4),
                       "95% low": r["low"] and round(r["low"], 4), "95% high": r["high"] and round(r["high"], 4)}
                      for r in rows]}


# The report is keyed by its cells (their keys, added by the caller), its own code and the significance level.
CONTRACT = Contract(stage=STAGE, run=write, section="study", reads={}, keyed=("alpha",),
                    writes=(f"{REPORT_NAME}.md", f"{REPORT_NAME}.html", STUDY_FIGURE_FILE, STUDY_RESULTS_FILE),
                    code=(__name__, "tasks.document", "tasks.study.cells", "tasks.study.selection"))


def key_inputs(cfg: StudyConfig, cell_keys: Sequence[str]) -> dict[str, Any]:
    """What the study report's key is the hash of: its code, its significance level and its cells' keys."""
    return {**CONTRACT.key_inputs(cfg, {}, {}), "cells": sorted(cell_keys)}


def latest(store: Store) -> Path | None:
    """The HTML report of the study written last into the store, if any."""
    for manifest in store.manifests(STAGE):
        page = store.path(STAGE, manifest.get("key", "-")) / f"{REPORT_NAME}.html"
        if page.is_file():
            return page
    return None


def verdicts_beside(page: Path) -> list[str]:
    """The verdict sentences of the study whose report `page` is (from `latest`); none without its results file."""
    results = page.parent / STUDY_RESULTS_FILE
    if not results.is_file():
        return []
    return [v["sentence"] for v in json.loads(results.read_text()).get("verdicts", [])]
