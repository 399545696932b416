"""The arithmetic count behind the engine benchmark's ceiling argument."""

import keras
import pytest
import tensorflow as tf

from mmtl_tf.benchmarking import gradient_flops
from mmtl_tf.models.conv4 import conv4_encoder


def _profiler_forward_flops(encoder, ways: int) -> int:
    """TensorFlow's own count for one image forward (it also counts bias, batch norm, ReLU)."""
    head = keras.layers.Dense(ways)
    head.build((None, encoder.feature_dim))
    graph = tf.function(lambda x: head(encoder(x, training=False))).get_concrete_function(
        tf.TensorSpec((1, encoder.image_size, encoder.image_size, encoder.channels))).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_forward_count_agrees_with_tensorflows_profiler(downsample):
    encoder = conv4_encoder(28, downsample=downsample)
    ours = gradient_flops(encoder, 5)["forward_per_image"]
    theirs = _profiler_forward_flops(encoder, 5)
    # the profiler adds the element-wise ops we leave out: a little more, never less
    assert 0.98 * theirs <= ours <= theirs


def test_gradient_count_is_three_forwards_without_the_first_input_gradient():
    encoder = conv4_encoder(28)  # MAML's Omniglot net: 28 -> 14 -> 7 -> 4 -> 2, 64 filters
    first = 2 * 14 * 14 * 64 * 9 * 1
    counts = gradient_flops(encoder, 5)
    assert counts["forward_per_image"] == first + 2 * 64 * 9 * 64 * (7 * 7 + 4 * 4 + 2 * 2) + 2 * 256 * 5
    assert counts["gradient_per_image"] == 3 * counts["forward_per_image"] - first
