"""Great Expectations checks of a dataset and of an incoming batch, over a per-image summary frame."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tasks.config import ValidateConfig
from tasks.data import data_docs
from tasks.data.mnist import CLASSES, SIDE
from tasks.data.splits import Dataset
from tasks.document import percent
from tasks.stages.files import DOCS_DIR, DOCS_INDEX, VALIDATION_FILE

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
DRIFT_COLUMNS = ("ink_drift", "class_drift")
LABELS = list(range(CLASSES))
IMAGE_DTYPE = "uint8"
LABEL_DTYPE = "uint8"
# Both sets ship 60,000 training and 10,000 test images in the same IDX layout.
EXPECTED_ROWS: dict[str, dict[str, int]] = {
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion-mnist": {"train": 60_000, "test": 10_000},
}
_SITE = "local"


class ValidationFailed(Exception):
    """The dataset broke at least one expectation; `failures` holds one readable line per broken expectation."""

    def __init__(self, message: str, failures: list[str], summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.failures = failures
        self.summary = summary


# Summary frame ---------------------------------------------------------------------------------------------------

def summarize(ds: Dataset) -> pd.DataFrame:
    """One row per image: split, position, label, shape, dtypes, pixel statistics, content hash, leakage flag.

    Works on arrays of any dtype (float images with NaN, float or out-of-range labels) so that a
    corrupted artifact is described, and then reported by the suite, rather than crashing here.
    The accepted incoming batches are training images too and follow the base ones.
    """
    x_train, y_train = ds.x_train, ds.y_train
    if len(ds.y_batches):
        x_train, y_train = np.concatenate([x_train, ds.x_batches]), np.concatenate([y_train, ds.y_batches])
    train = _summarize_split("train", x_train, y_train)
    test = _summarize_split("test", ds.x_test, ds.y_test)
    # Only test rows are flagged, so each leaked image is counted once.
    test["in_other_split"] = test["hash"].isin(set(train["hash"]))
    return pd.concat([train, test], ignore_index=True)


def _summarize_split(split: str, images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per-image summary of one split."""
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{split}: {n} images but {len(labels)} labels")
    flat = np.ascontiguousarray(images.reshape(n, -1))
    floating = np.issubdtype(flat.dtype, np.floating)
    label_values = np.asarray(labels, dtype=np.float64)
    return pd.DataFrame({
        "split": split,
        "position": np.arange(n),
        "label": label_values,
        "label_dtype": str(labels.dtype),
        "dtype": str(images.dtype),
        "height": images.shape[1] if images.ndim > 1 else 1,
        "width": math.prod(images.shape[2:]) if images.ndim > 2 else 1,
        "min": _per_image(flat, np.nanmin if floating else np.min),
        "max": _per_image(flat, np.nanmax if floating else np.max),
        "mean": _per_image(flat, np.nanmean if floating else np.mean),
        "ink": np.count_nonzero(flat > 0, axis=1),
        "has_nan": np.isnan(flat).any(axis=1) if floating else np.zeros(n, dtype=bool),
        "hash": _hashes(flat),
        "class_share": _class_share(label_values),
        "in_other_split": False,
    })


def _hashes(flat: np.ndarray) -> list[str]:
    """A content hash per image row, so that equal images are found across splits and batches."""
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat]


def _per_image(flat: np.ndarray, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """Row-wise reduction as float64; an all-NaN or empty image gives NaN, which the has_nan check reports."""
    if flat.shape[1] == 0:
        return np.full(len(flat), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(reduce(flat, axis=1), dtype=np.float64)


def _class_share(labels: np.ndarray) -> np.ndarray:
    """Each image's class share within its split, so one column expectation bounds every class at once."""
    series = pd.Series(labels)
    return series.map(series.value_counts(normalize=True)).to_numpy(dtype=np.float64)


@dataclass(frozen=True)
class Reference:
    """What a new batch is checked against: the training images accepted so far and the test images."""

    train_hashes: frozenset[str]
    test_hashes: frozenset[str]
    ink: np.ndarray  # per accepted training image
    mean: np.ndarray
    labels: np.ndarray


def reference(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> Reference:
    """The reference of the accepted training images (base and batches) and the test images."""
    train = np.ascontiguousarray(x_train.reshape(len(x_train), -1))
    test = np.ascontiguousarray(x_test.reshape(len(x_test), -1))
    return Reference(frozenset(_hashes(train)), frozenset(_hashes(test)), np.count_nonzero(train > 0, axis=1),
                     train.mean(axis=1), np.asarray(y_train, np.float64))


def summarize_batch(x: np.ndarray, y: np.ndarray, ref: Reference, alpha: float) -> pd.DataFrame:
    """The per-image summary of a new batch, plus what only new data can break: duplicates and drift.

    Drift is tested with the two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp) against the accepted
    images: of the ink per image (pixels above 0) over the batch, at level `alpha`, and of the mean intensity per
    image within each class, at `alpha` / 10 (Bonferroni over the classes). Both statistics are unchanged by
    shifting a digit, but not by inverting it, by another scanner's contrast or by labels that name the wrong
    digits. Clean batches from other writers differ significantly too when they are large (MNIST's own training
    slices do, at distances D up to 0.22), so `ink_drift` and `class_drift` hold the KS distance D where the
    test is significant (0 where it is not) for the suite to bound; each row carries its test's numbers, so one
    column expectation covers them all.
    """
    frame = _summarize_split("batch", x, y)
    frame["in_test"] = frame["hash"].isin(ref.test_hashes)
    frame["in_accepted"] = frame["hash"].isin(ref.train_hashes)
    frame["ink_ks_d"], frame["ink_ks_p"] = _ks(frame["ink"].to_numpy(np.float64), ref.ink)
    distance, p_value = np.zeros(len(frame)), np.ones(len(frame))
    labels, means = frame["label"].to_numpy(), frame["mean"].to_numpy()
    for label in np.unique(labels[~np.isnan(labels)]):
        rows, accepted = labels == label, ref.labels == label
        if accepted.any():
            distance[rows], p_value[rows] = _ks(means[rows], ref.mean[accepted])
    frame["class_ks_d"], frame["class_ks_p"] = distance, p_value
    frame["ink_drift"] = frame["ink_ks_d"].where(frame["ink_ks_p"] < alpha, 0.0)
    frame["class_drift"] = frame["class_ks_d"].where(frame["class_ks_p"] < alpha / CLASSES, 0.0)
    return frame


def _ks(sample: np.ndarray, accepted: np.ndarray) -> tuple[float, float]:
    """Distance D and p-value of the two-sample Kolmogorov-Smirnov test (NaN left out); (0, 1) for an empty sample."""
    from scipy.stats import ks_2samp

    sample = sample[~np.isnan(sample)]
    if not len(sample) or not len(accepted):
        return 0.0, 1.0
    result = ks_2samp(sample, accepted)
    return float(result.statistic), float(result.pvalue)


# Expectation suite -----------------------------------------------------------------------------------------------

def _import_gx() -> Any:
    """Import Great Expectations with analytics off; imported lazily because the import alone takes seconds."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx

    return gx


def build_expectations(cfg: ValidateConfig, expected_rows: Mapping[str, int]) -> list[Expectation]:
    """The checks, in the order the report lists them; each carries a plain-English description."""
    gx = _import_gx()
    from great_expectations.expectations.row_conditions import Column

    e = gx.expectations
    in_split = {s: Column("split") == s for s in SPLITS}
    share = f"{percent(cfg.min_class_share, None)} to {percent(cfg.max_class_share, None)}"
    return [
        *(e.ExpectTableRowCountToEqual(value=expected_rows[s], row_condition=in_split[s],
                                       description=f"{s} has {expected_rows[s]:,} images") for s in SPLITS),
        *_image_expectations(e),
        *(e.ExpectColumnDistinctValuesToContainSet(column="label", value_set=LABELS, row_condition=in_split[s],
                                                   description=f"every class 0..9 present in {s}") for s in SPLITS),
        *(e.ExpectColumnValuesToBeBetween(column="class_share", min_value=cfg.min_class_share,
                                          max_value=cfg.max_class_share, row_condition=in_split[s],
                                          description=f"{s} class shares within {share}",
                                          meta={"unexpected": "image(s) in classes outside these shares"})
          for s in SPLITS),
        e.ExpectColumnValuesToBeInSet(column="in_other_split", value_set=[False], row_condition=in_split["test"],
                                      description="no test image duplicates a training image",
                                      meta={"unexpected": "test image(s) duplicate training images"}),
    ]


def _image_expectations(e: Any) -> list[Expectation]:
    """The checks every image and label must pass, in the base data and in every new batch."""
    return [
        e.ExpectColumnValuesToBeInSet(column="dtype", value_set=[IMAGE_DTYPE], description="images are uint8"),
        e.ExpectColumnValuesToBeInSet(column="height", value_set=[SIDE], description="images are 28 pixels high"),
        e.ExpectColumnValuesToBeInSet(column="width", value_set=[SIDE], description="images are 28 pixels wide"),
        e.ExpectColumnValuesToBeBetween(column="min", min_value=0, max_value=255,
                                        description="darkest pixel in 0..255"),
        e.ExpectColumnValuesToBeBetween(column="max", min_value=0, max_value=255,
                                        description="brightest pixel in 0..255"),
        e.ExpectColumnValuesToBeInSet(column="has_nan", value_set=[False], description="no NaN pixels",
                                      meta={"unexpected": "image(s) with NaN pixels"}),
        e.ExpectColumnValuesToBeBetween(column="ink", min_value=1, description="no blank images",
                                        meta={"unexpected": "blank image(s)"}),
        e.ExpectColumnValuesToBeInSet(column="label_dtype", value_set=[LABEL_DTYPE], description="labels are uint8"),
        e.ExpectColumnValuesToNotBeNull(column="label", description="no missing labels",
                                        meta={"unexpected": "missing label(s)"}),
        e.ExpectColumnValuesToBeInSet(column="label", value_set=LABELS, description="labels in 0..9"),
    ]


def build_batch_expectations(cfg: ValidateConfig) -> list[Expectation]:
    """The checks of a new batch (a `summarize_batch` frame) before it may join the training data."""
    e = _import_gx().expectations
    share = f"{percent(cfg.min_class_share, None)} to {percent(cfg.max_class_share, None)}"
    rule = f"two-sample KS distance below {cfg.drift_max_distance:g} where p < "
    return [
        *_image_expectations(e),
        e.ExpectColumnValuesToBeBetween(column="class_share", min_value=cfg.min_class_share,
                                        max_value=cfg.max_class_share, description=f"class shares within {share}",
                                        meta={"unexpected": "image(s) in classes outside these shares"}),
        e.ExpectColumnValuesToBeUnique(column="hash", description="no image appears twice in the batch",
                                       meta={"unexpected": "repeated image(s)"}),
        e.ExpectColumnValuesToBeInSet(column="in_test", value_set=[False],
                                      description="no image duplicates a test image",
                                      meta={"unexpected": "image(s) that duplicate test images"}),
        e.ExpectColumnValuesToBeInSet(column="in_accepted", value_set=[False],
                                      description="no image duplicates an accepted training image",
                                      meta={"unexpected": "image(s) that duplicate accepted training images"}),
        e.ExpectColumnValuesToBeBetween(column="ink_drift", max_value=cfg.drift_max_distance, strict_max=True,
                                        description="ink per image distributed as in the accepted data "
                                                    f"({rule}{cfg.drift_alpha:g})"),
        e.ExpectColumnValuesToBeBetween(column="class_drift", max_value=cfg.drift_max_distance, strict_max=True,
                                        description="mean intensity per image distributed as in the accepted "
                                                    f"data, class by class ({rule}{cfg.drift_alpha / CLASSES:g})"),
    ]


def _context(docs_dir: Path) -> AbstractDataContext:
    """An in-memory context whose only file output is a Data Docs site under `docs_dir`."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={_SITE: {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_how_to_buttons": False},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        }},
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_checkpoint(frame: pd.DataFrame, expectations: list[Expectation], name: str,
                    docs_dir: Path) -> ExpectationSuiteValidationResult:
    """Validate `frame` through a checkpoint whose action renders the result into the Data Docs site."""
    gx = _import_gx()
    context = _context(docs_dir)
    batch = (context.data_sources.add_pandas(name).add_dataframe_asset("images")
             .add_batch_definition_whole_dataframe("all images"))
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update data docs", site_names=[_SITE])],
        result_format={"result_format": "SUMMARY"},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


# Reporting -------------------------------------------------------------------------------------------------------

def describe_failure(result: Mapping[str, Any], frame: pd.DataFrame) -> tuple[str, str, str]:
    """What a failed expectation result (JSON form) checked, where, and the problem observed."""
    config = result["expectation_config"]
    kwargs = config["kwargs"]
    where = config["type"]
    if "column" in kwargs:
        where += f" on column {kwargs['column']}"
    if cond := kwargs.get("row_condition"):
        where += f" where {cond['column']['name']} == {cond['parameter']}"
    return config.get("description") or config["type"], where, _problem(result, frame)


def _problem(result: Mapping[str, Any], frame: pd.DataFrame) -> str:
    """The observed problem of a failed result, with examples pointing at images."""
    config, found = result["expectation_config"], result.get("result") or {}
    if (result.get("exception_info") or {}).get("raised_exception"):
        return f"could not be evaluated: {result['exception_info']['exception_message']}"
    if config["type"] == "expect_table_row_count_to_equal":
        return f"observed {found.get('observed_value') or 0:,} rows, expected {config['kwargs']['value']:,}"
    if config["type"] == "expect_column_distinct_values_to_contain_set":
        missing = ", ".join(_show(v) for v in found.get("partial_missing_list", []))
        return f"class(es) {missing} missing"
    if config["kwargs"].get("column") in DRIFT_COLUMNS:
        return _drift(frame, config["kwargs"]["column"])
    noun = (config.get("meta") or {}).get("unexpected")
    examples = _examples(frame, config["kwargs"]["column"], found, show_value=noun is None)
    count = f"{found.get('unexpected_count', 0):,} {noun or 'unexpected value(s)'}"
    return count + (f", e.g. {', '.join(examples)}" if examples else "")


def _drift(frame: pd.DataFrame, column: str, limit: int = 4) -> str:
    """The drift test's numbers: overall, or for the classes that drifted, farthest first."""
    prefix = column.removesuffix("_drift")
    if prefix == "ink":
        row = frame.iloc[0]
        return (f"KS D={row['ink_ks_d']:.2f}, p={row['ink_ks_p']:.2g}; this batch's median ink is "
                f"{frame['ink'].median():.0f} pixels per image")
    by_class = frame.groupby("label")[["class_drift", "class_ks_d", "class_ks_p"]].first()
    drifted = by_class[by_class["class_drift"] > 0].sort_values("class_ks_d", ascending=False)
    shown = ", ".join(f"class {_show(label)} D={row['class_ks_d']:.2f} p={row['class_ks_p']:.2g}"
                      for label, row in drifted.iloc[:limit].iterrows())
    return f"{len(drifted)} class(es) drifted: {shown}" + (", ..." if len(drifted) > limit else "")


def _examples(frame: pd.DataFrame, column: str, found: Mapping[str, Any], show_value: bool,
              limit: int = 3) -> list[str]:
    """Up to `limit` distinct examples of unexpected rows, naming the image and, where it says something, the value."""
    values = found.get("partial_unexpected_list") or []
    indices = found.get("partial_unexpected_index_list") or [None] * len(values)
    shown: dict[str, str] = {}
    for value, index in zip(values, indices, strict=False):
        row = frame.loc[index] if index is not None and index in frame.index else None
        image = "" if row is None else f"{row['split']} image {row['position']}"
        if column == "class_share" and row is not None:
            key = text = f"class {_show(row['label'])} is {percent(value, 1)} of {row['split']}"
        elif show_value or not image:
            # One example per distinct value: "int64 (train image 0)", not the same dtype three times.
            key, text = _show(value), _show(value) + (f" ({image})" if image else "")
        else:
            key = text = image
        shown.setdefault(key, text)
        if len(shown) == limit:
            break
    return list(shown.values())


def _show(value: Any) -> str:
    """A value as people write it: 11 rather than 11.0, 'missing' for null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe_frame(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts for the report, computed independently of Great Expectations."""
    shares = frame.groupby("split")["label"].value_counts(normalize=True)
    return {
        "rows": {s: int((frame["split"] == s).sum()) for s in SPLITS},
        "class_share_range": [float(shares.min()), float(shares.max())] if len(shares) else None,
        "test_duplicates_of_train": int(frame["in_other_split"].sum()),
    }


def _paragraph(dataset: str, counts: dict[str, Any], total: int, failures: list[tuple[str, str, str]],
               cfg: ValidateConfig) -> str:
    """One plain-English paragraph for the report."""
    rows = counts["rows"]
    images = f"{rows['train']:,} training and {rows['test']:,} test images"
    if failures:
        problems = "; ".join(f"{title}: {problem}" for title, _, problem in failures)
        return (f"The {dataset} data failed {len(failures)} of {total} Great Expectations checks ({images}): "
                f"{problems}. The full results are in {VALIDATION_FILE} and the Data Docs at {DOCS_INDEX}.")
    low, high = counts["class_share_range"]
    return (f"The {dataset} data passed all {total} Great Expectations checks: {images}, every one a "
            f"{SIDE}x{SIDE} {IMAGE_DTYPE} image with pixel values in 0..255, no NaN and no blank image; "
            f"labels are {LABEL_DTYPE}, all in 0..9 with none missing, every class is present in both splits with "
            f"shares from {percent(low, 1)} to {percent(high, 1)} "
            f"(allowed {percent(cfg.min_class_share, None)} to {percent(cfg.max_class_share, None)}), "
            f"and no test image is an exact duplicate of a training image.")


# Stage -----------------------------------------------------------------------------------------------------------

def validate_frame(frame: pd.DataFrame, cfg: ValidateConfig, dataset: str, out: Path,
                   expected_rows: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Validate a `summarize` frame, write `validation.json` and the Data Docs site into `out`, return a summary.

    `expected_rows` maps split to image count; by default the dataset's published sizes (EXPECTED_ROWS).
    Raises ValidationFailed, after writing both outputs, when any expectation fails.
    """
    if expected_rows is None:
        if dataset not in EXPECTED_ROWS:
            raise ValueError(f"no expected row counts for dataset {dataset!r}; pass expected_rows")
        expected_rows = EXPECTED_ROWS[dataset]
    result, broken = _check(frame, build_expectations(cfg, expected_rows), f"{dataset}-images", out)
    failures = [f"{title} ({where}): {problem}" for title, where, problem in broken]
    counts = describe_frame(frame)
    summary = {
        "dataset": dataset,
        "success": bool(result["success"]) and not failures,
        "expectations": len(result["results"]),
        "failed": len(failures),
        "failures": failures,
        **counts,
        "validation": VALIDATION_FILE,
        "data_docs": DOCS_INDEX,
        "paragraph": _paragraph(dataset, counts, len(result["results"]), broken, cfg),
    }
    if failures:
        docs = out / DOCS_INDEX
        raise ValidationFailed(
            f"{dataset} failed {len(failures)} of {len(result['results'])} expectations "
            f"(Data Docs: {docs}):\n" + "\n".join(f"  - {line}" for line in failures),
            failures, summary)
    return summary


def _check(frame: pd.DataFrame, expectations: list[Expectation], name: str,
           out: Path) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Run the expectations on `frame`, write `validation.json` and the Data Docs into `out`; return the failures."""
    out.mkdir(parents=True, exist_ok=True)
    result = _run_checkpoint(frame, expectations, name, out / DOCS_DIR).to_json_dict()
    data_docs.make_offline(out / DOCS_DIR)
    (out / VALIDATION_FILE).write_text(json.dumps(result, indent=2, default=str))
    return result, [describe_failure(r, frame) for r in result["results"] if not r["success"]]


def validate_batch(name: str, x: np.ndarray, y: np.ndarray, ref: Reference, cfg: ValidateConfig,
                   out: Path) -> dict[str, Any]:
    """Validate a new batch against the accepted data; write `validation.json` and Data Docs into `out`.

    Raises ValidationFailed, after writing both, when any expectation fails.
    """
    frame = summarize_batch(x, y, ref, cfg.drift_alpha)
    suite = "batch-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    result, broken = _check(frame, build_batch_expectations(cfg), suite, out)
    failures = [f"{title} ({where}): {problem}" for title, where, problem in broken]
    counts = frame["label"].value_counts().sort_index()
    summary = {
        "batch": name,
        "images": len(frame),
        "success": bool(result["success"]) and not failures,
        "expectations": len(result["results"]),
        "failed": len(failures),
        "failures": failures,
        "classes": {_show(label): int(n) for label, n in counts.items()},
        "validation": VALIDATION_FILE,
        "data_docs": DOCS_INDEX,
    }
    if failures:
        raise ValidationFailed(
            f"batch {name} failed {len(failures)} of {len(result['results'])} expectations "
            f"(Data Docs: {out / DOCS_INDEX}):\n" + "\n".join(f"  - {line}" for line in failures),
            failures, summary)
    return summary


