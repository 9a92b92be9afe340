"""The label-efficiency study: subsets, schedule, recipe selection, the no-leak protocol, verdicts, and the flow."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import pytest

from tasks.config import ConfigError, check_study, load_config
from tasks.data.splits import Dataset, save_dataset
from tasks.ml.networks import build_autoencoder
from tasks.stages import pretrain
from tasks.stages.files import CELL_MODEL_FILE, CELL_PREDICTIONS_FILE, STUDY_RESULTS_FILE
from tasks.store.artifacts import Store
from tasks.study import cells as study
from tasks.study import report as study_report
from tasks.study import selection

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
        assert plan.steps >= max(250, 5 * -(-budget // plan.batch_size))
        assert plan.steps == plan.passes * -(-budget * plan.repeats // plan.batch_size)
    assert study.schedule(cell(55000)).steps == 5 * 430  # five passes over all labels
    # A recipe's step scale multiplies the budget's steps.
    doubled = study.schedule(cell(100).model_copy(update={"step_scale": 2.0}))
    assert doubled.steps >= 2 * study.schedule(cell(100)).steps


def test_the_default_grid_has_five_seeds_up_to_1000_labels_and_a_recipe_grid_per_model():
    config = load_config("default").study
    cells = study.grid(config, "glorot_uniform")
    seeds = {b: len({c.seed for c in cells if c.budget == b}) for b in config.budgets}
    assert all(n >= 5 for b, n in seeds.items() if b <= 1000)
    by_model = {c.model: c.candidates for c in cells if c.budget == 100 and c.seed == 0}
    assert {"tuning": "head_first"} in by_model["pretrained"] and {"head": "glorot_uniform"} in by_model["ann"]
    assert all(c.holdout is None for c in cells if c.budget < config.large_from)
    assert all(c.holdout == config.holdout for c in cells if c.budget >= config.large_from)


def test_budgets_beyond_the_training_split_are_refused_naming_the_field():
    config = load_config("quick", {"study.budgets": [100, 5000]})
    with pytest.raises(ConfigError, match=r"study\.budgets: 5,000 exceed the 3,000 labeled training images"):
        check_study(config)
    with pytest.raises(ConfigError, match="study.budgets"):
        load_config("quick", {"study.budgets": [5]})


# --- recipe selection ---------------------------------------------------------------------------------------------

def test_recipes_are_every_combination_of_the_grids_values():
    from tasks.config import RecipeGrid

    grid = RecipeGrid(learning_rate=(1e-3, 1e-2), head=("zeros", "glorot_uniform"))
    assert selection.recipes(grid) == [
        {"learning_rate": 1e-3, "head": "zeros"}, {"learning_rate": 1e-3, "head": "glorot_uniform"},
        {"learning_rate": 1e-2, "head": "zeros"}, {"learning_rate": 1e-2, "head": "glorot_uniform"}]
    assert selection.recipes(None) == selection.recipes(RecipeGrid()) == [{}]
    assert selection.describe({"learning_rate": 0.01, "head": "zeros"}) == "learning_rate 0.01, head zeros"
    with pytest.raises(ConfigError, match="study.search.ann.head"):
        load_config("quick", {"study.search": {"ann": {"head": ["ones"]}}})


def test_folds_are_disjoint_class_stratified_and_cover_the_budget():
    labels = np.repeat(np.arange(10), [10, 10, 10, 3, 10, 10, 10, 10, 10, 10])  # class 3 is rare
    folds = selection.stratified_folds(labels, 3, seed=4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for c in range(10):
        counts = [int(np.sum(labels[f] == c)) for f in folds]
        assert max(counts) - min(counts) <= 1, (c, counts)
    parts = selection.splits(labels, 3, None, seed=4)
    assert all(len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
               for train, held in parts)
    (train, held), = selection.splits(labels, 3, 0.2, seed=4)
    assert abs(len(held) - 0.2 * len(labels)) <= 1 and len(np.union1d(train, held)) == len(labels)
    assert not np.array_equal(selection.stratified_folds(labels, 3, seed=5)[0], folds[0])
    with pytest.raises(ValueError, match="folds need"):
        selection.stratified_folds(labels[:1], 2, seed=0)


def test_the_best_mean_held_out_accuracy_wins_and_a_tie_keeps_the_grid_order():
    parts = selection.splits(np.arange(30) % 10, 3, None, seed=0)
    by_rate = {1e-3: [0.5, 0.7, 0.6], 1e-2: [0.8, 0.6, 0.7], 1e-1: [0.8, 0.6, 0.7]}
    calls = []

    def score(recipe, train, held):
        calls.append(recipe["learning_rate"])
        return by_rate[recipe["learning_rate"]][len([r for r in calls if r == recipe["learning_rate"]]) - 1]

    chosen = selection.select([{"learning_rate": r} for r in by_rate], parts, score)
    assert chosen.chosen == {"learning_rate": 1e-2} and len(calls) == 9
    assert [round(s, 6) for _, s in chosen.scores] == [0.6, 0.7, 0.7]
    # A single candidate is trained on nothing but the whole budget.
    assert selection.select([{"head": "zeros"}], parts, score).chosen == {"head": "zeros"} and len(calls) == 9


def test_a_slow_encoder_recipe_moves_the_encoder_less_and_head_first_trains_it_too(mnist_head):
    ds = mnist_head(20, 0)
    x = ds.x_train.reshape(20, -1).astype("float32") / 255
    autoencoder = build_autoencoder(load_config("quick").pretrain, seed=0)
    cell = study.Cell(model="pretrained", budget=20, seed=0, optimizer="adam", learning_rate=1e-2, batch_size=10,
                      epochs=1, min_steps=100, init="glorot_uniform")  # two passes of 50 steps
    start = autoencoder.get_layer("enc_0").get_weights()[0]

    def moved(tuning: str) -> float:
        model, _, _ = study.train(cell.model_copy(update={"tuning": tuning}), x, ds.y_train, (128, 64),
                                  "relu", autoencoder)
        return float(np.abs(model.get_layer("encoder").get_layer("enc_0").get_weights()[0] - start).mean())

    joint, slow, head_first = moved("joint"), moved("slow_encoder"), moved("head_first")
    assert 0 < slow < joint / 3
    assert 0 < head_first < joint  # the encoder trained in the second pass only


# --- no leak: the validation and test labels never change what a cell learns or chooses ----------------------

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
    # One model chooses (the same code path serves every model), the others train as they are.
    quick = load_config("quick", {"pretrain.epochs": 1, "study.folds": 2,
                                  "study.search": {"ann": {"head": ["zeros", "glorot_uniform"]}}})
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
        # The same recipe chosen with the same cross-validated scores, from the budget's labels alone.
        assert clean_summary["selection"] == corrupt_summary["selection"], cell.name
        assert len(clean_summary["selection"]["scores"]) == (2 if cell.model == "ann" else 0)
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
    assert (row["challenger_only"], row["reference_only"]) == (297, 0)
    assert row["sentence"].startswith("With 100 labels, pretraining helped: 89.90 % against 80.00 %")
    assert "+9.90 points" in row["sentence"] and "We are sure" in row["sentence"]
    # Significant on the test set, but one seed of three behind: the seeds' interval includes no difference.
    mixed = _cells(tmp_path / "c", y, {("pretrained", 0): idx < 900, ("pretrained", 1): idx < 790,
                                       ("pretrained", 2): idx < 900} | {("ann", s): idx < 800 for s in range(3)})
    (row,) = study_report.compare(mixed, y, alpha=0.05)
    assert row["p_value"] < 0.05 and row["low"] < 0 < row["high"]
    assert "pretraining helped" in row["sentence"] and "Not sure" in row["sentence"]
    assert "We are sure" not in row["sentence"]
    # Five discordant pairs each way: no measurable difference.
    noise = _cells(tmp_path / "b", y, {("pretrained", 0): (idx < 800) | (idx >= 995),
                                       ("ann", 0): idx < 805})
    (row,) = study_report.compare(noise, y, alpha=0.05)
    assert row["p_value"] == 1.0 and "no measurable difference" in row["sentence"]


def test_another_non_baseline_model_is_judged_against_the_ann_too_the_better_one_only(tmp_path):
    y = np.arange(1000) % 10
    idx = np.arange(1000)
    cells = _cells(tmp_path, y, {("pretrained", 0): idx < 850, ("ann", 0): idx < 800, ("softmax", 0): idx < 700,
                                 ("semi-a", 0): idx < 950, ("semi-b", 0): idx < 900})
    rows = study_report.compare(cells, y, alpha=0.05)
    assert [r["model"] for r in rows] == ["pretrained", "semi-a"]
    assert rows[1]["sentence"].startswith("With 100 labels, semi-a did better: 95.00 % against 80.00 %")


def test_the_report_says_whether_the_pretrained_start_helped_the_semi_supervised_model(tmp_path):
    y = np.arange(1000) % 10
    idx = np.arange(1000)
    # From scratch right on 900 images, from the pretrained encoder on 850 of them, in every seed.
    cells = _cells(tmp_path, y, {("ann", s): idx < 700 for s in range(3)}
                   | {("semi-pretrained", s): idx < 850 + s for s in range(3)}
                   | {("semi-scratch", s): idx < 900 for s in range(3)})
    rows = study_report.compare(cells, y, alpha=0.05)
    assert [(r["model"], r["reference"]) for r in rows] == [("semi-scratch", "ann"),
                                                            ("semi-pretrained", "semi-scratch")]
    starts = rows[1]["sentence"]
    assert starts.startswith("With 100 labels, starting the semi-supervised model from the pretrained encoder hurt: "
                             "85.10 % against 90.00 % for the same model from a random start")
    assert "We are sure" in starts
    # The grid trains the semi-supervised models only at their own budgets.
    grid = study.grid(load_config("default").study, "glorot_uniform")
    assert {c.budget for c in grid if c.model in study.SEMI_MODELS} == set(load_config("default").study.semi.budgets)
    assert {c.model for c in grid} >= set(study.SEMI_MODELS)


# --- the flow: a quick grid on a Dask LocalCluster, then one more seed from the command line ----------------------

GRID = {"data.train_size": 600, "data.test_size": 500, "pretrain.epochs": 1, "study.budgets": [20, 600],
        "study.seeds": 1, "study.min_steps": 20, "study.epochs": 1, "study.folds": 2,
        "study.search": {"ann": {"head": ["zeros", "glorot_uniform"]}}}


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
    ann = [c["summary"] for c in on_dask["cells"] if c["summary"]["model"] == "ann"]
    assert all(c["recipe"] in ({"head": "zeros"}, {"head": "glorot_uniform"}) for c in ann)
    assert f"{ann[0]['recipe_name']} (1 of 1)" in page
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
    page = study_report.latest(store)  # what the flow's publish step finds and hands to the run report
    assert page is not None
    paths = run_report.run_report(load_config("quick", GRID, str(store.root)), store, {"report": ref}, None, run,
                                  study=(page, study_report.verdicts_beside(page)))
    latest = Path(on_dask["report"]).relative_to(store.root)
    written = paths["markdown"].read_text()
    assert f"Latest label-efficiency study: {latest}" in written
    assert all(sentence in written for sentence in on_dask["verdicts"])


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

