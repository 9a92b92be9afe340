"""Profiles and the errors a bad value gives before any work starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.config import PROFILES, ConfigError, load_config, parse_overrides


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_loads(profile):
    assert load_config(profile).profile == profile


def test_seed_profile_has_the_notebooks_hyperparameters():
    cfg = load_config("seed")
    assert (cfg.pretrain.hidden, cfg.pretrain.activation, cfg.pretrain.init) == ((128, 64), "sigmoid", "normal")
    assert (cfg.pretrain.optimizer, cfg.pretrain.learning_rate, cfg.pretrain.epochs) == ("rmsprop_tf1", 0.02, 100)
    assert (cfg.finetune.optimizer, cfg.finetune.learning_rate, cfg.finetune.epochs) == ("sgd", 0.5, 200)
    assert cfg.baselines.learning_rate == 0.5 and cfg.baselines.epochs == 200
    assert cfg.data.validation_size == 5000 and cfg.data.train_size is None
    part2 = load_config("seed-part2")
    assert part2.pretrain.hidden == (256, 128) and part2.pretrain.epochs == 20
    assert part2.stages == ("download", "validate", "pretrain", "report")


def test_overrides_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    monkeypatch.setenv("MNIST_AE_STORE", str(tmp_path / "s"))
    cfg = load_config("quick", ["finetune.learning_rate=0.1", "pretrain.hidden=[32, 16]", "data.dataset=fashion-mnist"])
    assert cfg.finetune.learning_rate == 0.1 and cfg.pretrain.hidden == (32, 16)
    assert cfg.data.mirror == tmp_path and cfg.store == str(tmp_path / "s") and cfg.data.offline
    assert cfg.data.dataset == "fashion-mnist"


def test_config_is_frozen():
    with pytest.raises(ValueError):
        load_config("quick").finetune.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("finetune.epochs=-1", "finetune.epochs"),
        ("pretrain.optimizer=adagrad", "pretrain.optimizer"),
        ("data.mirror=/no/such/dir", "data.mirror"),
        ("finetune.learning_rate=0", "finetune.learning_rate"),
        ("evaluate.confidence=1.5", "evaluate.confidence"),
        ("finetune.lr=0.1", "finetune.lr"),
        ("store=gs://bucket/x", "store"),
        (f"data.incoming={__file__}", "data.incoming"),
        ("validate.drift_max_distance=0", "validate.drift_max_distance"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config("quick", [override])
    assert field in str(info.value)


def test_unknown_profile_and_malformed_override():
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["finetune.epochs"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.validation_size=0", "pretrain.early_stopping_patience=3"],
         "pretrain.early_stopping_patience needs a validation split"),
        (["data.validation_size=60000"], "data.validation_size must leave training images"),
    ],
)
def test_inconsistent_values_fail_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)
    load_config("default", ["data.validation_size=0"])  # no early stopping there, so no validation split needed


def test_a_stage_without_what_it_reads_is_named_by_the_pipeline():
    from tasks.pipeline.graph import check_config

    config = load_config("quick", ['stages=["download", "pretrain"]'])  # the config alone knows no contracts
    with pytest.raises(ConfigError, match="stages: stage pretrain needs validate"):
        check_config(config)


def test_loading_a_config_imports_no_stage_code():
    code = ("import sys; from tasks.config import load_config; load_config('quick', ['stages=[\"download\"]']); "
            "print(sorted(m for m in sys.modules if m.startswith(('keras', 'tensorflow', 'tasks.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['tasks.config']"


def test_the_command_line_names_a_stage_without_what_it_reads_before_any_work(tmp_path, capsys):
    from flows.cli import main

    assert main(["run", "--profile", "quick", "--store", str(tmp_path / "s"),
                 "--set", 'stages=["download", "pretrain"]']) == 2
    assert capsys.readouterr().err == ("mnist-ae: invalid configuration: stages: stage pretrain needs validate "
                                       "(got ['download', 'pretrain'])\n")
    assert not (tmp_path / "s").exists()
