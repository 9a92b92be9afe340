"""Strict reader (and writer) of the IDX format that MNIST and Fashion-MNIST ship in."""

from __future__ import annotations

import gzip
import io
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tasks.data.mnist import SIDE

# Magic number = two zero bytes, a type byte (0x08 = unsigned byte) and the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
ROWS = COLS = SIDE
_AXES = {IMAGES_MAGIC: ("items", "rows", "columns"), LABELS_MAGIC: ("items",)}
_TRAILING = 1 << 20  # bytes read past the declared data to name what follows it


class DataError(ValueError):
    """A data file is missing, damaged or not what it claims to be; the message names the file and the problem."""


def read_payload(path: Path, name: str | None = None) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz; `name` is how errors refer to it."""
    with _opened(path, name or str(path)) as stream:
        return stream.read()


def parse_idx(payload: bytes, name: str, magic: int, shape: tuple[int | None, ...]) -> np.ndarray:
    """The uint8 array of an IDX payload whose magic and dimensions must equal `magic` and `shape` (None: any)."""
    return _read_idx(io.BytesIO(payload), name, magic, shape)


def read_idx(path: Path, magic: int, shape: tuple[int | None, ...], max_items: int) -> np.ndarray:
    """The array of an IDX file (gunzipped as it is read when its name ends in .gz) of at most `max_items` items.

    The header is checked before the data is read, and at most a little past the declared data: a small file that
    unpacks to gigabytes is refused without being unpacked.
    """
    with _opened(path, str(path)) as stream:
        return _read_idx(stream, str(path), magic, shape, max_items)


@contextmanager
def _opened(path: Path, name: str) -> Iterator[io.BufferedIOBase]:
    """The file as a stream, gunzipped as it is read when its name ends in .gz; its faults become DataErrors."""
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{name}: missing") from None
    except OSError as exc:
        raise DataError(f"{name}: unreadable ({exc.strerror})") from None
    with raw:
        if path.suffix != ".gz":
            yield raw
            return
        try:
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream
        except (OSError, EOFError, zlib.error) as exc:  # bad header, cut-off stream, bad deflate data or CRC
            raise DataError(f"{name}: corrupt gzip ({exc})") from None


def _read_idx(stream: io.BufferedIOBase, name: str, magic: int, shape: tuple[int | None, ...],
              max_items: int | None = None) -> np.ndarray:
    """Read one IDX array from `stream`, checking magic, dimensions and size before reading the data."""
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{name}: truncated header ({len(head)} bytes)")
    found = int.from_bytes(head, "big")
    if found != magic:
        raise DataError(f"{name}: wrong magic number 0x{found:08x}, expected 0x{magic:08x}")
    header = 4 + 4 * len(shape)
    head += stream.read(header - 4)
    if len(head) < header:
        raise DataError(f"{name}: truncated header ({len(head)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(head, ">u4", count=len(shape), offset=4))
    for axis, got, want in zip(_AXES.get(magic, ("items",) * len(shape)), dims, shape, strict=True):
        if want is not None and got != want:
            raise DataError(f"{name}: header declares {got} {axis}, expected {want}")
    if max_items is not None and dims[0] > max_items:
        raise DataError(f"{name}: header declares {dims[0]:,} items, more than the {max_items:,} accepted; "
                        "split it into smaller files")
    size = math.prod(dims)
    body = stream.read(size)
    if len(body) < size:
        raise DataError(f"{name}: truncated payload ({len(body)} data bytes, header declares {size})")
    # A bounded look past the data: a stream holding more than its header says is not read to its end.
    if trailing := len(stream.read(_TRAILING + 1)):
        count = f"more than {_TRAILING}" if trailing > _TRAILING else str(trailing)
        raise DataError(f"{name}: {count} trailing bytes after the {size} data bytes the header declares")
    return np.frombuffer(body, np.uint8).reshape(dims)


def parse_images(payload: bytes, name: str, count: int | None = None) -> np.ndarray:
    """Images (n, 28, 28) of an idx3-ubyte payload; `count` is the expected n."""
    return parse_idx(payload, name, IMAGES_MAGIC, (count, ROWS, COLS))


def parse_labels(payload: bytes, name: str, count: int | None = None) -> np.ndarray:
    """Labels (n,) of an idx1-ubyte payload; `count` is the expected n."""
    return parse_idx(payload, name, LABELS_MAGIC, (count,))


def check_pair(images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str) -> None:
    """Fail unless there is one label per image."""
    if len(images) != len(labels):
        raise DataError(f"{labels_name}: {len(labels)} labels for the {len(images)} images of {images_name}")


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX payload of a uint8 array, byte-identical to the canonical files for their arrays."""
    if array.dtype != np.uint8:
        raise ValueError(f"IDX here holds unsigned bytes only, got {array.dtype}")
    header = (0x0800 | array.ndim).to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()
