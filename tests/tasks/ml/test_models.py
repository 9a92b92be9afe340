"""Builders, initialisations, TF1's RMSProp and the last-batch loss, checked against independent NumPy arithmetic."""

from __future__ import annotations

import re
import zipfile

import keras
import numpy as np
import pytest

from tasks.config import PretrainConfig, TrainConfig, load_config
from tasks.ml.networks import build_ann, build_autoencoder, build_classifier, build_softmax_regression, extract_encoder
from tasks.ml.optimizers import TF1RMSprop, make_optimizer
from tasks.ml.training import LastBatchLoss, TrainingDiverged, fit


def _widths(model: keras.Model) -> list[int]:
    return [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)]


@pytest.fixture
def seed_ae() -> keras.Model:
    keras.utils.set_random_seed(1)
    return build_autoencoder(load_config("seed").pretrain)


@pytest.mark.parametrize(("profile", "widths"), [("seed", [128, 64, 128, 784]), ("seed-part2", [256, 128, 256, 784])])
def test_autoencoder_has_the_notebooks_shape(profile, widths):
    model = build_autoencoder(load_config(profile).pretrain)
    assert _widths(model) == widths
    assert [layer.name for layer in model.layers[1:]] == ["enc_0", "enc_1", "dec_0", "dec_1"]
    assert model.output_shape == (None, 784)
    assert all(model.get_layer(n).activation.__name__ == "sigmoid" for n in ("enc_0", "enc_1", "dec_0", "dec_1"))


def test_relu_autoencoder_keeps_a_sigmoid_output():
    cfg = load_config("default").pretrain
    model = build_autoencoder(cfg)
    assert model.get_layer("dec_0").activation.__name__ == "relu"
    assert model.get_layer("dec_1").activation.__name__ == "sigmoid"


def test_normal_init_draws_weights_and_biases_from_standard_normal(seed_ae):
    kernel = seed_ae.get_layer("enc_0").kernel.numpy()
    biases = np.concatenate([seed_ae.get_layer(n).bias.numpy() for n in ("enc_0", "enc_1", "dec_0", "dec_1")])
    assert abs(kernel.mean()) < 0.02 and abs(kernel.std() - 1) < 0.02
    assert abs(biases.mean()) < 0.1 and abs(biases.std() - 1) < 0.1
    # Each layer draws afresh: no two layers share values.
    assert not np.allclose(seed_ae.get_layer("enc_0").bias.numpy()[:64], seed_ae.get_layer("enc_1").bias.numpy())


@pytest.mark.parametrize("init", ["glorot_uniform", "he_normal"])
def test_keras_inits_have_zero_biases(init):
    model = build_ann((128, 64), "relu", init)
    kernel = model.get_layer("hidden_0").kernel.numpy()
    assert np.all(model.get_layer("hidden_0").bias.numpy() == 0)
    assert kernel.std() < 0.1  # scaled by fan-in, far from N(0, 1)


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="initialisation"):
        build_ann((8,), "sigmoid", "uniform")


def test_classifier_starts_from_the_encoder_weights_with_a_zero_head(seed_ae):
    model = build_classifier(extract_encoder(seed_ae), freeze=False)
    encoder = model.get_layer("encoder")
    assert _widths(encoder) == [128, 64]
    for name in ("enc_0", "enc_1"):
        for got, want in zip(encoder.get_layer(name).get_weights(), seed_ae.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    assert all(np.all(w == 0) for w in model.get_layer("head").get_weights())
    assert model.output_shape == (None, 10)
    assert len(model.trainable_weights) == 6


def test_extracted_encoder_is_a_copy(seed_ae):
    encoder = extract_encoder(seed_ae)
    encoder.get_layer("enc_0").kernel.assign(np.zeros((784, 128), np.float32))
    assert np.any(seed_ae.get_layer("enc_0").kernel.numpy() != 0)


def test_frozen_classifier_trains_only_the_head(seed_ae):
    model = build_classifier(extract_encoder(seed_ae), freeze=True)
    head = model.get_layer("head")
    assert [id(w) for w in model.trainable_weights] == [id(head.kernel), id(head.bias)]
    assert not model.get_layer("encoder").trainable


def test_extract_encoder_needs_enc_layers():
    with pytest.raises(ValueError, match="enc_"):
        extract_encoder(build_softmax_regression())


def test_baseline_shapes_and_zero_heads():
    softmax = build_softmax_regression()
    ann = build_ann((128, 64), "sigmoid", "normal")
    assert _widths(softmax) == [10] and _widths(ann) == [128, 64, 10]
    for model in (softmax, ann):
        assert all(np.all(w == 0) for w in model.get_layer("head").get_weights())
    assert abs(ann.get_layer("hidden_0").bias.numpy().std() - 1) < 0.3


def test_tf1_rmsprop_matches_hand_computation():
    w0 = np.array([1.0, -2.0, 0.5], np.float32)
    grads = [np.array([0.3, -1.5, 0.0], np.float32), np.array([-0.7, 2.0, 0.1], np.float32)]
    var = keras.Variable(w0)
    opt = TF1RMSprop(learning_rate=0.02)
    for g in grads:
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
    w, ms = w0.astype(np.float64), np.ones(3)
    for g in grads:
        ms = 0.9 * ms + 0.1 * g.astype(np.float64) ** 2
        w = w - 0.02 * g / np.sqrt(ms + 1e-10)
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-6)
    # Keras's RMSprop starts its accumulator at zero and so takes a visibly larger first step.
    stock = keras.Variable(w0)
    keras.optimizers.RMSprop(learning_rate=0.02).apply_gradients([(keras.ops.convert_to_tensor(grads[0]), stock)])
    tf1_step = 0.02 * 0.3 / np.sqrt(0.9 + 0.1 * 0.3**2)
    assert abs(stock.numpy()[0] - w0[0]) > 3 * tf1_step


def test_make_optimizer_names():
    assert isinstance(make_optimizer("rmsprop_tf1", 0.02), TF1RMSprop)
    assert type(make_optimizer("rmsprop", 0.1)) is keras.optimizers.RMSprop
    assert type(make_optimizer("adam", 0.1)) is keras.optimizers.Adam
    sgd = make_optimizer("sgd", 0.5)
    assert type(sgd) is keras.optimizers.SGD and sgd.momentum == 0
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("adagrad", 0.1)


def test_model_with_tf1_rmsprop_saves_and_loads_in_safe_mode(tmp_path):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="sigmoid")(inputs))
    model.compile(optimizer=TF1RMSprop(learning_rate=0.05, rho=0.8), loss="mean_squared_error",
                  metrics=[LastBatchLoss()])
    x = np.random.default_rng(0).random((16, 4), dtype=np.float32)
    model.fit(x, x, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert isinstance(loaded.optimizer, TF1RMSprop)
    assert loaded.optimizer.get_config()["rho"] == 0.8
    assert loaded.optimizer.get_config()["epsilon"] == 1e-10
    for got, want in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_last_batch_loss_keeps_only_the_latest_batch():
    metric = LastBatchLoss("mean_squared_error")
    first, second = np.zeros((2, 3), np.float32), np.full((2, 3), 0.5, np.float32)
    metric.update_state(first, np.ones((2, 3), np.float32))
    metric.update_state(second, np.zeros((2, 3), np.float32))
    assert float(metric.result()) == pytest.approx(0.25)
    ce = LastBatchLoss("sparse_categorical_crossentropy")
    ce.update_state(np.array([0, 1]), np.array([[0.5, 0.5], [0.25, 0.75]], np.float32))
    assert float(ce.result()) == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2, rel=1e-5)


def test_fit_records_last_batch_and_mean_losses():
    keras.utils.set_random_seed(3)
    model = build_softmax_regression()
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.5, epochs=2, batch_size=32)
    rng = np.random.default_rng(0)
    x, y = rng.random((96, 784), dtype=np.float32), rng.integers(0, 10, 96)
    seen = []
    rows, summary = fit(model, x, y, (x[:32], y[:32]), cfg, lambda e: seen.append((e.epoch, e.epochs, sorted(e.logs))))
    assert [r["epoch"] for r in rows] == [1, 2] and summary["epochs_run"] == 2
    assert set(rows[0]) == {"epoch", "loss_last_batch", "loss_mean", "val_loss", "accuracy", "val_accuracy", "seconds"}
    # Epoch 1 starts from a zero head, whose loss is ln 10; the epoch mean includes that, the last batch does not.
    assert rows[0]["loss_mean"] != rows[0]["loss_last_batch"]
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)] and "loss_last_batch" in seen[0][2]


def test_tensorboard_files_leave_training_unchanged(tmp_path):
    """The same seeded fit with and without the TensorBoard callback: equal weights and training log, event files."""
    rng = np.random.default_rng(0)
    x, y = rng.random((96, 784), dtype=np.float32), rng.integers(0, 10, 96)
    cfg = TrainConfig(optimizer="adam", learning_rate=0.01, epochs=2, batch_size=32)
    results = []
    for logdir in (None, tmp_path):
        keras.utils.set_random_seed(3)
        model = build_ann((16,), "relu", "glorot_uniform", seed=3)
        rows, _ = fit(model, x, y, (x[:32], y[:32]), cfg, tensorboard=logdir, name="ann")
        results.append((model.get_weights(), [{k: v for k, v in r.items() if k != "seconds"} for r in rows]))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert results[0][1] == results[1][1]
    assert {p.parent.name for p in (tmp_path / "ann").rglob("events.out.tfevents.*")} == {"train", "validation"}


def test_early_stopping_without_validation_is_rejected():
    model = build_softmax_regression()
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.5, epochs=2, early_stopping_patience=1)
    with pytest.raises(ValueError, match="validation"):
        fit(model, np.zeros((4, 784), np.float32), np.zeros(4, np.int64), None, cfg)


def test_a_diverging_training_stops_naming_the_setting(mnist, tmp_path):
    """The quick profile's autoencoder at a learning rate past float32's largest number (3.4e38), which is infinite
    in the arithmetic: the first step makes every weight infinite or NaN on any CPU (at 1e9 some CPUs stay finite)."""
    keras.utils.set_random_seed(0)
    cfg = load_config("quick", {"pretrain.learning_rate": 1e39}).pretrain
    model = build_autoencoder(cfg)
    x = mnist.x_train[:3500].reshape(-1, 784).astype(np.float32) / 255
    seen = []
    with pytest.raises(TrainingDiverged) as info:
        fit(model, x[500:], None, (x[:500], x[:500]), cfg, lambda e: seen.append(e.logs), tensorboard=tmp_path / "tb")
    # Which of the two a CPU notices first depends on how its activations treat NaN.
    assert re.fullmatch(r"pretrain: training of autoencoder diverged: (the loss became (nan|inf)|its weights became "
                        r"NaN or infinite) in epoch 1; nothing was cached\. Lower pretrain\.learning_rate "
                        r"\(now 1e\+39\) and run again", str(info.value)), str(info.value)
    assert len(seen) == 1  # stopped after the first epoch, not at the end
    assert not (tmp_path / "tb").exists()  # no curves of a training that produced nothing


def test_nan_weights_stop_training_even_when_the_loss_stays_finite():
    """An activation that turns NaN into a number (as oneDNN's vectorised sigmoid can) hides NaN weights from the
    loss; the weights themselves are checked too."""
    inputs = keras.Input((784,))
    hidden = keras.layers.Dense(784)(inputs)
    masked = keras.layers.Lambda(
        lambda t: keras.ops.sigmoid(keras.ops.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)))(hidden)
    model = keras.Model(inputs, masked, name="autoencoder")
    cfg = PretrainConfig(optimizer="adam", learning_rate=1e39, epochs=2, batch_size=32)
    x = np.random.default_rng(0).random((96, 784), dtype=np.float32)
    seen = []
    with pytest.raises(TrainingDiverged) as info:
        fit(model, x, None, (x[:32], x[:32]), cfg, lambda e: seen.append(e.logs))
    assert str(info.value) == ("pretrain: training of autoencoder diverged: its weights became NaN or infinite in "
                               "epoch 1; nothing was cached. Lower pretrain.learning_rate (now 1e+39) and run again")
    assert len(seen) == 1 and all(np.isfinite(v) for v in seen[0].values())  # the loss alone looked fine


def test_the_same_training_twice_in_one_process_writes_the_same_bytes(tmp_path):
    """Nothing in a model file depends on what the process trained before (Keras numbers unnamed optimizers)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 784), dtype=np.float32), rng.integers(0, 10, 64)
    cfg = TrainConfig(optimizer="adam", learning_rate=0.01, epochs=1, batch_size=32)
    files = []
    for i in range(2):
        model = build_ann((8,), "relu", "glorot_uniform", seed=1)
        fit(model, x, y, None, cfg, seed=1)
        model.save(tmp_path / f"{i}.keras")
        files.append(zipfile.ZipFile(tmp_path / f"{i}.keras").read("model.weights.h5"))
    assert files[0] == files[1]
