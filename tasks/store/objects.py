"""Object storage under an `s3://bucket/prefix` store root: files up and down, conditional writes, a lease lock.

Object stores have no rename and no file locks. What they do have, S3 and SeaweedFS alike, are conditional
writes: `If-None-Match: *` creates an object only when it does not exist, and `If-Match: <etag>` replaces it
only while it is the version that was read. The store's commit marker (a manifest created last), its
cross-machine lock (a lease object) and the registry's and run log's read-modify-write are built on them.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A lease not renewed for this long belongs to a dead process and is taken over. Holders renew it every
# LEASE_S / 4, so only a holder stalled for a whole LEASE_S (and then denied its writes, see below) loses it.
LEASE_S = float(os.environ.get("MNIST_AE_LEASE_SECONDS", "60"))
POLL_S = 0.5


# The settings a client is made from: one client per process and settings (making one takes seconds).
SETTINGS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE",
            "AWS_REGION")


class StoreError(RuntimeError):
    """The store root cannot be used; the message names it and what to do."""


class Conflict(RuntimeError):
    """A conditional write found another version of the object than the one it was made for."""


class Bucket:
    """The objects under one `s3://bucket/prefix` URL, addressed by paths relative to it.

    Credentials and the endpoint come from the usual AWS settings (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server, profiles, instance roles).
    """

    def __init__(self, url: str) -> None:
        scheme, _, rest = url.partition("://")
        if scheme != "s3":
            raise StoreError(f"store {url}: object stores other than s3:// are not supported yet "
                             "(the store needs conditional writes, which it uses through the S3 API)")
        self.url = url.rstrip("/")
        self.bucket, _, prefix = rest.strip("/").partition("/")
        self.prefix = prefix.strip("/")
        try:
            # Keyed by process too: a forked child cannot use its parent's event-loop thread.
            self.fs = _filesystem(os.getpid(), *(os.environ.get(name) for name in SETTINGS))
        except StoreError as exc:
            raise StoreError(f"store {url}: {exc}") from None

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def location(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    @contextmanager
    def _reached(self) -> Iterator[None]:
        """Turn a server that cannot be reached (refused, reset, timed out) into one line naming the store."""
        from botocore.exceptions import ConnectionError as Unreachable
        from botocore.exceptions import HTTPClientError

        try:
            yield
        except (Unreachable, HTTPClientError) as exc:
            raise StoreError(f"store {self.url} cannot be reached ({exc}); check that its S3 server is running and "
                             "that AWS_ENDPOINT_URL names it") from None

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            with self._reached():
                result: dict[str, Any] = self.fs.call_s3(method, Bucket=self.bucket, **kwargs)
            return result
        except ClientError as exc:  # s3fs passes some through untranslated
            raise self._translate(exc, kwargs.get("Key")) from None
        except OSError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise self._translate(cause, kwargs.get("Key")) from None
            raise

    def _translate(self, exc: Any, key: str | None) -> Exception:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"s3://{self.bucket}/{key or ''}"
        if status in (409, 412) or error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return Conflict(f"{where}: changed by another writer")
        if status == 404 or error.get("Code") in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(where)
        return OSError(f"{where}: {error.get('Code')} {error.get('Message') or exc}")

    def get(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when there is none."""
        try:
            result = self._call("get_object", Key=self.key(rel))
        except FileNotFoundError:
            return None
        with self._reached():
            return _read_body(self.fs, result["Body"]), result["ETag"]

    def put(self, rel: str, data: bytes, *, if_match: str | None = None, create: bool = False) -> str:
        """Write the object and return its new ETag; `create` only if absent, `if_match` only if unchanged."""
        conditions: dict[str, str] = {}
        if create:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = if_match
        result = self._call("put_object", Key=self.key(rel), Body=data, **conditions)
        return str(result["ETag"])

    def delete(self, rel: str) -> None:
        self._call("delete_object", Key=self.key(rel))

    def upload(self, local: Path, rel: str) -> None:
        with self._reached():
            self.fs.put_file(str(local), f"{self.bucket}/{self.key(rel)}")

    def download(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with self._reached():
            self.fs.get_file(f"{self.bucket}/{self.key(rel)}", str(local))

    def glob(self, pattern: str) -> list[str]:
        """Paths (relative to the root) of the objects matching a glob pattern relative to the root."""
        base = f"{self.bucket}/{self.prefix}/" if self.prefix else f"{self.bucket}/"
        with self._reached():
            return [p.removeprefix(base) for p in self.fs.glob(base + pattern)]

    def check_writable(self) -> None:
        """Fail with one line naming the URL when objects cannot be written and deleted under it."""
        probe = f".write-check-{uuid.uuid4().hex[:8]}"
        try:
            self.put(probe, b"", create=True)
            self.delete(probe)
        except (OSError, Conflict) as exc:
            raise StoreError(f"store {self.url} is not writable ({exc}); check the bucket, the credentials "
                             "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and AWS_ENDPOINT_URL") from None
        except Exception as exc:  # botocore's connection and credential errors
            raise StoreError(f"store {self.url} cannot be reached ({type(exc).__name__}: {exc}); check "
                             "AWS_ENDPOINT_URL and the credentials") from None

    def check_readable(self) -> None:
        try:
            self._call("list_objects_v2", Prefix=self.key(""), MaxKeys=1)
        except Exception as exc:
            raise StoreError(f"store {self.url} cannot be read ({type(exc).__name__}: {exc}); check the bucket, "
                             "AWS_ENDPOINT_URL and the credentials") from None

    @contextmanager
    def lease(self, rel: str) -> Iterator[None]:
        """Hold the lease object `rel` (created with If-None-Match), renewed in the background until released.

        A waiter takes over a lease whose ETag has not changed for LEASE_S seconds of its own clock (so
        clocks of different machines need not agree), again with a conditional write, so only one waiter wins.
        """
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        etag = self._acquire(rel, owner)
        stop = threading.Event()
        # In this thread's context, so the renewer's log records reach the run's log (Prefect keeps the run there).
        renewer = threading.Thread(target=contextvars.copy_context().run, args=(self._renew, rel, owner, etag, stop),
                                   daemon=True)
        renewer.start()
        failed = True
        try:
            yield
            failed = False
        finally:
            stop.set()
            renewer.join()
            try:
                current = self.get(rel)
                if current is not None and json.loads(current[0]).get("owner") == owner:
                    self.delete(rel)
            except StoreError:
                if not failed:  # else the error that ended the block is the one to tell (the lease expires)
                    raise

    def _acquire(self, rel: str, owner: str) -> str:
        seen: tuple[str, float] | None = None  # another holder's ETag and when this process first saw it
        while True:
            try:
                return self.put(rel, _lease_body(owner, 0), create=True)
            except Conflict:
                pass
            current = self.get(rel)
            if current is None:
                continue
            if seen is None:
                _tell_waiting(self.location(rel), current[0])
            if seen is None or seen[0] != current[1]:
                seen = (current[1], time.monotonic())
            elif time.monotonic() - seen[1] > LEASE_S:
                try:
                    etag = self.put(rel, _lease_body(owner, 0), if_match=current[1])
                except Conflict:
                    seen = None
                    continue
                log.warning("lock %s: took over a lease not renewed for %.0f s (its holder died?)",
                            self.location(rel), LEASE_S)
                return etag
            time.sleep(POLL_S)

    def _renew(self, rel: str, owner: str, etag: str, stop: threading.Event) -> None:
        beat = 0
        while not stop.wait(LEASE_S / 4):
            beat += 1
            try:
                etag = self.put(rel, _lease_body(owner, beat), if_match=etag)
            except Conflict:
                log.error("lock %s: lease lost to another process; its conditional writes will be refused",
                          self.location(rel))
                return
            except (OSError, StoreError) as exc:
                log.warning("lock %s: renewing the lease failed (%s); retrying", self.location(rel), exc)


@functools.lru_cache(maxsize=4)
def _filesystem(pid: int, *settings: str | None) -> Any:
    """An S3 client for these settings (read from the environment by botocore itself)."""
    try:
        import s3fs
    except ImportError:
        raise StoreError("s3:// stores need the s3 extra: pip install 'mnist-ae-pipeline[s3]'") from None
    # No listing cache: other machines write the same prefix.
    return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)


def _lease_body(owner: str, beat: int) -> bytes:
    return json.dumps({"owner": owner, "beat": beat, "at": time.time()}).encode()


def _tell_waiting(where: str, body: bytes) -> None:
    """Say once, before waiting for a lease, whose it is and how long the wait can last."""
    try:
        owner = json.loads(body)["owner"]
    except (ValueError, KeyError, TypeError):
        owner = "an unknown process"
    log.warning("lock %s is held by %s; waiting until it is released, or for up to %.0f s without renewal if its "
                "holder died (then taking it over)", where, owner, LEASE_S)


def _read_body(fs: Any, body: Any) -> bytes:
    """Read an aiobotocore streaming body on s3fs's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            data: bytes = await stream.read()
            return data

    return sync(fs.loop, read)
