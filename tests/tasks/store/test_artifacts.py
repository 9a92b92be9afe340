"""The stage cache rules, one by one, on a real directory store."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from tasks.store.artifacts import ArtifactError, Store, StoreError, key_of, verified_file, verify, write_json_atomic

INPUTS = {"stage": "s", "code_version": "c1", "config": {"lr": 0.5}, "upstream": {"a": "k1"}}


def _produce(text: str = "hello"):
    def produce(out: Path) -> dict:
        (out / "result.txt").write_text(text)
        (out / "sub").mkdir()
        (out / "sub" / "more.bin").write_bytes(b"\x00\x01" * 100)
        return {"text": text}

    return produce


@pytest.mark.parametrize(
    "change",
    [
        {"stage": "t"},
        {"code_version": "c2"},
        {"config": {"lr": 0.1}},
        {"upstream": {"a": "k2"}},
    ],
    ids=["stage", "code-version", "config", "upstream"],
)
def test_each_key_component_changes_the_key(change):
    assert key_of({**INPUTS, **change}) != key_of(INPUTS)


def test_key_ignores_mapping_order():
    assert key_of({"config": {"a": 1, "b": 2}}) == key_of({"config": {"b": 2, "a": 1}})


def test_materialize_then_hit(store_root):
    store = Store(store_root)
    key = key_of(INPUTS)
    first = store.materialize("s", key, INPUTS, _produce())
    assert not first.cached and first.summary == {"text": "hello"}
    manifest = json.loads((Path(first.path) / "manifest.json").read_text())
    assert manifest["key_inputs"] == INPUTS
    assert set(manifest["files"]) == {"result.txt", "sub/more.bin"}
    assert manifest["duration_s"] >= 0 and manifest["created_at"]
    second = store.materialize("s", key, INPUTS, _produce("other"))
    assert second.cached and (Path(second.path) / "result.txt").read_text() == "hello"


@pytest.mark.parametrize("damage", ["flip-byte", "delete-file", "delete-manifest", "truncate-manifest"])
def test_damaged_artifact_is_recomputed_with_a_warning(store_root, caplog, damage):
    store = Store(store_root)
    key = key_of(INPUTS)
    path = Path(store.materialize("s", key, INPUTS, _produce()).path)
    if damage == "flip-byte":
        blob = bytearray((path / "sub" / "more.bin").read_bytes())
        blob[7] ^= 0xFF
        (path / "sub" / "more.bin").write_bytes(bytes(blob))
    elif damage == "delete-file":
        (path / "result.txt").unlink()
    elif damage == "delete-manifest":
        (path / "manifest.json").unlink()
    else:
        (path / "manifest.json").write_text('{"key": ')
    assert verify(path, key) is not None
    with caplog.at_level(logging.WARNING, logger="tasks.store.artifacts"):
        ref = store.materialize("s", key, INPUTS, _produce("again"))
    assert not ref.cached
    assert (path / "result.txt").read_text() == "again"
    assert verify(path, key) is None
    assert "damaged" in caplog.text


def test_failed_stage_leaves_nothing_in_the_store(store_root):
    store = Store(store_root)
    key = key_of(INPUTS)

    def boom(out: Path) -> dict:
        (out / "half.txt").write_text("partial")
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input") as info:
        store.materialize("s", key, INPUTS, boom)
    assert store.load("s", key) is None
    assert not store.path("s", key).exists()
    kept = list(store.failed.iterdir())
    assert len(kept) == 1 and (kept[0] / "half.txt").exists()
    assert str(kept[0]) in "\n".join(info.value.__notes__)


def _write_then_die(root: str, key: str, ready: str) -> None:
    store = Store(root)

    def produce(out: Path) -> dict:
        (out / "big.bin").write_bytes(os.urandom(1 << 16))
        Path(ready).touch()
        time.sleep(60)
        return {}

    store.materialize("s", key, INPUTS, produce)


def test_kill_mid_write_leaves_no_trusted_artifact(store_root, tmp_path):
    key = key_of(INPUTS)
    ready = tmp_path / "ready"
    proc = multiprocessing.get_context("spawn").Process(target=_write_then_die, args=(str(store_root), key, str(ready)))
    proc.start()
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    store = Store(store_root)
    assert store.load("s", key) is None
    assert len(list((store.root / ".tmp").iterdir())) == 1  # the killed writer's staging dir, never trusted
    assert "a run writing it stopped before committing it" in (store.incomplete("s", key) or "")  # what status says
    ref = store.materialize("s", key, INPUTS, _produce())
    assert not ref.cached and verify(Path(ref.path), key) is None
    assert list((store.root / ".tmp").iterdir()) == []  # the next writer of that key cleared it
    assert store.incomplete("s", key) is None


def _materialize_counting(root: str, key: str, counter: str) -> None:
    def produce(out: Path) -> dict:
        with open(counter, "a") as fh:
            fh.write("x")
        time.sleep(1.0)
        return _produce()(out)

    Store(root).materialize("s", key, INPUTS, produce)


def test_concurrent_runs_compute_once_and_both_finish(store_root, tmp_path):
    key = key_of(INPUTS)
    counter = tmp_path / "count"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_materialize_counting, args=(str(store_root), key, str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "x"
    ref = Store(store_root).load("s", key)
    assert ref is not None and verify(Path(ref.path), key) is None


def test_force_replaces_a_valid_artifact(store_root):
    store = Store(store_root)
    key = key_of(INPUTS)
    store.materialize("s", key, INPUTS, _produce())
    ref = store.materialize("s", key, INPUTS, _produce("fresh"), force=True)
    assert not ref.cached and (Path(ref.path) / "result.txt").read_text() == "fresh"


def test_write_json_atomic_replaces(tmp_path):
    target = tmp_path / "reg" / "r.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_a_store_under_a_file_is_named_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    store = Store(tmp_path / "notes.txt" / "store")
    for check in (store.check_readable, store.check_writable):
        with pytest.raises(StoreError, match=r"store .*notes.txt/store: .*notes.txt is a file, not a directory"):
            check()
    Store(tmp_path / "fresh").check_readable()  # a store that does not exist yet is an empty one
    Store(tmp_path / "fresh").check_writable()
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == []  # the write probe leaves nothing behind


def test_verified_file_vouches_only_for_intact_listed_files(tmp_path):
    store = Store(tmp_path)
    ref = store.materialize("s", "k" * 64, INPUTS, _produce())
    path = Path(ref.path) / "result.txt"
    assert verified_file(path) == path
    with pytest.raises(ArtifactError, match="not-listed.txt: .*file not listed in the manifest"):
        verified_file(Path(ref.path) / "not-listed.txt")
    path.write_text("jello")
    with pytest.raises(ArtifactError, match=r"result.txt: fails verification .*\(checksum mismatch in result.txt\)"):
        verified_file(path)


@pytest.mark.parametrize("command", [["status"], ["run", "--profile", "quick"], ["rollback"], ["predict", "x.png"]])
def test_an_empty_store_is_refused_not_taken_for_the_default(command, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)  # where the default store, artifacts/, would be
    assert main([*command, "--store", ""]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("mnist-ae: invalid configuration: store: Value error, the store root is empty; give a directory "
                    "or an s3://bucket/prefix URL (got '')")
    assert list(tmp_path.iterdir()) == []
