"""Semi-supervised fine-tuning: it learns from the training images alone, never a validation or test image."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from tasks.config import ConfigError, load_config
from tasks.data.splits import Dataset, save_dataset
from tasks.stages import finetune, pretrain
from tasks.stages.files import CELL_MODEL_FILE
from tasks.store.artifacts import Store
from tasks.study import cells as study

SPLIT = {"validation_size": 300, "train_size": 1000, "test_size": None}


@pytest.fixture(scope="module")
def clean(mnist_head) -> Dataset:
    return mnist_head(1300, 300)


@pytest.fixture(scope="module")
def autoencoder(clean, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("semi")
    save_dataset(clean, root)
    quick = load_config("quick", {"pretrain.epochs": 1})
    return Path(Store(root / "store").materialize(
        "pretrain", "k", {}, lambda out: pretrain.run(quick.pretrain, SPLIT, root, out)).path)


def _train(cell: study.Cell, ds: Dataset, out: Path, autoencoder: Path) -> tuple[dict, list[np.ndarray]]:
    out.mkdir(parents=True)
    save_dataset(ds, out)
    summary = study.run(cell, SPLIT, (128, 64), "relu", out, out, autoencoder)
    return summary, keras.saving.load_model(out / CELL_MODEL_FILE).get_weights()


def test_semi_supervised_cells_learn_from_training_images_only(clean, autoencoder, tmp_path):
    """Other validation and test images leave every weight as it was (seeded re-runs are exact); training images not."""
    rng = np.random.default_rng(0)
    x_train = clean.x_train.copy()
    x_train[:300] = rng.integers(0, 256, x_train[:300].shape, dtype=np.uint8)  # the held-out validation images
    y_train = clean.y_train.copy()
    y_train[:300] = (y_train[:300] + 1) % 10
    corrupt = Dataset(x_train, y_train, 255 - clean.x_test, (clean.y_test + 1) % 10)
    semi = load_config("quick").study.semi.model_copy(update={"min_steps": 30, "budgets": (30,)})
    quick = load_config("quick").study.model_copy(update={"budgets": (30,), "seeds": 1, "semi": semi,
                                                          "models": ("semi-pretrained", "semi-scratch")})
    cells = study.grid(quick, "glorot_uniform")
    assert [c.model for c in cells] == ["semi-pretrained", "semi-scratch"]
    for cell in cells:
        assert cell.semi is not None and study.schedule(cell).steps >= 30
        first, first_weights = _train(cell, clean, tmp_path / cell.name / "clean", autoencoder)
        again, again_weights = _train(cell, corrupt, tmp_path / cell.name / "corrupt", autoencoder)
        assert all(np.array_equal(a, b) for a, b in zip(first_weights, again_weights, strict=True)), cell.name
        assert first["train_loss"] == again["train_loss"] and first["accuracy"] > 0.3
    # An unlabeled training image (none of the 30 labeled ones) changes what the model learns.
    unlabeled = np.setdiff1d(np.arange(1000), study.labeled_subset(clean.y_train[300:], 30, cell.seed))[:100]
    x_other = clean.x_train.copy()
    x_other[300 + unlabeled] = 255 - x_other[300 + unlabeled]
    _, other_weights = _train(cell, Dataset(x_other, clean.y_train, clean.x_test, clean.y_test),
                              tmp_path / cell.name / "other", autoencoder)
    assert not all(np.array_equal(a, b) for a, b in zip(first_weights, other_weights, strict=True))


def test_the_finetune_stage_trains_semi_supervised_on_request(clean, autoencoder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    save_dataset(clean, data)
    cfg = load_config("quick", {"finetune.unlabeled": "vat", "finetune.epochs": 1, "finetune.linear_probe": False})
    (tmp_path / "ft").mkdir()
    summary = finetune.run(cfg.finetune, SPLIT, data, autoencoder, tmp_path / "ft")
    assert summary["unlabeled"] == "vat" and summary["epochs_run"] == 1 and summary["val_accuracy"] > 0.3
    assert {p.name for p in (tmp_path / "ft").iterdir()} == {"pretrained.keras", "pretrained_training_log.json",
                                                             "tensorboard"}
    with pytest.raises(ConfigError, match=r"finetune\.unlabeled: .*'vat'"):
        load_config("quick", {"finetune.unlabeled": "pseudo-labels"})
