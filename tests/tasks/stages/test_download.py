"""Stage 1 on real files: the local mirror, damaged mirrors, Keras's cache, a local HTTP mirror, Fashion-MNIST."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import importlib.util
import json
import re
import shutil
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tasks.config import DataConfig
from tasks.data import sources
from tasks.data.sources import (
    DEFAULT_MIRRORS,
    KERAS_MNIST_SHA256,
    PAYLOAD_SHA256,
    DataError,
    NetworkError,
    fetch,
    keras_cache_path,
    list_sources,
)
from tasks.data.splits import load_dataset
from tasks.stages.download import run

NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")
TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # published MNIST figures


@pytest.fixture(scope="module")
def fetched(mnist_mirror):
    """The real MNIST, parsed once for the whole module."""
    return fetch(DataConfig(mirror=mnist_mirror, offline=True))


def _payload(mirror: Path, name: str) -> bytes:
    return gzip.decompress((mirror / name).read_bytes())


def _gz(payload: bytes) -> bytes:
    return gzip.compress(payload, compresslevel=1, mtime=0)


def _copy_mirror(src: Path, dst: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of the mirror where `changes` replaces (bytes) or removes (None) some files."""
    dst.mkdir()
    for name in NAMES:
        if name not in changes:
            shutil.copyfile(src / name, dst / name)
        elif changes[name] is not None:
            (dst / name).write_bytes(changes[name])
    return dst


def test_fetches_verified_mnist_from_the_mirror(fetched, mnist_mirror):
    ds, description = fetched
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert ds.x_train.dtype == ds.y_train.dtype == np.uint8
    assert np.bincount(ds.y_train).tolist() == TRAIN_CLASS_COUNTS
    independent = {name: hashlib.sha256(_payload(mnist_mirror, name)).hexdigest() for name in NAMES}
    assert description == {
        "dataset": "mnist",
        "source": f"local mirror {mnist_mirror}",
        "payload_sha256": independent,
        "counts": {"train": 60000, "test": 10000},
    }
    assert independent == PAYLOAD_SHA256["mnist"]


def test_run_writes_the_data_artifact(mnist_mirror, tmp_path, fetched):
    summary = run(DataConfig(mirror=mnist_mirror, offline=True), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["data.npz"]
    # No incoming batch is accepted: the artifact holds the verified dataset and says it has no batch images.
    assert json.loads(json.dumps(summary)) == {**fetched[1], "counts": {**fetched[1]["counts"], "batches": 0},
                                               "batches": []}
    saved = load_dataset(tmp_path)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(saved, field), getattr(fetched[0], field))
    assert saved.x_batches.shape == (0, 28, 28) and saved.y_batches.shape == (0,)


def test_uncompressed_files_are_accepted(mnist_mirror, tmp_path, fetched):
    name = "t10k-labels-idx1-ubyte.gz"
    mirror = _copy_mirror(mnist_mirror, tmp_path / "mirror", {name: None})
    (mirror / "t10k-labels-idx1-ubyte").write_bytes(_payload(mnist_mirror, name))
    ds, description = fetch(DataConfig(mirror=mirror, offline=True))
    assert np.array_equal(ds.y_test, fetched[0].y_test)
    assert description["payload_sha256"] == PAYLOAD_SHA256["mnist"]


def _header(payload: bytes, *fields: int) -> bytes:
    return struct.pack(f">{len(fields)}I", *fields) + payload[4 * len(fields):]


def _flip_pixel(payload: bytes) -> bytes:
    """A valid IDX file of the right shape whose only fault is one changed pixel."""
    at = 16 + 5000 * 784 + 400
    return payload[:at] + bytes([payload[at] ^ 0xFF]) + payload[at + 1:]


TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
DAMAGES: dict[str, tuple[str, Callable[[bytes], bytes | None], str]] = {
    "missing": ("train-labels-idx1-ubyte.gz", lambda p: None,
                "train-labels-idx1-ubyte.gz: missing (nor is train-labels-idx1-ubyte there)"),
    "truncated": (TEST_LABELS, lambda p: _gz(p[:-1]),
                  f"{TEST_LABELS}: truncated payload (9999 data bytes, header declares 10000)"),
    "trailing": (TEST_LABELS, lambda p: _gz(p + b"\n"), f"{TEST_LABELS}: 1 trailing bytes after the 10000 data bytes"),
    "magic": (TEST_LABELS, lambda p: _gz(_header(p, 0x803)), f"{TEST_LABELS}: wrong magic number 0x00000803"),
    "count": (TEST_LABELS, lambda p: _gz(_header(p[:-1], 0x801, 9999)),
              f"{TEST_LABELS}: header declares 9999 items, expected 10000"),
    "dimension": (TEST_IMAGES, lambda p: _gz(_header(p, 0x803, 10000, 28, 27)),
                  f"{TEST_IMAGES}: header declares 27 columns, expected 28"),
    "gzip": (TEST_LABELS, lambda p: _gz(p)[:-20], f"{TEST_LABELS}: corrupt gzip (Compressed file ended"),
    "checksum": (TEST_IMAGES, lambda p: _gz(_flip_pixel(p)),
                 f"{TEST_IMAGES}: payload SHA-256 "),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_mirror_gives_one_error_naming_file_and_problem(mnist_mirror, tmp_path, case):
    name, damage, problem = DAMAGES[case]
    mirror = _copy_mirror(mnist_mirror, tmp_path / "mirror", {name: damage(_payload(mnist_mirror, name))})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError) as err:
        run(DataConfig(mirror=mirror, offline=True), out)
    assert type(err.value) is DataError  # not a NetworkError: retrying cannot repair a file
    lines = str(err.value).splitlines()
    assert lines[0] == "could not load mnist from any source:"
    assert lines[1].startswith(f"  local mirror {mirror}: {problem}")
    assert lines[2] == f"  Keras cache {keras_cache_path()}: not found"
    assert lines[3:] == ["  network: skipped (offline)"]
    assert list(out.iterdir()) == []


def test_checksum_message_names_both_hashes(mnist_mirror, tmp_path):
    payload = _flip_pixel(_payload(mnist_mirror, TEST_IMAGES))
    mirror = _copy_mirror(mnist_mirror, tmp_path / "mirror", {TEST_IMAGES: _gz(payload)})
    with pytest.raises(DataError) as err:
        fetch(DataConfig(mirror=mirror, offline=True))
    got, pinned = hashlib.sha256(payload).hexdigest(), PAYLOAD_SHA256["mnist"][TEST_IMAGES]
    assert f"{TEST_IMAGES}: payload SHA-256 {got} does not match the pinned {pinned}" in str(err.value)


@pytest.fixture
def serve(monkeypatch):
    """Start plain HTTP servers on localhost for a directory; yields (base URL, list of requested paths)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    servers = []

    def start(directory: Path) -> tuple[str, list[str]]:
        requested: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def do_GET(self):
                requested.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/", requested

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_offline_never_touches_the_network_and_online_downloads(mnist_mirror, tmp_path, serve, monkeypatch, fetched):
    url, requested = serve(mnist_mirror)
    monkeypatch.setitem(sources.MIRROR_URLS, "mnist", (url,))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        fetch(DataConfig(mirror=empty, offline=True))
    assert "network: skipped (offline)" in str(err.value)
    assert url not in str(err.value) and requested == []

    ds, description = fetch(DataConfig(mirror=empty, offline=False))
    assert description["source"] == url
    assert description["payload_sha256"] == PAYLOAD_SHA256["mnist"]
    assert sorted(requested) == sorted(f"/{name}" for name in NAMES)
    assert np.array_equal(ds.x_train, fetched[0].x_train)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


def test_unreachable_mirrors_raise_a_network_error(tmp_path, serve, monkeypatch):
    missing_url, _ = serve(tmp_path)  # answers 404 for every file
    refused_url = _closed_port_url()
    monkeypatch.setitem(sources.MIRROR_URLS, "mnist", (refused_url, missing_url))
    with pytest.raises(NetworkError) as err:
        fetch(DataConfig(mirror=tmp_path, offline=False))
    text = str(err.value)
    assert f"{refused_url}: train-images-idx3-ubyte.gz: " in text and "Connection refused" in text
    assert f"{missing_url}: train-images-idx3-ubyte.gz: File not found" in text
    assert "local mirror" in text and "Keras cache" in text


def test_a_damaged_download_is_not_retryable(mnist_mirror, tmp_path, serve, monkeypatch):
    bad = _copy_mirror(mnist_mirror, tmp_path / "bad", {TEST_LABELS: _gz(_payload(mnist_mirror, TEST_LABELS)[:-1])})
    url, _ = serve(bad)
    monkeypatch.setitem(sources.MIRROR_URLS, "mnist", (_closed_port_url(), url))
    with pytest.raises(DataError) as err:
        fetch(DataConfig(mirror=tmp_path, offline=False))
    assert type(err.value) is DataError
    assert f"{url}: {TEST_LABELS}: truncated payload" in str(err.value)


def test_pinned_keras_hash_is_the_installed_keras_one():
    package = Path(importlib.util.find_spec("keras").submodule_search_locations[0])
    source = (package / "src" / "datasets" / "mnist.py").read_text()
    assert re.findall(r'"([0-9a-f]{64})"', source) == [KERAS_MNIST_SHA256]


def _write_keras_cache(ds, **overrides) -> Path:
    path = keras_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test, **overrides}
    np.savez(path, **arrays)
    return path


def test_a_keras_cache_without_the_pinned_hash_is_rejected(fetched):
    path = _write_keras_cache(fetched[0])
    with pytest.raises(DataError) as err:
        fetch(DataConfig(offline=True))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(err.value).splitlines()[1:] == [
        "  local mirror: none configured (set data.mirror or MNIST_MIRROR)",
        f"  Keras cache {path}: SHA-256 {digest} is not the {KERAS_MNIST_SHA256} that Keras pins for mnist.npz",
        "  network: skipped (offline)",
    ]


def test_a_keras_cache_with_the_pinned_hash_is_used(fetched, tmp_path, monkeypatch):
    path = _write_keras_cache(fetched[0])
    monkeypatch.setattr(sources, "KERAS_MNIST_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    ds, description = fetch(DataConfig(mirror=tmp_path, offline=True))  # the empty mirror fails first
    assert description["source"] == f"Keras cache {path}"
    assert description["payload_sha256"] == PAYLOAD_SHA256["mnist"]  # the arrays re-encoded as IDX
    assert np.array_equal(ds.x_test, fetched[0].x_test)


def test_a_keras_cache_of_the_wrong_shape_is_rejected(fetched, monkeypatch):
    path = _write_keras_cache(fetched[0], x_train=fetched[0].x_train[:100])
    monkeypatch.setattr(sources, "KERAS_MNIST_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(DataError, match=r"x_train is uint8 \(100, 28, 28\), expected uint8 \(60000, 28, 28\)"):
        fetch(DataConfig(offline=True))


def test_fashion_mnist_skips_the_keras_cache(tmp_path):
    labels = [label for label, _, _ in list_sources(DataConfig(dataset="fashion-mnist", mirror=tmp_path))]
    packaged = f"packaged copy {DEFAULT_MIRRORS['fashion-mnist']}"
    assert labels == [f"local mirror {tmp_path}", packaged, *sources.MIRROR_URLS["fashion-mnist"]]


FASHION_PAYLOAD_MD5 = {  # as published with the Fashion-MNIST archives, after gunzip
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    path = DEFAULT_MIRRORS["fashion-mnist"]
    if not path.is_dir():
        pytest.skip(f"{path} absent (Debian package dataset-fashion-mnist)")
    return path


def test_fashion_mnist_comes_from_the_debian_package_by_default(fashion_dir):
    ds, description = fetch(DataConfig(dataset="fashion-mnist", offline=True))
    assert description["source"] == f"packaged copy {fashion_dir}"
    assert description["payload_sha256"] == PAYLOAD_SHA256["fashion-mnist"]
    assert {n: hashlib.md5(_payload(fashion_dir, n)).hexdigest() for n in NAMES} == FASHION_PAYLOAD_MD5
    assert np.bincount(ds.y_train).tolist() == [6000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10


def test_mnist_files_are_not_taken_for_fashion_mnist(mnist_mirror, monkeypatch, tmp_path):
    monkeypatch.setitem(DEFAULT_MIRRORS, "fashion-mnist", tmp_path / "not-installed")
    with pytest.raises(DataError, match=r"local mirror .*: train-images-idx3-ubyte.gz: payload SHA-256 ba891046"):
        fetch(DataConfig(dataset="fashion-mnist", mirror=mnist_mirror, offline=True))


def test_fashion_mnist_is_found_while_the_mirror_holds_mnist(fashion_dir, mnist_mirror):
    """MNIST_MIRROR set for MNIST must not hide the packaged Fashion-MNIST."""
    _, description = fetch(DataConfig(dataset="fashion-mnist", mirror=mnist_mirror, offline=True))
    assert description["source"] == f"packaged copy {fashion_dir}"
