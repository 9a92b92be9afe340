"""Incoming batches in their three formats, parsed strictly; the per-batch Great Expectations suite on real digits."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from tasks.config import ValidateConfig
from tasks.data.batches import content_hash, entries, load_accepted, read_batch
from tasks.data.checks import ValidationFailed, reference, summarize_batch, validate_batch
from tasks.data.idx import DataError, encode_idx
from tasks.serve.predict import prepare


def test_npz_and_idx_pair_of_the_same_digits_are_the_same_batch(mnist, tmp_path):
    x, y = mnist.x_train[100:140], mnist.y_train[100:140]
    np.savez(tmp_path / "a.npz", x=x, y=y.astype(np.int64))  # int64 labels, as numpy writes them by default
    pair = tmp_path / "b"
    pair.mkdir()
    (pair / "new-images-idx3-ubyte.gz").write_bytes(gzip.compress(encode_idx(x)))
    (pair / "new-labels-idx1-ubyte").write_bytes(encode_idx(y))
    a, b = read_batch(tmp_path / "a.npz"), read_batch(pair)
    assert a.sha256 == b.sha256 == content_hash(x, y)
    assert a.x.dtype == a.y.dtype == np.uint8 and np.array_equal(a.y, y)
    assert [p.name for p in entries(tmp_path)] == ["a.npz", "b"]


def test_class_folders_of_pngs_are_converted_as_predict_converts(mnist, tmp_path):
    batch = tmp_path / "scans"
    expected = []
    for i, (image, label) in enumerate(zip(mnist.x_test[:6], mnist.y_test[:6], strict=True)):
        folder = batch / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - image).resize((56, 56)).save(folder / f"{i}.png")  # dark ink on white, larger
        expected.append((label, folder / f"{i}.png"))
    parsed = read_batch(batch)
    order = sorted(expected, key=lambda e: (str(e[0]), e[1].name))
    assert list(parsed.y) == [label for label, _ in order]
    for image, (_, path) in zip(parsed.x, order, strict=True):
        assert np.array_equal(image, np.rint(prepare(path).reshape(28, 28) * 255).astype(np.uint8))


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: (d / "b.npz").write_bytes(b"not a zip"), "b.npz: not a readable .npz"),
    (lambda d: np.savez(d / "b.npz", x=np.zeros((2, 28, 28), np.uint8)), "b.npz: no array y (it holds x)"),
    (lambda d: np.savez(d / "b.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(3, np.uint8)),
     "3 labels for the 2 images"),
    (lambda d: np.savez(d / "b.npz", x=np.zeros((2, 784), np.uint8), y=np.zeros(2, np.uint8)),
     "x has shape (2, 784), expected N x 28 x 28 images"),
    (lambda d: np.savez(d / "b.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.array(["a", "b"])),
     "y holds <U1 values, expected numbers"),
    (lambda d: (d / "b.csv").write_text("1,2"), "b.csv: not a batch"),
    (lambda d: (d / "b" / "12").mkdir(parents=True), "folder(s) 12 are not classes 0..9"),
    (lambda d: ((d / "b" / "3").mkdir(parents=True), (d / "b" / "3" / "x.jpg").write_bytes(b"")),
     "x.jpg: not a PNG file"),
    (lambda d: ((d / "b" / "3").mkdir(parents=True), (d / "b" / "3" / "x.png").write_bytes(b"no png")),
     "x.png: not a readable image"),
    (lambda d: ((d / "b").mkdir(), (d / "b" / "images-idx3-ubyte").write_bytes(encode_idx(np.zeros((1, 28, 28),
                                                                                             np.uint8)))),
     "expected one IDX image file (name containing idx3) and one label file (idx1), found 1 and 0"),
], ids=["not-zip", "no-y", "count", "flat", "text-labels", "csv", "bad-class", "jpeg", "bad-png", "no-labels"])
def test_bad_batches_are_refused_naming_the_file(tmp_path, make, message):
    make(tmp_path)
    (path,) = entries(tmp_path)
    with pytest.raises(DataError) as info:
        read_batch(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_an_accepted_batch_that_is_gone_is_named(mnist, tmp_path):
    with pytest.raises(DataError, match="accepted batch.*abcdef012345 are no longer in"):
        load_accepted(tmp_path, ("abcdef012345" + "0" * 52,))


@pytest.fixture(scope="module")
def ref(mnist):
    """The accepted data of a store without batches: all 60,000 training and 10,000 test images."""
    return reference(mnist.x_train, mnist.y_train, mnist.x_test)


def test_drift_and_duplicate_columns_match_an_independent_computation(mnist, ref):
    from scipy.stats import ks_2samp

    x, y = np.roll(mnist.x_train[50000:50600], (1, 1), axis=(1, 2)), mnist.y_train[50000:50600]
    x[5] = mnist.x_test[9]
    x[6] = mnist.x_train[7]
    frame = summarize_batch(x, y, ref, alpha=0.001)
    assert list(frame.index[frame["in_test"]]) == [5] and list(frame.index[frame["in_accepted"]]) == [6]
    ink = ks_2samp((x > 0).sum(axis=(1, 2)), (mnist.x_train > 0).sum(axis=(1, 2)))
    assert (frame["ink_ks_d"].iloc[0], frame["ink_ks_p"].iloc[0]) == pytest.approx((ink.statistic, ink.pvalue))
    threes = y == 3
    mean = ks_2samp(x[threes].mean(axis=(1, 2)), mnist.x_train[mnist.y_train == 3].mean(axis=(1, 2)))
    assert list(frame.loc[threes, "class_ks_d"]) == pytest.approx([mean.statistic] * threes.sum())
    assert list(frame.loc[threes, "class_ks_p"]) == pytest.approx([mean.pvalue] * threes.sum())


def test_other_writers_differ_significantly_but_not_far(mnist, ref):
    """MNIST's last 1,000 training images, shifted: KS p < 0.001 on ink, yet a distance far below the bound."""
    x, y = np.roll(mnist.x_train[59000:], (1, 1), axis=(1, 2)), mnist.y_train[59000:]
    frame = summarize_batch(x, y, ref, alpha=0.001)
    assert frame["ink_ks_p"].iloc[0] < 0.001 and frame["ink_drift"].iloc[0] == frame["ink_ks_d"].iloc[0]
    assert frame["ink_drift"].max() < 0.15 and frame["class_drift"].max() < 0.3


def test_inverted_images_drift(mnist, ref, tmp_path):
    """Another scanner's polarity: same digits, same labels, refused by both drift tests and named."""
    x, y = 255 - np.roll(mnist.x_train[50000:50600], (1, 1), axis=(1, 2)), mnist.y_train[50000:50600]
    with pytest.raises(ValidationFailed) as info:
        validate_batch("inverted", x, y, ref, ValidateConfig(), tmp_path)
    titles = {line.split(" (", 1)[0] for line in info.value.failures}
    assert titles == {"ink per image distributed as in the accepted data",
                      "mean intensity per image distributed as in the accepted data, class by class"}
    assert "10 class(es) drifted" in str(info.value)
    assert (tmp_path / "data_docs" / "index.html").is_file() and (tmp_path / "validation.json").is_file()


def test_data_add_refuses_a_bad_batch_before_copying_it(tmp_path, capsys):
    from flows.cli import main as cli

    bad, incoming = tmp_path / "week.npz", tmp_path / "incoming"
    np.savez(bad, x=np.zeros((3, 28, 28), np.uint8))
    settings = ["--store", str(tmp_path / "s"), "--set", f"data.incoming={incoming}"]
    assert cli(["data", "add", str(bad), *settings]) == 1
    assert capsys.readouterr().err == f"mnist-ae: {bad}: no array y (it holds x)\n"
    assert list(incoming.iterdir()) == []
    assert cli(["data", "list", "--store", str(tmp_path / "s")]) == 2
    assert "data.incoming: no incoming directory is configured" in capsys.readouterr().err
