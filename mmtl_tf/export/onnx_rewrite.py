"""Rewrites of converted ONNX graphs: exact reductions, faster kernels, reproducible names.

onnxruntime sums a multi-axis reduction sequentially in float32, which cost batch-norm moments
3e-5 of relative precision; ``split_reductions`` makes it one reduction per axis.
``split_kernel_transposes`` replaces a transpose that onnxruntime runs slowly by an equal pair
it runs fast (the adaptation step transposes every kernel on every call).
tf2onnx names the nodes it creates with a process-wide counter; ``canonicalise`` renames and
orders them so that converting the same function twice gives byte-identical files.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import tf2onnx


class OnnxExportError(RuntimeError):
    """A conversion did not give a plain ONNX model; ``ops`` names the ops responsible."""

    def __init__(self, message: str, ops=()):
        super().__init__(message)
        self.ops = tuple(ops)


_RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
           "Bernoulli", "Dropout"}  # never merged: two of them draw different values


def split_reductions(graph):
    """Rewrites each ReduceSum/ReduceMean over several axes as one reduction per axis.

    onnxruntime accumulates a reduction sequentially in float32: batch-norm moments over
    N*H*W = 4704 values came out ~3e-5 relative off (TensorFlow: ~2e-7), enough to flip ReLU
    masks and move adapted weights by 1e-3. Chained reductions add at most ~50 values each.
    """
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    nodes, added = [], []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        in_attr = "axes" in attrs
        axes = attrs.get("axes") if in_attr else (consts.get(node.input[1]) if len(node.input) > 1 else None)
        if node.op_type not in ("ReduceSum", "ReduceMean") or axes is None or len(axes) < 2 \
                or min(axes) < 0:
            nodes.append(node)
            continue
        keepdims = attrs.pop("keepdims", 1)
        attrs.pop("axes", None)
        value = node.input[0]
        # Later axes first, so that the earlier ones keep their index when keepdims=0.
        for axis in sorted((int(a) for a in axes), reverse=True):
            out = node.output[0] if axis == min(axes) else f"{node.output[0]}/axis{axis}"
            if in_attr:
                extra, inputs = {"axes": [axis]}, [value]
            else:
                added.append(onnx.numpy_helper.from_array(np.array([axis], np.int64), out + "/axes"))
                extra, inputs = {}, [value, added[-1].name]
            nodes.append(onnx.helper.make_node(node.op_type, inputs, [out], name=out,
                                               keepdims=keepdims, **attrs, **extra))
            value = out
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)


def split_kernel_transposes(model):
    """Rewrites each HWIO -> OIHW Transpose of a 4-D tensor (perm [3, 2, 0, 1], what tf2onnx
    puts before every Conv and ConvTranspose of a kernel input) as two plain matrix transposes:
    (KH*KW, Cin, Cout) -> (KH*KW, Cout, Cin), then (KH*KW, Cout*Cin) -> (Cout*Cin, KH*KW).

    Kernels are inputs of the adaptation graphs, so the transposes run at every step, and
    onnxruntime's one-shot transpose with a 9-element inner block took ~140 us per 3x3x64x64
    kernel against ~24 us for the pair (one core, graph optimisations off: onnxruntime's own
    transpose optimiser merges the pair back into the slow one).
    """
    graph = model.graph
    shapes = _static_shapes(model)
    nodes, added = [], []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        shape = shapes.get(node.input[0]) if node.op_type == "Transpose" else None
        if perm != [3, 2, 0, 1] or shape is None or len(shape) != 4:
            nodes.append(node)
            continue
        kh, kw, cin, cout = shape
        base = node.output[0]

        def add(op, value, suffix, out=None, **attrs):
            out = out or f"{base}/{suffix}"
            inputs = [value]
            if op == "Reshape":
                added.append(onnx.numpy_helper.from_array(np.array(attrs.pop("dims"), np.int64),
                                                          f"{base}/{suffix}_shape"))
                inputs.append(added[-1].name)
            nodes.append(onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
            return out

        k_i_o = add("Reshape", node.input[0], "k_i_o", dims=[kh * kw, cin, cout])
        k_o_i = add("Transpose", k_i_o, "k_o_i", perm=[0, 2, 1])
        k_oi = add("Reshape", k_o_i, "k_oi", dims=[kh * kw, cout * cin])
        oi_k = add("Transpose", k_oi, "oi_k", perm=[1, 0])
        add("Reshape", oi_k, "oihw", out=base, dims=[cout, cin, kh, kw])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)


def _static_shapes(model) -> dict:
    """Value name -> shape (list of ints) for every value whose shape is fully known."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    return shapes


def canonicalise(model, graph_name):
    """Names every node, intermediate value and symbolic dimension by position, and fixes the
    metadata, so that the serialisation depends on the graph only."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        raise OnnxExportError(f"{graph_name}: control flow (subgraphs) is not supported")
    _sort_nodes(graph)
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    # tf2onnx orders initializers by its numbered names: order them by first use instead.
    uses = [v for n in graph.node for v in n.input] + [v.name for v in graph.output]
    first = {v: i for i, v in reversed(list(enumerate(uses)))}
    initializers = sorted((t for t in graph.initializer if t.name in first), key=lambda t: first[t.name])
    initializers = [onnx.TensorProto.FromString(t.SerializeToString()) for t in initializers]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    rename = {}
    for i, tensor in enumerate(graph.initializer):
        if tensor.name not in keep:
            rename[tensor.name] = tensor.name = f"const_{i}:0"
    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{i}"
        node.ClearField("doc_string")
        for k, value in enumerate(node.output):
            if value and value not in keep:
                rename[value] = node.output[k] = f"{node.name}:{k}"
    for node in graph.node:
        for k, value in enumerate(node.input):
            node.input[k] = rename.get(value, value)
    del graph.value_info[:]  # shape hints only; they carry tf2onnx's numbered names
    symbols = {}
    for value in list(graph.input) + list(graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param"):
                dim.dim_param = symbols.setdefault(
                    dim.dim_param, "batch" if axis == 0 else f"dim_{len(symbols)}")
    graph.name = graph_name
    graph.ClearField("doc_string")
    model.ClearField("doc_string")
    model.producer_name, model.producer_version = "tf2onnx", tf2onnx.__version__
    used = {n.domain for n in graph.node}
    kept = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _sort_nodes(graph):
    """Merges duplicate nodes and orders the nodes by (depth, structural hash): tf2onnx's
    topological order breaks ties by its numbered names. A node's hash covers its op,
    attributes and its inputs' hashes (graph inputs by name, initializers by content), never an
    internal name, so two nodes with one hash compute the same value: the later one goes."""
    def digest(*parts):
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def anonymous(proto):
        copy = type(proto).FromString(proto.SerializeToString())
        copy.ClearField("name")
        return copy.SerializeToString().hex()

    value = {i.name: (0, "input:" + i.name) for i in graph.input}
    value.update({t.name: (0, "const:" + digest(anonymous(t))) for t in graph.initializer})
    value[""] = (0, "")
    outputs = {o.name for o in graph.output}
    alias, seen, keyed = {}, {}, []
    for node in graph.node:  # tf2onnx emits a topological order
        node.input[:] = [alias.get(v, v) for v in node.input]
        attrs = [a.name + "=" + (anonymous(a.t) if a.type == onnx.AttributeProto.TENSOR
                                  else a.SerializeToString().hex())
                 for a in sorted(node.attribute, key=lambda a: a.name)]
        inputs = [value[v] for v in node.input]
        depth = 1 + max((d for d, _ in inputs), default=0)
        key = digest(node.domain, node.op_type, *attrs, *(h for _, h in inputs))
        twin = seen.get(key)
        if twin is not None and not outputs & set(node.output) and node.op_type not in _RANDOM:
            alias.update(zip(node.output, twin.output))
            continue
        seen.setdefault(key, node)
        value.update({out: (depth, f"{key}:{k}") for k, out in enumerate(node.output)})
        keyed.append((depth, key, len(keyed), node))
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for *_, n in sorted(keyed, key=lambda t: t[:3])]
    del graph.node[:]
    graph.node.extend(nodes)
