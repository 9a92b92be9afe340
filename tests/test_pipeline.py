"""The whole flow on the `quick` profile, through a real (temporary) Prefect API and real MNIST."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.testing.utilities import prefect_test_harness

from flows.cli import main as cli
from flows.pipeline import pipeline
from flows.stages import ACCURACY_ARTIFACT, REPORT_ARTIFACT, StageContext
from flows.stages import download as download_task
from tasks import download, history
from tasks.config import load_config
from tasks.graph import MissingUpstream
from tasks.registry import Registry

ALL = ["download", "validate", "pretrain", "finetune", "baselines", "evaluate", "report"]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline") / "store"


@pytest.fixture(autouse=True)
def _mirror(monkeypatch, mnist_mirror):
    monkeypatch.setenv("MNIST_MIRROR", str(mnist_mirror))


def run(store: Path, profile: str = "quick", **params) -> dict:
    """A run on the sequential runner; tests/test_runners.py runs the same flow on Dask clusters."""
    return pipeline(profile=profile, store=str(store), runner="sequential", **params)


def task_states(flow_run_id: str) -> dict[str, str]:
    """Stage name -> Prefect state name of each task run of a flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.split("-")[0]: r.state.name for r in runs if r.state}


@pytest.fixture(scope="module")
def first(store) -> dict:
    return run(store)


def test_first_run_computes_every_stage_and_writes_the_report(first, store):
    assert list(first["stages"]) == ALL
    assert not any(s["cached"] for s in first["stages"].values())
    assert set(task_states(first["flow_run_id"]).values()) == {"Completed"}
    report_dir = Path(first["stages"]["report"]["path"])
    markdown = (report_dir / "report.md").read_text()
    for model in ("Softmax", "ANN", "fine-tuned"):
        assert model in markdown
    rows = first["stages"]["report"]["summary"]["rows"]
    assert {r["model"] for r in rows} >= {"softmax", "ann", "pretrained"}
    assert all(0 < r["accuracy"] <= 1 for r in rows)
    assert "claim" in markdown.lower()
    html = Path(first["report"]).read_text()
    assert "data:image/png;base64," in html and "Promotion decision" in html and "Trend over past runs" in html


def test_prefect_artifacts_are_published(first):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_ARTIFACT, ACCURACY_ARTIFACT])))
    mine = {a.key: a for a in found if str(a.flow_run_id) == first["flow_run_id"]}
    assert set(mine) == {REPORT_ARTIFACT, ACCURACY_ARTIFACT}
    assert "pretrained" in json.dumps(mine[ACCURACY_ARTIFACT].data)
    assert "Claim" in mine[REPORT_ARTIFACT].data or "claim" in mine[REPORT_ARTIFACT].data
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first["flow_run_id"]]),
            type=ArtifactFilterType(any_=["progress"])))
    assert len(progress) == 3 and all(a.data == 100.0 for a in progress)  # one per training stage, each finished


def test_first_model_becomes_champion_and_run_is_recorded(first, store):
    champion = Registry(store).champion()
    assert champion is not None and champion["key"] == first["stages"]["finetune"]["key"]
    records = history.read(store)
    assert records[0]["flow_run_id"] == first["flow_run_id"]
    assert set(records[0]["stages"]) == set(ALL)


def test_second_run_is_all_cached(first, store):
    decisions = len(Registry(store).history())
    second = run(store)
    assert second["decision"] is None and len(Registry(store).history()) == decisions  # nothing new to judge
    states = task_states(second["flow_run_id"])
    assert {s: states[s] for s in ALL} == {s: "Cached" for s in ALL}
    assert all(s["cached"] for s in second["stages"].values())
    assert {s: r["key"] for s, r in second["stages"].items()} == {s: r["key"] for s, r in first["stages"].items()}


@pytest.fixture(scope="module")
def changed(first, store) -> dict:
    return run(store, overrides={"finetune.learning_rate": 0.002})


def test_changing_a_finetune_setting_reruns_only_what_follows(changed):
    states = task_states(changed["flow_run_id"])
    recomputed = {s for s in ALL if states[s] != "Cached"}
    assert recomputed == {"finetune", "evaluate", "report"}


def test_forced_rerun_of_one_stage_reproduces_its_metrics(first, store):
    forced = run(store, stages=["finetune", "evaluate"], force=["finetune", "evaluate"])
    assert set(forced["stages"]) >= {"finetune", "evaluate"}
    states = task_states(forced["flow_run_id"])
    assert states["finetune"] == "Completed" and states["evaluate"] == "Completed"
    assert "pretrain" not in states and "report" not in states
    assert not forced["stages"]["finetune"]["cached"]
    before = first["stages"]["evaluate"]["summary"]["accuracy"]
    assert forced["stages"]["evaluate"]["summary"]["accuracy"] == before
    history_file = Path(forced["stages"]["finetune"]["path"]) / "history.json"
    assert json.loads(history_file.read_text()) == json.loads(history_file.read_text())


def test_seed_part2_stops_after_pretraining_and_reports_the_reconstruction(tmp_path):
    small = {"data.train_size": 1000, "data.test_size": 500, "pretrain.epochs": 1}
    result = run(tmp_path / "s", profile="seed-part2", overrides=small)
    assert list(result["stages"]) == ["download", "validate", "pretrain", "report"]
    markdown = (Path(result["stages"]["report"]["path"]) / "report.md").read_text()
    assert "reconstruction.png" in markdown and "784-256-128" in markdown
    assert "Claim" not in markdown
    assert Registry(tmp_path / "s").champion() is None


@pytest.mark.parametrize(("offline", "attempts"), [("0", 4), ("1", 1)], ids=["network-error", "data-error"])
def test_download_is_retried_on_network_errors_only(tmp_path, monkeypatch, offline, attempts):
    monkeypatch.delenv("MNIST_MIRROR")
    monkeypatch.setenv("MNIST_AE_OFFLINE", offline)
    monkeypatch.setattr(download, "MIRROR_URLS", {"mnist": ("http://127.0.0.1:9/",)})  # nothing listens there
    config = load_config("quick", {"store": str(tmp_path / "s")})
    context = StageContext(stage="download", store=config.store, force=False, shared={})

    @flow
    def download_only():
        state = download_task.with_options(retry_delay_seconds=0)(config.data, context=context, return_state=True)
        return state.is_failed(), state.state_details.task_run_id

    failed, task_run_id = download_only()
    assert failed
    with get_client(sync_client=True) as client:
        assert client.read_task_run(task_run_id).run_count == attempts
    assert not (tmp_path / "s" / "download").exists()


def test_only_with_a_missing_upstream_names_it(tmp_path):
    with pytest.raises(MissingUpstream) as info:
        run(tmp_path / "empty", stages=["finetune"])
    # Everything needed to compute what is missing is named at once: pretrain needs validate too.
    assert "download (never computed); validate (never computed); pretrain (never computed)" in str(info.value)
    assert "--only download,validate,pretrain" in str(info.value)


def test_failed_validation_stops_before_training(tmp_path):
    store = tmp_path / "s"
    with pytest.raises(Exception, match="class") as info:
        run(store, overrides={"validate.min_class_share": 0.2, "validate.max_class_share": 0.5})
    assert "data_docs" in str(info.value) or "data_docs" in "".join(getattr(info.value, "__notes__", []))
    assert not (store / "pretrain").exists() and not (store / "validate").exists()
    assert Registry(store).champion() is None


def test_status_explains_misses(first, store, capsys):
    assert cli(["status", "--profile", "quick", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.count("not cached") == 0 and out.count(" cached") == len(ALL)
    cli(["status", "--profile", "quick", "--store", str(store), "--set", "finetune.learning_rate=0.3"])
    out = capsys.readouterr().out
    assert "finetune" in out and "config changed: finetune.learning_rate 0.001 -> 0.3" in out
    assert "upstream changed: finetune" in out


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    assert cli(["run", "--profile", "quick", "--store", str(tmp_path / "s"), "--set", "finetune.epochs=-2"]) == 2
    assert "finetune.epochs" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_two_concurrent_runs_on_one_store_both_finish(tmp_path, mnist_mirror):
    """Two separate processes, as two users or a schedule and a person would start them."""
    store = tmp_path / "shared-store"
    env = {**os.environ, "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "quick", "--store", str(store),
           "--only", "download,validate,pretrain", "--runner", "sequential"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for stage in ("download", "validate", "pretrain"):
        artifacts = list((store / stage).iterdir())
        assert len(artifacts) == 1
        from tasks.store import verify

        assert verify(artifacts[0], artifacts[0].name) is None


def _digit_pngs(mnist_mirror: Path, directory: Path, count: int) -> tuple[list[Path], list[int]]:
    from PIL import Image

    from tasks.idx import parse_images, parse_labels, read_payload

    images = parse_images(read_payload(mnist_mirror / "t10k-images-idx3-ubyte.gz"), "t10k-images")
    labels = parse_labels(read_payload(mnist_mirror / "t10k-labels-idx1-ubyte.gz"), "t10k-labels")
    paths = []
    for i in range(count):
        path = directory / f"digit{i}.png"
        Image.fromarray(255 - images[i]).resize((84, 84)).convert("RGB").save(path)  # dark ink on white, larger
        paths.append(path)
    return paths, [int(v) for v in labels[:count]]


def test_predict_classifies_images_with_the_champion(first, store, tmp_path, mnist_mirror, capsys):
    paths, labels = _digit_pngs(mnist_mirror, tmp_path, 10)
    assert cli(["predict", *map(str, paths), "--json", "--store", str(store)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert sum(r["digit"] == y for r, y in zip(results, labels, strict=True)) >= 6  # a 2-epoch quick model
    assert all(0 < r["probability"] <= 1 and r["error"] is None for r in results)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert cli(["predict", str(paths[0]), str(bad), str(tmp_path / "missing.png"), "--store", str(store)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{paths[0]}: ")
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "notes.txt" in errors[0] and "missing.png" in errors[1]


def test_predict_without_a_champion_fails_clearly(tmp_path, capsys):
    assert cli(["predict", str(tmp_path / "x.png"), "--store", str(tmp_path / "empty")]) == 1
    assert "no mnist champion" in capsys.readouterr().err


def test_promote_and_rollback_by_hand(first, changed, store, capsys):
    registry = Registry(store)
    original = first["stages"]["finetune"]["key"]
    other = changed["stages"]["finetune"]["key"]
    assert other != original
    if registry.champion()["key"] != other:
        assert cli(["promote", other[:10], "--store", str(store), "--reason", "reviewed"]) == 0
        assert registry.champion()["key"] == other and registry.history()[-1]["event"] == "manual"
    assert cli(["rollback", "--store", str(store)]) == 0
    assert registry.champion()["key"] == original
    assert registry.history()[-1]["event"] == "rollback"
    assert cli(["promote", "ffff", "--store", str(store)]) == 1
    assert "matches 0 evaluated models" in capsys.readouterr().err


def test_champion_is_rescored_when_the_test_set_changed(first, store):
    """A champion scored on 2,000 test images is compared with a challenger on the same 1,000, not on its old set."""
    result = run(store, overrides={"data.test_size": 1000})
    event = Registry(store).history()[-1]
    assert event["candidate"]["key"] == result["stages"]["finetune"]["key"] and event["candidate"]["n"] == 1000
    decision = event["decision"]
    assert decision["champion_accuracy"] is not None and decision["b"] + decision["c"] <= 1000
    assert history.read(store)[-1]["promotion"]["reason"] == decision["reason"]


def test_a_moved_store_keeps_working(first, store, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(store, moved)
    result = run(moved)
    assert all(r["cached"] for r in result["stages"].values())
    assert all(r["path"].startswith(str(moved)) for r in result["stages"].values())


def test_cli_reports_a_missing_upstream_in_one_line(tmp_path, capsys):
    assert cli(["run", "--profile", "quick", "--store", str(tmp_path / "s"), "--only", "finetune"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mnist-ae: finetune needs stages that are not in") and "Traceback" not in err
    assert cli(["run", "--profile", "seed-part2", "--store", str(tmp_path / "s"), "--only", "finetune"]) == 2
    assert "not part of profile 'seed-part2'" in capsys.readouterr().err
