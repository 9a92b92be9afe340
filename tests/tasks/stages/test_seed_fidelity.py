"""The `seed` profile reproduces the notebook's pretraining: its printed loss log, epochs 1-36, on full MNIST."""

from __future__ import annotations

import json

import keras
import pytest

from tasks.config import DataConfig, load_config
from tasks.stages import download, pretrain, report

EPOCHS = len(report.NOTEBOOK_PRETRAIN_LOSS)  # 36: as far as the notebook's log goes
STALL_EPOCHS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, mnist_mirror):
    out = tmp_path_factory.mktemp("data")
    download.run(DataConfig(mirror=mnist_mirror, offline=True), out)
    return out


def test_seed_pretraining_follows_the_notebooks_log(data_dir, tmp_path):
    seed = load_config("seed", {"pretrain.epochs": EPOCHS})
    keras.utils.set_random_seed(seed.seed)
    pretrain.run(seed.pretrain, seed.data.split(), data_dir, tmp_path)
    training_log = json.loads((tmp_path / "training_log.json").read_text())
    difference, compared = report.loss_difference(training_log)
    assert compared == EPOCHS
    # The bar is 15 %; the notebook's own TF1 code, re-run, lands within 9 %.
    assert difference is not None and difference < 0.15, f"mean relative difference {difference:.1%}"


def test_stock_keras_rmsprop_does_not(data_dir, tmp_path):
    """The reason for the custom optimizer: Keras 3's RMSprop (accumulator from 0) stalls on this network.

    Eight epochs suffice: by then the stock optimizer's loss is about 84 % off the notebook's, the TF1 one's 9 %.
    """
    stock = load_config("seed", {"pretrain.epochs": STALL_EPOCHS, "pretrain.optimizer": "rmsprop"})
    keras.utils.set_random_seed(stock.seed)
    pretrain.run(stock.pretrain, stock.data.split(), data_dir, tmp_path)
    difference, compared = report.loss_difference(json.loads((tmp_path / "training_log.json").read_text()))
    assert compared == STALL_EPOCHS
    assert difference is not None and difference > 0.15, f"mean relative difference {difference:.1%}"
