"""The shape of an MNIST example, shared by data, training, evaluation and serving."""

SIDE = 28  # images are SIDE x SIDE pixels
PIXELS = SIDE * SIDE  # as the networks see them: flattened
CLASSES = 10  # the digits 0-9, or Fashion-MNIST's ten kinds of clothing
