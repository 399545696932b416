"""tf2onnx converters for the TensorFlow ops of an inner-loop SGD step.

tf2onnx 1.17 converts forward graphs but not the ops ``tf.GradientTape`` emits for Conv4's
backward pass. Importing this module registers converters (``tf2onnx.handler.tf_op``) for:

  ShapeN                 -> constants when the shapes are static (they are: support sets are
                            padded to a fixed size), else Shape (+ Cast)
  ReluGrad               -> gradients * Cast(features > 0)
  RsqrtGrad              -> -0.5 * dy * y^3
  BiasAddGrad            -> ReduceSum over every axis but the channel axis
  Conv2DBackpropFilter   -> strided Slices of the padded input (patches) and one Gemm
  Conv2D (NHWC, static H, W, C; replaces tf2onnx's) -> the same patches and one Gemm
  Conv2DBackpropInput (small NHWC maps; replaces tf2onnx's ConvTranspose there)
                         -> Gemm to patch gradients, MatMul with a constant scatter matrix
  MaxPoolGrad (opset 16) -> MaxPool indices + ScatterElements(reduction="add")

Every converter emits default-domain ONNX operators only. Shapes must be static; a
dynamic one raises (the message says to pad the support set to a fixed size).
``BroadcastGradientArgs`` appears only with dynamic shapes and is deliberately not converted.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from tf2onnx import utils
from tf2onnx.graph_builder import GraphBuilder
from tf2onnx.handler import tf_op
from tf2onnx.onnx_opset import nn as tf2onnx_nn

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


def _patch_rows(ctx, node, x, kernel, outputs, strides, dilations, pads):
    """The patches of NHWC ``x`` as rows (N*OH*OW, KH*KW*Cin), columns in HWIO (kh, kw, ci)
    order: the KH*KW strided slices of the padded input concatenated on the channel axis.
    The forward convolution and its filter gradient build the same nodes, which canonicalise
    merges, so an adaptation step cuts the patches of each activation once."""
    if any(pads):
        x = ctx.make_node("Pad", [x, _const(ctx, node, "pads", [
            0, pads[0], pads[1], 0, 0, pads[2], pads[3], 0], np.int64)]).output[0]
    patches = []
    for kh in range(kernel[0]):
        for kw in range(kernel[1]):
            starts = [kh * dilations[0], kw * dilations[1]]
            ends = [b + (o - 1) * s + 1 for b, o, s in zip(starts, outputs, strides)]
            patches.append(GraphBuilder(ctx).make_slice(
                {"data": x, "starts": starts, "ends": ends, "axes": [1, 2], "steps": strides}))
    patches = ctx.make_node("Concat", patches, attr={"axis": 3}).output[0]  # (N, OH, OW, K*K*Cin)
    columns = kernel[0] * kernel[1] * kernel[2]
    return ctx.make_node("Reshape", [patches, _const(ctx, node, "patch_rows", [-1, columns],
                                                     np.int64)]).output[0]


def _conv_geometry(ctx, node, x, kernel, output, nhwc):
    """(output sizes, strides, dilations, ONNX pads) of a TF 2-D convolution."""
    sizes = _spatial(ctx.get_shape(x), nhwc)
    outputs = _spatial(ctx.get_shape(output), nhwc)
    strides = _spatial(list(node.get_attr_value("strides", [1, 1, 1, 1])), nhwc)
    dilations = _spatial(list(node.get_attr_value("dilations", [1, 1, 1, 1])), nhwc)
    return outputs, strides, dilations, _pads(node, sizes, outputs, kernel[:2], strides, dilations, nhwc)


@tf_op("Conv2D")
class Conv2D:
    """NHWC Conv2D with static spatial sizes -> Gemm(patches, kernel as (KH*KW*Cin, Cout)),
    the output in NHWC: no layout transposes around it. On one core onnxruntime's Conv took
    2.5-3.7x the time of this Gemm for Conv4's layers (5 and 100 images of 28x28), and the
    patches are shared with the filter gradient (``Conv2DBackpropFilter``). Anything else
    (NCHW, unknown sizes, grouped) goes to tf2onnx's own converter."""

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        x, kernel_value = node.input[:2]
        shape, kernel = ctx.get_shape(x), ctx.get_shape(kernel_value)
        out_shape = ctx.get_shape(node.output[0])
        static = lambda s: s is not None and len(s) == 4 and all(d is not None and d >= 0 for d in s[1:])  # noqa: E731
        if not (_nhwc(node) and static(shape) and static(out_shape) and kernel is not None
                and all(d is not None and d >= 0 for d in kernel) and shape[3] == kernel[2]):
            return tf2onnx_nn.ConvOp.version_13(ctx, node, **kwargs)
        outputs, strides, dilations, pads = _conv_geometry(ctx, node, x, kernel, node.output[0], True)
        rows = _patch_rows(ctx, node, x, kernel, outputs, strides, dilations, pads)
        matrix = ctx.make_node("Reshape", [kernel_value, _const(
            ctx, node, "kernel_matrix", [-1, kernel[3]], np.int64)]).output[0]
        product = ctx.make_node("Gemm", [rows, matrix, *node.input[2:3]]).output[0]
        _replace(ctx, node, "Reshape", [product, _const(
            ctx, node, "nhwc", [-1, *outputs, kernel[3]], np.int64)])


@tf_op("Conv2DBackpropInput")
class Conv2DBackpropInput:
    """The input gradient of a small NHWC convolution as two matrix products: the patch
    gradients Gemm(g, kernel as (KH*KW*Cin, Cout), transB) of shape (N*OH*OW, KH*KW*Cin), then
    a constant 0/1 scatter matrix (H*W, OH*OW*KH*KW) that adds each patch entry to its input
    position (col2im) in one MatMul per image; the output is NHWC, with no layout transposes.

    onnxruntime's ConvTranspose has a large fixed cost per call: ~100 us for Conv4's 4x4 and
    7x7 maps of five images against ~20 and ~60 us this way (one core). The scatter matrix grows
    as (H*W)^2, so maps with more than ``MAX_SCATTER`` entries (Conv4's 14x14 one) and anything
    not NHWC with static sizes go to tf2onnx's ConvTranspose."""

    MAX_SCATTER = 16384

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        _, kernel_value, gradient = node.input
        shapes = [ctx.get_shape(t) for t in (node.output[0], gradient, kernel_value)]
        known = all(s is not None and len(s) == 4 and all(d is not None and d >= 0 for d in s[1:])
                    for s in shapes) and all(d >= 0 for d in shapes[2])
        if not (known and _nhwc(node)):
            return tf2onnx_nn.ConvTranspose.version_11(ctx, node, **kwargs)
        (_, height, width, cin), (_, oh, ow, cout), kernel = shapes
        taps = kernel[0] * kernel[1]
        if height * width * oh * ow * taps > cls.MAX_SCATTER:
            return tf2onnx_nn.ConvTranspose.version_11(ctx, node, **kwargs)
        strides = _spatial(list(node.get_attr_value("strides", [1, 1, 1, 1])), True)
        dilations = _spatial(list(node.get_attr_value("dilations", [1, 1, 1, 1])), True)
        pads = _pads(node, [height, width], [oh, ow], kernel[:2], strides, dilations, True)
        scatter = np.zeros((height * width, oh * ow * taps), np.float32)
        for i, (r, c, kh, kw) in enumerate(np.ndindex(oh, ow, kernel[0], kernel[1])):
            h = r * strides[0] + kh * dilations[0] - pads[0]
            w = c * strides[1] + kw * dilations[1] - pads[1]
            if 0 <= h < height and 0 <= w < width:
                scatter[h * width + w, i] = 1.0
        matrix = ctx.make_node("Reshape", [kernel_value, _const(
            ctx, node, "kernel_matrix", [-1, cout], np.int64)]).output[0]
        rows = ctx.make_node("Reshape", [gradient, _const(
            ctx, node, "grad_rows", [-1, cout], np.int64)]).output[0]
        patch_grads = ctx.make_node("Gemm", [rows, matrix], attr={"transB": 1}).output[0]
        per_image = ctx.make_node("Reshape", [patch_grads, _const(
            ctx, node, "per_image", [-1, oh * ow * taps, cin], np.int64)]).output[0]
        summed = ctx.make_node("MatMul", [_const(ctx, node, "scatter", scatter, np.float32),
                                          per_image]).output[0]
        _replace(ctx, node, "Reshape", [summed, _const(
            ctx, node, "nhwc", [-1, height, width, cin], np.int64)])


@tf_op("Conv2DBackpropFilter")
class Conv2DBackpropFilter:
    """dW[kh, kw, ci, co] = sum_{n, oh, ow} x_pad[n, kh*d + oh*s, kw*d + ow*s, ci] * g[n, oh, ow, co]
    as one matrix product: Gemm(patches^T, g) with the patch rows (N*OH*OW, KH*KW*Cin) of
    ``_patch_rows`` is the filter gradient (KH*KW*Cin, Cout), reshaped to HWIO.

    onnxruntime runs this 2-4x faster than the equivalent Conv with the gradient as a huge,
    dilated kernel (measured on an adaptation step of Conv4 with five 28x28 images)."""

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        x, _, gradient = node.input
        nhwc = _nhwc(node)
        kernel = _static(ctx, node, node.output[0], "the filter")  # (KH, KW, Cin, Cout)
        _static(ctx, node, x, "the input")
        _static(ctx, node, gradient, "the output gradient")
        outputs, strides, dilations, pads = _conv_geometry(ctx, node, x, kernel, gradient, nhwc)
        if not nhwc:
            x = ctx.make_node("Transpose", [x], attr={"perm": _FROM_NCHW}).output[0]
            gradient = ctx.make_node("Transpose", [gradient], attr={"perm": _FROM_NCHW}).output[0]
        rows = _patch_rows(ctx, node, x, kernel, outputs, strides, dilations, pads)
        gradient = ctx.make_node("Reshape", [gradient, _const(
            ctx, node, "grad_rows", [-1, kernel[3]], np.int64)]).output[0]
        product = ctx.make_node("Gemm", [rows, gradient], attr={"transA": 1}).output[0]
        _replace(ctx, node, "Reshape", [product, _const(ctx, node, "hwio", kernel, np.int64)])


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
