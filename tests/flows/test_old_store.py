"""A store written before the renames (run log, registry events, model files) keeps working and is migrated.

`tests/fixtures/store-before-renames` is part of a real store made by the release before them: one `quick` run
with a small network (`--set pretrain.hidden=[32,16] --set finetune.linear_probe=false`) whose fine-tuned
model was then made champion with `mnist-ae promote`. It holds that run's fine-tune and evaluate artifacts,
its registry (events under the old key `history`) and its run log (`history/runs.jsonl`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tasks.runs import run_log
from tasks.runs.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
OLD_STORE = ROOT / "tests" / "fixtures" / "store-before-renames"


def mnist_ae(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def old(tmp_path) -> dict:
    store = tmp_path / "store"
    shutil.copytree(OLD_STORE, store)
    registry = json.loads((store / "registry" / "mnist.json").read_text())
    runs = [json.loads(line) for line in (store / "history" / "runs.jsonl").read_text().splitlines()]
    return {"store": store, "events": registry["history"], "champion": registry["champion"], "runs": runs}


def predicted(store: Path, image: Path, cwd: Path) -> dict:
    proc = mnist_ae("predict", str(image), "--store", str(store), "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    (answer,) = json.loads(proc.stdout)
    return answer


def test_an_old_store_is_read_as_it_is(old, mnist, tmp_path):
    store = old["store"]
    assert [e["event"] for e in Registry(store).events()] == [e["event"] for e in old["events"]] == ["reject",
                                                                                                     "manual"]
    assert Registry(store).champion() == old["champion"]
    assert run_log.read(store) == old["runs"]
    # The champion's model is the old file name in its artifact, verified against its manifest.
    assert Registry(store).champion_model().name == "finetuned.keras"
    image = tmp_path / "digit.png"
    Image.fromarray(255 - mnist.x_test[0]).save(image)
    assert predicted(store, image, tmp_path)["error"] is None
    # Reading migrates nothing: a read-only command leaves the store as it found it.
    assert (store / "history" / "runs.jsonl").is_file() and not (store / run_log.RUN_LOG_FILE).exists()
    assert "history" in json.loads((store / "registry" / "mnist.json").read_text())


def test_the_next_run_migrates_the_run_log_and_the_registry(old, mirror_env, tmp_path):
    store = old["store"]
    # The quick profile's own network (128-64) passes its softmax gate by several points, so it meets the champion.
    proc = mnist_ae("run", "--profile", "quick", "--store", str(store), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    assert not (store / "history").exists()
    records = run_log.read(store)
    assert records[:-1] == old["runs"] and len(records) == 2
    registry = json.loads((store / "registry" / "mnist.json").read_text())
    assert "history" not in registry
    assert registry["events"][:-1] == old["events"]
    # The new run was judged against the old champion, example by example on the same test images, with the
    # predictions of the champion's evaluation in the old store.
    decision = registry["events"][-1]["decision"]
    assert decision["champion_accuracy"] == old["champion"]["metrics"]["accuracy"]
    assert decision["p_value"] is not None and decision["b"] + decision["c"] > 0
    # New artifacts take their model's names; the old champion's artifact is left as it was.
    new_key = registry["events"][-1]["candidate"]["key"]
    assert new_key != old["champion"]["key"]
    assert (store / "finetune" / new_key / "pretrained.keras").is_file()
    assert (store / "finetune" / old["champion"]["key"] / "finetuned.keras").is_file()
