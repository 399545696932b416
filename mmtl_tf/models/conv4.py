"""Backbones: pure Keras feature encoders, no training logic.

The meta-learner owns the classification head (a linear layer of ``max_ways`` outputs, sliced
to the task's N), so an encoder maps images to a feature vector and nothing more.
"""

from __future__ import annotations

import keras


def conv4_encoder(image_size: int = 28, channels: int = 1, filters: int = 64,
                  downsample: str = "stride", name: str = "conv4") -> keras.Model:
    """The 4-block convolutional encoder of the MAML paper.

    Each block is 3x3 conv (``filters``) -> batch norm -> ReLU, downsampling by a stride-2
    convolution (``downsample="stride"``, the MAML Omniglot setting) or a 2x2 max-pool
    (``"maxpool"``, the MiniImageNet setting). Input (B, image_size, image_size, channels) in
    [0, 1]; output (B, features), features = filters * s * s where s is the final side
    (2 for 28x28 with strides).

    Batch norm uses momentum 0: with training=True it normalises by the batch statistics and
    its moving statistics become exactly that batch's; the meta-learner relies on this for its
    non-transductive mode (query normalised with the support set's statistics).
    """
    if downsample not in ("stride", "maxpool"):
        raise ValueError(f"downsample={downsample!r} is not one of 'stride', 'maxpool'")
    inputs = keras.Input((image_size, image_size, channels), name="image")
    h = inputs
    for block in range(4):
        stride = 2 if downsample == "stride" else 1
        h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                                name=f"block{block}_conv")(h)
        h = keras.layers.BatchNormalization(momentum=0.0, epsilon=1e-3,
                                            name=f"block{block}_bn")(h)
        h = keras.layers.ReLU(name=f"block{block}_relu")(h)
        if downsample == "maxpool":
            h = keras.layers.MaxPooling2D(2, padding="same", name=f"block{block}_pool")(h)
    features = keras.layers.Flatten(name="features")(h)
    return keras.Model(inputs, features, name=name)


def mlp_encoder(input_dim: int = 1, hidden: tuple[int, ...] = (40, 40),
                name: str = "mlp") -> keras.Model:
    """The sinusoid regressor's body of the MAML paper: input (B, input_dim) -> ReLU MLP."""
    inputs = keras.Input((input_dim,), name="x")
    h = inputs
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(h)
    return keras.Model(inputs, h, name=name)
