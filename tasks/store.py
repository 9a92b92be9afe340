"""Content-addressed artifact store: one directory per (stage, key), written atomically, verified on load."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    """The store root cannot be used; the message names it and what to do."""


class ArtifactError(RuntimeError):
    """A stored file fails its artifact's verification; the message names the file and the problem."""


class ArtifactRef(BaseModel):
    """The small handle that stages pass to each other instead of arrays or models."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    path: str
    cached: bool
    duration_s: float
    created_at: str
    summary: dict[str, Any] = {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_of(inputs: dict[str, Any]) -> str:
    """The artifact key: sha256 over the canonical JSON of everything the output depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Store:
    """A store root holding `<stage>/<key>/` artifact directories.

    All paths are derived here. Only a local directory is supported now; the layout
    (a manifest written last, inside a directory that appears whole) is the one an
    object store would use with the manifest as its commit marker.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        text = os.fspath(root)
        self.root = Path(text.removeprefix("file://")).resolve()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def check_readable(self) -> None:
        """Fail with one line naming the root when it (or a parent) is not a directory; a missing root is empty."""
        for path in (self.root, *self.root.parents):
            if path.exists():
                if not path.is_dir():
                    raise StoreError(f"store {self.root}: {path} is a file, not a directory; choose another --store")
                return

    def check_writable(self) -> None:
        """Fail with one line naming the root when artifacts cannot be written under it, before any work."""
        self.check_readable()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-check-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"store {self.root} is not writable ({exc.strerror or exc}); "
                             "choose another --store or make it writable") from None

    @property
    def prefect_results(self) -> Path:
        return self.root / ".prefect"

    @property
    def failed(self) -> Path:
        return self.root / ".failed"

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An inter-process lock under the store root (one per artifact key, registry, history...)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{name}.lock")):
            yield

    def load(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact if it is present and intact; a damaged one is moved aside with a warning."""
        directory = self.path(stage, key)
        if not directory.exists():
            return None
        problem = verify(directory, key)
        if problem:
            log.warning("artifact %s/%s is damaged (%s); recomputing it", stage, key[:12], problem)
            self._discard(directory)
            return None
        manifest = read_manifest(directory)
        return ArtifactRef(stage=stage, key=key, path=str(directory), cached=True,
                           duration_s=manifest["duration_s"], created_at=manifest["created_at"],
                           summary=manifest.get("summary", {}))

    def materialize(
        self,
        stage: str,
        key: str,
        key_inputs: dict[str, Any],
        produce: Callable[[Path], dict[str, Any]],
        force: bool = False,
    ) -> ArtifactRef:
        """Return the stored artifact, or run `produce(tmp_dir)` and publish its output atomically.

        Under a per-key lock, so concurrent runs compute each artifact once and the
        second one finds the first one's result.
        """
        with self.lock(f"{stage}-{key}"):
            if not force and (hit := self.load(stage, key)):
                return hit
            # Under this key's lock nobody else writes it, so earlier staging dirs are leftovers of a killed run.
            for stale in (self.root / ".tmp").glob(f"{stage}-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            staging = self.root / ".tmp" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
            staging.mkdir(parents=True)
            started = time.perf_counter()
            try:
                summary = produce(staging)
            except BaseException as exc:
                kept = self._keep_failed(staging, stage)
                if isinstance(exc, Exception) and kept:
                    exc.add_note(f"partial output of {stage} kept for inspection in {kept} (never used as a cache hit)")
                raise
            duration = time.perf_counter() - started
            created = datetime.now(UTC).isoformat(timespec="seconds")
            write_manifest(staging, stage=stage, key=key, key_inputs=key_inputs,
                           summary=summary, duration_s=duration, created_at=created)
            final = self.path(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                self._discard(final)
            os.replace(staging, final)
            _fsync_dir(final.parent)
            return ArtifactRef(stage=stage, key=key, path=str(final), cached=False,
                               duration_s=duration, created_at=created, summary=summary)

    def manifests(self, stage: str) -> list[dict[str, Any]]:
        """Manifests of the intact-looking artifacts of a stage, newest first."""
        found = []
        for manifest in (self.root / stage).glob(f"*/{MANIFEST}"):
            try:
                found.append(json.loads(manifest.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return sorted(found, key=lambda m: m.get("created_at", ""), reverse=True)

    def _discard(self, directory: Path) -> None:
        trash = self.root / ".trash" / f"{directory.parent.name}-{directory.name[:12]}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _keep_failed(self, staging: Path, stage: str) -> Path | None:
        if not staging.exists():
            return None
        if not any(staging.iterdir()):
            staging.rmdir()
            return None
        self.failed.mkdir(parents=True, exist_ok=True)
        target = self.failed / f"{stage}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        os.replace(staging, target)
        return target


def write_manifest(directory: Path, **fields: Any) -> None:
    """Hash every file of the artifact and write the manifest last, fsynced."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        _fsync_file(path)
    manifest = directory / MANIFEST
    manifest.write_text(json.dumps({**fields, "files": files}, indent=2, sort_keys=True, default=str))
    _fsync_file(manifest)


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())


def verify(directory: Path, key: str) -> str | None:
    """What is wrong with an artifact directory, or None when every file matches its manifest."""
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        return "no manifest"
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest: {exc}"
    if manifest.get("key") != key:
        return "manifest belongs to another key"
    for rel, meta in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != meta["size"]:
            return f"size mismatch in {rel}"
        if sha256_file(path) != meta["sha256"]:
            return f"checksum mismatch in {rel}"
    return None


def verified_file(path: Path) -> Path:
    """The file, once the manifest of the artifact directory holding it vouches for it and for every other file."""
    directory = Path(path).parent
    problem = verify(directory, directory.name)
    if problem is None and Path(path).name not in read_manifest(directory).get("files", {}):
        problem = "file not listed in the manifest"
    if problem:
        raise ArtifactError(f"{path}: fails verification against its artifact's manifest ({problem})")
    return Path(path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace a small JSON document in one step (registry, history)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
