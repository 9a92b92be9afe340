"""A store whose disk runs full: one line naming the store and what was being written, nothing half-written kept.

Each case runs in a process of its own with a small tmpfs mounted over a directory (a user and mount namespace,
as `unshare -rm` makes), so the disk is really full: the writes fail with ENOSPC as on any full disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.store.artifacts import Store, key_of

ROOT = Path(__file__).resolve().parents[2]


def _on_small_disk(tmp_path: Path, size: str, case: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run `case(disk)` of this module in a new process where `disk` is a tmpfs of `size`: its JSON and stderr."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespaces here to mount a small file system")
    disk = tmp_path / "disk"
    disk.mkdir()
    code = f"import sys; sys.path.insert(0, 'tests/flows'); import test_full_disk; test_full_disk.{case}(sys.argv[1])"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size="$1" none "$0" && shift && exec "$@"',
                           str(disk), size, sys.executable, "-c", code, str(disk)],
                          cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _fill(disk: Path) -> None:
    """Write a file until the disk is full."""
    with (disk / "filler").open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts)


def _report(**fields: object) -> None:
    print(json.dumps(fields, default=str))


def rollback_on_a_full_disk(disk: str) -> None:
    """Two champions, a full disk, then `mnist-ae rollback`."""
    from flows.cli import main
    from tasks.runs.registry import Registry

    store = Store(Path(disk) / "store")
    registry = Registry(store.url)
    for name in "ab":
        inputs = {"model": name}

        def produce(out: Path, name: str = name) -> dict:
            (out / "pretrained.keras").write_text(f"model {name}")
            return {}

        ref = store.materialize("finetune", key_of(inputs), inputs, produce)
        registry.promote(ref.key, {"key": ref.key, "model_path": f"{ref.path}/pretrained.keras", "accuracy": 0.9,
                                   "n": 10, "data_fingerprint": None, "evaluate_key": None}, by="test", reason=name)
    before = (store.root / "registry" / "mnist.json").read_text()
    files = _files(store.root)
    _fill(Path(disk))
    code = main(["rollback", "--store", str(store.root)])
    _report(code=code, same=(store.root / "registry" / "mnist.json").read_text() == before,
            left=sorted(set(_files(store.root)) ^ set(files)))


def test_rollback_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    result, err = _on_small_disk(tmp_path, "1m", "rollback_on_a_full_disk")
    assert result == {"code": 1, "same": True, "left": []}
    store = tmp_path / "disk" / "store"  # as the process saw it: the tmpfs was mounted there
    assert err.strip().splitlines()[-1] == (f"mnist-ae: store {store}: no space left on device while writing "
                                            "registry/mnist.json; nothing was kept, what was stored before is intact")


def run_on_a_full_disk(disk: str) -> None:
    """`mnist-ae run --only download` twice on a disk too small for MNIST."""
    from flows.cli import main

    store = Path(disk) / "store"
    codes = [main(["run", "--profile", "quick", "--store", str(store), "--only", "download"]) for _ in range(2)]
    _report(codes=codes, left=_files(store), dirs=sorted(p.name for p in store.iterdir()))


def test_a_stage_on_a_full_disk_is_one_line_and_keeps_no_partial_copy(tmp_path, mnist_mirror):
    env = {"MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    result, err = _on_small_disk(tmp_path, "30m", "run_on_a_full_disk", env)
    assert result["codes"] == [1, 1]
    assert result["left"] == [] and ".failed" not in result["dirs"]  # no partial copy of the data, run after run
    lines = [line for line in err.splitlines() if line.startswith("mnist-ae: ")]
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].startswith(f"mnist-ae: store {tmp_path / 'disk' / 'store'}: no space left on device while "
                               "writing download/")
    assert lines[0].endswith("; nothing was kept, what was stored before is intact")


def staged_on_a_full_disk(disk: str) -> None:
    """A directory built in the store (as a run's report is) that does not fit, and a stage's output that does not."""
    from tasks.store.artifacts import StoreError

    store = Store(Path(disk) / "store")
    errors = []
    try:
        with store.staged("runs/20261130T000000Z-x") as out:
            (out / "report.html").write_bytes(b"x" * (2 << 20))
    except StoreError as exc:
        errors.append(str(exc))

    def produce(out: Path) -> dict:
        (out / "model.keras").write_bytes(b"x" * (2 << 20))
        return {}

    try:
        store.materialize("s", key_of({}), {}, produce)
    except StoreError as exc:
        errors.append(str(exc))
    _report(errors=errors, left=_files(store.root), failed=store.failed.exists())


def test_what_does_not_fit_is_removed_not_kept(tmp_path):
    result, _ = _on_small_disk(tmp_path, "1m", "staged_on_a_full_disk")
    store = tmp_path / "disk" / "store"
    assert result == {"errors": [
        f"store {store}: no space left on device while writing runs/20261130T000000Z-x; nothing was kept, what was "
        "stored before is intact",
        f"store {store}: no space left on device while writing s/{key_of({})[:12]}; nothing was kept, what was stored "
        "before is intact"], "left": [], "failed": False}
