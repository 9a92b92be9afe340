"""The notebook's networks in Keras 3: the autoencoder, its encoder with a softmax head, and the baselines."""

from __future__ import annotations

import random

import keras
from keras import layers

from tasks.config import PretrainConfig
from tasks.data.mnist import CLASSES, PIXELS


def _initializers(init: str, seeds: random.Random) -> tuple[keras.initializers.Initializer,
                                                              keras.initializers.Initializer]:
    """Fresh (kernel, bias) initializers, each with its own seed drawn from `seeds`.

    Explicit seeds, because an unseeded Keras initializer draws its seed from Python's global `random`, which
    other threads of the process (a Dask worker's, Prefect's) may draw from too. They are drawn as Keras draws
    them (`randint(1, 10**9)`, one per random initializer, in build order), so a run seed gives the weights an
    unseeded build gave right after `keras.utils.set_random_seed`.
    """

    def seed() -> int:
        return seeds.randint(1, int(1e9))

    if init == "normal":
        # tf.random_normal in the notebook: N(0, 1) for weights and biases alike.
        kernel = keras.initializers.RandomNormal(0.0, 1.0, seed=seed())
        return kernel, keras.initializers.RandomNormal(0.0, 1.0, seed=seed())
    if init == "glorot_uniform":
        return keras.initializers.GlorotUniform(seed=seed()), keras.initializers.Zeros()
    if init == "he_normal":
        return keras.initializers.HeNormal(seed=seed()), keras.initializers.Zeros()
    raise ValueError(f"unknown initialisation {init!r}")


def _dense(units: int, activation: str, init: str, name: str, seeds: random.Random) -> layers.Dense:
    kernel, bias = _initializers(init, seeds)
    return layers.Dense(units, activation=activation, kernel_initializer=kernel, bias_initializer=bias, name=name)


def _head(init: str = "zeros", seed: int = 0) -> layers.Dense:
    """The softmax layer, zero-initialised like the notebook's W_softmax and b_softmax unless `init` says otherwise."""
    if init == "zeros":
        kernel: str | keras.initializers.Initializer = "zeros"
    else:
        kernel, _ = _initializers(init, random.Random(seed))
    return layers.Dense(CLASSES, activation="softmax", kernel_initializer=kernel, bias_initializer="zeros",
                        name="head")


def build_autoencoder(cfg: PretrainConfig, seed: int = 0) -> keras.Model:
    """784 -> cfg.hidden -> mirrored decoder -> 784 with a sigmoid output; layers named enc_i and dec_i."""
    inputs = keras.Input((PIXELS,), name="pixels")
    x = inputs
    seeds = random.Random(seed)
    # Encoder
    for i, units in enumerate(cfg.hidden):
        x = _dense(units, cfg.activation, cfg.init, f"enc_{i}", seeds)(x)
    # Decoder
    widths = [*reversed(cfg.hidden[:-1]), PIXELS]
    for i, units in enumerate(widths):
        activation = "sigmoid" if i == len(widths) - 1 else cfg.activation
        x = _dense(units, activation, cfg.init, f"dec_{i}", seeds)(x)
    return keras.Model(inputs, x, name="autoencoder")


def encoder_layers(autoencoder: keras.Model) -> list[layers.Layer]:
    """The autoencoder's encoder layers in order."""
    found = [layer for layer in autoencoder.layers if layer.name.startswith("enc_")]
    if not found:
        raise ValueError(f"model {autoencoder.name!r} has no enc_* layers")
    return sorted(found, key=lambda layer: int(layer.name.split("_")[1]))


def extract_encoder(autoencoder: keras.Model) -> keras.Model:
    """A new 784 -> last-hidden model holding copies of the autoencoder's encoder weights."""
    inputs = keras.Input((PIXELS,), name="pixels")
    x = inputs
    for source in encoder_layers(autoencoder):
        # Copies, not shared layers: fine-tuning must not alter the loaded autoencoder.
        layer = layers.Dense.from_config(source.get_config())
        x = layer(x)
        layer.set_weights(source.get_weights())
    return keras.Model(inputs, x, name="encoder")


def build_classifier(encoder: keras.Model, freeze: bool, head: str = "zeros", seed: int = 0) -> keras.Model:
    """The encoder topped by the softmax head (zero-initialised by default); a frozen encoder runs in inference mode."""
    inputs = keras.Input((PIXELS,), name="pixels")
    if freeze:
        # keras-io transfer-learning recipe: non-trainable, and called with training=False.
        encoder.trainable = False
        features = encoder(inputs, training=False)
    else:
        encoder.trainable = True
        features = encoder(inputs)
    return keras.Model(inputs, _head(head, seed)(features), name="classifier")


def build_softmax_regression(head: str = "zeros", seed: int = 0) -> keras.Model:
    """The notebook's baseline: softmax regression on the raw pixels, zero-initialised by default."""
    inputs = keras.Input((PIXELS,), name="pixels")
    return keras.Model(inputs, _head(head, seed)(inputs), name="softmax")


def build_ann(hidden: tuple[int, ...], activation: str, init: str, seed: int = 0, head: str = "zeros") -> keras.Model:
    """The same classifier shape trained from a random initialisation, without pretraining."""
    inputs = keras.Input((PIXELS,), name="pixels")
    x = inputs
    seeds = random.Random(seed)
    for i, units in enumerate(hidden):
        x = _dense(units, activation, init, f"hidden_{i}", seeds)(x)
    return keras.Model(inputs, _head(head, seeds.randint(1, int(1e9)))(x), name="ann")


