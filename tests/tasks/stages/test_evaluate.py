"""Metric functions against hand computations, and the stage on tiny real Keras models over a real MNIST slice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tasks.config import EvaluateConfig
from tasks.data.splits import save_dataset
from tasks.ml import predictions, stats
from tasks.ml.saved import ModelError
from tasks.stages import evaluate
from tasks.store.artifacts import ArtifactError, write_manifest

SPLIT = {"validation_size": 500, "train_size": 2500, "test_size": 1000}

# A 3-class example small enough to count by hand.
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 1])


def test_confusion_by_hand():
    # true 0 -> predicted 0, 0, 1; true 1 -> 1, 1, 2; true 2 -> 2, 2, 2, 1
    expected = [[2, 1, 0],
                [0, 2, 1],
                [0, 1, 3]]
    assert stats.confusion(Y_TRUE, Y_PRED, k=3).tolist() == expected
    padded = stats.confusion(Y_TRUE, Y_PRED)
    assert padded.shape == (10, 10) and padded.sum() == 10 and padded[3:, :].sum() == 0


def test_per_class_by_hand():
    rows = stats.per_class(stats.confusion(Y_TRUE, Y_PRED, k=3))
    # precision = diagonal / column sum: 2/2, 2/(1+2+1), 3/(1+3)
    assert [r["precision"] for r in rows] == pytest.approx([1.0, 0.5, 0.75])
    # recall = diagonal / row sum: 2/3, 2/3, 3/4
    assert [r["recall"] for r in rows] == pytest.approx([0.6666666667, 0.6666666667, 0.75])
    # F1 = 2PR/(P+R): (4/3)/(5/3) = 0.8; (2/3)/(7/6) = 4/7; 0.75 (P = R)
    assert [r["f1"] for r in rows] == pytest.approx([0.8, 0.5714285714, 0.75])
    assert [r["support"] for r in rows] == [3, 3, 4]
    assert [r["predicted"] for r in rows] == [2, 4, 4]


def test_per_class_undefined_scores_are_none():
    # Class 1 is never predicted (precision 0/0), class 2 never occurs (recall 0/0), class 0 is never hit.
    rows = stats.per_class(stats.confusion(np.array([0, 0, 1]), np.array([2, 2, 0]), k=3))
    assert rows[0] == {"class": 0, "support": 2, "predicted": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rows[1]["precision"] is None and rows[1]["recall"] == 0.0 and rows[1]["f1"] is None
    assert rows[2]["recall"] is None and rows[2]["precision"] == 0.0 and rows[2]["f1"] is None


def test_wilson_interval_by_hand():
    # 7 of 10 correct, 95 %: z = 1.959964, z^2 = 3.841459, z^2/n = 0.3841459
    # center = (0.7 + z^2/(2n)) / (1 + z^2/n) = (0.7 + 0.1920729) / 1.3841459 = 0.6444934
    # half = z / 1.3841459 * sqrt(0.7 * 0.3 / 10 + z^2 / 400) = 1.4160097 * sqrt(0.021 + 0.0096036)
    #      = 1.4160097 * 0.1749390 = 0.2477153
    low, high = stats.accuracy_ci(7, 10, 0.95)
    assert low == pytest.approx(0.6444934 - 0.2477153, abs=1e-6)  # 0.3967781
    assert high == pytest.approx(0.6444934 + 0.2477153, abs=1e-6)  # 0.8922087
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)  # the textbook values


@pytest.mark.parametrize("correct,n,confidence", [(7, 10, 0.95), (9950, 10000, 0.95), (3, 50, 0.9), (1, 1, 0.99)])
def test_wilson_bounds_are_where_the_score_test_just_rejects(correct, n, confidence):
    # Independent definition: the bounds solve |p_hat - p| = z * sqrt(p (1 - p) / n).
    z = {0.9: 1.6448536, 0.95: 1.9599640, 0.99: 2.5758293}[confidence]
    p_hat = correct / n
    for p in stats.accuracy_ci(correct, n, confidence):
        if 0 < p < 1:
            assert abs(p_hat - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-5)


def test_wilson_interval_at_the_edges():
    assert stats.accuracy_ci(0, 20, 0.95)[0] == 0.0
    assert stats.accuracy_ci(20, 20, 0.95)[1] == 1.0
    low, high = stats.accuracy_ci(20, 20, 0.95)
    assert 0.8 < low < 1.0  # unlike the Wald interval, not a zero-width [1, 1]
    wide, narrow = stats.accuracy_ci(50, 100, 0.99), stats.accuracy_ci(50, 100, 0.9)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


@pytest.mark.parametrize("correct,n,confidence", [(1, 0, 0.95), (11, 10, 0.95), (-1, 10, 0.95), (5, 10, 1.0)])
def test_wilson_interval_rejects_bad_input(correct, n, confidence):
    with pytest.raises(ValueError):
        stats.accuracy_ci(correct, n, confidence)


def test_confusion_rejects_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        stats.confusion(np.array([0, 10]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one length"):
        stats.confusion(np.array([0, 1]), np.array([0]))


def test_metrics_for_by_hand():
    m = stats.metrics_for(Y_TRUE, Y_PRED, 0.95, k=3)
    assert (m["n"], m["correct"], m["accuracy"]) == (10, 7, 0.7)
    assert (m["ci_low"], m["ci_high"]) == pytest.approx((0.3967781, 0.8922087), abs=1e-6)
    assert m["macro_f1"] == pytest.approx((0.8 + 4 / 7 + 0.75) / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 2, 1], [0, 1, 3]]
    json.dumps(m)  # must be JSON-able as it is


def test_best_of_breaks_ties_in_table_order():
    models = {"pretrained": {"accuracy": 0.9}, "ann": {"accuracy": 0.9}, "softmax": {"accuracy": 0.8}}
    assert evaluate.best_of(models) == "ann"
    assert stats.ordered(["zeta", "probe", "softmax", "extra"]) == ["softmax", "probe", "extra", "zeta"]


# --- the stage on real models -------------------------------------------------------------------------------------

def _train(layers_: list, x: np.ndarray, y: np.ndarray, path: Path, from_logits: bool = False) -> Path:
    import keras

    model = keras.Sequential([keras.Input((784,)), *layers_])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
    model.fit(x, y, epochs=1, batch_size=128, verbose=0)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def trained(mnist_head, tmp_path_factory):
    """A real MNIST data artifact and tiny models trained on it for one epoch."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(root / "keras-home"))
        import keras
        from keras import layers

        from tasks.data.splits import load_splits

        data_dir = root / "download"
        data_dir.mkdir(parents=True)
        save_dataset(mnist_head(SPLIT["validation_size"] + SPLIT["train_size"], SPLIT["test_size"]), data_dir)
        s = load_splits(data_dir, SPLIT)
        keras.utils.set_random_seed(0)
        paths = {
            "softmax": _train([layers.Dense(10, activation="softmax")], s.x_train, s.y_train, root / "softmax.keras"),
            "ann": _train([layers.Dense(32, activation="sigmoid"), layers.Dense(10, activation="softmax")],
                          s.x_train, s.y_train, root / "ann.keras"),
            "logits": _train([layers.Dense(10)], s.x_train, s.y_train, root / "logits.keras", from_logits=True),
        }
        write_manifest(root, key=root.name)  # as the store publishes artifacts; evaluate loads only verified ones
        yield data_dir, paths, s


def _independent_predictions(path: Path, x: np.ndarray) -> np.ndarray:
    import keras

    return keras.saving.load_model(path).predict(x, verbose=0)


def test_run_on_real_models(trained, tmp_path):
    data_dir, paths, s = trained
    out = tmp_path / "out"
    out.mkdir()
    model_paths = {"ann": paths["ann"], "softmax": paths["softmax"]}
    summary = evaluate.evaluate_models(EvaluateConfig(), SPLIT, data_dir, model_paths, out)

    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.npz"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["order"] == ["softmax", "ann"] and metrics["n_test"] == 1000
    assert metrics["ci_method"] == "wilson" and metrics["confidence"] == 0.95
    preds = predictions.load_predictions(out)
    assert preds.y_true.dtype == np.uint8 and preds.y_true.tolist() == s.y_test.tolist()
    for name, path in model_paths.items():
        probs = _independent_predictions(path, s.x_test)
        expected = probs.argmax(axis=1)
        m = metrics["models"][name]
        assert m["output"] == "probabilities"
        assert m["accuracy"] == pytest.approx(np.mean(expected == s.y_test))
        assert summary["accuracy"][name] == m["accuracy"]
        assert m["ci_low"] < m["accuracy"] < m["ci_high"]
        assert m["accuracy"] > 0.5, "one epoch on 2,500 images should beat chance by far"
        # Confusion matrix counted independently, cell by cell.
        counted = [[int(np.sum((s.y_test == t) & (expected == p))) for p in range(10)] for t in range(10)]
        assert m["confusion"] == counted
        assert [c["support"] for c in m["per_class"]] == np.bincount(s.y_test, minlength=10).tolist()
        assert preds.predicted[name].dtype == np.uint8
        assert preds.predicted[name].tolist() == expected.tolist()
        np.testing.assert_allclose(preds.probability[name], probs.max(axis=1), rtol=1e-5)
        assert preds.correct(name).sum() == m["correct"]
    best = max(model_paths, key=lambda n: metrics["models"][n]["accuracy"])
    assert summary["best_model"] == metrics["best_model"] == best
    assert summary["ci"]["ann"] == [metrics["models"]["ann"]["ci_low"], metrics["models"]["ann"]["ci_high"]]


def test_run_turns_logits_into_probabilities(trained, tmp_path):
    data_dir, paths, s = trained
    evaluate.evaluate_models(EvaluateConfig(confidence=0.9), SPLIT, data_dir, {"pretrained": paths["logits"]}, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["models"]["pretrained"]["output"] == "logits"
    probability = predictions.load_predictions(tmp_path).probability["pretrained"]
    assert probability.min() >= 0.1 and probability.max() <= 1.0  # the top probability of 10 classes is at least 1/10


def test_run_rejects_a_missing_model_file(trained, tmp_path):
    data_dir, paths, _ = trained
    with pytest.raises(FileNotFoundError):
        evaluate.evaluate_models(EvaluateConfig(), SPLIT, data_dir, {"softmax": tmp_path / "nope.keras"}, tmp_path)
    with pytest.raises(ValueError, match="no models"):
        evaluate.evaluate_models(EvaluateConfig(), SPLIT, data_dir, {}, tmp_path)


def test_run_rejects_a_model_with_the_wrong_output(trained, tmp_path):
    import keras
    from keras import layers

    data_dir, _, _ = trained
    path = tmp_path / "five.keras"
    keras.Sequential([keras.Input((784,)), layers.Dense(5, activation="softmax")]).save(path)
    write_manifest(tmp_path, key=tmp_path.name)
    with pytest.raises(ValueError, match="expected outputs of shape"):
        evaluate.evaluate_models(EvaluateConfig(), SPLIT, data_dir, {"softmax": path}, tmp_path)


def test_run_refuses_to_deserialise_code(trained, tmp_path):
    import keras
    from keras import layers

    data_dir, _, _ = trained
    path = tmp_path / "lambda.keras"
    keras.Sequential([keras.Input((784,)), layers.Lambda(lambda t: t[:, :10])]).save(path)
    write_manifest(tmp_path, key=tmp_path.name)
    with pytest.raises(ModelError, match="lambda.keras: refused, the model holds Python code"):
        evaluate.evaluate_models(EvaluateConfig(), SPLIT, data_dir, {"softmax": path}, tmp_path)


def test_run_refuses_an_unverified_model(trained, tmp_path):
    data_dir, paths, _ = trained
    copy = tmp_path / "softmax.keras"
    copy.write_bytes(paths["softmax"].read_bytes())  # the same model, but in no artifact
    with pytest.raises(ArtifactError, match="softmax.keras: fails verification .*no manifest"):
        evaluate.evaluate_models(EvaluateConfig(), SPLIT, data_dir, {"softmax": copy}, tmp_path)


def test_run_refuses_a_model_with_non_finite_outputs(trained, tmp_path):
    """A model whose weights trained into NaN must not get an accuracy (its argmax is always class 0)."""
    import keras

    data_dir, paths, _ = trained
    model = keras.saving.load_model(paths["softmax"])
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.full_like(kernel, np.nan), bias])
    model.save(tmp_path / "nan.keras")
    write_manifest(tmp_path, key=tmp_path.name)
    with pytest.raises(ModelError, match=r"nan.keras: the model outputs NaN or infinite values for 1000 of 1000"):
        evaluate.evaluate_models(EvaluateConfig(), SPLIT, data_dir, {"pretrained": tmp_path / "nan.keras"},
                                 tmp_path / "out")


def test_paired_counts_who_is_right_alone_and_tests_it():
    y = np.arange(10)
    predicted = {
        "pretrained": y.copy(),
        "ann": np.array([0, 1, 2, 3, 4, 5, 6, 0, 0, 0]),  # wrong on 7, 8, 9
        "softmax": np.array([9, 1, 2, 3, 4, 5, 6, 0, 0, 0]),  # also wrong on 0
    }
    rows = evaluate.paired(y, predicted)
    # pretrained alone right on 3 images, ann alone on none: two-sided exact p = 2 * (1/2)**3 = 0.25
    assert rows[0] == {"models": ["pretrained", "ann"], "only_first_right": 3, "only_second_right": 0,
                       "p_value": 0.25}
    # ann alone right on 1 image: p = 2 * 1/2 = 1.0; there is no probe, so no third pair
    assert rows[1] == {"models": ["ann", "softmax"], "only_first_right": 1, "only_second_right": 0, "p_value": 1.0}
    assert len(rows) == 2
