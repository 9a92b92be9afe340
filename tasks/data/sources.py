"""Where MNIST and Fashion-MNIST come from: a local mirror, Keras's cache or the public mirrors, verified."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import DataConfig
from tasks.data import idx
from tasks.data.idx import DataError
from tasks.data.splits import Dataset
from tasks.store.artifacts import key_of, sha256_file

log = logging.getLogger(__name__)

# split -> (images file, labels file, number of items), in the canonical mirrors' names.
FILES: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}

# SHA-256 of each file's uncompressed payload: gzip wrappers differ between mirrors, the payloads do not.
PAYLOAD_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

# The mirrors keras and torchvision download from, tried in order.
MIRROR_URLS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/",),
}

# Where Debian's dataset-fashion-mnist package installs the canonical archives.
DEFAULT_MIRRORS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

# The file_hash that keras/src/datasets/mnist.py pins for the mnist.npz that load_data() caches.
KERAS_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

TIMEOUT_S = 60.0

Loaded = tuple[Dataset, dict[str, str]]


class NetworkError(DataError):
    """A mirror could not be reached or stopped answering; worth retrying, unlike a damaged file."""


def fetch(cfg: DataConfig) -> tuple[Dataset, dict[str, Any]]:
    """Load the configured dataset from the first source that yields verified files.

    Sources in order: the local mirror directory, Keras's cached mnist.npz (MNIST only), then
    the public HTTPS mirrors unless `cfg.offline`. When all fail, one DataError lists every
    source's problem; it is a NetworkError when the network was tried and only failed to connect.
    """
    failures: list[str] = []
    network_failures: list[DataError] = []
    for label, load, remote in list_sources(cfg):
        try:
            ds, hashes = load()
        except DataError as exc:
            log.warning("%s: %s", label, exc)
            failures.append(f"{label}: {exc}")
            if remote:
                network_failures.append(exc)
            continue
        log.info("loaded %s from %s", cfg.dataset, label)
        counts = {"train": len(ds.y_train), "test": len(ds.y_test)}
        return ds, {"dataset": cfg.dataset, "source": label, "payload_sha256": hashes, "counts": counts}
    if cfg.offline:
        failures.append("network: skipped (offline)")
    retryable = bool(network_failures) and all(isinstance(e, NetworkError) for e in network_failures)
    error = NetworkError if retryable else DataError
    raise error(f"could not load {cfg.dataset} from any source:\n  " + "\n  ".join(failures))


def fingerprint(cfg: DataConfig) -> str:
    """Identifies the exact images the model stages see: the verified payloads, the split and the accepted batches."""
    # Without batches the fingerprint is the one of earlier versions, so their champions need no re-scoring.
    extra = {"batches": list(cfg.batches)} if cfg.batches else {}
    return key_of({"payload": PAYLOAD_SHA256[cfg.dataset], "split": cfg.split(), **extra})[:16]


def list_sources(cfg: DataConfig) -> list[tuple[str, Callable[[], Loaded], bool]]:
    """(label, loader, is it remote) for each source to try, in order."""
    sources: list[tuple[str, Callable[[], Loaded], bool]] = [
        (f"local mirror {cfg.mirror or ''}".strip(), partial(read_mirror, cfg.mirror, cfg.dataset), False)
    ]
    # A dataset's packaged location is tried too: MNIST_MIRROR may be set for MNIST while Fashion-MNIST is asked for.
    packaged = DEFAULT_MIRRORS.get(cfg.dataset)
    if packaged is not None and packaged != cfg.mirror:
        sources.append((f"packaged copy {packaged}", partial(read_mirror, packaged, cfg.dataset), False))
    if cfg.dataset == "mnist":
        cache = keras_cache_path()
        sources.append((f"Keras cache {cache}", partial(read_keras_cache, cache), False))
    if not cfg.offline:
        sources += [(url, partial(download, url, cfg.dataset), True) for url in MIRROR_URLS[cfg.dataset]]
    return sources


def read_mirror(directory: Path | None, dataset: str) -> Loaded:
    """Parse and verify the four IDX files of a directory (gzipped or not)."""
    if directory is None:
        raise DataError("none configured (set data.mirror or MNIST_MIRROR)")
    if not directory.is_dir():
        raise DataError("not a directory")
    return parse_files(lambda name: _find(directory, name), dataset)


def download(base_url: str, dataset: str) -> Loaded:
    """Download the four files from one mirror into a temporary directory, then parse and verify them."""
    with tempfile.TemporaryDirectory(prefix="mnist-download-") as tmp:
        for images, labels, _ in FILES.values():
            for name in (images, labels):
                _download_file(base_url + name, Path(tmp) / name)
        return parse_files(lambda name: (Path(tmp) / name, name), dataset)


def _download_file(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, dest.open("wb") as fh:
            shutil.copyfileobj(response, fh)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise NetworkError(f"{dest.name}: {reason}") from exc


def parse_files(locate: Callable[[str], tuple[Path, str]], dataset: str) -> Loaded:
    """Read, parse and verify each file; `locate(name)` gives its path and how errors refer to it."""
    arrays: dict[str, np.ndarray] = {}
    hashes: dict[str, str] = {}
    for split, (images_file, labels_file, count) in FILES.items():
        for key, file, parse in (("x", images_file, idx.parse_images), ("y", labels_file, idx.parse_labels)):
            path, name = locate(file)
            payload = idx.read_payload(path, name)
            # Parse first: a truncated or mislabelled file gets a more telling message than a hash mismatch.
            arrays[f"{key}_{split}"] = parse(payload, name, count)
            hashes[file] = verify_payload(payload, name, PAYLOAD_SHA256[dataset][file])
        idx.check_pair(arrays[f"x_{split}"], arrays[f"y_{split}"], images_file, labels_file)
    return Dataset(**arrays), hashes


def verify_payload(payload: bytes, name: str, pinned: str) -> str:
    """The payload's SHA-256, which must be `pinned`."""
    digest = hashlib.sha256(payload).hexdigest()
    if digest != pinned:
        raise DataError(f"{name}: payload SHA-256 {digest} does not match the pinned {pinned}")
    return digest


def _find(directory: Path, name: str) -> tuple[Path, str]:
    """The gzipped file, else the uncompressed one, and the name errors use for it."""
    for path in (directory / name, directory / name.removesuffix(".gz")):
        if path.is_file():
            return path, path.name
    raise DataError(f"{name}: missing (nor is {name.removesuffix('.gz')} there)")


def keras_cache_path() -> Path:
    """Where keras.datasets.mnist.load_data() leaves mnist.npz (Keras's own rule for its home)."""
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
        home = str(base / ".keras")
    return Path(home).expanduser() / "datasets" / "mnist.npz"


def read_keras_cache(path: Path) -> Loaded:
    """The arrays of Keras's mnist.npz, accepted only when its SHA-256 is the one Keras pins."""
    if not path.is_file():
        raise DataError("not found")
    digest = sha256_file(path)
    if digest != KERAS_MNIST_SHA256:
        raise DataError(f"SHA-256 {digest} is not the {KERAS_MNIST_SHA256} that Keras pins for mnist.npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            ds = Dataset(npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"unreadable npz ({exc})") from None
    hashes = {}
    for split, (images_file, labels_file, count) in FILES.items():
        for key, file, shape in (("x", images_file, (count, idx.ROWS, idx.COLS)), ("y", labels_file, (count,))):
            array = getattr(ds, f"{key}_{split}")
            if array.shape != shape or array.dtype != np.uint8:
                raise DataError(f"{key}_{split} is {array.dtype} {array.shape}, expected uint8 {shape}")
            # Trust rests on Keras's pinned file hash; these hashes say whether the arrays equal the IDX files.
            hashes[file] = hashlib.sha256(idx.encode_idx(array)).hexdigest()
    if hashes != PAYLOAD_SHA256["mnist"]:
        log.warning("%s: arrays differ from the canonical MNIST IDX payloads", path)
    return ds, hashes
