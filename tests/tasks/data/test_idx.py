"""The IDX parser on the real MNIST test files, intact and damaged byte by byte."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from tasks.data.idx import (
    IMAGES_MAGIC,
    DataError,
    check_pair,
    encode_idx,
    parse_images,
    parse_labels,
    read_idx,
    read_payload,
)

IMAGES = "t10k-images-idx3-ubyte"
LABELS = "t10k-labels-idx1-ubyte"


@pytest.fixture(scope="module")
def payloads(mnist_mirror) -> dict[str, bytes]:
    return {name: gzip.decompress((mnist_mirror / f"{name}.gz").read_bytes()) for name in (IMAGES, LABELS)}


def test_parses_the_real_files_as_an_independent_reader_does(payloads):
    images = parse_images(payloads[IMAGES], IMAGES, 10000)
    labels = parse_labels(payloads[LABELS], LABELS, 10000)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    # Header offsets from the format's definition: 16 bytes for images, 8 for labels.
    assert struct.unpack(">4I", payloads[IMAGES][:16]) == (0x803, 10000, 28, 28)
    assert images[1234].tobytes() == payloads[IMAGES][16 + 1234 * 784:16 + 1235 * 784]
    assert labels.tolist() == list(payloads[LABELS][8:])
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_encode_idx_reproduces_the_canonical_payload(payloads):
    assert encode_idx(parse_images(payloads[IMAGES], IMAGES)) == payloads[IMAGES]
    assert encode_idx(parse_labels(payloads[LABELS], LABELS)) == payloads[LABELS]


def _with_header(payload: bytes, *fields: int) -> bytes:
    return struct.pack(f">{len(fields)}I", *fields) + payload[4 * len(fields):]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: _with_header(p, 0x801), "wrong magic number 0x00000801, expected 0x00000803"),
        (lambda p: _with_header(p, 0x0D03), "wrong magic number 0x00000d03"),  # float32 type byte
        (lambda p: _with_header(p, 0x803, 10000, 27), "header declares 27 rows, expected 28"),
        (lambda p: _with_header(p, 0x803, 10000, 28, 29), "header declares 29 columns, expected 28"),
        (lambda p: _with_header(p, 0x803, 9999), "header declares 9999 items, expected 10000"),
        (lambda p: p[:-1], "truncated payload (7839999 data bytes, header declares 7840000)"),
        (lambda p: p[:10], "truncated header (10 bytes, need 16)"),
        (lambda p: p + b"\0\0", "2 trailing bytes after the 7840000 data bytes"),
    ],
    ids=["labels-magic", "float-type", "rows", "columns", "count", "truncated", "short-header", "trailing"],
)
def test_damaged_images_are_rejected_naming_file_and_problem(payloads, damage, problem):
    with pytest.raises(DataError) as err:
        parse_images(damage(payloads[IMAGES]), IMAGES, 10000)
    assert str(err.value).startswith(f"{IMAGES}: ")
    assert problem in str(err.value)


def test_labels_with_the_images_magic_are_rejected(payloads):
    with pytest.raises(DataError, match=rf"^{LABELS}: wrong magic number 0x00000803, expected 0x00000801$"):
        parse_labels(_with_header(payloads[LABELS], 0x803), LABELS, 10000)


def test_one_label_per_image_is_required(payloads):
    images = parse_images(payloads[IMAGES], IMAGES)
    short = _with_header(payloads[LABELS][:-1], 0x801, 9999)
    labels = parse_labels(short, LABELS)  # no expected count: the file is consistent in itself
    with pytest.raises(DataError, match=rf"^{LABELS}: 9999 labels for the 10000 images of {IMAGES}$"):
        check_pair(images, labels, IMAGES, LABELS)


def test_read_payload_gunzips_or_reads_plain(tmp_path, payloads):
    (tmp_path / "plain").write_bytes(payloads[LABELS])
    (tmp_path / "packed.gz").write_bytes(gzip.compress(payloads[LABELS]))
    assert read_payload(tmp_path / "plain") == read_payload(tmp_path / "packed.gz") == payloads[LABELS]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda gz: gz[:len(gz) // 2], "corrupt gzip (Compressed file ended"),
        (lambda gz: gz[:-8] + (int.from_bytes(gz[-8:-4], "little") ^ 1).to_bytes(4, "little") + gz[-4:],
         "corrupt gzip (CRC check failed"),
        (lambda gz: b"PK" + gz[2:], "corrupt gzip (Not a gzipped file"),
    ],
    ids=["cut", "crc", "not-gzip"],
)
def test_corrupt_gzip_is_rejected_naming_the_file(tmp_path, mnist_mirror, damage, problem):
    path = tmp_path / f"{LABELS}.gz"
    path.write_bytes(damage((mnist_mirror / f"{LABELS}.gz").read_bytes()))
    with pytest.raises(DataError) as err:
        read_payload(path)
    assert str(err.value).startswith(f"{path}: {problem}")


def test_missing_file_is_reported_by_name(tmp_path):
    with pytest.raises(DataError, match=rf"^{LABELS}\.gz: missing$"):
        read_payload(tmp_path / f"{LABELS}.gz", f"{LABELS}.gz")


def test_read_idx_streams_the_same_array_and_refuses_what_the_payload_parser_refuses(tmp_path, mnist_mirror,
                                                                                     payloads):
    packed = mnist_mirror / f"{IMAGES}.gz"
    shape = (None, 28, 28)
    assert np.array_equal(read_idx(packed, IMAGES_MAGIC, shape, 10000), parse_images(payloads[IMAGES], IMAGES))
    with pytest.raises(DataError, match="header declares 10,000 items, more than the 9,999 accepted"):
        read_idx(packed, IMAGES_MAGIC, shape, 9999)
    cut = tmp_path / f"{IMAGES}.gz"
    cut.write_bytes(packed.read_bytes()[:100_000])
    with pytest.raises(DataError, match=rf"^{cut}: corrupt gzip \(Compressed file ended"):
        read_idx(cut, IMAGES_MAGIC, shape, 10000)
    plain = tmp_path / IMAGES
    plain.write_bytes(payloads[IMAGES] + b"\0")
    with pytest.raises(DataError, match=rf"^{plain}: 1 trailing bytes after the 7840000 data bytes"):
        read_idx(plain, IMAGES_MAGIC, shape, 10000)
