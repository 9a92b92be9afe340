"""The training input pipeline: each epoch a permutation, reproducible draws, shifts and masking noise as described."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tasks.ml.inputs import shifted, steps_per_epoch, training_batches


def _take(dataset: tf.data.Dataset, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    iterator = iter(dataset)
    return [tuple(t.numpy() for t in next(iterator)) for _ in range(count)]


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((300, 784), dtype=np.float32), np.arange(300) % 10


def test_every_epoch_is_a_new_permutation_of_all_images(images):
    x, y = images
    steps = steps_per_epoch(len(x), 128)
    batches = _take(training_batches(x, np.arange(len(x)), 128, seed=5), 2 * steps)
    assert [len(b[1]) for b in batches] == [128, 128, 44] * 2  # the last batch of an epoch is smaller
    first, second = (np.concatenate([b[1] for b in batches[e * steps:(e + 1) * steps]]) for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(len(x)))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(len(x)))
    for inputs, index in batches:  # without noise or shifts, the inputs are the indexed images themselves
        np.testing.assert_array_equal(inputs, x[index])


def test_the_same_seed_draws_the_same_batches_and_another_seed_others(images):
    x, y = images
    a, b = (_take(training_batches(x, y, 64, seed=1, noise=0.3, shift=1), 7) for _ in range(2))
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other = _take(training_batches(x, y, 64, seed=2, noise=0.3, shift=1), 1)
    assert not np.array_equal(a[0][0], other[0][0])


def test_autoencoder_targets_are_clean_and_inputs_masked_at_the_noise_share():
    x = np.full((2000, 784), 0.5, np.float32)
    inputs, targets = _take(training_batches(x, None, 2000, seed=0, noise=0.25), 1)[0]
    np.testing.assert_array_equal(targets, x)
    assert set(np.unique(inputs)) == {0.0, 0.5}
    assert np.mean(inputs == 0) == pytest.approx(0.25, abs=0.005)


def test_shifts_move_whole_images_by_at_most_the_limit():
    rng = np.random.default_rng(1)
    x = np.zeros((500, 28, 28), np.float32)
    x[:, 5:23, 5:23] = rng.random((500, 18, 18), dtype=np.float32)  # ink away from the border: nothing falls off
    moved = shifted(tf.constant(x.reshape(500, 784)), 2, tf.constant([0, 0], tf.int64)).numpy().reshape(500, 28, 28)
    seen = set()
    for original, image in zip(x, moved, strict=True):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(np.roll(original, (dy, dx), axis=(0, 1)), image)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 25  # every offset in [-2, 2]^2 occurs


def test_shifted_pixels_leave_through_the_border_and_zeros_come_in():
    x = np.ones((64, 784), np.float32)
    moved = shifted(tf.constant(x), 1, tf.constant([3, 4], tf.int64)).numpy().reshape(64, 28, 28)
    assert moved.sum() < x.sum() and set(np.unique(moved)) == {0.0, 1.0}
    assert (moved[:, 1:-1, 1:-1] == 1).all()
