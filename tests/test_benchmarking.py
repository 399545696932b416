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


def test_profile_finds_the_one_matmul_of_a_known_graph_and_its_times_add_up():
    from mmtl_tf.profiling import profile_op_times

    spec = tf.TensorSpec((384, 384))
    step = tf.function(lambda a, b: tf.matmul(a, b) * 3.0, input_signature=[spec, spec])
    a, b = tf.random.normal((384, 384), seed=1), tf.random.normal((384, 384), seed=2)
    step(a, b)  # tracing stays out of the profile
    profile = profile_op_times(lambda: step(a, b), steps=3)
    assert profile["calls_per_step_by_type"]["MatMul"] == 1  # oneDNN's _MklMatMul, named as its op
    assert profile["calls_per_step_by_type"]["Mul"] == 1
    # a 384^3 multiply-add dominates one element-wise multiply of its result
    assert profile["op_ms_by_type"]["MatMul"] > profile["op_ms_by_type"]["Mul"]
    assert sum(profile["op_ms_by_type"].values()) == pytest.approx(profile["op_ms_per_step"], rel=1e-9)
    # op time is kernel time on the executor threads: never more than they had
    assert 0 < profile["op_ms_per_step"] <= profile["executor_threads"] * profile["wall_ms_per_step"]


@pytest.mark.parametrize("kernel, op", [("_MklNativeFusedBatchNormGradV3", "FusedBatchNormGradV3"),
                                        ("_MklMatMul", "MatMul"), ("Tile", "Tile"),
                                        ("_FusedConv2D", "_FusedConv2D")])
def test_onednn_kernels_are_reported_under_their_op_type(kernel, op):
    from mmtl_tf.profiling import op_type

    assert op_type(kernel) == op
