"""Choosing a study model's recipe inside its label budget: the grid's recipes, class-stratified splits, the winner.

A recipe is a small set of named overrides of a study cell (`{"head": "glorot_uniform"}`); the grid of a model
is every combination of the values its `RecipeGrid` lists. Each recipe is scored by the accuracy it reaches on
the held-out part of each split of the budget's own labels, and the best mean wins (the first in grid order on a
tie). Nothing here sees an image or a label outside the budget: the splits are made from the budget's labels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.config import RecipeGrid

Recipe = dict[str, Any]
# Train with a recipe on the images at the first indices, return the accuracy on the images at the second ones.
Score = Callable[[Recipe, np.ndarray, np.ndarray], float]


def recipes(grid: RecipeGrid | None) -> list[Recipe]:
    """Every combination of the grid's values, in the grid's field order; one empty recipe for no grid."""
    if grid is None:
        return [{}]
    axes = {name: values for name, values in grid.model_dump().items() if values}
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def describe(recipe: Recipe) -> str:
    """A recipe in words, for reports: `head glorot_uniform, learning_rate 0.01`."""
    return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in recipe.items()) or "the study's own settings"


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """`k` disjoint index sets covering `labels`, each class dealt to the folds in turn (sizes within one).

    The deal continues from class to class, so a class too small to reach every fold leaves the folds it misses
    to the next class.
    """
    labels = np.asarray(labels)
    if not 2 <= k <= len(labels):
        raise ValueError(f"{k} folds need 2 to {len(labels)} labeled images")
    rng = np.random.default_rng([seed, 0xF01D])  # independent of the seed's other uses
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    return [np.sort(order[i::k]) for i in range(k)]


def splits(labels: np.ndarray, folds: int, holdout: float | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs: one per fold, or a single class-stratified held-out share when `holdout`."""
    if holdout is not None:
        parts = stratified_folds(labels, max(2, round(1 / holdout)), seed)
        held = parts[0]
        return [(np.setdiff1d(np.arange(len(labels)), held), held)]
    parts = stratified_folds(labels, folds, seed)
    return [(np.sort(np.concatenate(parts[:i] + parts[i + 1:])), part) for i, part in enumerate(parts)]


@dataclass(frozen=True)
class Selection:
    """The chosen recipe and every candidate's mean held-out accuracy, in grid order."""

    chosen: Recipe
    scores: tuple[tuple[Recipe, float], ...]

    def as_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "name": describe(self.chosen),
                "scores": [{"recipe": r, "name": describe(r), "accuracy": s} for r, s in self.scores]}


def select(candidates: Sequence[Recipe], parts: Sequence[tuple[np.ndarray, np.ndarray]], score: Score) -> Selection:
    """Score every candidate on every split and keep the best mean (the first on a tie); one candidate needs none."""
    if not candidates:
        raise ValueError("no recipe to choose from")
    if len(candidates) == 1:
        return Selection(dict(candidates[0]), ())
    scored = tuple((dict(r), float(np.mean([score(r, train, held) for train, held in parts]))) for r in candidates)
    best = max(range(len(scored)), key=lambda i: (scored[i][1], -i))
    return Selection(scored[best][0], scored)
