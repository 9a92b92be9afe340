"""Scheduled retraining through the flow: labeled batches arrive, validation guards them, the champion is challenged.

One module-scoped sequence of runs on the `quick` profile: a first run; then a clean batch (shifted copies of
training images the quick profile never trains on) arrives with three broken ones, and the next run retrains
on the clean one while quarantining the others; then a run with nothing new, which is fully cached.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main as cli
from flows.pipeline import pipeline
from tasks.data.idx import encode_idx
from tasks.data.splits import load_dataset
from tasks.runs.registry import Registry

ALL = ["download", "validate", "pretrain", "finetune", "baselines", "evaluate", "report"]
CLEAN = slice(55000, 56000)  # far beyond the quick profile's 500 held-out and 3,000 training images


pytestmark = pytest.mark.usefixtures("prefect_api", "mirror_env")  # one Prefect API per module


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retraining")
    return {"store": root / "store", "incoming": root / "incoming", "drops": root / "drops"}


def run(places: dict[str, Path]) -> dict:
    return pipeline(profile="quick", store=str(places["store"]), runner="sequential",
                    overrides={"data.incoming": str(places["incoming"])})


def cli_args(places: dict[str, Path]) -> list[str]:
    return ["--profile", "quick", "--store", str(places["store"]), "--set", f"data.incoming={places['incoming']}"]


@pytest.fixture(scope="module")
def first(places) -> dict:
    return run(places)


@pytest.fixture(scope="module")
def added(first, places, mnist) -> dict[str, tuple[int, str]]:
    """A clean batch and three broken ones arrive; exit code and output of `mnist-ae data add` for two of them."""
    drops = places["drops"]
    drops.mkdir()
    np.savez(drops / "clean.npz", x=np.roll(mnist.x_train[CLEAN], (1, 1), axis=(1, 2)), y=mnist.y_train[CLEAN])
    x, y = np.roll(mnist.x_train[56000:57000], (-1, 1), axis=(1, 2)), mnist.y_train[56000:57000]
    np.savez(drops / "permuted.npz", x=x, y=(y + 1) % 10)  # every label names the next digit
    leak = drops / "leak"
    leak.mkdir()
    x, y = np.roll(mnist.x_train[57000:57500], (1, -1), axis=(1, 2)), mnist.y_train[57000:57500].copy()
    x[17], y[17] = mnist.x_test[3], mnist.y_test[3]  # one test image, copied into training data
    (leak / "leak-images-idx3-ubyte.gz").write_bytes(gzip.compress(encode_idx(x)))
    (leak / "leak-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(y)))
    outcome = {}
    for name in ("clean.npz", "leak"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(["data", "add", str(drops / name), *cli_args(places)])
        outcome[name] = (code, out.getvalue())
    # Dropped without the command, as a copy into the directory would: a batch with wrong labels, a cut-off upload.
    (drops / "permuted.npz").rename(places["incoming"] / "permuted.npz")
    (places["incoming"] / "cut.npz").write_bytes((drops / "clean.npz").read_bytes()[:5000])
    return outcome


@pytest.fixture(scope="module")
def second(added, places) -> tuple[dict, list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tasks.data.intake")
    logger.addHandler(handler)
    try:
        return run(places), records
    finally:
        logger.removeHandler(handler)


def test_data_add_says_what_the_next_run_will_do(added, places):
    code, out = added["clean.npz"]
    assert code == 0 and "1000 images" in out and out.strip().endswith("the next run accepts it")
    code, out = added["leak"]
    assert code == 1 and "no image duplicates a test image" in out and "batch image 17" in out
    assert sorted(p.name for p in places["incoming"].iterdir()) == ["clean.npz", "cut.npz", "leak", "permuted.npz"]


def test_a_clean_batch_retrains_every_stage_and_challenges_the_champion(first, second, places):
    result, _ = second
    assert not any(result["stages"][s]["cached"] for s in ALL)
    assert result["stages"]["download"]["key"] != first["stages"]["download"]["key"]
    data = load_dataset(result["stages"]["download"]["path"])
    assert len(data.y_batches) == 1000 and len(data.y_train) == 60_000
    event = Registry(places["store"]).events()[-1]
    assert event["candidate"]["key"] == result["stages"]["finetune"]["key"]
    assert event["decision"]["champion_accuracy"] is not None  # compared with the first run's champion
    assert result["decision"] == event["reason"]


def test_broken_batches_are_quarantined_with_the_failed_expectation_named(second, places):
    result, records = second
    verdicts = {v["name"]: v for v in result["batches"]["verdicts"]}
    assert {n: v["accepted"] for n, v in verdicts.items()} == {
        "clean.npz": True, "cut.npz": False, "leak": False, "permuted.npz": False}
    assert list(result["batches"]["accepted"]) == [verdicts["clean.npz"]["sha256"]]
    (why,) = verdicts["leak"]["failures"]
    assert why.startswith("no image duplicates a test image (") and "1 image(s) that duplicate test images" in why
    (why,) = verdicts["permuted.npz"]["failures"]
    assert why.startswith("mean intensity per image distributed as in the accepted data, class by class")
    assert "class(es) drifted: class " in why
    assert "cut.npz: not a readable .npz" in verdicts["cut.npz"]["failures"][0]
    for name in ("leak", "permuted.npz"):
        moved = Path(verdicts[name]["where"])
        assert moved.parent == places["incoming"] / "_quarantine"
        assert sorted(p.name for p in moved.iterdir()) == sorted(["data_docs", name, "validation.json",
                                                                  "verdict.json"])
        assert json.loads((moved / "validation.json").read_text())["success"] is False
        assert (moved / "data_docs" / "index.html").is_file()
    assert sorted(p.name for p in places["incoming"].iterdir()) == ["_quarantine", "clean.npz"]
    lines = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(lines) == 3 and all(line.startswith("quarantined batch ") for line in lines)
    assert any("leak: no image duplicates a test image" in line for line in lines)


def test_the_run_report_names_the_batches_and_what_the_model_saw(second):
    result, _ = second
    markdown = Path(result["report"]).with_suffix(".md").read_text()
    section = markdown[markdown.index("### Incoming batches"):]
    assert "The models trained on 4,000 images: 3,000 of the pinned mnist training set and 1,000 from 1 accepted" \
        in section
    assert "| clean.npz | 1000 | accepted | passed every expectation |" in section
    assert "| leak | 500 | quarantined | no image duplicates a test image" in section
    assert "Promotion decision" in markdown and "vs champion" in markdown


def test_a_run_with_nothing_new_is_fully_cached(second, places):
    decisions = len(Registry(places["store"]).events())
    third = run(places)
    assert all(third["stages"][s]["cached"] for s in ALL)
    assert not third["batches"]["verdicts"] and third["decision"] is None
    assert len(Registry(places["store"]).events()) == decisions
    markdown = Path(third["report"]).with_suffix(".md").read_text()
    assert "No new batch arrived for this run." in markdown


def test_data_list_and_status(second, places, capsys):
    assert cli(["data", "list", *cli_args(places)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("4 batch(es)")
    status = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert status == {"clean.npz": "accepted", "cut.npz": "quarantined", "leak": "quarantined",
                      "permuted.npz": "quarantined"}
    assert cli(["status", *cli_args(places)]) == 0
    out = capsys.readouterr().out
    assert "1 accepted batch(es), 0 new" in out and "not cached" not in out
