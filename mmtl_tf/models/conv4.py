"""Backbones: pure Keras feature encoders, no training logic.

The meta-learner owns the classification head (a linear layer of ``max_ways`` outputs, sliced
to the task's N), so an encoder maps images to a feature vector and nothing more.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="mmtl_tf")
class ExactBatchNorm(keras.layers.BatchNormalization):
    """Batch norm whose batch variance keeps the gradient through the batch mean.

    Keras' unmasked moments are ``tf.nn.moments``, which stops that gradient: first derivatives
    stay right (the variance's derivative with respect to the mean is zero) but second
    derivatives, which MAML's meta-gradient needs, do not.

    Training mode takes one of two paths, both exact to second order (finite-difference and
    parity tests in tests/test_inner_loop.py):
    - a float32 (B, H, W, C) batch without a mask (meta-training) goes through TensorFlow's
      fused kernel (``FusedBatchNormV3``; its gradient and that gradient's gradient
    are registered, so second-order MAML stays exact) instead of some thirty element-wise ops;
    about twice as fast on CPU. The fused op's statistics outputs carry no gradient, so the
    batch statistics written to the moving variables (which non-transductive adaptation feeds
    to the query) are computed by ``_moments`` as before; when nothing reads them TensorFlow
    prunes them;
    - anything else (a mask, float64, ``fused=False``) goes through Keras with the exact
      moments below (masked ones for padded support sets).
    """

    def __init__(self, fused: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.fused = bool(fused)

    def get_config(self):
        return {**super().get_config(), "fused": self.fused}

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and not self.renorm:
            if mask is None and self._fusable(inputs):
                return self._fused_call(inputs)
        return super().call(inputs, training=training, mask=mask)

    def _fusable(self, inputs) -> bool:
        return (self.fused and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and keras.backend.result_type(inputs.dtype, "float32") == "float32")

    def _fused_call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        mean, variance = self._moments(x, None)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        channels = x.shape[-1]
        gamma = self.gamma if self.scale else tf.ones([channels], x.dtype)
        beta = self.beta if self.center else tf.zeros([channels], x.dtype)
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, keras.ops.cast(gamma, x.dtype), keras.ops.cast(beta, x.dtype),
            epsilon=self.epsilon, is_training=True)
        return keras.ops.cast(outputs, self.compute_dtype)

    def _moments(self, inputs, mask):
        axes = self._reduction_axes
        if mask is not None:
            # The mask may be constant along axes (size 1 there: Conv4 passes (B, 1, 1) per-row
            # masks): those axes are summed first and the weights multiply the partial sums, so
            # no activation-sized tensor is ever multiplied by the mask. Keras' own masked
            # moments broadcast the mask to (B, H, W, C) and select with where(): about a dozen
            # more activation-sized operations in every exported adaptation step.
            weights = keras.ops.expand_dims(keras.ops.cast(mask, inputs.dtype), -1)
            first = [a for a in axes if weights.shape[a] == 1 and inputs.shape[a] != 1]
            shape = keras.ops.shape(inputs)
            count = keras.ops.sum(weights)
            for a in first:
                count = count * keras.ops.cast(shape[a], inputs.dtype)

            def masked_sum(values):
                if first:
                    values = keras.ops.sum(values, axis=first, keepdims=True)
                return keras.ops.sum(values * weights, axis=axes, keepdims=True)

            mean = masked_sum(inputs) / count
            variance = masked_sum(keras.ops.square(inputs - mean)) / count
            return keras.ops.squeeze(mean, axes), keras.ops.squeeze(variance, axes)
        mean = keras.ops.mean(inputs, axis=axes, keepdims=True)
        variance = keras.ops.mean(keras.ops.square(inputs - mean), axis=axes, keepdims=True)
        return keras.ops.squeeze(mean, axes), keras.ops.squeeze(variance, axes)


@keras.saving.register_keras_serializable(package="mmtl_tf")
class Conv4(keras.Model):
    """The 4-block convolutional encoder of the MAML paper.

    Each block is 3x3 conv (``filters``) -> batch norm -> ReLU, downsampling by a stride-2
    convolution (``downsample="stride"``, the MAML Omniglot setting) or a 2x2 max-pool
    (``"maxpool"``, the MiniImageNet setting). Input (B, image_size, image_size, channels) in
    [0, 1]; output (B, feature_dim), feature_dim = filters * s * s where s is the final side
    (2 for 28x28 with strides).

    ``call(x, training, sample_mask)``: sample_mask (B,) marks real rows of a padded batch;
    batch-norm statistics ignore the others, which is what lets one exported adaptation graph
    serve every support-set size up to its maximum.

    Batch norm uses momentum 0: with training=True its moving statistics become exactly the
    batch's; the meta-learner relies on this for its non-transductive mode (queries normalised
    with the support set's statistics).
    """

    def __init__(self, image_size: int = 28, channels: int = 1, filters: int = 64,
                 downsample: str = "stride", **kwargs):
        super().__init__(**kwargs)
        if downsample not in ("stride", "maxpool"):
            raise ValueError(f"downsample={downsample!r} is not one of 'stride', 'maxpool'")
        self.image_size, self.channels = int(image_size), int(channels)
        self.filters, self.downsample = int(filters), downsample
        stride = 2 if downsample == "stride" else 1
        self.convs = [keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                                          name=f"block{b}_conv") for b in range(4)]
        self.norms = [ExactBatchNorm(momentum=0.0, epsilon=1e-3,
                                                      name=f"block{b}_bn") for b in range(4)]
        side = self.image_size
        for _ in range(4):
            side = -(-side // 2)
        self.feature_dim = filters * side * side
        self.build((None, self.image_size, self.image_size, self.channels))

    def build(self, input_shape):
        shape = tuple(input_shape)
        for conv, norm in zip(self.convs, self.norms):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            norm.build(shape)
            if self.downsample == "maxpool":
                shape = (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3])
        self.built = True

    def call(self, x, training=False, sample_mask=None):
        h = x
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            mask = None
            if sample_mask is not None:  # (B,) -> (B, 1, 1): one dimension less than h, as
                mask = sample_mask[:, None, None] > 0  # BatchNormalization expects; see _moments
            h = keras.ops.relu(norm(h, training=training, mask=mask))
            if self.downsample == "maxpool":
                h = keras.ops.max_pool(h, 2, 2, padding="same")
        return keras.ops.reshape(h, (keras.ops.shape(h)[0], self.feature_dim))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.feature_dim)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "channels": self.channels,
                "filters": self.filters, "downsample": self.downsample}


def conv4_encoder(image_size: int = 28, channels: int = 1, filters: int = 64,
                  downsample: str = "stride", name: str = "conv4") -> Conv4:
    """A built Conv4 encoder (see Conv4)."""
    return Conv4(image_size, channels, filters, downsample, name=name)


def mlp_encoder(input_dim: int = 1, hidden: tuple[int, ...] = (40, 40),
                name: str = "mlp") -> keras.Model:
    """The sinusoid regressor's body of the MAML paper: input (B, input_dim) -> ReLU MLP."""
    inputs = keras.Input((input_dim,), name="x")
    h = inputs
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(h)
    return keras.Model(inputs, h, name=name)
