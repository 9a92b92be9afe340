"""The whole flow on the `quick` profile, through a real (temporary) Prefect API and real MNIST."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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

from flows.cli import main as cli
from flows.pipeline import pipeline
from flows.stages import ACCURACY_ARTIFACT, REPORT_ARTIFACT, REPORT_LINK_ARTIFACT, StageContext
from flows.stages import download as download_task
from tasks.config import load_config
from tasks.data import sources
from tasks.pipeline import graph
from tasks.pipeline.graph import MissingUpstream
from tasks.runs import run_log
from tasks.runs.registry import Registry, RegistryError
from tasks.store.artifacts import Store

ALL = ["download", "validate", "pretrain", "finetune", "baselines", "evaluate", "report"]


pytestmark = pytest.mark.usefixtures("prefect_api", "mirror_env")  # one Prefect API per module


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline") / "store"


def run(store: Path, profile: str = "quick", **params) -> dict:
    """A run on the sequential runner; tests/flows/test_runners.py runs the same flow on Dask clusters."""
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


def test_the_run_report_reads_from_the_summary_down(first):
    """Summary first, a table of contents, one stage table, the configuration last under its own heading."""
    html = Path(first["report"]).read_text()
    headings = re.findall(r"<h2 id=\"([^\"]+)\">([^<]+)</h2>", html)
    names = [text for _, text in headings]
    assert names[0] == "Summary" and names[-1] == "Configuration" and names.index("This run") < len(names) - 1
    assert "Stage artifacts" not in names and html.count("<th>Stage</th>") == 1  # one stage table, not two
    toc = re.findall(r'href="#([^"]+)"', re.search(r'<nav class="toc">(.*?)</nav>', html).group(1))
    assert html.index("<nav") < html.index("<h2") and {anchor for anchor, _ in headings} <= set(toc)
    assert all(f'id="{anchor}"' in html for anchor in toc)
    summary = html[html.index('id="summary"'):html.index("</ul>", html.index('id="summary"'))]
    assert "Profile quick, dataset mnist, 2,000 test images" in summary and first["flow_run_id"] in summary
    assert "The claim " in summary and "Champion for mnist: model " in summary
    config = html[html.index('id="configuration"'):]
    assert "<details><summary>Show all" in config and "&quot;learning_rate&quot;" in config
    assert "&quot;learning_rate&quot;" not in html[:html.index('id="configuration"')]
    assert "2000 test images" not in html and "Accuracy on 2,000 test images" in html
    stage_table = html[html.index('id="this-run"'):html.index('id="promotion-decision"')]
    assert all(f"<td>{stage}</td><td>computed</td>" in stage_table for stage in ALL)


def test_prefect_artifacts_are_published(first):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                any_=[REPORT_ARTIFACT, REPORT_LINK_ARTIFACT, ACCURACY_ARTIFACT])))
    mine = {a.key: a for a in found if str(a.flow_run_id) == first["flow_run_id"]}
    assert set(mine) == {REPORT_ARTIFACT, REPORT_LINK_ARTIFACT, ACCURACY_ARTIFACT}
    assert all(a.task_run_id is None for a in mine.values())  # the flow run's own, not the publish task's

    # The accuracy table is the report's claim table: percentages, the test-set size and the claim's verdict.
    table = json.loads(mine[ACCURACY_ARTIFACT].data)
    metrics = json.loads((Path(first["stages"]["evaluate"]["path"]) / "metrics.json").read_text())
    assert [r["Model"] for r in table] == ["softmax", "ann", "pretrained", "probe"]
    held = first["stages"]["report"]["summary"]["claim_held"]
    for row in table:
        model = metrics["models"][row["Model"]]
        assert row["Test accuracy"] == f"{100 * model['accuracy']:.2f} %"
        assert row["95 % CI"] == f"[{100 * model['ci_low']:.2f} %, {100 * model['ci_high']:.2f} %]"
        assert row["Test images"] == "2,000"
        assert row["Claim"] == (
            "not in the claim" if row["Model"] == "probe" else {True: "held", False: "did not hold"}[held])
    markdown = (Path(first["stages"]["report"]["path"]) / "report.md").read_text()
    pretrained = next(r for r in table if r["Model"] == "pretrained")
    assert f"| pretrained | {pretrained['Description']} | {pretrained['Test accuracy']} | {pretrained['95 % CI']} |" \
        in markdown
    assert "2,000 test images" in mine[ACCURACY_ARTIFACT].description

    # The link artifact leads to the full HTML report, the file the run wrote.
    assert f"]({Path(first['report']).as_uri()})" in mine[REPORT_LINK_ARTIFACT].data
    assert Path(first["report"]).name == "report.html" and Path(first["report"]).is_file()

    # The Markdown artifact links the full report first and marks each figure; no config dump.
    text = mine[REPORT_ARTIFACT].data
    assert text.index("**Full report with figures:**") < text.index("## Summary") < text.index("## Claim")
    assert Path(first["report"]).as_uri() in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", Path(first["report"]).with_suffix(".md").read_text())
    assert text.count("](") == 1 and len(figures) >= 5  # the one link: the full report
    assert text.count("*[Figure: ") == len(figures) and "```" not in text and '"learning_rate"' not in text

    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first["flow_run_id"]]),
            type=ArtifactFilterType(any_=["progress"])))
    # One per training stage, each finished, its card saying what it trained.
    assert sorted(a.key for a in progress) == ["baselines-progress", "finetune-progress", "pretrain-progress"]
    assert all(a.data == 100.0 and a.description == f"{a.key.split('-')[0]}: 100 % done, trained" for a in progress)


def test_flow_run_is_named_and_tagged_and_each_model_logs_its_epochs(first):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(first["flow_run_id"])
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    assert re.fullmatch(r"quick-mnist-\d{8}-\d{6}", flow_run.name)
    assert {"profile:quick", "dataset:mnist", "runner:sequential"} <= set(flow_run.tags)
    lines = [log.message for log in logs]
    for stage, model in (("pretrain", "autoencoder"), ("finetune", "pretrained"), ("finetune", "probe"),
                         ("baselines", "softmax"), ("baselines", "ann")):
        assert [line for line in lines if line.startswith(f"{stage}: {model} epoch ")][-1].startswith(
            f"{stage}: {model} epoch 2/2 "), (stage, model)


def test_training_stages_leave_tensorboard_event_files(first):
    """Each trained model's epochs as TensorBoard scalars, equal to its training log."""
    import tensorflow as tf

    for stage, model, training_log_file in (("pretrain", "autoencoder", "training_log.json"),
                                       ("finetune", "probe", "probe_training_log.json"),
                                       ("baselines", "ann", "ann_training_log.json")):
        directory = Path(first["stages"][stage]["path"])
        rows = json.loads((directory / training_log_file).read_text())
        (events,) = (directory / "tensorboard" / model / "validation").glob("events.out.tfevents.*")
        val_loss = {}
        for record in tf.data.TFRecordDataset(str(events)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "epoch_loss":
                    val_loss[event.step] = float(tf.make_ndarray(value.tensor))
        assert val_loss == {r["epoch"] - 1: pytest.approx(r["val_loss"], rel=1e-6) for r in rows}
        assert "tensorboard/" + model in " ".join(json.loads((directory / "manifest.json").read_text())["files"])


def test_data_docs_read_offline_and_the_report_links_them(first):
    html = Path(first["report"]).read_text()
    (href,) = re.findall(r'href="([^"#]+)"', html)
    index = (Path(first["report"]).parent / href).resolve()
    assert index == Path(first["stages"]["validate"]["path"]) / "data_docs" / "index.html"
    pages = re.findall(r'href="(validations/[^"]+)"', index.read_text())
    assert len(pages) == 1 and "<td>passed</td>" in index.read_text()
    page = (index.parent / pages[0]).read_text()
    assert "fa-check-circle" in page and ".fa-check-circle::before" in page  # icons drawn without the icon font
    # Nothing is loaded from elsewhere (links to other sites may stay: following one is the reader's choice).
    assert not re.search(r"""(src=|<link[^>]*href=)["']?(https?:)?//""", page) and "<script" not in page


def test_first_model_becomes_champion_and_run_is_recorded(first, store):
    champion = Registry(store).champion()
    assert champion is not None and champion["key"] == first["stages"]["finetune"]["key"]
    records = run_log.read(store)
    assert records[0]["flow_run_id"] == first["flow_run_id"]
    assert set(records[0]["stages"]) == set(ALL)


def test_second_run_is_all_cached(first, store):
    decisions = len(Registry(store).events())
    second = run(store)
    assert second["decision"] is None and len(Registry(store).events()) == decisions  # nothing new to judge
    states = task_states(second["flow_run_id"])
    assert {s: states[s] for s in ALL} == {s: "Cached" for s in ALL}
    assert all(s["cached"] for s in second["stages"].values())
    assert {s: r["key"] for s, r in second["stages"].items()} == {s: r["key"] for s, r in first["stages"].items()}

    # Recorded as a run that trained nothing: no seconds of the first run's training, not a new point of the trend.
    records = [r for r in run_log.read(store) if r["flow_run_id"] in (first["flow_run_id"], second["flow_run_id"])]
    assert [r["flow_run_id"] for r in records] == [first["flow_run_id"], second["flow_run_id"]]
    assert all(s["cached"] and s["duration_s"] == 0.0 for s in records[1]["stages"].values())
    assert records[0]["stages"]["pretrain"]["duration_s"] > 0
    assert run_log.models(records) == records[:1]
    html = Path(second["report"]).read_text()
    assert "(1 trained model in 2 runs of profile quick;" in html
    assert "<td>as run 1</td>" in html and "<td>0/7</td>" in html
    assert all(f"<td>{stage}</td><td>cached (built " in html for stage in ALL)


@pytest.fixture(scope="module")
def changed(first, store) -> dict:
    return run(store, overrides={"finetune.learning_rate": 0.002})


def test_changing_a_finetune_setting_reruns_only_what_follows(changed):
    states = task_states(changed["flow_run_id"])
    recomputed = {s for s in ALL if states[s] != "Cached"}
    assert recomputed == {"finetune", "evaluate", "report"}


def test_forced_rerun_of_one_stage_reproduces_its_metrics(first, store):
    training_log_file = Path(first["stages"]["finetune"]["path"]) / "pretrained_training_log.json"
    before_rows = json.loads(training_log_file.read_text())
    forced = run(store, stages=["finetune", "evaluate"], force=["finetune", "evaluate"])
    assert set(forced["stages"]) >= {"finetune", "evaluate"}
    states = task_states(forced["flow_run_id"])
    assert states["finetune"] == "Completed" and states["evaluate"] == "Completed"
    assert "pretrain" not in states and "report" not in states
    assert not forced["stages"]["finetune"]["cached"]
    before = first["stages"]["evaluate"]["summary"]["accuracy"]
    assert forced["stages"]["evaluate"]["summary"]["accuracy"] == before
    assert Path(forced["stages"]["finetune"]["path"]) == training_log_file.parent
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in rows]
               for rows in (before_rows, json.loads(training_log_file.read_text()))]
    assert untimed[0] == untimed[1] and len(untimed[0]) > 0


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
    monkeypatch.setattr(sources, "MIRROR_URLS", {"mnist": ("http://127.0.0.1:9/",)})  # nothing listens there
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
    assert "finetune" in out and "config changed: finetune.learning_rate 0.005 -> 0.3" in out
    assert "upstream changed: finetune" in out


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    assert cli(["run", "--profile", "quick", "--store", str(tmp_path / "s"), "--set", "finetune.epochs=-2"]) == 2
    assert "finetune.epochs" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_two_concurrent_runs_on_one_store_both_finish(tmp_path, mnist_mirror):
    """Two separate processes, as two users or a schedule and a person would start them."""
    store = tmp_path / "shared-store"
    # Each process starts its own temporary server; on a busy two-core machine that takes longer than the
    # default 20 s (the harness above allows 120 s for the same reason).
    env = {**os.environ, "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "quick", "--store", str(store),
           "--only", "download,validate,pretrain", "--runner", "sequential"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    # The server the command line started before its imports is the one the flow used: one per process.
    assert [o.count("Starting temporary server") for o in outputs] == [1, 1]
    for stage in ("download", "validate", "pretrain"):
        artifacts = list((store / stage).iterdir())
        assert len(artifacts) == 1
        from tasks.store.artifacts import verify

        assert verify(artifacts[0], artifacts[0].name) is None


def test_a_temporary_server_that_cannot_start_is_one_line_and_writes_nothing(tmp_path, mnist_mirror):
    """Prefect's database cannot be opened: the run stops before any stage, saying what the server said."""
    env = {**os.environ, "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "quick", "--store", str(store)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mnist-ae: Prefect's temporary server exited") and "unable to open database" in last
    assert "Traceback" not in done.stderr
    assert not [p for p in store.rglob("*") if p.is_file()]


def _digit_pngs(mnist_mirror: Path, directory: Path, count: int) -> tuple[list[Path], list[int]]:
    from PIL import Image

    from tasks.data.idx import parse_images, parse_labels, read_payload

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
        assert registry.champion()["key"] == other and registry.events()[-1]["event"] == "manual"
    assert cli(["rollback", "--store", str(store)]) == 0
    assert registry.champion()["key"] == original
    assert registry.events()[-1]["event"] == "rollback"
    assert cli(["promote", "ffff", "--store", str(store)]) == 1
    assert "matches 0 evaluated models" in capsys.readouterr().err


def test_champion_is_rescored_when_the_test_set_changed(first, store):
    """A champion scored on 2,000 test images is compared with a challenger on the same 1,000, not on its old set."""
    result = run(store, overrides={"data.test_size": 1000})
    event = Registry(store).events()[-1]
    assert event["candidate"]["key"] == result["stages"]["finetune"]["key"] and event["candidate"]["n"] == 1000
    decision = event["decision"]
    assert decision["champion_accuracy"] is not None and decision["b"] + decision["c"] <= 1000
    assert run_log.read(store)[-1]["promotion"]["reason"] == decision["reason"]


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


# --- a champion you can trust ---------------------------------------------------------------------------------------

def copy_of(store: Path, tmp_path: Path) -> Path:
    """A copy of the module's store, for tests that damage it."""
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    return copy


def user_errors(err: str) -> list[str]:
    """The command's own error lines; Prefect's run log keeps tracebacks elsewhere."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("mnist-ae: ")]


def stored_model(root: Path, model) -> tuple[str, Path]:
    """Save a Keras model as a fine-tuned model artifact with a valid manifest; return its key and path."""
    from tasks.store.artifacts import write_manifest

    key = "f" * 64
    directory = root / "finetune" / key
    directory.mkdir(parents=True)
    model.save(directory / "pretrained.keras")
    write_manifest(directory, key=key)
    return key, directory / "pretrained.keras"


def test_predict_never_serves_a_damaged_champion(first, store, tmp_path, mnist_mirror, capsys):
    """Case 1: the probe copied over the champion, three flipped bytes, a deleted manifest; one line each."""
    root = copy_of(store, tmp_path)
    model = Registry(root).champion_model()
    original = model.read_bytes()
    (digit,), _ = _digit_pngs(mnist_mirror, tmp_path, 1)

    def predict_error(*extra: str) -> str:
        assert cli(["predict", str(digit), "--store", str(root), *extra]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""  # no answer, and no JSON with a bare NaN in it
        (line,) = user_errors(captured.err)
        assert str(model) in line and "mnist-ae rollback" in line
        return line

    shutil.copyfile(model.parent / "probe.keras", model)
    assert "size mismatch in pretrained.keras" in predict_error()
    damaged = bytearray(original)
    for offset in (100, len(damaged) // 2, len(damaged) - 100):
        damaged[offset] ^= 0xFF
    model.write_bytes(bytes(damaged))
    assert "checksum mismatch in pretrained.keras" in predict_error("--json")
    model.write_bytes(original)
    (model.parent / "manifest.json").unlink()
    assert "no manifest" in predict_error()

    assert cli(["status", "--profile", "quick", "--store", str(root)]) == 0
    finetune_line = next(line for line in capsys.readouterr().out.splitlines() if "finetune" in line)
    assert "stored artifact is damaged: no manifest; the next run recomputes it" in finetune_line


def test_predict_refuses_champions_that_cannot_answer(first, store, tmp_path, mnist_mirror, capsys):
    """A champion trained into NaN before this check existed, and one with a Lambda layer: one line, no NaN."""
    import keras

    (digit,), _ = _digit_pngs(mnist_mirror, tmp_path, 1)
    for name, build in {
        "nan": lambda m: m.layers[-1].set_weights([np.full_like(w, np.nan) for w in m.layers[-1].get_weights()]),
        "lambda": None,
    }.items():
        root = tmp_path / name
        champion = Registry(store).champion_model()
        if build is None:
            model = keras.Sequential([keras.Input((784,)), keras.layers.Lambda(lambda t: t[:, :10])])
        else:
            model = keras.saving.load_model(champion)
            build(model)
        key, path = stored_model(root, model)
        Registry(root).promote(key, {"key": key, "model_path": str(path), "accuracy": 0.9, "n": 2000,
                                     "data_fingerprint": None, "evaluate_key": None}, by="test", reason="test")
        assert cli(["predict", str(digit), "--json", "--store", str(root)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        (line,) = user_errors(captured.err)
        expected = "outputs NaN or infinite values" if name == "nan" else "refused, the model holds Python code"
        assert str(path.resolve()) in line and expected in line


def test_predict_small_cases_in_one_line_each_and_strict_json(first, store, tmp_path, mnist_mirror, capsys,
                                                               caplog):
    """Case 7: a 10000x10000 PNG and a float TIFF holding NaN; each error once; JSON always parses strictly."""
    from PIL import Image

    (digit,), (label,) = _digit_pngs(mnist_mirror, tmp_path, 1)
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000), 1).save(huge)
    pixels = np.zeros((28, 28), np.float32)
    pixels[0, 0] = np.nan
    tiff = tmp_path / "nan.tif"
    Image.fromarray(pixels, mode="F").save(tiff)
    assert cli(["predict", str(digit), str(huge), str(tiff), "--json", "--store", str(store)]) == 1
    out = capsys.readouterr().out

    def no_constants(name: str):
        raise ValueError(f"not JSON: {name}")

    results = json.loads(out, parse_constant=no_constants)
    assert results[0]["digit"] == label and results[0]["error"] is None
    assert "10000x10000 pixels is more than predict accepts" in results[1]["error"]
    assert "NaN or infinite pixel values" in results[2]["error"]

    # Each error once: the command prints it. A warning logged as well was printed a second time by logging's
    # last-resort handler, which writes any warning to stderr when nothing configured logging.
    assert cli(["predict", str(huge), str(tiff), "--store", str(store)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 2
    assert lines[0].startswith(f"{huge}: error: ") and lines[1].startswith(f"{tiff}: error: ")
    assert not [r for r in caplog.records if r.name == "tasks.serve.predict" and r.levelno >= logging.WARNING]


def test_a_diverging_run_fails_in_one_line_and_caches_nothing(first, store, capsys):
    """Case 2: learning rates of 1e9 trained into NaN and made the champion; now the stage fails, named.

    Whether 1e9 overflows depends on the CPU; a rate past float32's range (3.4e38) makes every weight infinite or NaN
    in the first step on any CPU. (A rate too high to learn that stays finite meets the quality gate, below.)
    """
    decisions = len(Registry(store).events())
    assert cli(["run", "--profile", "quick", "--store", str(store), "--set", "pretrain.learning_rate=1e39"]) == 1
    (line,) = user_errors(capsys.readouterr().err)
    assert re.fullmatch(r"mnist-ae: pretrain: training of autoencoder diverged: (the loss became (nan|inf)|its "
                        r"weights became NaN or infinite) in epoch 1; nothing was cached\. Lower "
                        r"pretrain\.learning_rate \(now 1e\+39\) and run again", line), line
    config = load_config("quick", {"pretrain.learning_rate": 1e39, "store": str(store)})
    steps = {s.stage: s for s in graph.plan(config, Store(config.store))}
    assert steps["download"].cached and not steps["pretrain"].cached
    assert not Store(store).path("pretrain", steps["pretrain"].key).exists()
    assert len(Registry(store).events()) == decisions


def test_a_chance_level_first_model_is_not_promoted(first, store, tmp_path, capsys):
    """Case 3: five training images made a 9.25 % model the first champion without a word."""
    root = copy_of(store, tmp_path)
    shutil.rmtree(root / "registry")
    assert cli(["run", "--profile", "quick", "--store", str(root), "--set", "data.train_size=5"]) == 0
    report = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("report: "))
    registry = Registry(root)
    assert registry.champion() is None
    (event,) = registry.events()
    decision = event["decision"]
    assert event["event"] == "reject" and decision["challenger_accuracy"] < 0.2
    assert "softmax baseline" in decision["reason"] and decision["reason"].endswith(": not promoted")
    html = Path(report.removeprefix("report: ")).read_text()
    assert "This run&#x27;s model was not promoted" in html or "This run's model was not promoted" in html
    assert f"{decision['baseline_accuracy'] * 100:.2f} %" in html


def test_a_finite_chance_level_model_is_refused_by_the_quality_gate(first, store, tmp_path, capsys):
    """A learning rate too high to learn but too low to overflow on any CPU: Adam moves a weight by at most about 3.2x
    the rate per step, so fine-tuning at 10 (2,000x the profile's) for 40 steps keeps every weight below ~1,300 and
    every activation far below float32's range, and ends near chance. It is stored, and the gate refuses it."""
    root = copy_of(store, tmp_path)
    champion = Registry(root).champion()
    assert cli(["run", "--profile", "quick", "--store", str(root), "--set", "finetune.learning_rate=10"]) == 0
    capsys.readouterr()
    registry = Registry(root)
    event = registry.events()[-1]
    decision = event["decision"]
    assert event["event"] == "reject" and registry.champion() == champion
    assert decision["challenger_accuracy"] < 0.2 < decision["baseline_accuracy"]
    assert "softmax baseline" in decision["reason"] and decision["reason"].endswith(": not promoted")
    assert run_log.read(root)[-1]["promotion"] == {"promote": False, "reason": decision["reason"]}
    config = load_config("quick", {"finetune.learning_rate": 10, "store": str(root)})
    planned = {s.stage: s for s in graph.plan(config, Store(root))}
    assert planned["finetune"].cached and event["candidate"]["key"] == planned["finetune"].key


CORRUPT_REGISTRIES = {"truncated": '{"champion": {"key": "ab', "no champion": '{"events": []}',
                      "champion a number": '{"champion": 5, "events": []}'}


@pytest.mark.parametrize("text", CORRUPT_REGISTRIES.values(), ids=CORRUPT_REGISTRIES.keys())
def test_a_damaged_registry_is_one_line_for_every_command(tmp_path, capsys, text):
    """Case 4: JSONDecodeError, KeyError: 'champion', TypeError tracebacks; now one line naming the file."""
    root = tmp_path / "s"
    path = root / "registry" / "mnist.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    for command in (["predict", str(tmp_path / "x.png")], ["promote", "ab"], ["rollback"],
                    ["run", "--profile", "quick"]):
        assert cli([*command, "--store", str(root)]) == 1, command
        (line,) = user_errors(capsys.readouterr().err)
        assert line.startswith(f"mnist-ae: registry file {path} is damaged (") and "left untouched" in line
    assert path.read_text() == text and sorted(p.name for p in root.iterdir()) == [".locks", "registry"]


def test_a_challenger_whose_publishing_failed_is_judged_later(first, store, tmp_path, capsys):
    """Case 5: a run trains and evaluates, then cannot read the registry; its model must not be lost."""
    root = copy_of(store, tmp_path)
    registry_file = root / "registry" / "mnist.json"
    good = registry_file.read_bytes()
    registry_file.write_bytes(good[:-40])
    overrides = {"finetune.epochs": 1}
    with pytest.raises(RegistryError, match=re.escape(f"registry file {registry_file} is damaged")):
        run(root, overrides=overrides)
    assert registry_file.read_bytes() == good[:-40]  # never silently replaced
    config = load_config("quick", {**overrides, "store": str(root)})
    steps = {s.stage: s for s in graph.plan(config, Store(root))}
    assert steps["evaluate"].cached  # the evaluation was stored; only its judgement is missing
    unjudged = tmp_path / "unjudged"
    shutil.copytree(root, unjudged)

    registry_file.write_bytes(good)
    later = run(root, overrides=overrides)
    assert later["stages"]["evaluate"]["cached"] and later["decision"] is not None
    event = Registry(root).events()[-1]
    assert event["candidate"]["evaluate_key"] == steps["evaluate"].key and event["by"] == later["flow_run_id"]
    assert event["candidate"]["key"] == steps["finetune"].key and event["event"] in ("promote", "reject")
    again = run(root, overrides=overrides)  # judged exactly once
    assert again["decision"] is None and Registry(root).events()[-1] == event

    # A champion that must be re-scored (other test data) but whose model is damaged stops the judging, named.
    state = json.loads(good)
    state["champion"]["data_fingerprint"] = "other data"
    (unjudged / "registry" / "mnist.json").write_text(json.dumps(state))
    champion_model = unjudged / state["champion"]["model_path"]
    intact = champion_model.read_bytes()
    champion_model.write_bytes(intact[:-1])
    with pytest.raises(RegistryError, match=r"pretrained.keras: fails verification .*: it cannot be re-scored"):
        run(unjudged, overrides=overrides)
    champion_model.write_bytes(intact)
    assert not Registry(unjudged).judged(steps["evaluate"].key)

    (unjudged / "registry" / "mnist.json").write_bytes(good)
    assert cli(["promote", steps["finetune"].key[:12], "--store", str(unjudged), "--reason", "reviewed"]) == 0
    assert capsys.readouterr().out.strip() == f"champion: {steps['finetune'].key}"
    champion = Registry(unjudged).champion()
    assert champion["key"] == steps["finetune"].key and champion["evaluate_key"] == steps["evaluate"].key
    assert champion["metrics"]["accuracy"] == later["stages"]["evaluate"]["summary"]["accuracy"]["pretrained"]


def test_an_unusable_store_is_named_before_any_work(tmp_path, mnist_mirror, capsys):
    """Case 6: a path under a file and a read-only mount ended in raw OSError tracebacks, after Prefect started."""
    (tmp_path / "file").write_text("not a directory")
    under_file = str(tmp_path / "file" / "store")
    message = f"mnist-ae: store {under_file}: {tmp_path}/file is a file, not a directory; choose another --store"
    for command in (["rollback"], ["promote", "ab"], ["predict", "x.png"], ["status", "--profile", "quick"]):
        assert cli([*command, "--store", under_file]) == 1, command
        assert user_errors(capsys.readouterr().err) == [message]
    # `run` in a fresh interpreter: the flow module (which starts Prefect's server) must never be imported.
    ro = tmp_path / "ro"
    ro.mkdir()
    stores = [under_file]
    prefix: list[str] = []
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"]).returncode == 0:
        # A read-only mount, as root sees it too (permissions alone do not stop root).
        prefix = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o ro none "$0" && exec "$@"', str(ro)]
        stores.append(str(ro / "store"))
    # TensorFlow's log lines kept off stderr as the `mnist-ae` command keeps them (this test's process set a level).
    script = ("import sys; from flows.cli import main; from flows.tf_logs import hide_tf_logs; hide_tf_logs()\n"
              "for store in sys.argv[1:]: print(main(['run', '--profile', 'quick', '--store', store]))\n"
              "print('flow imported' if 'flows.pipeline' in sys.modules else 'no flow')")
    env = {**os.environ, "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([*prefix, sys.executable, "-c", script, *stores], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.split() == ["1"] * len(stores) + ["no", "flow"], proc.stderr
    expected = [message, f"mnist-ae: store {ro}/store is not writable (Read-only file system); "
                         "choose another --store or make it writable"]
    assert proc.stderr.strip().splitlines() == expected[:len(stores)]
    if len(stores) == 1:
        pytest.skip("the store under a file passed; no user namespaces here to mount a read-only file system")


def test_semi_supervised_finetuning_runs_in_the_pipeline(first, store):
    semi = run(store, stages=["finetune", "evaluate"], overrides={"finetune.unlabeled": "vat"})
    finetuned = semi["stages"]["finetune"]
    assert not finetuned["cached"] and finetuned["key"] != first["stages"]["finetune"]["key"]
    assert finetuned["summary"]["unlabeled"] == "vat"
    assert semi["stages"]["evaluate"]["summary"]["accuracy"]["pretrained"] > 0.5
