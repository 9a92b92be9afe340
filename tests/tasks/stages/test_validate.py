"""The validate stage on the real MNIST files, then on corrupted copies of a real slice."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tasks.config import DataConfig, ValidateConfig
from tasks.data.checks import EXPECTED_ROWS, ValidationFailed, summarize, validate_frame
from tasks.data.splits import Dataset
from tasks.stages import download
from tasks.stages.validate import run

SMALL = {"train": 2000, "test": 500}
CFG = ValidateConfig()


@pytest.fixture(scope="module")
def small(mnist) -> Dataset:
    """A real slice: the first 2,000 training and 500 test images, writable copies to corrupt."""
    return Dataset(mnist.x_train[:SMALL["train"]].copy(), mnist.y_train[:SMALL["train"]].copy(),
                   mnist.x_test[:SMALL["test"]].copy(), mnist.y_test[:SMALL["test"]].copy())


@pytest.fixture(scope="module")
def full_run(mnist_mirror, tmp_path_factory) -> tuple[dict, Path, list[str]]:
    """Run the stage once on the download stage's artifact (all 70,000 images), from an empty working directory."""
    data_dir = tmp_path_factory.mktemp("download")
    download.run(DataConfig(mirror=mnist_mirror, offline=True), data_dir)
    out = tmp_path_factory.mktemp("validate")
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        summary = run(CFG, data_dir, "mnist", out)
    return summary, out, os.listdir(cwd)


def fail(ds: Dataset, tmp_path: Path, rows: dict[str, int] = SMALL, cfg: ValidateConfig = CFG) -> ValidationFailed:
    """Validate a corrupted dataset, expecting failure; check the outputs were written before the raise."""
    with pytest.raises(ValidationFailed) as info:
        validate_frame(summarize(ds), cfg, "mnist", tmp_path, expected_rows=rows)
    exc = info.value
    assert "data_docs/index.html" in str(exc)
    assert (tmp_path / "data_docs" / "index.html").is_file()
    assert json.loads((tmp_path / "validation.json").read_text())["success"] is False
    assert len(exc.failures) == exc.summary["failed"] > 0
    for line in exc.failures:
        assert line in str(exc)
    return exc


def titles(exc: ValidationFailed) -> set[str]:
    return {line.split(" (", 1)[0] for line in exc.failures}


# The real data ---------------------------------------------------------------------------------------------------

def test_full_mnist_passes_and_writes_its_outputs(full_run):
    summary, out, _ = full_run
    assert summary["success"] is True
    assert summary["failed"] == 0 and summary["expectations"] == 17
    assert summary["rows"] == EXPECTED_ROWS["mnist"] == {"train": 60_000, "test": 10_000}
    assert summary["test_duplicates_of_train"] == 0
    result = json.loads((out / "validation.json").read_text())
    assert result["success"] is True and len(result["results"]) == 17
    index = out / "data_docs" / "index.html"
    assert index.is_file() and "mnist-images" in index.read_text()
    assert list((out / "data_docs" / "validations").rglob("*.html"))
    assert "passed all 17" in summary["paragraph"] and "60,000 training and 10,000 test" in summary["paragraph"]
    json.dumps(summary)


def test_full_run_leaves_no_great_expectations_project_behind(full_run):
    _, out, cwd_entries = full_run
    assert cwd_entries == []
    assert sorted(p.name for p in out.iterdir()) == ["data_docs", "validation.json"]


def test_summary_matches_an_independent_computation(mnist):
    frame = summarize(Dataset(mnist.x_train[:50], mnist.y_train[:50], mnist.x_test[:20], mnist.y_test[:20]))
    assert len(frame) == 70 and list(frame["split"].unique()) == ["train", "test"]
    image, row = mnist.x_test[7], frame[(frame["split"] == "test") & (frame["position"] == 7)].iloc[0]
    assert row["label"] == mnist.y_test[7]
    assert (row["min"], row["max"], row["ink"]) == (image.min(), image.max(), (image > 0).sum())
    assert row["mean"] == pytest.approx(image.mean())
    assert row["hash"] == hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
    assert (row["dtype"], row["height"], row["width"], row["has_nan"]) == ("uint8", 28, 28, False)
    share = (mnist.y_train[:50] == mnist.y_train[0]).mean()
    assert frame.loc[0, "class_share"] == pytest.approx(share)


def test_summary_rejects_labels_that_do_not_match_the_images(small):
    with pytest.raises(ValueError, match="500 images but 499 labels"):
        summarize(replace(small, y_test=small.y_test[:-1]))


def test_unknown_dataset_needs_expected_counts(small, tmp_path):
    with pytest.raises(ValueError, match="pass expected_rows"):
        validate_frame(summarize(small), CFG, "kmnist", tmp_path)


def test_small_real_slice_passes_with_its_own_counts_and_never_opens_a_socket(small, tmp_path, monkeypatch):
    attempts: list[object] = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address))
    summary = validate_frame(summarize(small), CFG, "mnist", tmp_path, expected_rows=SMALL)
    assert summary["success"] is True and summary["rows"] == SMALL
    assert attempts == []


# Corrupted variants ----------------------------------------------------------------------------------------------

def test_label_out_of_range(small, tmp_path):
    y = small.y_train.copy()
    y[3] = 11
    exc = fail(replace(small, y_train=y), tmp_path)
    assert "labels in 0..9 (expect_column_values_to_be_in_set on column label): " \
           "1 unexpected value(s), e.g. 11 (train image 3)" in exc.failures
    # A class of one image is also far below the minimum share.
    assert titles(exc) == {"labels in 0..9", "train class shares within 5 % to 15 %"}
    assert "class 11 is 0.1 % of train" in str(exc)


def test_nan_pixel_in_float_images(small, tmp_path):
    x = small.x_train.astype(np.float32)
    x[5, 14, 14] = np.nan
    exc = fail(replace(small, x_train=x), tmp_path)
    assert titles(exc) == {"no NaN pixels", "images are uint8"}
    assert any(line.endswith("1 image(s) with NaN pixels, e.g. train image 5") for line in exc.failures)


def test_missing_label_in_float_labels(small, tmp_path):
    y = small.y_test.astype(np.float64)
    y[7] = np.nan
    exc = fail(replace(small, y_test=y), tmp_path)
    assert titles(exc) == {"no missing labels", "labels are uint8"}
    assert any(line.endswith("1 missing label(s), e.g. test image 7") for line in exc.failures)


def test_test_images_copied_from_train_are_leakage(small, tmp_path):
    x = small.x_test.copy()
    x[[4, 40, 400]] = small.x_train[[10, 11, 12]]
    exc = fail(replace(small, x_test=x), tmp_path)
    assert titles(exc) == {"no test image duplicates a training image"}
    assert "3 test image(s) duplicate training images, e.g. test image 4, test image 40, test image 400" in str(exc)
    assert exc.summary["test_duplicates_of_train"] == 3


def test_missing_class(small, tmp_path):
    keep = small.y_train != 7
    rows = {"train": int(keep.sum()), "test": SMALL["test"]}
    exc = fail(replace(small, x_train=small.x_train[keep], y_train=small.y_train[keep]), tmp_path, rows)
    assert exc.failures == ["every class 0..9 present in train (expect_column_distinct_values_to_contain_set on "
                            "column label where split == train): class(es) 7 missing"]


def test_class_share_bounds_come_from_the_config(small, tmp_path):
    exc = fail(small, tmp_path, cfg=ValidateConfig(min_class_share=0.105, max_class_share=0.5))
    assert titles(exc) == {"train class shares within 10.5 % to 50 %", "test class shares within 10.5 % to 50 %"}


def test_wrong_row_count(small, tmp_path):
    exc = fail(replace(small, x_test=small.x_test[:-1], y_test=small.y_test[:-1]), tmp_path)
    assert exc.failures == ["test has 500 images (expect_table_row_count_to_equal where split == test): "
                            "observed 499 rows, expected 500"]


def test_full_size_counts_are_the_default(small, tmp_path):
    with pytest.raises(ValidationFailed) as info:
        validate_frame(summarize(small), CFG, "fashion-mnist", tmp_path)
    assert titles(info.value) == {"train has 60,000 images", "test has 10,000 images"}


def test_wrong_image_dtype(small, tmp_path):
    exc = fail(replace(small, x_train=small.x_train.astype(np.int64)), tmp_path)
    assert exc.failures == ["images are uint8 (expect_column_values_to_be_in_set on column dtype): "
                            "2,000 unexpected value(s), e.g. int64 (train image 0)"]


def test_wrong_shape_and_out_of_range_pixels(small, tmp_path):
    x = small.x_test.reshape(len(small.x_test), -1).astype(np.uint16)
    x[2, 300] = 300
    exc = fail(replace(small, x_test=x), tmp_path)
    assert titles(exc) == {"images are uint8", "images are 28 pixels high", "images are 28 pixels wide",
                           "brightest pixel in 0..255"}
    assert "1 unexpected value(s), e.g. 300 (test image 2)" in str(exc)
