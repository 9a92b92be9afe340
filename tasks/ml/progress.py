"""What a training stage reports after each epoch, for the orchestration to show; imports no Keras."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EpochEnd:
    """One finished epoch of one model, as a training stage reports it to the orchestration."""

    model: str  # the Keras model's name: autoencoder, classifier, probe, softmax, ann
    epoch: int
    epochs: int  # planned epochs of this model
    logs: dict[str, float]
    done: float  # share of the stage's planned epochs (all its models) finished, 0..1


Progress = Callable[[EpochEnd], None]
