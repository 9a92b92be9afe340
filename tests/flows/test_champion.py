"""The champion through the command line: which model `predict` serves, and `promote`/`rollback` on odd input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main as cli
from tasks.runs.registry import Registry
from tasks.store.artifacts import Store, key_of


def constant_model(digit: int):
    """A Keras classifier of MNIST's 784 pixels that answers `digit` for every image."""
    import keras

    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, activation="softmax")])
    bias = np.zeros(10, np.float32)
    bias[digit] = 5.0
    model.layers[0].set_weights([np.zeros((784, 10), np.float32), bias])
    return model


def stored(store: Store, stage: str, file: str, digit: int) -> tuple[str, Path]:
    """Publish a constant model as an artifact of `stage`; its key and the model file in the store."""
    inputs = {"stage": stage, "digit": digit, "file": file}

    def produce(out: Path) -> dict:
        constant_model(digit).save(out / file)
        return {}

    ref = store.materialize(stage, key_of(inputs), inputs, produce)
    return ref.key, Path(ref.path) / file


def candidate(key: str, model: Path) -> dict:
    return {"key": key, "model_path": str(model), "accuracy": 0.9, "n": 1000, "data_fingerprint": None,
            "evaluate_key": None}


@pytest.fixture
def champion(tmp_path, mnist) -> dict:
    """A store whose champion answers 3, beside a baseline in it and a model of another store that answer 7."""
    store = Store(tmp_path / "store")
    key, model = stored(store, "finetune", "pretrained.keras", 3)
    _, ann = stored(store, "baselines", "ann.keras", 7)
    _, elsewhere = stored(Store(tmp_path / "other"), "finetune", "pretrained.keras", 7)
    Registry(store.url).promote(key, candidate(key, model), by="test", reason="first")
    digit = tmp_path / "digit.png"
    Image.fromarray(255 - mnist.x_test[0]).save(digit)  # dark ink on white, as a scan
    return {"store": store, "key": key, "ann": ann, "elsewhere": elsewhere, "digit": digit,
            "registry": store.root / "registry" / "mnist.json"}


def _edit(path: Path, **champion: object) -> None:
    state = json.loads(path.read_text())
    state["champion"].update(champion)
    path.write_text(json.dumps(state))


def _predict(champion: dict, capsys) -> tuple[int, str, str]:
    code = cli(["predict", str(champion["digit"]), "--json", "--store", str(champion["store"].root)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_serves_the_model_of_the_champion_key_whatever_model_path_says(champion, capsys):
    registry = champion["registry"]
    for path in (champion["ann"].relative_to(champion["store"].root).as_posix(), str(champion["ann"]),
                 str(champion["elsewhere"]), "finetune/missing/pretrained.keras"):
        _edit(registry, model_path=path)
        code, out, err = _predict(champion, capsys)
        assert code == 0, err
        assert [r["digit"] for r in json.loads(out)] == [3]  # the champion's own model, never the file named


@pytest.mark.parametrize(("key", "expected"), [
    ("0" * 64, "names no finetune artifact in store"),
    ("", "is not an artifact key"),
    ("../baselines", "is not an artifact key"),
    ("/etc", "is not an artifact key"),
])
def test_predict_refuses_a_champion_key_that_names_no_stored_model(champion, capsys, key, expected):
    _edit(champion["registry"], key=key)  # model_path still names the old champion's intact file
    code, out, err = _predict(champion, capsys)
    assert code == 1 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("mnist-ae: champion ") and expected in line and str(champion["registry"]) in line


def test_promote_refuses_an_empty_key_and_keeps_an_existing_champion_without_an_event(champion, capsys):
    root, registry = str(champion["store"].root), champion["registry"]
    before = registry.read_text()
    for key in ("", " "):
        assert cli(["promote", key, "--store", root]) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("mnist-ae: the key is empty;") and champion["key"][:12] in line
    assert cli(["promote", champion["key"][:8], "--store", root]) == 0
    assert capsys.readouterr().out == f"champion: {champion['key']} (already the champion; nothing recorded)\n"
    assert registry.read_text() == before


def test_rollback_without_a_champion_says_so(champion, capsys):
    _, second = stored(champion["store"], "finetune", "pretrained.keras", 5)
    Registry(champion["store"].url).promote(second.parent.name, candidate(second.parent.name, second), by="test",
                                            reason="second")
    state = json.loads(champion["registry"].read_text())
    state["champion"] = None  # withdrawn by hand: two champions in the events, none now
    champion["registry"].write_text(json.dumps(state))
    assert cli(["rollback", "--store", str(champion["store"].root)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"mnist-ae: cannot roll back: registry {champion['registry']} has no champion to roll back from"
    assert json.loads(champion["registry"].read_text()) == state
