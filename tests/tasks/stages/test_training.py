"""The three training stages on a few thousand real MNIST images, seeded and compiled as the pipeline runs them."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tasks.config import load_config
from tasks.data.splits import Dataset, load_splits, save_dataset
from tasks.ml.networks import build_classifier, extract_encoder
from tasks.ml.saved import load_autoencoder
from tasks.stages import baselines, finetune, pretrain
from tasks.store.artifacts import write_manifest

SPLIT = {"validation_size": 500, "train_size": 3000, "test_size": 1000}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(mnist_head, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    save_dataset(mnist_head(3500, 1000), directory)
    return directory


def _seed_cfg(overrides: dict):
    return load_config("seed", overrides)


def _pretrain(data_dir: Path, out: Path, epochs: int, progress=None, **overrides) -> dict:
    out.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    cfg = _seed_cfg({"pretrain.epochs": epochs, **{f"pretrain.{k}": v for k, v in overrides.items()}}).pretrain
    return pretrain.run(cfg, SPLIT, data_dir, out, progress)


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory) -> tuple[Path, dict, list]:
    seen: list = []
    out = tmp_path_factory.mktemp("pretrain") / "out"
    summary = _pretrain(data_dir, out, 2, lambda e: seen.append((e.epoch, e.epochs, e.logs)))
    write_manifest(out, key=out.name)  # as the store publishes it: fine-tuning loads only a verified autoencoder
    return out, summary, seen


def _encoder_weights(model: keras.Model) -> list[np.ndarray]:
    source = model.get_layer("encoder") if "encoder" in [layer.name for layer in model.layers] else model
    return [w for name in ("enc_0", "enc_1") for w in source.get_layer(name).get_weights()]


def test_pretrain_writes_model_training_log_and_figure(pretrained, data_dir):
    out, summary, seen = pretrained
    assert {p.name for p in out.iterdir()} - {"manifest.json"} == {"autoencoder.keras", "training_log.json",
                                                                   "reconstruction.png", "tensorboard"}
    training_log = json.loads((out / "training_log.json").read_text())
    assert [row["epoch"] for row in training_log] == [1, 2]
    assert training_log[1]["loss_last_batch"] < training_log[0]["loss_mean"]
    assert [(e, n) for e, n, _ in seen] == [(1, 2), (2, 2)] and seen[1][2]["loss_last_batch"] > 0
    assert summary["epochs_run"] == 2 and (summary["train_size"], summary["val_size"]) == (3000, 500)

    model = keras.saving.load_model(out / "autoencoder.keras", safe_mode=True)
    test = load_splits(data_dir, SPLIT).x_test
    recon = model.predict(test, verbose=0)
    assert summary["reconstruction_mse_test"] == pytest.approx(float(np.mean((recon - test) ** 2)), rel=1e-4)
    assert summary["reconstruction_mse_shown"] == pytest.approx(float(np.mean((recon[:10] - test[:10]) ** 2)), 1e-4)

    png = (out / "reconstruction.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1000, 200)


def test_finetuned_model_starts_from_the_pretrained_encoder(pretrained):
    autoencoder = load_autoencoder(pretrained[0])
    model = build_classifier(extract_encoder(autoencoder), freeze=False)
    for got, want in zip(_encoder_weights(model), _encoder_weights(autoencoder), strict=True):
        np.testing.assert_array_equal(got, want)


def _finetune(data_dir: Path, pretrain_dir: Path, out: Path, **overrides) -> dict:
    out.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    cfg = _seed_cfg({"finetune.epochs": 1, **{f"finetune.{k}": v for k, v in overrides.items()}}).finetune
    return finetune.run(cfg, SPLIT, data_dir, pretrain_dir, out)


def test_finetune_trains_the_encoder_and_a_frozen_probe(pretrained, data_dir, tmp_path):
    summary = _finetune(data_dir, pretrained[0], tmp_path / "ft", linear_probe=True)
    files = {p.name for p in (tmp_path / "ft").iterdir()}
    assert files == {"pretrained.keras", "pretrained_training_log.json", "probe.keras", "probe_training_log.json",
                     "tensorboard"}
    assert sorted(p.name for p in (tmp_path / "ft" / "tensorboard").iterdir()) == ["pretrained", "probe"]
    assert summary["epochs_run"] == 1 and summary["probe"]["epochs_run"] == 1
    assert summary["val_accuracy"] > 0.2  # a zero head alone predicts one class: about 0.1

    pretrained_weights = _encoder_weights(load_autoencoder(pretrained[0]))
    tuned = keras.saving.load_model(tmp_path / "ft" / "pretrained.keras", safe_mode=True)
    probe = keras.saving.load_model(tmp_path / "ft" / "probe.keras", safe_mode=True)
    assert any(not np.array_equal(a, b) for a, b in zip(_encoder_weights(tuned), pretrained_weights, strict=True))
    for got, want in zip(_encoder_weights(probe), pretrained_weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.any(probe.get_layer("head").kernel.numpy() != 0)


def test_frozen_finetuning_moves_only_the_head(pretrained, data_dir, tmp_path):
    summary = _finetune(data_dir, pretrained[0], tmp_path / "ft", freeze_encoder=True)
    assert summary["freeze_encoder"] and "probe" not in summary
    tuned = keras.saving.load_model(tmp_path / "ft" / "pretrained.keras", safe_mode=True)
    pretrained_weights = _encoder_weights(load_autoencoder(pretrained[0]))
    for got, want in zip(_encoder_weights(tuned), pretrained_weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert all(np.any(w != 0) for w in tuned.get_layer("head").get_weights())


def test_finetune_without_a_pretrained_model_fails(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="autoencoder.keras"):
        _finetune(data_dir, tmp_path / "missing", tmp_path / "ft")


def test_baselines_write_both_models(data_dir, tmp_path):
    seen: list = []
    keras.utils.set_random_seed(0)
    cfg = _seed_cfg({"baselines.epochs": 1}).baselines
    summary = baselines.run(cfg, SPLIT, data_dir, tmp_path, lambda e: seen.append((e.model, e.epoch, e.epochs, e.done)),
                            hidden=(128, 64), activation="sigmoid")
    assert {p.name for p in tmp_path.iterdir()} == {"softmax.keras", "ann.keras", "softmax_training_log.json",
                                                   "ann_training_log.json", "tensorboard"}
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["ann", "softmax"]
    # Each model's epochs by name; the stage's share done runs over both.
    assert seen == [("softmax", 1, 1, 0.5), ("ann", 1, 1, 1.0)]
    ann = keras.saving.load_model(tmp_path / "ann.keras", safe_mode=True)
    assert [layer.units for layer in ann.layers[1:]] == [128, 64, 10]
    assert summary["softmax"]["val_accuracy"] > 0.7 and summary["ann"]["epochs_run"] == 1
    assert len(json.loads((tmp_path / "softmax_training_log.json").read_text())) == 1


def test_early_stopping_restores_the_best_epoch(mnist_head, tmp_path):
    """Training labels shifted by one make validation loss rise after the first epoch, so training must stop."""
    ds = mnist_head(3500, 1000)
    shifted = ds.y_train.copy()
    shifted[SPLIT["validation_size"]:] = (shifted[SPLIT["validation_size"]:] + 1) % 10
    data = tmp_path / "data"
    data.mkdir()
    save_dataset(Dataset(ds.x_train, shifted, ds.x_test, ds.y_test), data)
    keras.utils.set_random_seed(0)
    cfg = _seed_cfg({"baselines.epochs": 8, "baselines.early_stopping_patience": 1}).baselines
    summary = baselines.run(cfg, SPLIT, data, tmp_path, hidden=(16,), activation="sigmoid")["softmax"]
    assert summary["epochs_run"] == 2 and summary["best_epoch"] == 1

    model = keras.saving.load_model(tmp_path / "softmax.keras", safe_mode=True)
    val = load_splits(data, SPLIT)
    val_loss = float(keras.losses.sparse_categorical_crossentropy(val.y_val, model.predict(val.x_val, verbose=0))
                     .numpy().mean())
    assert val_loss == pytest.approx(summary["best_val_loss"], rel=1e-4)


def test_early_stopping_needs_a_validation_split(data_dir, tmp_path):
    cfg = _seed_cfg({"pretrain.epochs": 1, "pretrain.early_stopping_patience": 1}).pretrain
    with pytest.raises(ValueError, match="validation"):
        pretrain.run(cfg, {**SPLIT, "validation_size": 0}, data_dir, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_seeded_rerun_reproduces_the_stage_exactly(pretrained, data_dir, tmp_path):
    """Masking noise, pixel shifts, the order of the images and the learning-rate schedule all repeat exactly."""
    random = {"noise": 0.2, "shift": 1, "schedule": "cosine"}
    first = _pretrain(data_dir, tmp_path / "a", 1, **random)
    second = _pretrain(data_dir, tmp_path / "b", 1, **random)
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in second.items() if k != "seconds"}
    a = keras.saving.load_model(tmp_path / "a" / "autoencoder.keras", safe_mode=True)
    b = keras.saving.load_model(tmp_path / "b" / "autoencoder.keras", safe_mode=True)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)

    tuned = [_finetune(data_dir, pretrained[0], tmp_path / name, shift=2, schedule="cosine") for name in ("fa", "fb")]
    assert tuned[0]["val_accuracy"] == tuned[1]["val_accuracy"] and tuned[0]["loss_mean"] == tuned[1]["loss_mean"]
    fa, fb = (keras.saving.load_model(tmp_path / n / "pretrained.keras", safe_mode=True) for n in ("fa", "fb"))
    for wa, wb in zip(fa.get_weights(), fb.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
