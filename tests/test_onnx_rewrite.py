"""The ONNX rewrites replace a pattern by an equal computation: same values, other nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from mmtl_tf.export.onnx_rewrite import split_kernel_transposes


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    onnx.checker.check_model(model)
    return model


def _run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _ops(model):
    return [node.op_type for node in model.graph.node]


def test_kernel_transpose_split_gives_the_oihw_kernel_bit_for_bit():
    shape = [3, 3, 5, 7]  # HWIO with distinct sizes, so a wrong permutation cannot pass
    model = _model([helper.make_node("Transpose", ["k"], ["oihw"], perm=[3, 2, 0, 1])],
                   [helper.make_tensor_value_info("k", TensorProto.FLOAT, shape)],
                   [helper.make_tensor_value_info("oihw", TensorProto.FLOAT, [7, 5, 3, 3])])
    kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    before = _run(model, {"k": kernel})
    split_kernel_transposes(model)
    onnx.checker.check_model(model)
    assert "Transpose" in _ops(model)
    assert all(len(a.ints) <= 3 for n in model.graph.node for a in n.attribute if a.name == "perm")
    np.testing.assert_array_equal(_run(model, {"k": kernel}), before)
    np.testing.assert_array_equal(before, kernel.transpose(3, 2, 0, 1))


def test_other_transposes_are_left_alone():
    model = _model([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 3])])
    split_kernel_transposes(model)
    assert _ops(model) == ["Transpose"]
