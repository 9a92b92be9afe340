"""Whole runs on a store in an S3 bucket (SeaweedFS on loopback), from separate processes as from separate machines.

Each process has its own empty local cache (MNIST_AE_CACHE), as another machine would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main as cli
from flows.pipeline import pipeline
from tasks.config import parse_overrides
from tasks.runs import run_log
from tasks.runs.registry import Registry
from tasks.store.artifacts import Store

OVERRIDES = ["data.test_size=1000"]
SETTINGS = ["--profile", "quick", *(arg for o in OVERRIDES for arg in ("--set", o))]
STAGES = ["download", "validate", "pretrain", "finetune", "baselines", "evaluate", "report"]
DAMAGED = "report"  # the stage whose object is damaged before the second run (cheap to recompute)
# Files that record when or in which process they were made, so two identical runs differ there: Keras's
# date_saved and object ids in .keras files, seconds per epoch in histories, Great Expectations' run times
# (also in the names of its Data Docs pages), TensorBoard's event files (time, host and process in their names).
CLOCKED = re.compile(r"\.keras$|training_log\.json$|^data_docs/|^validation\.json$|^tensorboard/")


def _start(store: str, cache: Path, mnist_mirror: Path, api: str) -> subprocess.Popen[str]:
    """`mnist-ae run` in a new process with its own local cache, reporting to the shared Prefect server."""
    env = {**os.environ, "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1", "MNIST_AE_CACHE": str(cache),
           "PREFECT_HOME": str(cache.parent / f"prefect-{cache.name}"), "PREFECT_API_URL": api}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *SETTINGS, "--store", store],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen[str]]) -> list[dict[str, str]]:
    """Each run's stage outcomes (computed or cached), as its command line printed them."""
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outputs)
    return [dict(re.findall(r"^  (\w+)\s+(computed|cached) ", o, re.MULTILINE)) for o in outputs]


def _files(store: Store) -> dict[str, dict[str, str]]:
    """Stage -> {file: sha256} of every stored artifact, from the manifests (one artifact per stage here)."""
    found = {}
    for stage in STAGES:
        (manifest,) = store.manifests(stage)
        found[stage] = {rel: meta["sha256"] for rel, meta in manifest["files"].items()}
    return found


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return f"s3://{s3_server}/pipeline-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def first(bucket, tmp_path_factory, mnist_mirror, prefect_api) -> dict:
    """Two runs started together on the empty bucket, and the same run on a local store beside them."""
    tmp = tmp_path_factory.mktemp("s3-runs")
    local = tmp / "local-store"
    procs = [_start(bucket, tmp / f"cache-{name}", mnist_mirror, prefect_api) for name in "ab"]
    with pytest.MonkeyPatch.context() as env:  # meanwhile, the same run here on a local store
        env.setenv("MNIST_MIRROR", str(mnist_mirror))
        result = pipeline(profile="quick", overrides=parse_overrides(OVERRIDES), store=str(local))
    local_run = {stage: "cached" if ref["cached"] else "computed" for stage, ref in result["stages"].items()}
    return {"bucket_runs": _finish(procs), "local_run": local_run, "local": local, "tmp": tmp}


@pytest.fixture(scope="module")
def second(first, bucket, mnist_mirror, prefect_api) -> dict:
    """One object of the bucket damaged, then status and a run from another machine (an empty cache)."""
    store = Store(bucket)
    assert store.bucket is not None
    (manifest,) = store.manifests(DAMAGED)
    damaged = f"{DAMAGED}/{manifest['key']}/{sorted(manifest['files'])[0]}"
    data, _ = store.bucket.get(damaged) or (b"", "")
    store.bucket.put(damaged, data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, same size
    cache = first["tmp"] / "cache-second"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as env:
        env.setenv("MNIST_AE_CACHE", str(first["tmp"] / "cache-status"))
        assert cli(["status", *SETTINGS, "--store", bucket]) == 0
    (outcomes,) = _finish([_start(bucket, cache, mnist_mirror, prefect_api)])
    return {"status": out.getvalue(), "outcomes": outcomes, "damaged": damaged, "cache": cache}


def test_two_concurrent_runs_on_one_bucket_compute_each_stage_once(first, bucket):
    a, b = first["bucket_runs"]
    assert set(a) == set(b) == set(STAGES)
    assert {s: sorted([a[s], b[s]]) for s in STAGES} == {s: ["cached", "computed"] for s in STAGES}
    store = Store(bucket)
    assert store.bucket is not None
    assert all(len(store.bucket.glob(f"{s}/*/manifest.json")) == 1 for s in STAGES)
    registry = Registry(bucket)
    assert [e["event"] for e in registry.events()] == ["promote"]  # judged once, by one of the two
    assert registry.champion()["model_path"].startswith("finetune/")
    assert len(run_log.read(bucket)) == 2
    assert len(store.bucket.glob("runs/*/report.html")) == 2


def test_bucket_artifacts_have_the_content_hashes_of_a_local_run(first, bucket):
    assert first["local_run"] == dict.fromkeys(STAGES, "computed")
    remote, local = Store(bucket), Store(first["local"])
    in_bucket, on_disk = _files(remote), _files(local)
    assert {s: len(f) for s, f in in_bucket.items()} == {s: len(f) for s, f in on_disk.items()}
    assert ({s: {f: h for f, h in files.items() if not CLOCKED.search(f)} for s, files in in_bucket.items()}
            == {s: {f: h for f, h in files.items() if not CLOCKED.search(f)} for s, files in on_disk.items()})
    for stage, files in in_bucket.items():  # the models: the same weights, byte for byte
        for name in (f for f in files if f.endswith(".keras")):
            key = remote.manifests(stage)[0]["key"]
            weights = [zipfile.ZipFile(s.verified(f"{stage}/{key}/{name}")).read("model.weights.h5")
                       for s in (remote, local)]
            assert weights[0] == weights[1], f"{stage}/{name}"


def test_another_machine_finds_every_stage_cached_and_recomputes_a_damaged_object(second, bucket):
    assert re.search(rf"{DAMAGED}\s+\w+\s+not cached \(stored artifact is damaged: checksum mismatch in ",
                     second["status"]), second["status"]
    assert second["outcomes"] == {**dict.fromkeys(STAGES, "cached"), DAMAGED: "computed"}
    store = Store(bucket)
    assert all(store.problem(s, m["key"]) is None for s in STAGES for m in store.manifests(s))
    assert any(second["cache"].glob("*/pretrain/*/autoencoder.keras"))
    assert [e["event"] for e in Registry(bucket).events()] == ["promote"]


def test_status_and_predict_against_the_bucket_from_an_empty_cache(first, second, bucket, mnist, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("MNIST_AE_CACHE", str(tmp_path / "empty-cache"))
    assert cli(["status", *SETTINGS, "--store", bucket]) == 0
    assert capsys.readouterr().out.count(" cached\n") == len(STAGES)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(255 - mnist.x_test[i]).save(paths[-1])
    answers = []
    for store in (bucket, str(first["local"])):
        assert cli(["predict", *map(str, paths), "--json", "--store", store]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0] == answers[1]  # the same champion model, pulled from the bucket and verified
    assert sum(r["digit"] == y for r, y in zip(answers[0], mnist.y_test[:5], strict=True)) >= 3
