"""The export of a regression learner (the sinusoid family): parameters and two ONNX graphs.

  predict     x (B, 1) with any B, params -> y (B, 1)
  adapt_step  support_x (MAX_SUPPORT, 1), support_y (MAX_SUPPORT, 1), sample_mask
              (MAX_SUPPORT,), params, lr_<param>
              -> loss (the support MSE before the step), new_<param> for every param;
              a proximal model (manifest ``proximal`` mu > 0) also takes anchor_<param>, the
              parameters the task starts from (the meta-initialisation), after the rates

Both run the one inner loop (``InnerLoop.logits``, ``InnerLoop.step``): ``adapt_step`` chained k
times from the meta-initialisation in ``params.npz`` (feeding ``new_<param>`` back as
``<param>``) is k steps of ``MetaLearner`` adaptation, then ``predict`` gives the adapted
regressor's outputs. K support points go in the first K rows, ``sample_mask`` 1 there and 0 on
the padding (whose values do not matter): the support set has a static size because tf2onnx
converts neither the gradient of a mean nor of a subtraction over a dynamic number of rows
(DynamicStitch, BroadcastGradientArgs). The image device runtime (``mmtl_tf.ondevice``) does not
read these exports; any onnxruntime can run the two graphs (see ``exported/README.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from mmtl_tf.files import sha256

GRAPHS = ("predict", "adapt_step")
MAX_SUPPORT = 100  # support points adapt_step takes (K <= 100); an MLP step on 100 rows is cheap


def check_exportable(learner) -> None:
    """Raises ValueError for a regression learner these graphs cannot carry."""
    if learner.config.learned_inner_lr != "none":
        raise ValueError(f"learned_inner_lr={learner.config.learned_inner_lr!r}: a regression "
                         "export carries one constant inner rate (algorithms maml, fomaml, "
                         "anil, pretrain); learned rates are exported for classifiers only")


def parameters(learner):
    """(names, tensors) of the meta-initialisation, in the graphs' input order."""
    from mmtl_tf.export.signatures import param_names

    return param_names(learner), [tf.convert_to_tensor(p) for p in learner.meta_params]


def inner_rates(learner) -> list:
    """The constant inner rate of every parameter, as the one inner loop uses it (ANIL's
    encoder rates are there too but its inner loop leaves the encoder unchanged)."""
    return [tf.cast(r, tf.float32) for r in learner.learning_rates(1)(0)]


def graphs(learner, opset: int) -> dict:
    """The checked ONNX graphs by file stem (``onnx_convert.to_onnx``)."""
    from mmtl_tf.export.onnx_convert import to_onnx

    check_exportable(learner)
    names, params = parameters(learner)
    loop, n = learner.loop, len(params)
    param_specs = [tf.TensorSpec(p.shape, p.dtype, name) for p, name in zip(params, names)]
    lr_specs = [tf.TensorSpec([], tf.float32, "lr_" + name) for name in names]
    anchor_specs = [tf.TensorSpec(p.shape, p.dtype, "anchor_" + name)
                    for p, name in zip(params, names)] if loop.proximal else []
    column = lambda rows, name: tf.TensorSpec([rows, 1], tf.float32, name)  # noqa: E731
    support = [column(MAX_SUPPORT, "support_x"), column(MAX_SUPPORT, "support_y"),
               tf.TensorSpec([MAX_SUPPORT], tf.float32, "sample_mask")]

    def predict(x, *params):
        return loop.logits(list(params), x)

    def adapt_step(support_x, support_y, sample_mask, *rest):
        loss, new = loop.step(list(rest[:n]), support_x, support_y, list(rest[n:2 * n]), True,
                              sample_mask, anchor=list(rest[2 * n:]) or None)
        return [loss, *new]

    return {"predict": to_onnx(predict, [column(None, "x"), *param_specs], ["y"], opset,
                               graph_name="predict"),
            "adapt_step": to_onnx(adapt_step, [*support, *param_specs, *lr_specs, *anchor_specs],
                                  ["loss"] + ["new_" + name for name in names], opset,
                                  graph_name="adapt_step")}


def manifest(folder: Path, learner, config, onnx_graphs: dict, opset: int, params_file: str,
             format_version: int) -> dict:
    """What a user needs to run the graphs, and the SHA-256 of every file in ``folder``."""
    from mmtl_tf.export.exporter import graph_io
    from mmtl_tf.training import protocol_of

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    metrics_path = folder / "metrics.json"
    return {
        "format_version": format_version,
        "name": config.name,
        "task": "regression",
        "inputs": "x: float32 (rows, 1); targets y: float32 (rows, 1)",
        "max_support": MAX_SUPPORT,
        "protocol": protocol_of(config),
        "default_steps": learner.config.eval_inner_steps,
        "inner_lr": learner.config.inner_lr,
        "adapt_head_only": learner.config.adapt_head_only,
        "algorithm": learner.config.algorithm,
        "proximal": float(learner.config.proximal),  # > 0: adapt_step takes anchor_<param>
        "onnx_opset": opset,
        "parameters": parameters(learner)[0],
        "graphs": {stem: {"file": f"{stem}.onnx", **graph_io(model)}
                   for stem, model in sorted(onnx_graphs.items())},
        "params_file": params_file,
        "meta_init_sha256": sha256(folder / params_file),
        "training_config": config.to_dict(),
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
        "files": {str(p.relative_to(folder)): sha256(p) for p in files},
    }
