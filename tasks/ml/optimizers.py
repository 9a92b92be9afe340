"""The optimizers a config can name, TF1's RMSProp among them."""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="mnist_ae")
class TF1RMSprop(keras.optimizers.Optimizer):
    """TF1's `RMSPropOptimizer` without momentum: accumulator starts at 1.0 and epsilon sits inside the square root.

    Keras's own RMSprop starts the accumulator at 0, so its first steps are about lr / sqrt(1 - rho) ~ 3x larger
    per weight; with N(0, 1) sigmoid networks that trains very differently from the notebook.
    """

    def __init__(self, learning_rate=0.001, rho=0.9, epsilon=1e-10, initial_accumulator=1.0,
                 name="tf1_rmsprop", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho = rho
        self.epsilon = epsilon
        self.initial_accumulator = initial_accumulator

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._ms = self.add_optimizer_variables(
            var_list, "ms", initializer=keras.initializers.Constant(self.initial_accumulator)
        )

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        grad = ops.cast(gradient, variable.dtype)
        ms = self._ms[self._get_variable_index(variable)]
        # The same arithmetic as TF1's ApplyRMSProp kernel: ms += (g^2 - ms) * (1 - rho).
        self.assign(ms, ops.add(ms, ops.multiply(ops.subtract(ops.square(grad), ms), 1.0 - self.rho)))
        self.assign_sub(variable, ops.divide(ops.multiply(lr, grad), ops.sqrt(ops.add(ms, self.epsilon))))

    def get_config(self):
        config = super().get_config()
        config.update(rho=self.rho, epsilon=self.epsilon, initial_accumulator=self.initial_accumulator)
        return config


@keras.saving.register_keras_serializable(package="mnist_ae")
class SlowEncoderAdam(keras.optimizers.Adam):
    """Adam whose steps on the encoder's layers (named enc_*) are `encoder_rate` times its steps on the others.

    Keras has no per-layer learning rate, and scaling the gradients would not do it: Adam's steps do not change
    with the gradient's scale.
    """

    def __init__(self, encoder_rate: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.encoder_rate = encoder_rate

    def update_step(self, gradient, variable, learning_rate):
        if variable.name.startswith("enc_"):
            learning_rate = ops.multiply(learning_rate, self.encoder_rate)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "encoder_rate": self.encoder_rate}


def make_optimizer(name: str, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
                   encoder_rate: float = 1.0) -> keras.optimizers.Optimizer:
    """A fresh optimizer by its config name ("sgd" is plain gradient descent, as TF1's GradientDescentOptimizer).

    `encoder_rate` below 1 slows the steps on the encoder's layers (Adam only).
    """
    if encoder_rate != 1.0:
        if name != "adam":
            raise ValueError(f"a slower encoder rate needs the adam optimizer, not {name!r}")
        return SlowEncoderAdam(encoder_rate=encoder_rate, learning_rate=learning_rate, name=name)
    factories: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
        "rmsprop_tf1": TF1RMSprop, "rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
    }
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(factories)}")
    # A fixed name: Keras would otherwise number optimizers per process ("adam_1"), and that name is saved in
    # the model file, so the same training would write different bytes depending on what the process ran before.
    return factories[name](learning_rate=learning_rate, name=name)
