"""The exported computations as plain ONNX: converted, checked, reproducible.

``to_onnx`` converts a TensorFlow function with tf2onnx (after registering the gradient-op
converters of ``tf2onnx_ops`` and ``tf2onnx_conv``) and refuses to return a model that a stock onnxruntime cannot
run: any op tf2onnx reports as unsupported or fails to convert raises ``OnnxExportError`` naming
the ops, and every model passes ``onnx.checker`` (full check), uses default-domain operators only
and loads in onnxruntime. Reductions over several axes are split into one per axis (onnxruntime
sums sequentially in float32, which cost batch-norm moments 3e-5 of relative precision). Names
are canonicalised (tf2onnx numbers the nodes it creates with a process-wide counter), so
converting the same function twice gives byte-identical files.

``export_graphs`` builds the graphs a device needs from an ``Exportable`` (file stem -> model):

  predict        images (B, S, S, C) with any B, params[, bn stats] -> logits (B, max_ways)
  support_stats  support_images, sample_mask, params -> bn stats, support_logits
                 (non-transductive models only)
  adapt_step     support_images, support_labels, sample_mask, class_mask, params, lrs
                 -> loss, new_<param> for every param
  head_step      same inputs -> loss, new_head_w, new_head_b
  init_head      support_images, support_labels, sample_mask, params -> new_head_w, new_head_b
                 (not "head_w": an ONNX value cannot share its name with the head_w input)
  head_then_adapt_step  adapt_step's inputs and next_lr_<param> -> loss, head_w_1, head_b_1,
                 next_loss, new_<param>: head_step then adapt_step (zero-head models only)
  meta_init      images -> logits with the meta-learned weights baked in

A proximal model (``Exportable.proximal`` mu > 0) adds ``anchor_<param>`` inputs, the task's
starting params (the meta-initialisation with init_head's head), after all the others of
adapt_step and head_then_adapt_step, and ``anchor_head_w``, ``anchor_head_b`` to head_step: each
step then descends the support loss plus mu/2 * ||params - anchor||^2 (``InnerLoop.step``).
Without the term the graphs have no anchor inputs.

Inputs and outputs carry exactly the names of ``signatures`` (param_names, bn_names; learning
rates are lr_<param>, proximal anchors anchor_<param>).
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

from mmtl_tf.export import tf2onnx_conv, tf2onnx_ops  # noqa: F401  (register the converters)
from mmtl_tf.export.onnx_rewrite import (OnnxExportError, canonicalise, split_kernel_transposes,
                                          split_reductions)
from mmtl_tf.files import atomic_write

# The lowest opset every graph converts at: MaxPoolGrad (maxpool encoders) needs
# ScatterElements with reduction="add", which is opset 16.
OPSET = 16
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# tf2onnx logs these and carries on (from_function converts with continue_on_error=True); the
# group is the op type, or the converter class of a node whose converter raised.
_FAILURES = (re.compile(r"Tensorflow op \[.*?: (\w+)\] is not supported"),
             re.compile(r"Failed to convert node .*?fct=<bound method (\w+)\."))


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
    split_reductions(model.graph)
    split_kernel_transposes(model)
    canonicalise(model, graph_name)
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
    data = model.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))


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
    # The support logits give the device its support loss after the last step without a second
    # pass through the encoder.
    x, _, mask = _support_specs(ex)
    fn = lambda support_x, mask, *params: ex.support_stats(support_x, mask, params, True)  # noqa: E731
    return fn, [x, mask, *ex.param_specs()], [*ex.bn, "support_logits"]


def _step(method, outputs):
    def build(ex):
        n = len(ex.params)
        class_mask = tf.TensorSpec([ex.spec.max_ways], tf.float32, "class_mask")

        def fn(support_x, support_y, sample_mask, class_mask, *rest):
            loss, new = getattr(ex, method)(support_x, support_y, sample_mask, class_mask,
                                            rest[:n], rest[n:2 * n], rest[2 * n:])
            return [loss, *new]

        names = ["loss"] + ["new_" + p for p in (ex.names if outputs is None else outputs)]
        anchors = ex.anchor_specs(head_only=method == "head_step")
        return fn, [*_support_specs(ex), class_mask, *ex.param_specs(), *ex.lr_specs(),
                    *anchors], names
    return build


def _head_then_adapt_step(ex):
    n = len(ex.params)
    class_mask = tf.TensorSpec([ex.spec.max_ways], tf.float32, "class_mask")
    next_lrs = [tf.TensorSpec(s.shape, s.dtype, "next_" + s.name) for s in ex.lr_specs()]

    def fn(support_x, support_y, sample_mask, class_mask, *rest):
        loss, head, next_loss, new = ex.head_then_adapt_step(
            support_x, support_y, sample_mask, class_mask, rest[:n], rest[n:2 * n],
            rest[2 * n:3 * n], rest[3 * n:])
        return [loss, *head, next_loss, *new]

    names = ["loss", "head_w_1", "head_b_1", "next_loss"] + ["new_" + p for p in ex.names]
    specs = [*_support_specs(ex), class_mask, *ex.param_specs(), *ex.lr_specs(), *next_lrs,
             *ex.anchor_specs()]
    return fn, specs, names


def _init_head(ex):
    fn = lambda x, y, mask, *params: list(ex.init_head(x, y, mask, params))  # noqa: E731
    return fn, [*_support_specs(ex), *ex.param_specs()], ["new_head_w", "new_head_b"]


BUILDERS = {"predict": _predict, "support_stats": _support_stats,
            "adapt_step": _step("adapt_step", None), "head_step": _step("head_step", ["head_w", "head_b"]),
            "init_head": _init_head, "head_then_adapt_step": _head_then_adapt_step}


def graph_names(exportable) -> list[str]:
    """The file stems ``export_graphs`` builds for this model, in build order."""
    names = list(BUILDERS) + ["meta_init"]
    if exportable.spec.transductive or not exportable.bn:
        names.remove("support_stats")  # predict normalises with batch statistics: no stats needed
    if exportable.learner.config.head_init != "zero":
        names.remove("head_then_adapt_step")  # only a zero head's first step is a head step
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

    Batch norm in inference mode with the statistics calibrated at the end of meta-training
    (``training.calibrate_batch_norm``), in either batch-norm mode: there is no support set to
    take statistics from, and so it computes what ``MetaLearner(images)`` and the SavedModel's
    ``serving_default`` compute. With a "zero" or "proto" head the head is the unused head
    variable: only the features, not the logits, mean anything before a task's head is set.
    """
    return personalized(exportable, exportable.params, exportable.bn_state, opset,
                        graph_name="meta_init")


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
    if not ex.spec.transductive and bn_state is None:
        raise ValueError("a non-transductive model needs the support statistics from "
                         "support_stats as bn_state")
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
            "converter failed (converters: mmtl_tf/export/tf2onnx_ops.py, tf2onnx_conv.py):\n  " + "\n  ".join(lines), ops)


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
