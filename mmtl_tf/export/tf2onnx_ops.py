"""tf2onnx converters for the TensorFlow ops of an inner-loop SGD step.

tf2onnx 1.17 converts forward graphs but not the ops ``tf.GradientTape`` emits for Conv4's
backward pass. Importing this module registers converters (``tf2onnx.handler.tf_op``) for:

  ShapeN                 -> constants when the shapes are static (they are: support sets are
                            padded to a fixed size), else Shape (+ Cast)
  ReluGrad               -> gradients * Cast(features > 0)
  RsqrtGrad              -> -0.5 * dy * y^3
  BiasAddGrad            -> ReduceSum over every axis but the channel axis
  MaxPoolGrad (opset 16) -> MaxPool indices + ScatterElements(reduction="add")

and ``tf2onnx_conv`` those of the convolutions (Conv2D and both its gradients).

Every converter emits default-domain ONNX operators only. Shapes must be static; a
dynamic one raises (the message says to pad the support set to a fixed size).
``BroadcastGradientArgs`` appears only with dynamic shapes and is deliberately not converted.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from tf2onnx import utils
from tf2onnx.handler import tf_op

_TO_NCHW, _FROM_NCHW = [0, 3, 1, 2], [0, 2, 3, 1]


def _const(ctx, node, suffix, value, dtype):
    """A constant named after ``node`` (tf2onnx's counter keeps names unique)."""
    return ctx.make_const(utils.make_name(f"{node.name}_{suffix}"), np.asarray(value, dtype)).output[0]


def _replace(ctx, node, op_type, inputs, attr=None):
    """Replaces ``node`` by one ONNX node with the same name, outputs, shapes and dtypes."""
    name, outputs = node.name, list(node.output)
    shapes = [ctx.get_shape(o) for o in outputs]
    dtypes = [ctx.get_dtype(o) for o in outputs]
    ctx.remove_node(name)
    return ctx.make_node(op_type, inputs, attr=attr or {}, name=name, outputs=outputs,
                         shapes=shapes, dtypes=dtypes)


def _static(ctx, node, tensor, what):
    """The shape of ``tensor`` as ints; raises if any dimension the converter needs is unknown."""
    shape = ctx.get_shape(tensor)
    if shape is None or any(d is None or d < 0 for d in shape):
        raise ValueError(f"{node.type} {node.name!r}: {what} has shape {shape}, but the ONNX "
                         "converter needs static sizes; pad the support set to a fixed size")
    return [int(d) for d in shape]


def _dtype(ctx, tensor):
    return utils.map_onnx_to_numpy_type(ctx.get_dtype(tensor))


def _nhwc(node) -> bool:
    fmt = node.get_attr_value("data_format", b"NHWC")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt not in ("NHWC", "NCHW"):
        raise ValueError(f"{node.type} {node.name!r}: data_format {fmt!r} is not NHWC or NCHW")
    return fmt == "NHWC"


def _spatial(values, nhwc):
    """The (H, W) entries of a 4-long NHWC or NCHW attribute/shape."""
    return [values[1], values[2]] if nhwc else [values[2], values[3]]


def _pads(node, sizes, outputs, kernel, strides, dilations, nhwc):
    """ONNX pads [top, left, bottom, right] of a TF forward op with padding SAME/VALID/EXPLICIT."""
    padding = node.get_attr_value("padding")
    padding = padding.decode() if isinstance(padding, bytes) else padding
    if padding == "VALID":
        return [0, 0, 0, 0]
    if padding == "EXPLICIT":
        pairs = list(node.get_attr_value("explicit_paddings"))
        rows = [pairs[2:4], pairs[4:6]] if nhwc else [pairs[4:6], pairs[6:8]]
        return [rows[0][0], rows[1][0], rows[0][1], rows[1][1]]
    if padding != "SAME":
        raise ValueError(f"{node.type} {node.name!r}: padding {padding!r} is not supported")
    begin, end = [], []
    for size, out, k, s, d in zip(sizes, outputs, kernel, strides, dilations):
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return begin + end


@tf_op("ShapeN")
class ShapeN:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        # Static shapes become constants, so the consumers (Conv2DBackpropInput's input_sizes)
        # see constant sizes and convert to a plain ConvTranspose.
        for i, (tensor, output) in enumerate(zip(list(node.input), list(node.output))):
            dtype = ctx.get_dtype(output)
            shape = ctx.get_shape(tensor)
            if shape is not None and all(d is not None and d >= 0 for d in shape):
                new = _const(ctx, node, f"shape{i}", shape, utils.map_onnx_to_numpy_type(dtype))
            else:
                new = ctx.make_node("Shape", [tensor]).output[0]
                if dtype != TensorProto.INT64:
                    new = ctx.make_node("Cast", [new], attr={"to": dtype}).output[0]
            ctx.replace_all_inputs(output, new)
        ctx.remove_node(node.name)


@tf_op("ReluGrad")
class ReluGrad:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        # gradients * float(features > 0): onnxruntime's Where broadcasting a scalar zero took
        # ~45 us per 5x14x14x64 gradient on one core, Cast and Mul ~10 us. They differ only for
        # an inf or NaN gradient of an inactive unit (NaN, not 0), which stops adaptation anyway.
        gradients, features = node.input
        dtype = ctx.get_dtype(gradients)
        zero = _const(ctx, node, "zero", 0, _dtype(ctx, gradients))
        positive = ctx.make_node("Greater", [features, zero]).output[0]
        mask = ctx.make_node("Cast", [positive], attr={"to": dtype}).output[0]
        _replace(ctx, node, "Mul", [gradients, mask])


@tf_op("RsqrtGrad")
class RsqrtGrad:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        # TF: dy * -0.5 * y^3 for y = rsqrt(x), evaluated as -0.5 * (dy * y) * (y * y).
        y, dy = node.input
        half = _const(ctx, node, "minus_half", -0.5, _dtype(ctx, y))
        dy_y = ctx.make_node("Mul", [dy, y]).output[0]
        y_y = ctx.make_node("Mul", [y, y]).output[0]
        product = ctx.make_node("Mul", [dy_y, y_y]).output[0]
        _replace(ctx, node, "Mul", [half, product])


@tf_op("BiasAddGrad")
class BiasAddGrad:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        gradients = node.input[0]
        rank = len(ctx.get_shape(gradients))
        channel = rank - 1 if _nhwc(node) or rank < 3 else 1
        axes = _const(ctx, node, "axes", [a for a in range(rank) if a != channel], np.int64)
        _replace(ctx, node, "ReduceSum", [gradients, axes], {"keepdims": 0})


@tf_op("MaxPoolGrad")
class MaxPoolGrad:
    """The gradient goes to the argmax of each window: MaxPool's Indices output (flat indices
    into the NCHW input) and a ScatterElements with reduction="add" (opset 16)."""

    @classmethod
    def version_16(cls, ctx, node, **kwargs):
        x, _, gradient = node.input
        nhwc = _nhwc(node)
        shape = _static(ctx, node, x, "the input")
        kernel = _spatial(list(node.get_attr_value("ksize")), nhwc)
        strides = _spatial(list(node.get_attr_value("strides")), nhwc)
        outputs = _spatial(_static(ctx, node, gradient, "the output gradient"), nhwc)
        pads = _pads(node, _spatial(shape, nhwc), outputs, kernel, strides, [1, 1], nhwc)
        if nhwc:
            x = ctx.make_node("Transpose", [x], attr={"perm": _TO_NCHW}).output[0]
            gradient = ctx.make_node("Transpose", [gradient], attr={"perm": _TO_NCHW}).output[0]
        pool = ctx.make_node("MaxPool", [x], output_count=2, attr={
            "kernel_shape": kernel, "strides": strides, "pads": pads})
        flat = _const(ctx, node, "flat", [-1], np.int64)
        indices = ctx.make_node("Reshape", [pool.output[1], flat]).output[0]
        updates = ctx.make_node("Reshape", [gradient, flat]).output[0]
        size = _const(ctx, node, "size", [np.prod(shape)], np.int64)
        zero = helper.make_tensor("value", ctx.get_dtype(node.input[0]), [1], [0])
        zeros = ctx.make_node("ConstantOfShape", [size], attr={"value": zero}).output[0]
        scattered = ctx.make_node("ScatterElements", [zeros, indices, updates],
                                  attr={"axis": 0, "reduction": "add"}).output[0]
        nchw = [shape[0], shape[3], shape[1], shape[2]] if nhwc else shape
        grid = _const(ctx, node, "nchw", nchw, np.int64)
        if not nhwc:
            _replace(ctx, node, "Reshape", [scattered, grid])
            return
        result = ctx.make_node("Reshape", [scattered, grid]).output[0]
        _replace(ctx, node, "Transpose", [result], {"perm": _FROM_NCHW})
