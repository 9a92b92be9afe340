"""The label-efficiency study: subsets, schedule, the no-leak protocol, verdicts, and the flow with its cell cache."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import pytest

from tasks.config import ConfigError, check_study, load_config
from tasks.data.splits import Dataset, save_dataset
from tasks.stages import pretrain
from tasks.stages.files import CELL_MODEL_FILE, CELL_PREDICTIONS_FILE, STUDY_RESULTS_FILE
from tasks.store.artifacts import Store
from tasks.study import cells as study
from tasks.study import report as study_report

TRAIN_SPLIT = slice(5000, None)  # the default split's training images; the first 5,000 are held out


# --- the labeled subset -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [100, 300, 1000, 3000, 10000])
def test_subsets_hold_the_same_number_of_labels_of_each_class(mnist, budget):
    labels = mnist.y_train[TRAIN_SPLIT]
    chosen = study.labeled_subset(labels, budget, seed=0)
    assert len(np.unique(chosen)) == budget
    assert np.bincount(labels[chosen], minlength=10).tolist() == [budget // 10] * 10


def test_subsets_are_as_balanced_as_the_data_allows():
    # Class 3 has only two images: it gives both, and the other classes share the rest evenly (within one).
    labels = np.repeat(np.arange(10), [50, 50, 50, 2, 50, 50, 50, 50, 50, 50])
    counts = np.bincount(labels[study.labeled_subset(labels, 57, seed=1)], minlength=10)
    assert counts[3] == 2 and counts.sum() == 57
    assert set(np.delete(counts, 3)) <= {6, 7}
    # The largest budget is every labeled image.
    assert study.labeled_subset(labels, len(labels), seed=1).tolist() == list(range(len(labels)))
    with pytest.raises(ValueError, match="budget 453"):
        study.labeled_subset(labels, len(labels) + 1, seed=1)


def test_subsets_nest_across_budgets_and_depend_on_the_seed_alone(mnist):
    labels = mnist.y_train[TRAIN_SPLIT]
    budgets = (100, 300, 1000, 3000, 10000, len(labels))
    for seed in (0, 1):
        subsets = [set(study.labeled_subset(labels, b, seed).tolist()) for b in budgets]
        assert all(small < large for small, large in zip(subsets, subsets[1:], strict=False))
    again = study.labeled_subset(labels.copy(), 100, seed=0)
    assert np.array_equal(study.labeled_subset(labels, 100, seed=0), again)
    assert not np.array_equal(study.labeled_subset(labels, 100, seed=1), again)


def test_schedule_is_set_by_the_budget_alone():
    def cell(budget: int) -> study.Cell:
        return study.grid(load_config("default").study, "glorot_uniform")[0].model_copy(update={"budget": budget})

    for budget in (100, 300, 1000, 3000, 10000, 55000):
        plan = study.schedule(cell(budget))
        assert plan.batch_size == min(128, budget)
        assert plan.steps >= max(500, 5 * -(-budget // plan.batch_size))
        assert plan.steps == plan.passes * -(-budget * plan.repeats // plan.batch_size)
    assert study.schedule(cell(55000)).steps == 5 * 430  # five passes over all labels


def test_budgets_beyond_the_training_split_are_refused_naming_the_field():
    config = load_config("quick", {"study.budgets": [100, 5000]})
    with pytest.raises(ConfigError, match=r"study\.budgets: 5,000 exceed the 3,000 labeled training images"):
        check_study(config)
    with pytest.raises(ConfigError, match="study.budgets"):
        load_config("quick", {"study.budgets": [5]})


# --- no leak: the validation and test labels never change what a cell learns ----------------------------------

SPLIT = {"validation_size": 300, "train_size": 1000, "test_size": None}


def test_no_choice_sees_validation_or_test_labels(mnist_head, tmp_path):
    clean = mnist_head(1300, 500)
    # Every held-out validation label and every test label wrong; the training split's labels untouched.
    y_train = clean.y_train.copy()
    y_train[:300] = (y_train[:300] + 1) % 10
    corrupt = Dataset(clean.x_train, y_train, clean.x_test, (clean.y_test + 1) % 10)
    dirs = {}
    for name, ds in (("clean", clean), ("corrupt", corrupt)):
        (tmp_path / name).mkdir()
        save_dataset(ds, tmp_path / name)
        dirs[name] = tmp_path / name
    quick = load_config("quick", {"pretrain.epochs": 1})
    autoencoder = Store(tmp_path / "store").materialize(
        "pretrain", "k", {}, lambda out: pretrain.run(quick.pretrain, SPLIT, dirs["clean"], out))
    for cell in study.grid(quick.study.model_copy(update={"budgets": (30,), "seeds": 1, "min_steps": 30}),
                           "glorot_uniform"):
        results = {}
        for name in dirs:
            out = tmp_path / f"{cell.name}-{name}"
            out.mkdir()
            summary = study.run(cell, SPLIT, (128, 64), "relu", dirs[name], out, Path(autoencoder.path))
            weights = keras.saving.load_model(out / CELL_MODEL_FILE).get_weights()
            results[name] = summary, weights, study.load_predictions(out)
        (clean_summary, clean_weights, clean_pred), (corrupt_summary, corrupt_weights, corrupt_pred) = (
            results["clean"], results["corrupt"])
        assert clean_summary["class_counts"] == [3] * 10
        assert all(np.array_equal(a, b) for a, b in zip(clean_weights, corrupt_weights, strict=True)), cell.name
        assert np.array_equal(clean_pred, corrupt_pred)
        assert clean_summary["train_loss"] == corrupt_summary["train_loss"]
        # The test labels reached the scoring, and only the scoring.
        assert clean_summary["accuracy"] > 0.3 and corrupt_summary["accuracy"] != clean_summary["accuracy"]


# --- verdicts ----------------------------------------------------------------------------------------------------

def _cells(tmp_path: Path, y: np.ndarray, right: dict[tuple[str, int], np.ndarray]) -> list[study_report.CellResult]:
    cells = []
    for (model, seed), correct in right.items():
        path = tmp_path / f"{model}-{seed}"
        path.mkdir(parents=True)
        np.save(path / CELL_PREDICTIONS_FILE, np.where(correct, y, (y + 1) % 10).astype(np.uint8))
        cells.append(study_report.CellResult(model, 100, seed, float(correct.mean()), path))
    return cells


def test_verdicts_say_whether_pretraining_helped_and_how_sure(tmp_path):
    y = np.arange(1000) % 10
    idx = np.arange(1000)
    # Pretrained right on 900 images, the ANN on 800 of them: 100 discordant pairs, all for pretraining.
    helped = _cells(tmp_path / "a", y, {("pretrained", s): idx < 900 - s for s in range(3)}
                    | {("ann", s): idx < 800 for s in range(3)})
    (row,) = study_report.compare(helped, y, alpha=0.05)
    assert (row["pretrained_only"], row["ann_only"]) == (297, 0)
    assert row["sentence"].startswith("With 100 labels, pretraining helped: 89.90 % against 80.00 %")
    assert "+9.90 points" in row["sentence"] and "We are sure" in row["sentence"]
    # Five discordant pairs each way: no measurable difference.
    noise = _cells(tmp_path / "b", y, {("pretrained", 0): (idx < 800) | (idx >= 995),
                                       ("ann", 0): idx < 805})
    (row,) = study_report.compare(noise, y, alpha=0.05)
    assert row["p_value"] == 1.0 and "no measurable difference" in row["sentence"]


# --- the flow: a quick grid on a Dask LocalCluster, then one more seed from the command line ----------------------

GRID = {"data.train_size": 600, "data.test_size": 500, "pretrain.epochs": 1, "study.budgets": [20, 600],
        "study.seeds": 1, "study.min_steps": 20, "study.epochs": 1}


@pytest.fixture(scope="module")
def on_dask(prefect_api, tmp_path_factory, mnist_mirror):
    from flows.study import label_study

    store = tmp_path_factory.mktemp("study") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_MIRROR", str(mnist_mirror))
        mp.setenv("MNIST_AE_OFFLINE", "1")
        return label_study(profile="quick", overrides=GRID, store=str(store), runner="dask")


def test_quick_grid_on_dask_reuses_the_pipelines_artifacts_and_reports(on_dask):
    from tasks.pipeline import graph

    store = Store(on_dask["store"])
    planned = {s.stage: s.key for s in graph.plan(load_config("quick", GRID, str(store.root)), store)}
    assert {s: r["key"] for s, r in on_dask["upstream"].items()} == {s: planned[s] for s in on_dask["upstream"]}
    assert sorted((c["summary"]["budget"], c["summary"]["model"]) for c in on_dask["cells"]) == sorted(
        (b, m) for b in (20, 600) for m in ("pretrained", "ann", "softmax"))
    assert not any(c["cached"] for c in on_dask["cells"])
    assert all(c["summary"]["n_test"] == 500 for c in on_dask["cells"])
    assert len(on_dask["verdicts"]) == 2 and on_dask["verdicts"][0].startswith("With 20 labels, pretraining")
    page = Path(on_dask["report"]).read_text()
    assert "data:image/png;base64," in page and on_dask["verdicts"][1].split(":")[0] in page
    assert study_report.latest(store) == Path(on_dask["report"])


def test_the_pipelines_run_report_names_the_latest_study(on_dask, tmp_path):
    from tasks import document
    from tasks.runs import run_report
    from tasks.store.artifacts import ArtifactRef, write_manifest

    store = Store(on_dask["store"])
    stage_report = tmp_path / "report"
    document.render([document.Heading("stage report", 1)], stage_report, "report")
    write_manifest(stage_report, key="0" * 64)  # as the store publishes a report artifact
    ref = ArtifactRef(stage="report", key="0" * 64, path=str(stage_report), cached=True, duration_s=0.0,
                      created_at="")
    run = run_report.RunInfo(id="run", name="quick-mnist", at=datetime.now(UTC))
    paths = run_report.run_report(load_config("quick", GRID, str(store.root)), store, {"report": ref}, None, run)
    latest = Path(on_dask["report"]).relative_to(store.root)
    assert f"Latest label-efficiency study: {latest}" in paths["markdown"].read_text()


def test_another_seed_computes_only_its_cells(on_dask, mnist_mirror, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("MNIST_MIRROR", str(mnist_mirror))
    args = ["study", "--profile", "quick", "--store", on_dask["store"]]
    args += [f"--set={k}={json.dumps(v)}" for k, v in {**GRID, "study.seeds": 2}.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cells: 12 (6 computed, 6 from the store)" in out
    report = Path(out.split("report: ")[-1].strip())
    results = json.loads((report.parent / STUDY_RESULTS_FILE).read_text())
    assert all(len(v["seeds"]) == 2 for v in results["verdicts"])

