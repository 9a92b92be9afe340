"""Run log: append/read, concurrent appenders, torn lines, trend rule, figure and table."""

from __future__ import annotations

import json
import logging
import multiprocessing

import pytest
from PIL import Image

from tasks.runs import run_log


def run_record(i: int, pretrained: float = 0.97, **extra) -> dict:
    return {
        "flow_run_id": f"run-{i}",
        "profile": "quick",
        "data_fingerprint": "d" * 64,
        "config_hash": "c" * 64,
        "stages": {"download": {"cached": True, "duration_s": 0.1}, "pretrain": {"cached": False, "duration_s": 4.0}},
        "accuracy": {"softmax": 0.92, "pretrained": pretrained},
        "promotion": {"promote": i == 0, "reason": "first model" if i == 0 else "champion kept"},
        **extra,
    }


def records_of(values: list[float]) -> list[dict]:
    return [run_record(i, v) for i, v in enumerate(values)]


def test_append_read_round_trip(store_root):
    written = [run_log.append(store_root, run_record(i)) for i in range(3)]
    assert run_log.read(store_root) == written
    assert written[0]["at"].endswith("+00:00")
    assert (store_root / "run_log.jsonl").read_text().count("\n") == 3


def test_read_of_missing_run_log_is_empty(store_root):
    assert run_log.read(store_root) == []


def test_torn_last_line_is_skipped_with_a_warning(store_root, caplog):
    run_log.append(store_root, run_record(0))
    path = store_root / "run_log.jsonl"
    with path.open("a") as fh:
        fh.write(json.dumps(run_record(1))[:40])  # a writer killed mid-line
    with caplog.at_level(logging.WARNING, logger="tasks.runs.run_log"):
        assert [r["flow_run_id"] for r in run_log.read(store_root)] == ["run-0"]
    assert "line 2" in caplog.text

    # The next append starts on a fresh line, so only the fragment is lost.
    run_log.append(store_root, run_record(2))
    assert [r["flow_run_id"] for r in run_log.read(store_root)] == ["run-0", "run-2"]


def _append_many(root: str, worker: int, count: int) -> None:
    for i in range(count):
        run_log.append(root, run_record(i, flow_run_id=f"w{worker}-{i}"))


def test_concurrent_appends_lose_nothing(store_root):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(store_root), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    ids = sorted(r["flow_run_id"] for r in run_log.read(store_root))
    assert ids == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))


@pytest.mark.parametrize(("values", "expected"), [
    ([], "flat"),
    ([0.97], "flat"),
    ([0.960, 0.965, 0.970, 0.975, 0.980], "improving"),
    ([0.980, 0.975, 0.970, 0.965, 0.960], "regressing"),
    ([0.975, 0.976, 0.974, 0.975, 0.976], "flat"),
    # Only the last five runs count: an old climb followed by a steady decline is a regression.
    ([0.90, 0.93, 0.96, 0.99, 0.985, 0.98, 0.975, 0.97], "regressing"),
    ([0.97, 0.98], "improving"),
])
def test_trend_classification(values, expected):
    assert run_log.trend(records_of(values)) == expected


def test_trend_ignores_runs_without_the_pretrained_model():
    records = records_of([0.96, 0.97, 0.98])
    records.insert(1, {"flow_run_id": "part2", "accuracy": {}})
    assert run_log.trend(records) == "improving"
    assert run_log.accuracies(records, "pretrained") == [0.96, 0.97, 0.98]


def test_trend_figure_is_written(tmp_path):
    records = records_of([0.96, 0.97, 0.975])
    records[1]["accuracy"]["probe"] = 0.9
    path = run_log.trend_figure(records, tmp_path / "figs" / "trend.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (700, 400)


def test_trend_figure_of_no_runs_is_still_written(tmp_path):
    assert run_log.trend_figure([], tmp_path / "trend.png").stat().st_size > 0


def test_trend_table_rows_share_columns_and_keep_the_last_runs():
    records = records_of([0.9 + i / 100 for i in range(12)])
    records[-1]["accuracy"]["probe"] = 0.88
    rows = run_log.trend_table(records, last=10)
    assert [r["Run"] for r in rows] == [str(i) for i in range(3, 13)]
    assert {tuple(r) for r in rows} == {tuple(rows[0])}
    assert rows[-1]["pretrained"] == "101.00 %" and rows[-1]["probe"] == "88.00 %" and rows[0]["probe"] == ""
    assert rows[0]["Computed"] == "1/2" and rows[0]["Promoted"] == "no"
    assert len(rows[0]) <= 9  # fits a page: no ids or hashes


def cached_rerun(record: dict, i: int) -> dict:
    """The record of a run that found every stage in the store."""
    return {**record, "flow_run_id": f"run-{i}", "wall_s": 1.2,
            "stages": {s: {**v, "cached": True, "duration_s": 0.0} for s, v in record["stages"].items()}}


def test_a_cached_run_is_not_a_new_model():
    first = run_record(0, 0.96, wall_s=14.0)
    first["stages"]["evaluate"] = {"cached": False, "duration_s": 1.0, "key": "e1"}
    second = run_record(2, 0.98, wall_s=15.0)
    second["stages"]["evaluate"] = {"cached": False, "duration_s": 1.0, "key": "e2"}
    legacy = {**run_record(3, 0.98), "stages": {"pretrain": {"cached": True, "duration_s": 13.8}}}
    records = [first, cached_rerun(first, 1), second, cached_rerun(second, 3), legacy]
    assert run_log.models(records) == [first, second]
    assert run_log.trend(records) == "improving"  # two models, not five points
    rows = run_log.trend_table(records)
    assert [r["Models"] for r in rows] == ["new", "as run 1", "new", "as run 3", "from the store"]
    assert [r["Seconds"] for r in rows] == ["14.0", "1.2", "15.0", "1.2", ""]
    assert run_log.plural(1, "run") == "1 run" and run_log.plural(2, "run") == "2 runs"


def test_lines_of_the_wrong_shape_are_skipped_in_one_warning(store_root, caplog):
    run_log.append(store_root, run_record(0))
    path = store_root / "run_log.jsonl"
    with path.open("a") as fh:
        fh.write('[1, 2]\n"text"\n{"accuracy": 5}\n{"stages": []}\n\x00\xff garbage\n')
    run_log.append(store_root, run_record(1))
    with caplog.at_level(logging.WARNING, logger="tasks.runs.run_log"):
        records = run_log.read(store_root)
    assert [r["flow_run_id"] for r in records] == ["run-0", "run-1"]
    assert run_log.trend(records) == "flat" and len(run_log.trend_table(records)) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "skipping 5 unreadable line(s)" in warnings[0] and "line 2, 3, 4, 5, 6" in warnings[0]
    assert str(path) in warnings[0]


def test_an_unreadable_run_log_is_one_error_naming_it(store_root):
    path = store_root / "run_log.jsonl"
    path.mkdir(parents=True)  # a directory where the file should be
    for action in (lambda: run_log.read(store_root), lambda: run_log.append(store_root, run_record(0))):
        with pytest.raises(run_log.RunLogError, match=f"run log {path} cannot be"):
            action()
    assert path.is_dir() and not any(path.iterdir())
