"""The stage report: claim table, training curves, reconstructions, confusion matrix, validation and provenance.

The stage report is a `tasks.document` block list, rendered to Markdown and to one self-contained HTML file; its
`blocks.json` lets the run report (`tasks.runs.run_report`) reuse its sections beside a decision and a trend.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tasks.config import STAGES, ReportConfig
from tasks.document import (
    BLOCKS_FILE,
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Link,
    Paragraph,
    Table,
    percent,
    render,
)
from tasks.ml.stats import ordered
from tasks.ml.training_log import best_row
from tasks.pipeline.contract import Contract
from tasks.stages.files import (
    ACCURACY_FILE,
    CONFIG_HEADING,
    METRICS_FILE,
    RECONSTRUCTION_FILE,
    REPORT_NAME,
    STAGES_HEADING,
    TRAINING_LOG_FILE,
    TRAINING_LOG_FILES,
)
from tasks.store.artifacts import MANIFEST

log = logging.getLogger(__name__)

DPI = 100  # small figures keep the self-contained HTML at a few hundred KB

# The notebook's printed pretraining log (part 3: 784-128-64 sigmoid autoencoder, N(0, 1) init, TF1 RMSProp 0.02,
# batch 256), epochs 1-36, each the loss of the epoch's last mini-batch; copied from the end of the seed notebook.
NOTEBOOK_PRETRAIN_LOSS: tuple[float, ...] = (
    0.173456, 0.107189, 0.094686, 0.080522, 0.067303, 0.063146, 0.059718, 0.057705, 0.054638, 0.051806,
    0.050090, 0.049157, 0.046456, 0.047479, 0.047068, 0.045666, 0.042720, 0.041650, 0.040096, 0.040642,
    0.040900, 0.040152, 0.040299, 0.039190, 0.036930, 0.036297, 0.034307, 0.033592, 0.033702, 0.031986,
    0.032740, 0.032521, 0.031337, 0.030314, 0.032664, 0.031706,
)
NOTEBOOK_ARCHITECTURE = {"hidden": [128, 64], "activation": "sigmoid", "init": "normal"}
NOTEBOOK_TRAINING = {"optimizer": "rmsprop_tf1", "learning_rate": 0.02, "batch_size": 256}
LOSS_TABLE_EPOCHS = 10

MODEL_LABELS = {
    "softmax": "Softmax regression on pixels",
    "ann": "ANN, same layers, random init",
    "pretrained": "Pretrained encoder + softmax, fine-tuned",
    "probe": "Frozen pretrained encoder + softmax (probe)",
}
CLAIM_ORDER = ("pretrained", "ann", "softmax")  # the notebook's claim: each beats the next
# Section headings a run's report rearranges: it replaces the stage table and moves the configuration to the end.



# --- figures (the object-oriented matplotlib API renders PNG with Agg and leaves pyplot's global state alone) -------

def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version string: same data, same bytes
    return path


def _series(rows: list[dict[str, Any]], *keys: str) -> tuple[list[int], list[float]]:
    """Epochs and values of the first key present in each row, skipping rows where it is missing or None."""
    points = []
    for r in rows:
        value = next((r[k] for k in keys if r.get(k) is not None), None)
        if value is not None and r.get("epoch") is not None:
            points.append((int(r["epoch"]), float(value)))
    return [p[0] for p in points], [p[1] for p in points]


def plot_pretrain_loss(training_log: list[dict[str, Any]], path: Path) -> Path:
    """This run's pretraining losses per epoch beside the notebook's printed log, log-scaled."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for key, label, style in (("loss_last_batch", "this run, last mini-batch", "-"),
                              ("loss_mean", "this run, epoch mean", ":"), ("val_loss", "this run, validation", "--")):
        epochs, values = _series(training_log, key)
        if values:
            ax.plot(epochs, values, style, label=label)
    nb_epochs = range(1, len(NOTEBOOK_PRETRAIN_LOSS) + 1)
    ax.plot(nb_epochs, NOTEBOOK_PRETRAIN_LOSS, "k.", markersize=4, label="notebook (784-128-64), last mini-batch")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction MSE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_training(training_logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Loss and accuracy per epoch of each classifier; training solid, validation dashed."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (name, rows) in enumerate(training_logs.items()):
        color = f"C{i}"
        for ax, train_keys, val_key in ((loss_ax, ("loss", "loss_mean"), "val_loss"),
                                        (acc_ax, ("accuracy",), "val_accuracy")):
            epochs, values = _series(rows, *train_keys)
            if values:
                ax.plot(epochs, values, "-", color=color, label=f"{name} train")
            epochs, values = _series(rows, val_key)
            if values:
                ax.plot(epochs, values, "--", color=color, label=f"{name} validation")
    for ax, label in ((loss_ax, "cross-entropy"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small")
    return _save(fig, path)


def plot_confusion(matrix: list[list[int]], title: str, path: Path) -> Path:
    """The confusion matrix as a heat map with counts; rows are true classes."""
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    k = len(matrix)
    top = max((max(row) for row in matrix), default=0)
    for t in range(k):
        for p in range(k):
            color = "white" if matrix[t][p] > top / 2 else "black"
            ax.text(p, t, f"{matrix[t][p]:,}", ha="center", va="center", fontsize=10, color=color)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium")
    return _save(fig, path)


# --- reading upstream artifacts -------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def _training_log(inputs: dict[str, Path], model: str) -> Any:
    """A model's per-epoch rows from its training stage's artifact, or None."""
    stage, file = TRAINING_LOG_FILES[model]
    return _read_json(inputs[stage] / file)


def _count(n: Any) -> str:
    """A count as the rest of the report writes it: 10,000."""
    return f"{n:,}" if isinstance(n, int) else str(n)


# --- sections -------------------------------------------------------------------------------------------------------

def claim_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model: name, accuracy and its confidence interval."""
    models = metrics.get("models", {})
    return [{"model": n, "accuracy": models[n]["accuracy"], "ci_low": models[n]["ci_low"],
             "ci_high": models[n]["ci_high"]} for n in metrics.get("order") or ordered(models)]


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def judge_claim(rows: list[dict[str, Any]], level: str) -> tuple[bool | None, str]:
    """Whether pretrained > ANN > softmax held on test accuracy, and a plain sentence saying so."""
    by_name = {r["model"]: r for r in rows}
    missing = [n for n in CLAIM_ORDER if n not in by_name]
    if missing:
        return None, f"The claim cannot be judged in this run: no test accuracy for {', '.join(missing)}."
    p, a, s = (by_name[n] for n in CLAIM_ORDER)
    held = p["accuracy"] > a["accuracy"] > s["accuracy"]
    ranking = " > ".join(f"{r['model']} ({percent(r['accuracy'])})"
                         for r in sorted((p, a, s), key=lambda r: -r["accuracy"]))
    verdict = (f"The claim held in this run: {ranking}." if held else
               f"The claim did not hold in this run: {ranking}.")
    overlapping = [f"{x['model']} and {y['model']}" for x, y in ((p, a), (a, s)) if _overlap(x, y)]
    if overlapping:
        ci = (f" The {level} confidence intervals of {' and of '.join(overlapping)} overlap, so this test set "
              "alone does not separate them.")
    else:
        ci = (f" The {level} confidence intervals of neighbouring models (pretrained and ann, ann and softmax) "
              "do not overlap.")
    return held, verdict + ci


def paired_sentence(pairs: list[dict[str, Any]]) -> str:
    """McNemar's exact test on the same test images, in words."""
    if not pairs:
        return ""
    parts = [f"{p['models'][0]} vs {p['models'][1]}: p = {p['p_value']:.2g} ({p['models'][0]} alone right on "
             f"{p['only_first_right']} images, {p['models'][1]} alone on {p['only_second_right']})" for p in pairs]
    return " Paired McNemar exact test on the same test images: " + "; ".join(parts) + "."


def claim_table(rows: list[dict[str, Any]], level: str) -> Table:
    """The claim table as the report and the Prefect accuracy artifact show it: accuracies in %."""
    return Table(("Model", "Description", "Test accuracy", f"{level} CI"), tuple(
        (r["model"], MODEL_LABELS.get(r["model"], ""), percent(r["accuracy"]),
         f"[{percent(r['ci_low'])}, {percent(r['ci_high'])}]") for r in rows))


def claim_section(metrics: dict[str, Any]) -> tuple[list[Block], list[dict[str, Any]], bool | None]:
    """The claim table and its verdict."""
    level = percent(metrics.get("confidence", 0.95), None)
    rows = claim_rows(metrics)
    held, verdict = judge_claim(rows, level)
    n = metrics.get("n_test")
    table = claim_table(rows, level)
    method = "Wilson score" if metrics.get("ci_method") == "wilson" else str(metrics.get("ci_method", "unknown"))
    blocks: list[Block] = [
        Heading("Claim: pretraining improves accuracy"),
        Paragraph("The notebook claims that a classifier built on the pretrained autoencoder beats both an ANN "
                  "of the same shape trained from random weights and a softmax regression on raw pixels."),
        table,
        Paragraph(verdict + paired_sentence(metrics.get("paired", []))),
        Paragraph(f"Accuracy on {_count(n)} test images; {method} intervals. Non-overlapping intervals are a "
                  "conservative sign of a difference; the paired test, which compares the models image by image, is "
                  "sharper (p below 0.05: the difference is unlikely to be noise)."),
    ]
    return blocks, rows, held


def notebook_comparable(pretrain_cfg: dict[str, Any] | None) -> bool:
    """Whether the run pretrained the notebook's part-3 network (784-128-64, sigmoid, N(0, 1) init)."""
    if not pretrain_cfg or pretrain_cfg.get("hidden") is None:
        return False
    return (list(pretrain_cfg["hidden"]) == NOTEBOOK_ARCHITECTURE["hidden"]
            and all(pretrain_cfg.get(k) == NOTEBOOK_ARCHITECTURE[k] for k in ("activation", "init")))


def loss_difference(training_log: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Mean relative difference |run - notebook| / notebook of the last-mini-batch loss, and the epochs compared."""
    epochs, values = _series(training_log, "loss_last_batch")
    pairs = [(v, NOTEBOOK_PRETRAIN_LOSS[e - 1]) for e, v in zip(epochs, values, strict=True)
             if 1 <= e <= len(NOTEBOOK_PRETRAIN_LOSS)]
    if not pairs:
        return None, 0
    return sum(abs(v - nb) / nb for v, nb in pairs) / len(pairs), len(pairs)


def pretrain_section(pretrain_dir: Path, pretrain_cfg: dict[str, Any] | None,
                     out: Path) -> tuple[list[Block], float | None]:
    """Loss curve against the notebook's log, the side-by-side table, and the reconstruction figure."""
    blocks: list[Block] = [Heading("Pretraining")]
    training_log = _read_json(pretrain_dir / TRAINING_LOG_FILE) or []
    comparable = notebook_comparable(pretrain_cfg)
    difference = None
    if training_log:
        restored = bool((pretrain_cfg or {}).get("early_stopping_patience"))
        kept, _ = _kept(training_log, restored)
        which = f"epoch {kept['epoch']}, whose weights were kept (lowest validation loss)" if restored else "last epoch"
        facts = [f"{label} {kept[key]:.6f}" for key, label in (
            ("loss_last_batch", "last mini-batch loss"), ("loss_mean", "epoch-mean loss"),
            ("val_loss", "validation loss")) if kept.get(key) is not None]
        blocks.append(Paragraph(f"This run: {len(training_log)} epochs; {which}: " + ", ".join(facts) + "."))
        blocks.append(Image(plot_pretrain_loss(training_log, out / "pretrain_loss.png").name,
                            "Pretraining loss per epoch",
                            "Reconstruction loss per epoch (log scale); dots: the notebook's printed log."))
        difference, compared = loss_difference(training_log)
        blocks.append(_notebook_paragraph(pretrain_cfg, comparable, difference, compared))
        if comparable and difference is not None:
            blocks.append(_loss_table(training_log))
    else:
        blocks.append(Paragraph("The pretraining training log is missing."))
    figure = pretrain_dir / RECONSTRUCTION_FILE
    if figure.is_file():
        shutil.copyfile(figure, out / figure.name)
        blocks.append(Image(figure.name, "Test digits and their reconstructions",
                            "Top row: test digits; bottom row: the autoencoder's reconstructions."))
    else:
        blocks.append(Paragraph("The reconstruction figure is missing."))
    return blocks, difference if comparable else None


def _notebook_paragraph(cfg: dict[str, Any] | None, comparable: bool, difference: float | None,
                        compared: int) -> Paragraph:
    if not comparable:
        shape = f"784-{'-'.join(map(str, cfg['hidden']))}" if cfg and cfg.get("hidden") else "an unknown shape"
        return Paragraph(f"This run pretrained {shape} ({(cfg or {}).get('activation', '?')}, "
                         f"{(cfg or {}).get('init', '?')} init), not the notebook's 784-128-64 sigmoid network "
                         "with N(0, 1) init, so its losses are not compared with the notebook's; the notebook's "
                         "log is drawn for orientation only.")
    if difference is None:
        return Paragraph("The training log has no last-mini-batch loss to compare with the notebook's log.")
    text = (f"Same network as the notebook's part 3: the last-mini-batch loss differs from the notebook's "
            f"printed value by {percent(difference, 1)} on average (mean relative difference over the "
            f"{compared} epochs both logs cover).")
    changed = [f"{k} {cfg.get(k)!r}" for k, v in NOTEBOOK_TRAINING.items() if cfg and cfg.get(k) != v]
    if changed:
        text += (f" This run trained with {', '.join(changed)} where the notebook used TF1 RMSProp, learning "
                 "rate 0.02 and batch 256, so the curves need not agree.")
    return Paragraph(text)


def _loss_table(training_log: list[dict[str, Any]]) -> Table:
    epochs, values = _series(training_log, "loss_last_batch")
    rows = []
    for e, v in zip(epochs, values, strict=True):
        if e <= min(LOSS_TABLE_EPOCHS, len(NOTEBOOK_PRETRAIN_LOSS)):
            nb = NOTEBOOK_PRETRAIN_LOSS[e - 1]
            rows.append((str(e), f"{nb:.6f}", f"{v:.6f}", f"{100 * (v - nb) / nb:+.1f} %"))
    return Table(("Epoch", "Notebook", "This run", "Difference"), tuple(rows))


def _kept(rows: list[dict[str, Any]], restored: bool) -> tuple[dict[str, Any], str]:
    """The epoch whose weights the saved model has, and how to call it."""
    if not restored:
        return rows[-1], "final"
    best = best_row(rows)
    return best, f"kept (epoch {best['epoch']}, the lowest validation loss)"


def training_section(title: str, text: str, training_logs: dict[str, list[dict[str, Any]] | None],
                     out: Path, file: str, restored: bool = False) -> list[Block]:
    """Loss and accuracy curves of one training stage, with each saved model's validation accuracy."""
    present = {n: h for n, h in training_logs.items() if h}
    if not present:
        return [Heading(title), Paragraph("The training log is missing.")]
    finals = []
    for name, rows in present.items():
        kept, label = _kept(rows, restored)
        acc = kept.get("val_accuracy") if kept.get("val_accuracy") is not None else kept.get("accuracy")
        which = "validation" if kept.get("val_accuracy") is not None else "training"
        if acc is not None:
            finals.append(f"{name}: {len(rows)} epochs, {label} {which} accuracy {percent(acc)}")
    blocks: list[Block] = [Heading(title), Paragraph(text)]
    if finals:
        blocks.append(Bullets(tuple(finals)))
    figure = plot_training(present, out / file)
    return blocks + [Image(figure.name, f"{title}: loss and accuracy per epoch", "Training solid, validation dashed.")]


def confusion_section(metrics: dict[str, Any], out: Path) -> list[Block]:
    """The best model's confusion matrix and per-class scores."""
    best = metrics.get("best_model")
    model = metrics.get("models", {}).get(best)
    if model is None:
        return []

    def fmt(share: float | None) -> str:
        return percent(share, missing="n/a")

    rows = tuple((str(c["class"]), fmt(c["precision"]), fmt(c["recall"]), fmt(c["f1"]), str(c["support"]))
                 for c in model["per_class"])
    return [
        Heading(f"Best model: {best}"),
        Image(plot_confusion(model["confusion"], f"{best}: test confusion matrix", out / "confusion.png").name,
              f"Confusion matrix of {best}", "Rows: true digit; columns: predicted digit."),
        Table(("Digit", "Precision", "Recall", "F1", "Support"), rows),
    ]


def validation_section(validate_dir: Path) -> list[Block]:
    """The validation stage's own summary paragraph and a link to its Great Expectations Data Docs."""
    summary = (_read_json(validate_dir / MANIFEST) or {}).get("summary") or {}
    paragraph = summary.get("paragraph")
    blocks: list[Block] = [Heading("Data validation"),
                           Paragraph(paragraph or "The validation stage left no summary paragraph.")]
    docs = summary.get("data_docs")
    if docs and (validate_dir / docs).is_file():
        # Relative to the store root, so the link holds from report/<key>/ and runs/<run>/ alike, and in a moved store.
        href = f"../../{validate_dir.parent.name}/{validate_dir.name}/{docs}"
        blocks.append(Link(href, "Great Expectations Data Docs: every expectation with its observed values"))
    return blocks


def stages_section(run_info: dict[str, Any]) -> list[Block]:
    """Per upstream stage, the artifact key and code version this report was built from."""
    stages = run_info.get("stages") or {}
    names = [s for s in STAGES if s in stages] + sorted(set(stages) - set(STAGES))
    if not names:
        return []
    rows = tuple((s, str(stages[s].get("key", ""))[:12], str(stages[s].get("code_version", ""))) for s in names)
    return [Heading(STAGES_HEADING), Paragraph("The stage artifacts this report was built from:"),
            Table(("Stage", "Key", "Code version"), rows)]


def config_section(run_info: dict[str, Any]) -> list[Block]:
    """Provenance: data fingerprint, profile, seed, and the whole config as JSON."""
    config = run_info.get("config") or {}
    facts = [f"Data fingerprint: {run_info.get('data_fingerprint') or 'unknown'}"]
    if config.get("profile"):
        facts.append(f"Profile: {config['profile']}")
    if config.get("seed") is not None:
        facts.append(f"Seed: {config['seed']}")
    return [Heading(CONFIG_HEADING), Bullets(tuple(facts)),
            Paragraph("Every setting of this run, one section per stage (--set section.field=value changes one):"),
            Code(json.dumps(config, indent=2, sort_keys=True), "json")]


def _verdict(blocks: list[Block]) -> str | None:
    """The claim section's verdict paragraph."""
    return next((b.text for b in blocks if isinstance(b, Paragraph) and b.text.startswith("The claim ")), None)


def _early_stopped(config: dict[str, Any], stage: str) -> bool:
    return bool((config.get(stage) or {}).get("early_stopping_patience"))


def run(cfg: ReportConfig, out: Path, *, config: dict[str, Any], data_fingerprint: str,
        validate_dir: Path | None = None, pretrain_dir: Path | None = None, finetune_dir: Path | None = None,
        baselines_dir: Path | None = None, evaluate_dir: Path | None = None) -> dict[str, Any]:
    """Report on the upstream artifacts the profile has; `config` is the reported config (by alias)."""
    dirs = {"validate": validate_dir, "pretrain": pretrain_dir, "finetune": finetune_dir, "baselines": baselines_dir,
            "evaluate": evaluate_dir}
    inputs = {stage: Path(path) for stage, path in dirs.items() if path is not None}
    stages = {}
    for stage, path in inputs.items():
        manifest = _read_json(path / MANIFEST) or {}
        stages[stage] = {"key": manifest.get("key", path.name),
                         "code_version": (manifest.get("key_inputs") or {}).get("code_version", "")}
    return write_report(cfg, inputs, {"config": config, "data_fingerprint": data_fingerprint, "stages": stages}, out)


CONTRACT = Contract(stage="report", run=run, section="report", shared=("config", "data_fingerprint"),
                    reads={"validate_dir": "validate", "pretrain_dir": "pretrain", "finetune_dir": "finetune",
                           "baselines_dir": "baselines", "evaluate_dir": "evaluate"},
                    writes=(f"{REPORT_NAME}.md", f"{REPORT_NAME}.html", BLOCKS_FILE, ACCURACY_FILE),
                    code=(__name__, "tasks.document", "tasks.stages.files", "tasks.ml.stats", "tasks.ml.training"))


def write_report(cfg: ReportConfig, inputs: dict[str, Path], run_info: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write `report.md`, `report.html`, `blocks.json`, `accuracy.json` and the figures into `out`.

    `inputs` maps a stage name (validate, pretrain, finetune, baselines, evaluate) to its artifact directory;
    sections of absent stages are left out. `run_info` is, with every key optional:
    {"config": PipelineConfig as JSON (by alias), "data_fingerprint": str,
     "stages": {stage: {"key": str, "code_version": str}}}.
    Returns the claim table rows (model, accuracy, ci_low, ci_high), "claim_held" (None when the run has no
    evaluation), the best model and the mean relative difference to the notebook's pretraining log.
    """
    inputs = {stage: Path(path) for stage, path in inputs.items()}
    config = run_info.get("config") or {}
    blocks: list[Block] = [Heading(cfg.title, 1)]
    rows: list[dict[str, Any]] = []
    held: bool | None = None
    metrics = _read_json(inputs["evaluate"] / METRICS_FILE) if "evaluate" in inputs else None
    if metrics:
        claim, rows, held = claim_section(metrics)
        blocks += claim
    difference = None
    if "pretrain" in inputs:
        section, difference = pretrain_section(inputs["pretrain"], config.get("pretrain"), out)
        blocks += section
    if "finetune" in inputs:
        blocks += training_section(
            "Fine-tuning", "The encoder with a softmax head, trained on the labels.",
            {"pretrained": _training_log(inputs, "pretrained"), "probe": _training_log(inputs, "probe")}, out,
            "finetune_curves.png",
            _early_stopped(config, "finetune"))
    if "baselines" in inputs:
        blocks += training_section(
            "Baselines", "The same classifiers without pretraining.",
            {"softmax": _training_log(inputs, "softmax"), "ann": _training_log(inputs, "ann")}, out,
            "baselines_curves.png",
            _early_stopped(config, "baselines"))
    if metrics:
        blocks += confusion_section(metrics, out)
    if "validate" in inputs:
        blocks += validation_section(inputs["validate"])
    blocks += stages_section(run_info) + config_section(run_info)
    render(blocks, out, REPORT_NAME)
    accuracy = {"rows": rows, "claim_held": held, "confidence": (metrics or {}).get("confidence")}
    (out / ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2))
    log.info("report written with %d blocks; claim held: %s", len(blocks), held)
    return {"rows": rows, "claim_held": held, "best_model": (metrics or {}).get("best_model"),
            "n_test": (metrics or {}).get("n_test"), "verdict": _verdict(blocks) if metrics else None,
            "confidence": (metrics or {}).get("confidence"),
            "pretrain_mean_rel_diff": difference, "sections": [b.text for b in blocks if isinstance(b, Heading)]}
