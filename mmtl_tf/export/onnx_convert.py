"""The exported computations as plain ONNX: converted, checked, reproducible.

``to_onnx`` converts a TensorFlow function with tf2onnx (after registering the gradient-op
converters of ``tf2onnx_ops``) and refuses to return a model that a stock onnxruntime cannot
run: any op tf2onnx reports as unsupported or fails to convert raises ``OnnxExportError`` naming
the ops, and every model passes ``onnx.checker`` (full check), uses default-domain operators only
and loads in onnxruntime. Reductions over several axes are split into one per axis (onnxruntime
sums sequentially in float32, which cost batch-norm moments 3e-5 of relative precision). Names
are canonicalised (tf2onnx numbers the nodes it creates with a process-wide counter), so
converting the same function twice gives byte-identical files.

``export_graphs`` builds the graphs a device needs from an ``Exportable`` (file stem -> model):

  predict        images (B, S, S, C) with any B, params[, bn stats] -> logits (B, max_ways)
  support_stats  support_images, sample_mask, params -> bn stats  (non-transductive models only)
  adapt_step     support_images, support_labels, sample_mask, class_mask, params, lrs
                 -> loss, new_<param> for every param
  head_step      same inputs -> loss, new_head_w, new_head_b
  init_head      support_images, support_labels, sample_mask, params -> new_head_w, new_head_b
                 (not "head_w": an ONNX value cannot share its name with the head_w input)
  meta_init      images -> logits with the meta-learned weights baked in

Inputs and outputs carry exactly the names of ``signatures`` (param_names, bn_names, lr_names).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

from mmtl_tf.export import tf2onnx_ops  # noqa: F401  (registers the gradient-op converters)

# The lowest opset every graph converts at: MaxPoolGrad (maxpool encoders) needs
# ScatterElements with reduction="add", which is opset 16.
OPSET = 16
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
           "Bernoulli", "Dropout"}  # never merged: two of them draw different values
# tf2onnx logs these and carries on (from_function converts with continue_on_error=True); the
# group is the op type, or the converter class of a node whose converter raised.
_FAILURES = (re.compile(r"Tensorflow op \[.*?: (\w+)\] is not supported"),
             re.compile(r"Failed to convert node .*?fct=<bound method (\w+)\."))


class OnnxExportError(RuntimeError):
    """A conversion did not give a plain ONNX model; ``ops`` names the ops responsible."""

    def __init__(self, message: str, ops=()):
        super().__init__(message)
        self.ops = tuple(ops)


def to_onnx(fn, input_signature, output_names, opset: int = OPSET,
            graph_name: str = "mmtl_tf") -> onnx.ModelProto:
    """Converts ``fn`` (a Python or tf.function taking one tensor per spec, returning a tensor
    or a flat sequence of ``len(output_names)`` tensors) to a checked ONNX model whose inputs are
    named by the specs and whose outputs are ``output_names``, in that order.

    Raises OnnxExportError if tf2onnx leaves an op unconverted or the model fails the checks.
    """
    specs, outputs = list(input_signature), list(output_names)
    _check_names([s.name for s in specs], outputs)

    @tf.function(input_signature=specs, autograph=False)
    def named(*args):
        flat = tf.nest.flatten(fn(*args))
        if len(flat) != len(outputs):
            raise ValueError(f"the function returned {len(flat)} tensors for {len(outputs)} "
                             f"output names {outputs}")
        return {name: tf.identity(t) for name, t in zip(outputs, flat)}

    with _captured("tf2onnx") as messages:
        try:
            model, _ = tf2onnx.convert.from_function(named, input_signature=specs, opset=opset)
        except Exception as err:
            raise OnnxExportError(f"tf2onnx could not convert {graph_name!r}: {err}\n"
                                  + "\n".join(messages)) from err
    _raise_on_failures(graph_name, messages)
    _fix_interface(model, [s.name for s in specs], outputs, graph_name)
    _split_reductions(model.graph)
    _canonicalise(model, graph_name)
    verify(model, graph_name)
    return model


def verify(model: onnx.ModelProto, graph_name: str = "model") -> None:
    """Raises OnnxExportError unless ``model`` is default-domain only, passes the full checker
    and loads in onnxruntime's CPU provider."""
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                      if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise OnnxExportError(f"{graph_name}: operators outside the default ONNX domain: {foreign}",
                              foreign)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise OnnxExportError(f"{graph_name}: onnx.checker rejects the model: {err}") from err
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise OnnxExportError(f"{graph_name}: onnxruntime cannot load the model: {err}") from err


def write_onnx(model: onnx.ModelProto, path) -> Path:
    """Writes ``model`` atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; exported models are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# ----- the graphs of an Exportable -------------------------------------------------------------
def _support_specs(ex):
    rows = ex.spec.max_support
    return [ex.image_spec(rows, "support_images"), tf.TensorSpec([rows], tf.int32, "support_labels"),
            tf.TensorSpec([rows], tf.float32, "sample_mask")]


def _predict(ex):
    n = len(ex.params)
    stats = [] if ex.spec.transductive else ex.bn_specs()
    fn = lambda images, *rest: ex.predict(images, rest[:n], rest[n:] or None)  # noqa: E731
    return fn, [ex.image_spec(None, "images"), *ex.param_specs(), *stats], ["logits"]


def _support_stats(ex):
    x, _, mask = _support_specs(ex)
    fn = lambda support_x, mask, *params: ex.support_stats(support_x, mask, params)  # noqa: E731
    return fn, [x, mask, *ex.param_specs()], list(ex.bn)


def _step(method, outputs):
    def build(ex):
        n = len(ex.params)
        class_mask = tf.TensorSpec([ex.spec.max_ways], tf.float32, "class_mask")

        def fn(support_x, support_y, sample_mask, class_mask, *rest):
            loss, new = getattr(ex, method)(support_x, support_y, sample_mask, class_mask,
                                            rest[:n], rest[n:])
            return [loss, *new]

        names = ["loss"] + ["new_" + p for p in (ex.names if outputs is None else outputs)]
        return fn, [*_support_specs(ex), class_mask, *ex.param_specs(), *ex.lr_specs()], names
    return build


def _init_head(ex):
    fn = lambda x, y, mask, *params: list(ex.init_head(x, y, mask, params))  # noqa: E731
    return fn, [*_support_specs(ex), *ex.param_specs()], ["new_head_w", "new_head_b"]


BUILDERS = {"predict": _predict, "support_stats": _support_stats,
            "adapt_step": _step("adapt_step", None), "head_step": _step("head_step", ["head_w", "head_b"]),
            "init_head": _init_head}


def graph_names(exportable) -> list[str]:
    """The file stems ``export_graphs`` builds for this model, in build order."""
    names = list(BUILDERS) + ["meta_init"]
    if exportable.spec.transductive or not exportable.bn:
        names.remove("support_stats")  # predict normalises with batch statistics: no stats needed
    return names


def export_graphs(exportable, names=None, opset: int = OPSET) -> dict[str, onnx.ModelProto]:
    """The checked ONNX graphs of ``exportable`` by file stem (all of ``graph_names`` or ``names``)."""
    wanted = graph_names(exportable) if names is None else list(names)
    unknown = sorted(set(wanted) - set(graph_names(exportable)))
    if unknown:
        raise ValueError(f"unknown graphs {unknown} for this model; known: {graph_names(exportable)}")
    graphs = {}
    for name in wanted:
        if name == "meta_init":
            graphs[name] = meta_init(exportable, opset)
            continue
        fn, specs, outputs = BUILDERS[name](exportable)
        graphs[name] = to_onnx(fn, specs, outputs, opset, graph_name=name)
    return graphs


def meta_init(exportable, opset: int = OPSET) -> onnx.ModelProto:
    """The classifier at the meta-learned weights: images (B, ...) -> logits (B, max_ways).

    Batch norm: a transductive model normalises each batch with its own statistics (there is
    no support set); a non-transductive one uses the statistics stored in the encoder's
    non-trainable variables, i.e. those of the last support batch seen in meta-training (batch
    norm has momentum 0). With a "zero" or "proto" head the head is the unused head variable:
    only the features, not the logits, mean anything before a task's head is initialised.
    """
    stats = None if exportable.spec.transductive else exportable.bn_state
    return personalized(exportable, exportable.params, stats, opset, graph_name="meta_init")


def personalized(exportable, params, bn_state=None, opset: int = OPSET,
                 graph_name: str = "personalized") -> onnx.ModelProto:
    """A stand-alone classifier with ``params`` (param_names order; the head may be max_ways or
    N wide) and, for a non-transductive model, the support statistics ``bn_state`` baked in as
    initializers: images (B, S, S, C) with any B -> logits (B, head width)."""
    ex = exportable
    if len(params) != len(ex.params):
        raise ValueError(f"expected {len(ex.params)} params ({ex.names}), got {len(params)}")
    for name, p, ref in zip(ex.names[:-2], params, ex.params):
        if tuple(np.shape(p)) != tuple(ref.shape):
            raise ValueError(f"param {name} has shape {np.shape(p)}, expected {tuple(ref.shape)}")
    if ex.spec.transductive != (bn_state is None):
        raise ValueError("a transductive model takes no bn_state (batch statistics), a "
                         "non-transductive one needs the support statistics from support_stats")
    weights = [np.asarray(p, ref.dtype.as_numpy_dtype) for p, ref in zip(params, ex.params)]
    stats = None if bn_state is None else [np.asarray(v, np.float32) for v in bn_state]

    def fn(images):  # constants made inside the trace: captured tensors would become inputs
        consts = lambda arrays: [tf.constant(a) for a in arrays]  # noqa: E731
        return ex.predict(images, consts(weights), None if stats is None else consts(stats))

    return to_onnx(fn, [ex.image_spec(None, "images")], ["logits"], opset, graph_name=graph_name)


# ----- conversion details ---------------------------------------------------------------------
class _Collect(logging.Handler):
    def __init__(self, messages):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record):
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:  # a converter raised: say why
            message = f"{message.splitlines()[0]}: {record.exc_info[1]}"
        self.messages.append(message)


@contextlib.contextmanager
def _captured(logger_name):
    """The warning and error messages of a logger hierarchy, as a list filled while inside."""
    logger, messages = logging.getLogger(logger_name), []
    handler, level = _Collect(messages), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _raise_on_failures(graph_name, messages):
    ops, lines = [], []
    for message in messages:
        for match in filter(None, (p.search(message) for p in _FAILURES)):
            lines.append(message.splitlines()[0])
            ops += [match.group(1)] if match.group(1) not in ops else []
    if lines or any(m.startswith("Unsupported ops") for m in messages):
        raise OnnxExportError(
            f"tf2onnx could not convert {graph_name!r}: ops {ops} are unsupported or their "
            "converter failed (converters: mmtl_tf/export/tf2onnx_ops.py):\n  " + "\n  ".join(lines), ops)


def _check_names(inputs, outputs):
    names = list(inputs) + list(outputs)
    bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
    if bad:
        raise ValueError(f"input and output names must be identifiers, got {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"input and output names must be distinct, got {names}")


def _fix_interface(model, inputs, outputs, graph_name):
    """Orders the graph outputs as given (tf2onnx sorts a dict's keys) and checks the names."""
    graph = model.graph
    by_name = {o.name: o for o in graph.output}
    got_in = [i.name for i in graph.input]
    if got_in != inputs or sorted(by_name) != sorted(outputs):
        raise OnnxExportError(f"{graph_name}: tf2onnx named the graph's inputs {got_in} and outputs "
                              f"{sorted(by_name)}, expected {inputs} and {outputs}")
    ordered = [onnx.ValueInfoProto.FromString(by_name[n].SerializeToString()) for n in outputs]
    del graph.output[:]
    graph.output.extend(ordered)


def _split_reductions(graph):
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


def _canonicalise(model, graph_name):
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
