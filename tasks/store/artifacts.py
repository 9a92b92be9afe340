"""Content-addressed artifact store: one directory per (stage, key), written atomically, verified on load.

The root is a local directory or an `s3://bucket/prefix` URL. A local root keeps rename and file locks; an
object-store root is mirrored by a local cache directory (`Store.root`), into which artifacts are pulled and
verified before use, and from which new ones are pushed, their manifest created last (see tasks/store/objects.py).
"""

from __future__ import annotations

import errno
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

from tasks.store.objects import Bucket, Conflict, StoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_ENV = "MNIST_AE_CACHE"
ABSENT = "not stored"
# Errors of a disk (or quota) that has run full: what was being written cannot be kept.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

__all__ = ["ABSENT", "ArtifactError", "ArtifactRef", "Conflict", "Store", "StoreError", "key_of", "out_of_space",
           "read_manifest", "sha256_file", "verified_file", "verify", "write_json_atomic", "write_manifest"]


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


def cache_dir(url: str) -> Path:
    """This machine's local copy of an object-store root: `$MNIST_AE_CACHE/<hash of the URL>`."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-ae"
    return Path(base).resolve() / hashlib.sha256(url.encode()).hexdigest()[:16]


class Store:
    """A store root holding `<stage>/<key>/` artifact directories, each with a manifest written last.

    All paths are derived here. `url` is the root as given (a resolved local path, or an `s3://` URL);
    `root` is the local directory that stages read and write: the store itself, or the object store's cache.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        text = os.fspath(root)
        self.bucket: Bucket | None = None
        if "://" in text and not text.startswith("file://"):
            self.bucket = Bucket(text)
            self.url = self.bucket.url
            self.root = cache_dir(self.url)
        else:
            self.root = Path(text.removeprefix("file://")).resolve()
            self.url = str(self.root)
        self._versions: dict[str, str | None] = {}  # ETag of each document last read (object stores)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def location(self, rel: str) -> str:
        """Where a path relative to the root is stored, for messages: a local path or a URL."""
        return self.bucket.location(rel) if self.bucket else str(self.root / rel)

    def check_readable(self) -> None:
        """Fail with one line naming the root when it (or a parent) is not a directory; a missing root is empty."""
        if self.bucket:
            self.bucket.check_readable()
            return
        for path in (self.root, *self.root.parents):
            if path.exists():
                if not path.is_dir():
                    raise StoreError(f"store {self.root}: {path} is a file, not a directory; choose another --store")
                return

    def check_writable(self) -> None:
        """Fail with one line naming the root when artifacts cannot be written under it, before any work."""
        if self.bucket:
            self.bucket.check_writable()
            return
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
        """A lock for every process using the store (one per artifact key, registry, run log...).

        A file lock under a local root; a lease object under an object-store root, held by one process
        on any machine (Prefect's concurrency limits would need a shared Prefect server, which command-line
        runs with their ephemeral servers do not have).
        """
        if self.bucket:
            with self.bucket.lease(f".locks/{name}.lock"):
                yield
            return
        with self._local_lock(name):
            yield

    def _local_lock(self, name: str) -> FileLock:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{name}.lock"))

    def problem(self, stage: str, key: str) -> str | None:
        """What is wrong with the stored artifact (ABSENT when there is none), or None when it is intact.

        Under an object-store root, an intact artifact is left verified in the local cache.
        """
        if self.bucket:
            return self._pull(stage, key)
        directory = self.path(stage, key)
        return verify(directory, key) if directory.exists() else ABSENT

    def load(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact if it is present and intact; a damaged one is moved aside (replaced later) with a warning."""
        problem = self.problem(stage, key)
        if problem == ABSENT:
            return None
        directory = self.path(stage, key)
        if problem:
            log.warning("artifact %s/%s is damaged (%s); recomputing it", stage, key[:12], problem)
            if not self.bucket:  # in an object store the recomputed artifact's manifest replaces the damaged one
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
            with self._writing(f"{stage}/{key[:12]}", staging):
                staging.mkdir(parents=True)
                started = time.perf_counter()
                try:
                    summary = produce(staging)
                except BaseException as exc:
                    # A partial copy on a full disk would only keep it full: then the staging dir goes.
                    if not out_of_space(exc) and (kept := self._keep_failed(staging, stage)):
                        exc.add_note(f"partial output of {stage} kept for inspection in {kept} "
                                     "(never used as a cache hit)")
                    raise
                duration = time.perf_counter() - started
                created = datetime.now(UTC).isoformat(timespec="seconds")
                write_manifest(staging, stage=stage, key=key, key_inputs=key_inputs,
                               summary=summary, duration_s=duration, created_at=created)
                if self.bucket and not self._push(staging, f"{stage}/{key}"):
                    shutil.rmtree(staging, ignore_errors=True)
                    if hit := self.load(stage, key):
                        return hit
                    raise StoreError(f"store {self.url}: {stage}/{key[:12]} was committed by another run while this "
                                     "one held its lock, and fails verification; run again")
                final = self._install(staging, self.path(stage, key))
            return ArtifactRef(stage=stage, key=key, path=str(final), cached=False,
                               duration_s=duration, created_at=created, summary=summary)

    def manifests(self, stage: str) -> list[dict[str, Any]]:
        """Manifests of the intact-looking artifacts of a stage, newest first."""
        found = []
        if self.bucket:
            texts = [got[0] for rel in self.bucket.glob(f"{stage}/*/{MANIFEST}") if (got := self.bucket.get(rel))]
        else:
            texts = [p.read_bytes() for p in (self.root / stage).glob(f"*/{MANIFEST}")]
        for text in texts:
            try:
                found.append(json.loads(text))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
        return sorted(found, key=lambda m: m.get("created_at", ""), reverse=True)

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        """The manifest of one stored artifact (unverified; FileNotFoundError when absent)."""
        if self.bucket:
            got = self.bucket.get(f"{stage}/{key}/{MANIFEST}")
            if got is None:
                raise FileNotFoundError(self.location(f"{stage}/{key}/{MANIFEST}"))
            manifest: dict[str, Any] = json.loads(got[0])
            return manifest
        return read_manifest(self.path(stage, key))

    def localized(self, ref: ArtifactRef) -> ArtifactRef:
        """The artifact with its path in this machine's copy, verified (a ref may come from another machine)."""
        if not self.bucket:
            return ref
        if problem := self._pull(ref.stage, ref.key):
            raise ArtifactError(f"{self.location(f'{ref.stage}/{ref.key}')}: {problem}")
        return ref.model_copy(update={"path": str(self.path(ref.stage, ref.key))})

    def verified(self, rel: str) -> Path:
        """The local copy of a stored file `<stage>/<key>/<file>`, once its artifact's manifest vouches for it."""
        path = self.root / rel
        if self.bucket and len(parts := Path(rel).parts) >= 3:
            if (problem := self._pull(parts[0], parts[1])) and problem != ABSENT:
                raise ArtifactError(f"{self.location(rel)}: fails verification against its artifact's manifest "
                                    f"({problem})")
        return verified_file(path)

    @contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        """A new local directory to build `rel` in: moved there (and uploaded) when the block ends, removed if it fails.

        The finished directory is `root / rel`.
        """
        staging = self.root / ".tmp" / f"{rel.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
        with self._writing(rel, staging):
            staging.mkdir(parents=True)
            yield staging
            if self.bucket:
                for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                    self.bucket.upload(path, f"{rel}/{path.relative_to(staging).as_posix()}")
            final = self.root / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)

    def read_text(self, rel: str, errors: str = "strict") -> str | None:
        """A small document under the root (registry, run log), or None when there is none."""
        if self.bucket:
            got = self.bucket.get(rel)
            self._versions[rel] = got and got[1]
            return None if got is None else got[0].decode("utf-8", errors)
        try:
            return (self.root / rel).read_text(encoding="utf-8", errors=errors)
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Replace a small document in one step; in an object store only if it is still the version read last.

        Callers hold `lock`; the conditional write (If-Match on the ETag read, If-None-Match for a new
        document) also refuses the write of a process whose lease was taken over, instead of losing an update.
        """
        if self.bucket:
            version = self._versions.get(rel)
            self._versions[rel] = self.bucket.put(rel, text.encode("utf-8"), if_match=version, create=version is None)
            return
        with self._writing(rel):
            _write_text_atomic(self.root / rel, text)

    def incomplete(self, stage: str, key: str) -> str | None:
        """What an unfinished write of an artifact without a manifest left behind, or None when it left nothing."""
        if self.bucket:
            left = bool(self.bucket.glob(f"{stage}/{key}/*"))
        else:
            left = any((self.root / ".tmp").glob(f"{stage}-{key}-*"))
        if not left:
            return None
        return "files without a manifest: a run writing it stopped before committing it, or is writing it now"

    @contextmanager
    def _writing(self, what: str, *leftovers: Path) -> Iterator[None]:
        """Remove `leftovers` if the block fails; a disk that ran full becomes one line naming the store and `what`."""
        try:
            yield
        except BaseException as exc:
            for path in leftovers:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if not out_of_space(exc):
                raise
            disk = f" (its local cache {self.root})" if self.bucket else ""
            raise StoreError(f"store {self.url}{disk}: no space left on device while writing {what}; "
                             "nothing was kept, what was stored before is intact") from None

    def _pull(self, stage: str, key: str) -> str | None:
        """Bring an object-store artifact into the local cache, verified; what is wrong with it, or None."""
        assert self.bucket
        got = self.bucket.get(f"{stage}/{key}/{MANIFEST}")
        if got is None:
            return ABSENT
        final = self.path(stage, key)
        with self._local_lock(f"pull-{stage}-{key}"):
            if (final / MANIFEST).is_file() and (final / MANIFEST).read_bytes() == got[0] and not verify(final, key):
                return None
            staging = self.root / ".tmp" / f"pull-{stage}-{key}-{uuid.uuid4().hex[:8]}"
            try:
                staging.mkdir(parents=True)
                (staging / MANIFEST).write_bytes(got[0])
                try:
                    files = json.loads(got[0]).get("files", {})
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    return f"unreadable manifest: {exc}"
                for rel in files:
                    try:
                        self.bucket.download(f"{stage}/{key}/{rel}", staging / rel)
                    except FileNotFoundError:
                        return f"missing file {rel}"
                if problem := verify(staging, key):
                    return problem
                self._install(staging, final)
                return None
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _push(self, staging: Path, rel: str) -> bool:
        """Upload an artifact's files, then create its manifest (or replace a damaged one it saw); False if beaten."""
        assert self.bucket
        old = self.bucket.get(f"{rel}/{MANIFEST}")
        for path in sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST):
            self.bucket.upload(path, f"{rel}/{path.relative_to(staging).as_posix()}")
        try:
            self.bucket.put(f"{rel}/{MANIFEST}", (staging / MANIFEST).read_bytes(),
                            create=old is None, if_match=old and old[1])
        except Conflict:
            log.warning("artifact %s was committed by another run first; using that one", rel)
            return False
        return True

    def _install(self, staging: Path, final: Path) -> Path:
        """Move a complete local artifact directory into place, replacing an older copy."""
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            self._discard(final)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        return final

    def _discard(self, directory: Path) -> None:
        trash = self.root / ".trash" / f"{directory.parent.name}-{directory.name[:12]}-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _keep_failed(self, staging: Path, stage: str) -> Path | None:
        """Move a failed stage's output aside for inspection; None when there is none (or it cannot be kept)."""
        if not staging.exists():
            return None
        if not any(staging.iterdir()):
            staging.rmdir()
            return None
        target = self.failed / f"{stage}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        try:
            self.failed.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
        except OSError:
            return None
        return target


def out_of_space(exc: BaseException) -> bool:
    """Whether an error, or one that caused it, is a disk (or quota) that ran full."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    # Libraries that wrap the OSError (HDF5, TensorFlow) keep its text only.
    return any(isinstance(e, OSError) and e.errno in NO_SPACE or "No space left on device" in str(e) for e in chain)


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
    """Replace a small JSON document in one step (registry, run log)."""
    _write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
