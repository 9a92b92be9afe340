"""Labeled batches dropped into the incoming directory: three formats, each parsed strictly and content-hashed.

A batch is one entry of the directory: a `.npz` file with arrays `x` (N x 28 x 28 uint8) and `y` (N labels),
or a directory holding either one IDX image/label pair (file names containing `idx3` and `idx1`, gzipped or
not) or class folders `0` .. `9` of PNG files, converted exactly as `mnist-ae predict` converts its inputs.
Entries whose names start with `.` or `_` (staging copies, the quarantine) are not batches.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data import idx
from tasks.data.idx import DataError
from tasks.data.mnist import CLASSES

CLASS_FOLDERS = tuple(str(c) for c in range(CLASSES))
HIDDEN = (".", "_")  # name prefixes of staging copies and the quarantine, which are not batches
# About four times MNIST's training set; an IDX header declaring more is refused before any data is unpacked.
MAX_IMAGES = 250_000


@dataclass(frozen=True)
class Batch:
    """One parsed batch: its entry in the incoming directory, its arrays and the hash of their content."""

    path: Path
    x: np.ndarray
    y: np.ndarray
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def content_hash(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes: the same images and labels in any format hash alike."""
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def entries(incoming: Path | None) -> list[Path]:
    """The batch entries of the incoming directory, by name; none when it is not configured or does not exist."""
    if incoming is None or not incoming.is_dir():
        return []
    return sorted(p for p in incoming.iterdir() if not p.name.startswith(HIDDEN))


def check_name(path: Path) -> None:
    """Fail when the entry's name would hide it from runs, as staging copies and the quarantine are hidden."""
    if path.name.startswith(HIDDEN):
        raise DataError(f"{path}: names starting with '.' or '_' are hidden (staging copies, the quarantine) and "
                        "runs skip them; rename it")


def read_batch(path: Path) -> Batch:
    """Parse one entry strictly; a DataError names the file and the problem."""
    if path.is_file() and path.suffix == ".npz":
        x, y = _read_npz(path)
    elif path.is_dir():
        x, y = _read_directory(path)
    else:
        raise DataError(f"{path}: not a batch (expected a .npz file, or a directory with an IDX image/label pair "
                        "or class folders 0..9 of PNG files)")
    if not len(y):
        raise DataError(f"{path}: holds no images; a batch needs at least one")
    if len(y) > MAX_IMAGES:
        raise DataError(f"{path}: holds {len(y):,} images, more than the {MAX_IMAGES:,} a batch may hold; split it")
    x, y = _uint8_if_lossless(x), _uint8_if_lossless(y)
    return Batch(path, x, y, content_hash(x, y))


def scan(incoming: Path | None) -> list[tuple[Path, Batch | DataError]]:
    """Every entry of the incoming directory with its parsed batch, or the error that stops it from being parsed."""
    found: list[tuple[Path, Batch | DataError]] = []
    for path in entries(incoming):
        try:
            found.append((path, read_batch(path)))
        except DataError as exc:
            found.append((path, exc))
    return found


def load_accepted(incoming: Path | None, hashes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the batches with these content hashes, in the order given; each must be present."""
    by_hash = {b.sha256: b for _, b in scan(incoming) if isinstance(b, Batch)}
    if missing := [h[:12] for h in hashes if h not in by_hash]:
        raise DataError(f"accepted batch(es) {', '.join(missing)} are no longer in {incoming}")
    chosen = [by_hash[h] for h in hashes]
    if not chosen:
        return np.empty((0, idx.ROWS, idx.COLS), np.uint8), np.empty((0,), np.uint8)
    return np.concatenate([b.x for b in chosen]), np.concatenate([b.y for b in chosen])


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = [k for k in ("x", "y") if k in npz.files]
            # Sizes from the .npy headers first: a small compressed file may unpack to gigabytes.
            declared = {k: _declared_items(npz.zip, k) for k in keys}
            arrays = {k: npz[k] for k in keys if declared[k] <= MAX_IMAGES}
            held = ", ".join(npz.files) or "none"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    if too_many := [k for k in keys if declared[k] > MAX_IMAGES]:
        raise DataError(f"{path}: {too_many[0]} declares {declared[too_many[0]]:,} rows, more than the "
                        f"{MAX_IMAGES:,} images a batch may hold; split it")
    if missing := [k for k in ("x", "y") if k not in arrays]:
        raise DataError(f"{path}: no array {' or '.join(missing)} (it holds {held})")
    x, y = arrays["x"], arrays["y"]
    if x.ndim != 3:
        raise DataError(f"{path}: x has shape {x.shape}, expected N x 28 x 28 images")
    if y.ndim != 1:
        raise DataError(f"{path}: y has shape {y.shape}, expected one label per image")
    for key, array in (("x", x), ("y", y)):
        if array.dtype.kind not in "biuf":  # strings or objects: no statistic of the validation applies
            raise DataError(f"{path}: {key} holds {array.dtype} values, expected numbers")
    idx.check_pair(x, y, f"{path} x", f"{path} y")
    return x, y


def _declared_items(archive: zipfile.ZipFile, key: str) -> int:
    """The length of the first axis that an array's .npy header declares, read without unpacking the array."""
    with archive.open(f"{key}.npy") as file:
        version = np.lib.format.read_magic(file)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read(file)[0]
    return int(shape[0]) if shape else 1


def _read_directory(path: Path) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    images = [p for p in files if p.is_file() and "idx3" in p.name]
    labels = [p for p in files if p.is_file() and "idx1" in p.name]
    folders = [p for p in files if p.is_dir()]
    if (images or labels) and folders:
        raise DataError(f"{path}: mixes IDX files and class folders; a batch is one or the other")
    if images or labels:
        if len(images) != 1 or len(labels) != 1:
            raise DataError(f"{path}: expected one IDX image file (name containing idx3) and one label file "
                            f"(idx1), found {len(images)} and {len(labels)}")
        x = idx.read_idx(images[0], idx.IMAGES_MAGIC, (None, idx.ROWS, idx.COLS), MAX_IMAGES)
        y = idx.read_idx(labels[0], idx.LABELS_MAGIC, (None,), MAX_IMAGES)
        idx.check_pair(x, y, str(images[0]), str(labels[0]))
        return x, y
    if not folders:
        raise DataError(f"{path}: holds neither an IDX image/label pair nor class folders 0..9 of PNG files")
    return _read_class_folders(path, folders)


def _read_class_folders(path: Path, folders: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    from tasks.data.images import ImageError, prepare  # Pillow only when a batch holds PNG files

    if bad := [f.name for f in folders if f.name not in CLASS_FOLDERS]:
        raise DataError(f"{path}: folder(s) {', '.join(bad)} are not classes 0..9")
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    for folder in folders:
        for file in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
            if not (file.is_file() and file.suffix.lower() == ".png"):
                raise DataError(f"{file}: not a PNG file; class folders hold PNG files only")
            try:
                pixels.append(prepare(file))
            except ImageError as exc:
                raise DataError(str(exc)) from None
            labels.append(int(folder.name))
    if not pixels:
        raise DataError(f"{path}: its class folders hold no PNG files")
    # predict's framing gives intensities in [0, 1]; MNIST stores them as bytes.
    x = np.rint(np.stack(pixels) * 255).astype(np.uint8).reshape(-1, idx.ROWS, idx.COLS)
    return x, np.asarray(labels, np.uint8)


def _uint8_if_lossless(array: np.ndarray) -> np.ndarray:
    """Integer arrays whose values fit in a byte become uint8 (npz files often hold int64 labels); others stay."""
    if array.dtype == np.uint8 or not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return array
    if array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    return array
