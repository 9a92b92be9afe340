"""The store on object storage, rule by rule, against a real S3-compatible server (SeaweedFS) on loopback."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks.runs import run_log
from tasks.runs.registry import Registry, RegistryError
from tasks.store import objects
from tasks.store.artifacts import ABSENT, Conflict, Store, StoreError, key_of, sha256_file

INPUTS = {"stage": "s", "code_version": "c1", "config": {"lr": 0.5}, "upstream": {}}
KEY = key_of(INPUTS)


@pytest.fixture
def url(s3_server) -> str:
    """A fresh prefix in the test bucket: an empty store."""
    return f"s3://{s3_server}/{uuid.uuid4().hex[:12]}"


def _fresh_cache(monkeypatch, tmp_path) -> None:
    """As on another machine: nothing of the store in the local cache."""
    monkeypatch.setenv("MNIST_AE_CACHE", str(tmp_path / f"cache-{uuid.uuid4().hex[:6]}"))


def _produce(out: Path) -> dict:
    (out / "result.txt").write_text("hello")
    (out / "sub").mkdir()
    (out / "sub" / "more.bin").write_bytes(b"\x00\x01" * 100)
    return {"text": "hello"}


def test_conditional_writes_admit_exactly_one_writer(url):
    """What the store's commit marker, lock and registry rely on: If-None-Match and If-Match, under contention."""
    bucket = Store(url).bucket
    assert bucket is not None

    def create(i: int) -> bool:
        try:
            bucket.put("race", str(i).encode(), create=True)
            return True
        except Conflict:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(create, range(16))) == 1
    got = bucket.get("race")
    assert got is not None

    def replace(i: int) -> bool:
        try:
            bucket.put("race", f"x{i}".encode(), if_match=got[1])
            return True
        except Conflict:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(replace, range(16))) == 1


def test_artifact_is_pushed_with_its_manifest_last_and_pulled_verified(url, monkeypatch, tmp_path):
    store = Store(url)
    ref = store.materialize("s", KEY, INPUTS, _produce)
    assert not ref.cached and Path(ref.path).is_relative_to(store.root)
    _fresh_cache(monkeypatch, tmp_path)
    other = Store(url)
    assert other.root != store.root and not other.path("s", KEY).exists()
    hit = other.load("s", KEY)
    assert hit is not None and hit.cached and hit.summary == {"text": "hello"}
    for rel in ("result.txt", "sub/more.bin"):
        assert sha256_file(Path(hit.path) / rel) == sha256_file(Path(ref.path) / rel)
    assert other.manifests("s")[0]["key"] == KEY


def test_objects_without_a_manifest_are_not_an_artifact(url):
    """A run killed while uploading leaves files but no manifest: nobody uses them, the next run computes."""
    store = Store(url)
    assert store.bucket is not None
    store.bucket.put(f"s/{KEY}/result.txt", b"half")
    assert store.problem("s", KEY) == ABSENT and store.load("s", KEY) is None
    assert not store.materialize("s", KEY, INPUTS, _produce).cached
    assert store.bucket.get(f"s/{KEY}/result.txt") == (b"hello", store.bucket.get(f"s/{KEY}/result.txt")[1])


@pytest.mark.parametrize("damage", ["rewrite", "truncate", "delete"])
def test_a_damaged_object_is_detected_and_recomputed(url, monkeypatch, tmp_path, caplog, damage):
    store = Store(url)
    store.materialize("s", KEY, INPUTS, _produce)
    bucket = store.bucket
    assert bucket is not None
    if damage == "delete":
        bucket.delete(f"s/{KEY}/sub/more.bin")
    else:
        bucket.put(f"s/{KEY}/sub/more.bin", b"\x00\x02" * 100 if damage == "rewrite" else b"\x00")
    _fresh_cache(monkeypatch, tmp_path)
    other = Store(url)
    expected = {"rewrite": "checksum mismatch in", "truncate": "size mismatch in", "delete": "missing file"}[damage]
    assert other.problem("s", KEY) == f"{expected} sub/more.bin"
    assert not other.path("s", KEY).exists()  # nothing unverified reaches the cache
    with caplog.at_level(logging.WARNING, logger="tasks.store.artifacts"):
        ref = other.materialize("s", KEY, INPUTS, _produce)
    assert not ref.cached and "damaged" in caplog.text
    _fresh_cache(monkeypatch, tmp_path)
    assert Store(url).problem("s", KEY) is None


def test_the_lock_is_held_by_one_process_at_a_time_and_a_dead_holders_lease_expires(url, monkeypatch):
    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with Store(url).lock("k"):  # a Store per thread, as each machine has its own
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))

    monkeypatch.setattr(objects, "LEASE_S", 1.0)
    store = Store(url)
    assert store.bucket is not None
    store.bucket.put(".locks/k.lock", json.dumps({"owner": "a killed run", "beat": 0}).encode(), create=True)
    started = time.monotonic()
    with store.lock("k"):
        waited = time.monotonic() - started
    assert 1.0 <= waited < 10


def test_registry_and_run_log_refuse_to_overwrite_a_change_they_did_not_read(url):
    """A writer whose lease was taken over must not lose the other writer's registry event."""
    registry = Registry(url)
    assert registry.champion() is None and registry.events() == []
    registry.store.write_text("registry/mnist.json", json.dumps({"champion": None, "events": []}))
    meanwhile = Store(url)
    meanwhile.read_text("registry/mnist.json")
    meanwhile.write_text("registry/mnist.json", json.dumps({"champion": None, "events": []}) + "\n")
    with pytest.raises(RegistryError, match="changed by another run"):
        registry._write({"champion": None, "events": []})
    for n in range(3):
        run_log.append(url, {"flow_run_id": f"r{n}", "accuracy": {"pretrained": 0.5}, "stages": {}})
    assert [r["flow_run_id"] for r in run_log.read(url)] == ["r0", "r1", "r2"]


def test_an_old_run_log_and_registry_are_migrated_by_the_next_write(url):
    """Objects written before the renames (history/runs.jsonl, the registry's `history`) are read; the run log
    moves on its next append."""
    store = Store(url)
    old_record = {"flow_run_id": "old", "accuracy": {"pretrained": 0.5}, "stages": {}}
    store.write_text("history/runs.jsonl", json.dumps(old_record) + "\n")
    store.write_text("registry/mnist.json", json.dumps({"champion": None, "history": [
        {"event": "reject", "candidate": {"key": "ab", "model_path": "finetune/ab/finetuned.keras"}}]}))
    assert [r["flow_run_id"] for r in run_log.read(url)] == ["old"]
    assert [e["event"] for e in Registry(url).events()] == ["reject"]
    run_log.append(url, {**old_record, "flow_run_id": "new"})
    assert [r["flow_run_id"] for r in run_log.read(url)] == ["old", "new"]
    assert Store(url).read_text("history/runs.jsonl") is None


def test_unusable_object_stores_fail_in_one_line(url, monkeypatch):
    with pytest.raises(StoreError, match="gs://b/x: object stores other than s3:// are not supported"):
        Store("gs://b/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError, match=f"store {url} is not writable"):
        Store(url).check_writable()
