"""The one typed configuration object of the pipeline, and its named profiles."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

Stage = Literal["download", "validate", "pretrain", "finetune", "baselines", "evaluate", "report"]
STAGES: tuple[Stage, ...] = ("download", "validate", "pretrain", "finetune", "baselines", "evaluate", "report")
Optimizer = Literal["rmsprop_tf1", "rmsprop", "adam", "sgd"]
Init = Literal["normal", "glorot_uniform", "he_normal"]
Activation = Literal["sigmoid", "relu"]
Schedule = Literal["constant", "cosine"]
DatasetName = Literal["mnist", "fashion-mnist"]
StudyModel = Literal["pretrained", "ann", "softmax", "semi-pretrained", "semi-scratch"]
Unlabeled = Literal["none", "vat"]
HeadInit = Literal["zeros", "glorot_uniform"]
# How a pretrained encoder is fine-tuned: all layers at once; the head alone for the first half of the steps, then
# everything; or all at once with the encoder's layers at a tenth of the learning rate.
Tuning = Literal["joint", "head_first", "slow_encoder"]

MIRROR_ENV = "MNIST_MIRROR"
OFFLINE_ENV = "MNIST_AE_OFFLINE"
STORE_ENV = "MNIST_AE_STORE"
INCOMING_ENV = "MNIST_AE_INCOMING"
TRAINING_IMAGES = 60_000  # in MNIST and Fashion-MNIST alike
STUDY_MIN_BUDGET = 10  # one label per class


class SplitSpec(TypedDict):
    """`DataConfig.split()`: the keyword arguments of `tasks.data.splits.split`."""

    validation_size: int
    train_size: int | None
    test_size: int | None


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    """Where the data comes from and how it is split (TF1's reader held out the first 5,000 training images)."""

    dataset: DatasetName = "mnist"
    mirror: Path | None = Field(default=None, description=f"Local directory with the four IDX files; env {MIRROR_ENV}.")
    offline: bool = Field(default=False, description=f"Never use the network; env {OFFLINE_ENV}=1.")
    validation_size: NonNegativeInt = 5000
    train_size: PositiveInt | None = Field(default=None, description="Training images after the hold-out; None = all.")
    test_size: PositiveInt | None = Field(default=None, description="Test images; None = all.")
    incoming: Path | None = Field(default=None,
                                  description=f"Directory where labeled batches arrive; env {INCOMING_ENV}.")
    batches: tuple[str, ...] = Field(
        default=(), description="Content hashes of the accepted incoming batches the training data includes; each "
                                "run sets them from the batches it accepted (tasks/data/intake.py), not by hand.")

    @field_validator("mirror")
    @classmethod
    def _mirror_readable(cls, v: Path | None) -> Path | None:
        if v is not None and not (v.is_dir() and os.access(v, os.R_OK | os.X_OK)):
            raise ValueError(f"{v} is not a readable directory")
        return v

    @field_validator("incoming")
    @classmethod
    def _incoming_directory(cls, v: Path | None) -> Path | None:
        if v is not None and v.exists() and not v.is_dir():
            raise ValueError(f"{v} is not a directory")
        # Absolute, so that a stage on a Dask worker with another working directory finds the same batches.
        return None if v is None else v.resolve()

    def split(self) -> SplitSpec:
        """The fields that decide which images the model stages see."""
        return {"validation_size": self.validation_size, "train_size": self.train_size, "test_size": self.test_size}


class ValidateConfig(_Section):
    min_class_share: float = Field(default=0.05, gt=0, lt=1)
    max_class_share: float = Field(default=0.15, gt=0, le=1)
    drift_alpha: float = Field(default=0.001, gt=0, lt=1, description=(
        "Significance level of the two-sample Kolmogorov-Smirnov tests of a new batch against the accepted data: "
        "ink per image at this level, mean intensity per image class by class at this / 10."))
    drift_max_distance: float = Field(default=0.4, gt=0, le=1, description=(
        "A new batch is refused as drifted when a significant KS distance D reaches this. Clean slices of MNIST "
        "from other writers reach 0.34, labels shifted by one class 0.91, inverted images 1."))

    @model_validator(mode="after")
    def _ordered(self) -> ValidateConfig:
        if self.min_class_share >= self.max_class_share:
            raise ValueError("min_class_share must be below max_class_share")
        return self


class TrainConfig(_Section):
    optimizer: Optimizer
    learning_rate: PositiveFloat
    epochs: PositiveInt
    batch_size: PositiveInt = 256
    early_stopping_patience: PositiveInt | None = Field(
        default=None, description="Stop when validation loss has not improved for this many epochs; None = never."
    )
    schedule: Schedule = Field(default="constant", description=(
        "Learning rate over training: constant, or cosine decay from learning_rate to 0 over all planned epochs."))
    shift: NonNegativeInt = Field(default=0, le=4, description=(
        "Augmentation: move each training image by up to this many pixels along each axis, anew every epoch."))


class PretrainConfig(TrainConfig):
    hidden: tuple[PositiveInt, ...] = Field(
        default=(128, 64), min_length=1, description="Encoder widths; the decoder mirrors them."
    )
    activation: Activation = "sigmoid"
    init: Init = "normal"
    noise: float = Field(default=0.0, ge=0, lt=1, description=(
        "Denoising: the share of input pixels set to 0, anew every epoch; the target stays the clean image."))


class VatConfig(_Section):
    """Virtual adversarial training with entropy minimisation on the unlabeled images (docs/study.md)."""

    epsilon: PositiveFloat = Field(default=2.0, description=(
        "L2 length of the adversarial perturbation of an image (pixels in [0, 1]; an image's own length is about 9)."))
    weight: NonNegativeFloat = Field(default=1.0, description="The VAT loss's weight beside the cross-entropy.")
    entropy_weight: NonNegativeFloat = Field(default=0.3, description=(
        "Weight of the unlabeled predictions' entropy, which pushes class boundaries away from the images."))
    batch_size: PositiveInt = Field(default=128, description="Unlabeled images per optimizer step.")
    ramp_up: NonNegativeInt = Field(default=300, description=(
        "Optimizer steps over which the unlabeled losses' weights grow linearly from 0 to their values."))


class FinetuneConfig(TrainConfig):
    freeze_encoder: bool = Field(default=False, description="Train only the softmax head (the notebook trains both).")
    linear_probe: bool = Field(default=False, description="Also train a frozen-encoder probe for the claim table.")
    unlabeled: Unlabeled = Field(default="none", description=(
        "What the training images teach beside their labels: nothing (the notebook), or virtual adversarial "
        "training with entropy minimisation on all of them (vat, settings in finetune.vat)."))
    vat: VatConfig = VatConfig()


class BaselinesConfig(TrainConfig):
    init: Init = Field(default="normal", description="Initialisation of the un-pretrained network.")


class EvaluateConfig(_Section):
    confidence: float = Field(default=0.95, gt=0, lt=1)


class ReportConfig(_Section):
    title: str = "MNIST autoencoder pretraining report"


class PromoteConfig(_Section):
    """When a challenger replaces the champion."""

    min_accuracy_gain: float = Field(default=0.0, ge=0, description="Required test-accuracy gain (absolute).")
    min_accuracy: float = Field(default=0.5, ge=0, le=1,
                                description="Lowest test accuracy any promoted model has, the first one too.")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance level of McNemar's exact test.")


class SemiStudyConfig(_Section):
    """How the study's semi-supervised models train: VAT on all training images, its own rate, shifts and steps."""

    learning_rate: PositiveFloat = 1e-2
    shift: NonNegativeInt = Field(default=2, le=4, description="Pixel shifts of labeled and unlabeled images.")
    min_steps: PositiveInt = Field(default=1000, description="Fewest optimizer steps of a semi-supervised cell.")
    budgets: tuple[PositiveInt, ...] = Field(default=(100,), min_length=1, description=(
        "The study's budgets at which these models train: where labels are scarcest, since a cell costs several "
        "supervised ones."))
    vat: VatConfig = VatConfig()


class RecipeGrid(_Section):
    """The values a study model may choose from, per setting; the recipes are every combination of them.

    An empty setting keeps the study's own value. Each field names a setting of a study cell, so a recipe is a
    small set of named overrides of the cell.
    """

    learning_rate: tuple[PositiveFloat, ...] = ()
    head: tuple[HeadInit, ...] = Field(default=(), description="Initialisation of the softmax head.")
    step_scale: tuple[PositiveFloat, ...] = Field(default=(), description="Multiple of the budget's step count.")
    tuning: tuple[Tuning, ...] = Field(default=(), description="How the pretrained encoder is fine-tuned.")


# Softmax regression, convex and started from zero, trains with the study's own settings: its selection would
# cost as much as the ANN's, and no verdict rests on it.
_DEFAULT_SEARCH: dict[StudyModel, RecipeGrid] = {
    "pretrained": RecipeGrid(tuning=("joint", "head_first", "slow_encoder")),
    "ann": RecipeGrid(head=("zeros", "glorot_uniform")),
}


class StudyConfig(_Section):
    """The label-efficiency study: label budgets, seeds, models, their recipe grids and the schedule rule.

    Every cell trains for `max(min_steps, epochs * ceil(budget / batch))` optimizer steps (times a recipe's step
    scale), a number set by the budget alone: no early stopping. Each model's recipe is chosen from its grid in
    `search` by cross-validation on the budget's own labels; nothing is chosen on the validation or test labels.
    """

    budgets: tuple[PositiveInt, ...] = Field(
        default=(100, 300, 1000, 3000, 10000), min_length=1,
        description="Labeled training images per cell; the training split's size means all of its labels (the "
                    "pipeline's own run compares the models on all labels).")
    seeds: PositiveInt = Field(default=5, description="Seeds 0..seeds-1: each draws its own labeled subsets.")
    large_from: PositiveInt = Field(default=3000, description=(
        "From this budget on, a recipe is chosen on a held-out share of the budget instead of k folds, and only "
        "large_seeds seeds are trained (each costs more there, and seeds vary less)."))
    large_seeds: PositiveInt = Field(default=3, description="Seeds at budgets from large_from on (at most seeds).")
    models: tuple[StudyModel, ...] = Field(
        default=("pretrained", "ann", "softmax", "semi-pretrained", "semi-scratch"), min_length=1)
    search: dict[StudyModel, RecipeGrid] = Field(default=_DEFAULT_SEARCH, description=(
        "Each model's recipe grid; a model without one trains with the study's own settings, unselected."))
    folds: int = Field(default=3, ge=2, description="Folds of the cross-validation below large_from.")
    holdout: float = Field(default=0.2, gt=0, lt=1, description="Share of a large budget held out to choose on.")
    optimizer: Optimizer = "adam"
    learning_rate: PositiveFloat = 1e-3
    batch_size: PositiveInt = 128
    epochs: PositiveInt = Field(default=5, description="Passes over the budget's labels, unless min_steps is more.")
    min_steps: PositiveInt = Field(default=250, description="Fewest optimizer steps of any cell.")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance level of the verdicts.")
    semi: SemiStudyConfig = Field(default=SemiStudyConfig(), description=(
        "The semi-supervised models' training (semi-pretrained, semi-scratch); the other models ignore it."))

    @field_validator("budgets")
    @classmethod
    def _class_balanced(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if min(v) < STUDY_MIN_BUDGET:
            raise ValueError(f"every budget needs at least one label per class ({STUDY_MIN_BUDGET})")
        return tuple(sorted(set(v)))

    @field_validator("models")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v))


class PipelineConfig(_Section):
    """Everything a run depends on; each stage reads only its own section."""

    profile: str = "default"
    seed: int = 0
    store: str = Field(default="artifacts", description=f"Store root; env {STORE_ENV}.")
    stages: tuple[Stage, ...] = Field(default=STAGES, description="Stages this profile runs, in order.")
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    baselines: BaselinesConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    promote: PromoteConfig = PromoteConfig()
    study: StudyConfig = StudyConfig()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def training_images(self) -> int:
        """How many training images (hence labels) the split leaves after the validation hold-out."""
        left = TRAINING_IMAGES - self.data.validation_size
        return left if self.data.train_size is None else min(self.data.train_size, left)

    def reported(self) -> dict[str, Any]:
        """The config as reports show it, without machine-specific settings, which never change a result.

        The study's section is left out: it changes nothing the pipeline computes (the study reports it itself).
        """
        return self.model_dump(mode="json", by_alias=True,
                               exclude={"store": True, "data": {"mirror", "offline", "incoming"}, "study": True})

    @model_validator(mode="after")
    def _validation_split_fits(self) -> PipelineConfig:
        if self.data.validation_size >= TRAINING_IMAGES:
            raise ValueError(f"data.validation_size must leave training images out of {TRAINING_IMAGES:,}")
        for name in ("pretrain", "finetune", "baselines"):
            if getattr(self, name).early_stopping_patience and not self.data.validation_size:
                raise ValueError(f"{name}.early_stopping_patience needs a validation split (data.validation_size > 0)")
        return self

    @field_validator("store")
    @classmethod
    def _known_store(cls, v: str) -> str:
        if not v.strip():  # not the default `artifacts/`: an empty value is a mistake, not a choice
            raise ValueError("the store root is empty; give a directory or an s3://bucket/prefix URL")
        scheme = v.partition("://")[0] if "://" in v else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(f"{v}: store roots are local paths or s3://bucket/prefix URLs")
        return v

    @field_validator("stages")
    @classmethod
    def _in_pipeline_order(cls, v: tuple[Stage, ...]) -> tuple[Stage, ...]:
        # Whether each stage finds what it reads is the pipeline's check (`tasks.pipeline.graph.check_config`): the
        # stages' contracts say it, and the config imports no stage code.
        return tuple(s for s in STAGES if s in v)


_SEED_FINETUNE = dict(optimizer="sgd", learning_rate=0.5, epochs=200, batch_size=256)
_MODERN = dict(optimizer="adam", learning_rate=1e-3, batch_size=256, schedule="cosine")
# The `default` classifiers: the pretrained model and both baselines train exactly the same way.
_MODERN_CLASSIFIER = dict(_MODERN, learning_rate=2e-3, epochs=15, shift=1)
_QUICK = dict(optimizer="adam", learning_rate=1e-3, batch_size=128, early_stopping_patience=3)

PROFILES: dict[str, dict[str, Any]] = {
    # The notebook's part 3, exactly: TF1 RMSProp pretraining, plain gradient descent fine-tuning.
    "seed": dict(
        pretrain=dict(optimizer="rmsprop_tf1", learning_rate=0.02, epochs=100, batch_size=256,
                      hidden=(128, 64), activation="sigmoid", init="normal"),
        finetune=dict(_SEED_FINETUNE),
        baselines=dict(_SEED_FINETUNE, init="normal"),
    ),
    # The notebook's part 2: the 784-256-128-256-784 reconstruction autoencoder, 20 epochs, no classifier.
    "seed-part2": dict(
        stages=("download", "validate", "pretrain", "report"),
        pretrain=dict(optimizer="rmsprop_tf1", learning_rate=0.02, epochs=20, batch_size=256,
                      hidden=(256, 128), activation="sigmoid", init="normal"),
        finetune=dict(_SEED_FINETUNE),
        baselines=dict(_SEED_FINETUNE, init="normal"),
    ),
    # What one would choose today (bench/recipe.py): a denoising ReLU autoencoder, Adam with cosine decay, a fixed
    # number of epochs, fine-tuning on images shifted by up to one pixel; the ANN is trained exactly the same way.
    "default": dict(
        pretrain=dict(_MODERN, epochs=10, noise=0.4, hidden=(128, 64), activation="relu", init="glorot_uniform"),
        finetune=dict(_MODERN_CLASSIFIER, linear_probe=True),
        baselines=dict(_MODERN_CLASSIFIER, init="glorot_uniform"),
    ),
    # Seconds on two CPU cores: smoke runs and tests.
    "quick": dict(
        data=dict(validation_size=500, train_size=3000, test_size=2000),
        pretrain=dict(_QUICK, epochs=2, hidden=(128, 64), activation="relu", init="glorot_uniform"),
        # At Adam's default rate two epochs leave the fine-tuned model below its own softmax baseline (64 vs 76 %),
        # which the promotion gate refuses; at 5e-3 it reaches about 83 %, so smoke runs exercise the champion path.
        finetune=dict(_QUICK, epochs=2, learning_rate=5e-3, linear_probe=True),
        baselines=dict(_QUICK, epochs=2, init="glorot_uniform"),
        study=dict(budgets=(100, 300, 1000, 3000), seeds=2, min_steps=100),
    ),
}


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ["finetune.learning_rate=0.1", ...] into a dotted-key mapping; values are JSON when they parse."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form section.field=value")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _env_defaults() -> dict[str, Any]:
    env: dict[str, Any] = {}
    if os.environ.get(MIRROR_ENV):
        env["data.mirror"] = os.environ[MIRROR_ENV]
    if os.environ.get(OFFLINE_ENV, "").lower() in {"1", "true", "yes"}:
        env["data.offline"] = True
    if os.environ.get(STORE_ENV):
        env["store"] = os.environ[STORE_ENV]
    if os.environ.get(INCOMING_ENV):
        env["data.incoming"] = os.environ[INCOMING_ENV]
    return env


def load_config(
    profile: str = "default", overrides: Mapping[str, Any] | Iterable[str] = (), store: str | None = None
) -> PipelineConfig:
    """Build the config of a named profile, then apply environment defaults, dotted overrides and the store root."""
    if profile not in PROFILES:
        raise ConfigError(f"profile: unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    if store is not None:
        overrides = {**overrides, "store": store}
    tree = json.loads(json.dumps(PROFILES[profile]))
    tree["profile"] = profile
    for dotted, value in {**_env_defaults(), **overrides}.items():
        _set_dotted(tree, dotted, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def check_study(config: PipelineConfig) -> None:
    """The study's budgets must fit the training split (its size is the largest budget allowed: all labels)."""
    available = config.training_images()
    if too_many := [b for b in config.study.budgets if b > available]:
        raise ConfigError(f"study.budgets: {', '.join(f'{b:,}' for b in too_many)} exceed the {available:,} "
                          "labeled training images of this split; the largest budget is all of them")


def check_stages(config: PipelineConfig, *selections: Iterable[str]) -> None:
    """Stage names given to run alone or to force must be stages of the config's profile."""
    if unknown := sorted({s for sel in selections for s in sel} - set(config.stages)):
        raise ConfigError(f"stages {', '.join(unknown)} are not part of profile {config.profile!r} "
                          f"({', '.join(config.stages)})")


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]).replace("validate_", "validate") or "config"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{field}: {err['msg']}{shown}")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n  " + "\n  ".join(lines)
