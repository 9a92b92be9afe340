"""The training input pipeline: a fresh permutation every epoch, denoising noise and pixel shifts, outside the model.

Every random draw is a stateless TensorFlow op keyed on (seed, epoch) or (seed, step), so a training reproduces
itself exactly whatever else runs in the process, and the models hold no random op. The pipeline runs on
background threads beside the training step (`prefetch`).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tasks.data.mnist import PIXELS, SIDE


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Batches per pass over `images`; the last one may be smaller."""
    return math.ceil(images / batch_size)


def training_batches(x: np.ndarray, y: np.ndarray | None, batch_size: int, seed: int, *,
                     noise: float = 0.0, shift: int = 0) -> tf.data.Dataset:
    """Endless (inputs, targets) batches; each run of `steps_per_epoch` batches is one pass in a new order.

    `y=None` trains an autoencoder: the target is the clean (shifted) image, the input the same image with a
    `noise` share of its pixels set to 0 (masking noise, a denoising autoencoder). `shift` moves each image by up to
    that many pixels along each axis, a new draw for every image in every epoch.
    """
    images = tf.constant(x, tf.float32)
    labels = None if y is None else tf.constant(y)
    count = len(x)

    def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed=[seed, epoch])
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def batch(step: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        clean = tf.gather(images, index)
        if shift:
            clean = shifted(clean, shift, tf.stack([tf.constant(seed, tf.int64), 2 * step]))
        inputs = clean
        if noise:
            kept = tf.random.stateless_uniform(tf.shape(clean), seed=tf.stack([tf.constant(seed, tf.int64),
                                                                                 2 * step + 1])) >= noise
            inputs = clean * tf.cast(kept, clean.dtype)
        return inputs, (clean if labels is None else tf.gather(labels, index))

    orders = tf.data.Dataset.counter().flat_map(epoch_order)
    options = tf.data.Options()
    # No autotuning: its model thread wakes only on its own timer, so releasing the pipeline at the end of a
    # training waits for that timer (in TensorFlow's RootDataset iterator's destructor). Instead, two batches are
    # made at a time (in order) and two kept ahead: enough to keep even softmax regression fed (bench/speed.py).
    options.autotune.enabled = False
    return (tf.data.Dataset.zip(tf.data.Dataset.counter(), orders)
            .map(batch, num_parallel_calls=2, deterministic=True)
            .prefetch(2)
            .with_options(options))


def shifted(flat: tf.Tensor, most: int, seed: tf.Tensor) -> tf.Tensor:
    """Each flattened image moved by its own random (dy, dx) in [-most, most]^2; uncovered pixels are 0.

    The batch is zero-padded by `most` pixels, its images grouped by offset (`dynamic_partition`), each group
    cropped with one slice and the crops put back in batch order (`dynamic_stitch`): plain copies, about half the
    CPU time of selecting each image's crop with `tf.where`, for the same pixels.
    """
    images = tf.reshape(flat, (-1, SIDE, SIDE))
    padded = tf.pad(images, [[0, 0], [most, most], [most, most]])
    span = 2 * most + 1
    offsets = tf.random.stateless_uniform((tf.shape(images)[0], 2), seed=seed, minval=0, maxval=span,
                                          dtype=tf.int32)
    group = offsets[:, 0] * span + offsets[:, 1]
    groups = tf.dynamic_partition(padded, group, span * span)
    positions = tf.dynamic_partition(tf.range(tf.shape(images)[0]), group, span * span)
    crops = [groups[dy * span + dx][:, dy:dy + SIDE, dx:dx + SIDE] for dy in range(span) for dx in range(span)]
    return tf.reshape(tf.dynamic_stitch(positions, crops), (-1, PIXELS))
