"""Semi-supervised fine-tuning: a classifier fits its labels while the unlabeled training images keep teaching it.

The method is virtual adversarial training (Miyato et al. 2018) with entropy minimisation: on each batch of
unlabeled images the classifier's prediction is made smooth in the direction of input space that changes it most
(one power iteration finds that direction), and confident. Both terms need no label, so every training image
counts, while the cross-entropy sees only the labeled ones; their weights ramp up from 0 over the first steps.
The random start of each power iteration is a stateless draw keyed on (seed, optimizer step), like the input
pipeline's noise, so a seeded training reproduces itself exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tasks.config import TrainConfig, VatConfig
from tasks.ml.inputs import training_batches
from tasks.ml.progress import Progress
from tasks.ml.training import fit

# Offsets the unlabeled stream's seed, so its order and shifts are not the labeled stream's draws.
UNLABELED_STREAM = 0x0A1B
# The first step of the power iteration: small enough to probe the prediction's curvature locally.
XI = 1e-6
TINY = 1e-12


def _unit(d: tf.Tensor) -> tf.Tensor:
    """Each row scaled to unit L2 norm (a zero row stays zero)."""
    d = d / (tf.reduce_max(tf.abs(d), axis=1, keepdims=True) + TINY)  # keeps the squares in float32's range
    return d / tf.sqrt(tf.reduce_sum(tf.square(d), axis=1, keepdims=True) + TINY)


def _kl(p_logits: tf.Tensor, q_logits: tf.Tensor) -> tf.Tensor:
    """Mean KL(p || q) over the batch, from logits."""
    p = tf.nn.softmax(p_logits)
    return tf.reduce_mean(tf.reduce_sum(p * (tf.nn.log_softmax(p_logits) - tf.nn.log_softmax(q_logits)), axis=1))


@keras.saving.register_keras_serializable(package="mnist_ae")
class SemiSupervised(keras.Model):
    """A classifier whose training step adds the unlabeled images' VAT and entropy losses to the labels' loss.

    Its batches are ((labeled images, unlabeled images), labels); predicting and evaluating go to the classifier,
    which is what gets saved. The classifier must end in a softmax layer named `head`.
    """

    def __init__(self, classifier: keras.Model, vat: VatConfig, seed: int = 0, **kwargs: Any):
        super().__init__(name=classifier.name, **kwargs)
        self.classifier = classifier
        self.vat = vat
        self.seed = seed
        head = classifier.get_layer("head")
        self._features = keras.Model(classifier.inputs, head.input, name="features")
        self._head = head

    def call(self, inputs, training=False):
        return self.classifier(inputs, training=training)

    def logits(self, x: tf.Tensor) -> tf.Tensor:
        """The head's input to its softmax: log-probabilities up to a constant, stable for KL and entropy."""
        return ops.matmul(self._features(x, training=True), self._head.kernel) + self._head.bias

    def adversarial_direction(self, x: tf.Tensor, clean: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """One power iteration from a seeded random start: the unit direction that changes the prediction most."""
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        d = _unit(tf.random.stateless_normal(tf.shape(x), seed=seed)) * XI
        with tf.GradientTape() as tape:
            tape.watch(d)
            divergence = _kl(clean, self.logits(x + d))
        return _unit(tf.stop_gradient(tape.gradient(divergence, d)))

    def train_step(self, data):
        (x_labeled, x_unlabeled), y = data
        # The prediction on the unlabeled images is the target the perturbed one must match, not a thing to move.
        clean = tf.stop_gradient(self.logits(x_unlabeled))
        r_adv = self.vat.epsilon * self.adversarial_direction(x_unlabeled, clean, self.optimizer.iterations)
        # The unlabeled losses' weights grow linearly from 0: the labels shape the classes first, so that the
        # entropy term does not fix the clusters of an untrained network.
        scale = (tf.minimum(1.0, tf.cast(self.optimizer.iterations, tf.float32) / self.vat.ramp_up)
                 if self.vat.ramp_up else 1.0)
        with tf.GradientTape() as tape:
            y_pred = self.classifier(x_labeled, training=True)
            loss = self._compute_loss(x=x_labeled, y=y, y_pred=y_pred, training=True)
            loss += scale * self.vat.weight * _kl(clean, self.logits(x_unlabeled + r_adv))
            if self.vat.entropy_weight:
                logits = self.logits(x_unlabeled)
                entropy = -tf.reduce_mean(tf.reduce_sum(tf.nn.softmax(logits) * tf.nn.log_softmax(logits), axis=1))
                loss += scale * self.vat.entropy_weight * entropy
            self._loss_tracker.update_state(loss, sample_weight=tf.shape(x_labeled)[0])
        weights = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=True))
        return self.compute_metrics(x_labeled, y, y_pred)

    def get_config(self):
        return {"classifier": keras.saving.serialize_keras_object(self.classifier), "vat": self.vat.model_dump(),
                "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["classifier"]), VatConfig(**config["vat"]),
                   config["seed"])


def semi_supervised_batches(x: np.ndarray, y: np.ndarray, unlabeled: np.ndarray, cfg: TrainConfig,
                            vat: VatConfig, seed: int) -> tf.data.Dataset:
    """Endless ((labeled images, unlabeled images), labels) batches, both streams from `tasks.ml.inputs`."""
    labeled = training_batches(x, y, cfg.batch_size, seed, shift=cfg.shift)
    # An autoencoder's batches without noise: (image, the same image); one of the pair is enough.
    images = training_batches(unlabeled, None, vat.batch_size, seed + UNLABELED_STREAM, shift=cfg.shift)

    def arrange(pair: tuple[tf.Tensor, tf.Tensor], image: tuple[tf.Tensor, tf.Tensor]) -> Any:
        return (pair[0], image[0]), pair[1]

    return tf.data.Dataset.zip(labeled, images).map(arrange)


def fit_semi_supervised(classifier: keras.Model, x: np.ndarray, y: np.ndarray, unlabeled: np.ndarray,
                        validation: tuple[np.ndarray, np.ndarray] | None, cfg: TrainConfig, vat: VatConfig,
                        progress: Progress | None = None, *, seed: int = 0, tensorboard: Path | None = None,
                        name: str | None = None, part: tuple[int, int] = (0, 1)
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train `classifier` in place on the labeled (`x`, `y`) and the `unlabeled` images; `fit`'s log and summary.

    An epoch is one pass over the labeled images; each of its steps also takes `vat.batch_size` unlabeled
    images, drawn in a new order every pass over them.
    """
    model = SemiSupervised(classifier, vat, seed)
    batches = semi_supervised_batches(x, y, unlabeled, cfg, vat, seed)
    return fit(model, x, y, validation, cfg, progress, seed=seed, tensorboard=tensorboard,
               name=name or classifier.name, part=part, batches=batches)
