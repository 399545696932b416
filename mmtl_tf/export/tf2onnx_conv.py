"""tf2onnx converters for Conv4's convolutions: NHWC in, NHWC out, matrix products only.

onnxruntime's Conv and ConvTranspose loop over images and carry a large fixed cost per call;
for the small maps of an adaptation step (five 28x28 images, one core) Conv took 2.5-3.8x the
time of the equivalent Gemm and ConvTranspose 1.5-5x that of Gemm plus a scatter MatMul, and the
matrix forms need none of the NHWC <-> NCHW transposes tf2onnx puts around each Conv. Importing
this module registers:

  Conv2D                 -> strided Slices of the padded input (patches) and one Gemm
  Conv2DBackpropFilter   -> Gemm(patches^T, output gradient) on the same patches
  Conv2DBackpropInput    -> Gemm to patch gradients, MatMul with a constant scatter matrix
                            (small maps); larger strided ones one Gemm per sub-pixel phase

Each falls back to tf2onnx's own converter where it does not apply (NCHW, unknown sizes),
except the filter gradient, which tf2onnx does not convert at all.
"""

from __future__ import annotations

import numpy as np
from tf2onnx.graph_builder import GraphBuilder
from tf2onnx.handler import tf_op
from tf2onnx.onnx_opset import nn as tf2onnx_nn

from mmtl_tf.export.tf2onnx_ops import _FROM_NCHW, _const, _nhwc, _pads, _replace, _spatial, _static


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


def _known(shape, rank: int = 4, from_axis: int = 1) -> bool:
    """Whether ``shape`` has ``rank`` dimensions, all known from ``from_axis`` on (the batch may
    be dynamic for the forward convolution, not for the kernel)."""
    return (shape is not None and len(shape) == rank
            and all(d is not None and d >= 0 for d in shape[from_axis:]))


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
        if not (_nhwc(node) and _known(shape) and _known(out_shape) and _known(kernel, from_axis=0)
                and shape[3] == kernel[2]):
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
    as (H*W)^2, so maps with more than ``MAX_SCATTER`` entries (Conv4's 14x14 one) take
    ``_subpixel_input_gradient``, and anything not NHWC with static sizes (or dilated) goes to
    tf2onnx's ConvTranspose."""

    MAX_SCATTER = 16384

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        _, kernel_value, gradient = node.input
        shapes = [ctx.get_shape(t) for t in (node.output[0], gradient, kernel_value)]
        known = _known(shapes[0]) and _known(shapes[1]) and _known(shapes[2], from_axis=0)
        if not (known and _nhwc(node)):
            return tf2onnx_nn.ConvTranspose.version_11(ctx, node, **kwargs)
        (_, height, width, cin), (_, oh, ow, cout), kernel = shapes
        taps = kernel[0] * kernel[1]
        strides = _spatial(list(node.get_attr_value("strides", [1, 1, 1, 1])), True)
        dilations = _spatial(list(node.get_attr_value("dilations", [1, 1, 1, 1])), True)
        pads = _pads(node, [height, width], [oh, ow], kernel[:2], strides, dilations, True)
        if height * width * oh * ow * taps > cls.MAX_SCATTER:
            if dilations == [1, 1] and _subpixel_input_gradient(
                    ctx, node, gradient, kernel_value, (height, width), (oh, ow), kernel, strides, pads):
                return
            return tf2onnx_nn.ConvTranspose.version_11(ctx, node, **kwargs)
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


def _subpixel_input_gradient(ctx, node, gradient, kernel_value, sizes, outputs, kernel, strides,
                             pads) -> bool:
    """The input gradient of a strided NHWC convolution without ConvTranspose or col2im adds.

    Input rows h = r*stride + kh - pad fall into ``stride`` phases (h mod stride); within a
    phase each tap only shifts the output gradient g on the coarse grid. So every phase is one
    Gemm: g shifted once per tap, concatenated on channels (N*Hc*Wc, taps*Cout), times those
    taps' kernels (Cin, taps*Cout) transposed; Concat + Reshape interleave the phases. Conv4's
    14x14 maps ran ~20% faster this way than through onnxruntime's ConvTranspose and its two
    layout transposes (one core, 5 to 100 images). Returns False, building nothing, when a
    phase receives no tap (a stride larger than the kernel)."""
    (height, width), (oh, ow), (kernel_h, kernel_w, cin, cout) = sizes, outputs, kernel
    sh, sw = strides
    hc, wc = -(-height // sh), -(-width // sw)  # the coarse grid of one phase
    phases = {}
    for kh in range(kernel_h):
        for kw in range(kernel_w):
            qh, qw = kh - pads[0], kw - pads[1]
            phases.setdefault((qh % sh, qw % sw), []).append((kh, kw, qh // sh, qw // sw))
    if len(phases) != sh * sw:
        return False
    builder, shifted = GraphBuilder(ctx), {}

    def shift(dh, dw):  # g at coarse (r + dh, c + dw), zeros where nothing lands
        if (dh, dw) not in shifted:
            r0, r1, c0, c1 = max(0, -dh), min(oh, hc - dh), max(0, -dw), min(ow, wc - dw)
            part, pads = gradient, [0, r0 + dh, c0 + dw, 0, 0, hc - r1 - dh, wc - c1 - dw, 0]
            if (r0, r1, c0, c1) != (0, oh, 0, ow):  # copies only where the shift cuts or pads
                part = builder.make_slice({"data": gradient, "starts": [r0, c0], "ends": [r1, c1],
                                           "axes": [1, 2]})
            if any(pads):
                part = ctx.make_node("Pad", [part, _const(ctx, node, "shift", pads, np.int64)]).output[0]
            shifted[dh, dw] = part
        return shifted[dh, dw]

    def tap_kernel(kh, kw):  # (Cin, Cout)
        tap = builder.make_slice({"data": kernel_value, "starts": [kh, kw], "ends": [kh + 1, kw + 1],
                                  "axes": [0, 1]})
        return ctx.make_node("Reshape", [tap, _const(ctx, node, "tap", [cin, cout], np.int64)]).output[0]

    def concat(values, axis):
        return values[0] if len(values) == 1 else ctx.make_node("Concat", values, attr={"axis": axis}).output[0]

    def reshape(value, shape):
        return ctx.make_node("Reshape", [value, _const(ctx, node, "shape", shape, np.int64)]).output[0]

    per_phase = {}
    for (ph, pw), phase_taps in sorted(phases.items()):
        g = concat([shift(dh, dw) for _, _, dh, dw in phase_taps], 3)  # (N, Hc, Wc, T*Cout)
        w = concat([tap_kernel(kh, kw) for kh, kw, _, _ in phase_taps], 1)  # (Cin, T*Cout)
        product = ctx.make_node("Gemm", [reshape(g, [-1, len(phase_taps) * cout]), w],
                                attr={"transB": 1}).output[0]
        per_phase[ph, pw] = reshape(product, [-1, hc, wc, cin])
    rows = [reshape(concat([per_phase[ph, pw] for pw in range(sw)], 3), [-1, hc, wc * sw, cin])
            for ph in range(sh)]  # columns interleaved; then rows
    full = concat(rows, 2)  # (N, Hc, Sh * Wc * Sw, Cin) = (N, Hc * Sh, Wc * Sw, Cin) in memory
    if (hc * sh, wc * sw) == (height, width):
        _replace(ctx, node, "Reshape", [full, _const(ctx, node, "nhwc", [-1, height, width, cin], np.int64)])
    else:
        full = reshape(full, [-1, hc * sh, wc * sw, cin])
        _replace(ctx, node, "Slice", [full, _const(ctx, node, "start", [0, 0], np.int64),
                                      _const(ctx, node, "end", [height, width], np.int64),
                                      _const(ctx, node, "axes", [1, 2], np.int64)])
    return True


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
