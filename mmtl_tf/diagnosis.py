"""What adaptation does, step by step: the measurements behind "why does this setting score
lower" (``pipelines/diagnose.py``).

For fixed episodes of one setting it records, after 0, 1, ..., ``steps`` inner steps: the support
loss, the query accuracy and loss, and how far the step moved the encoder (relative to the
encoder's own size) and the head, so a step that overshoots, does nothing, or moves only the head
shows up as a number instead of a guess.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mmtl_tf.data.episodes import Episode
from mmtl_tf.evaluation import mean_and_ci95
from mmtl_tf.meta import inner_loop as il

TRACED = ("support_loss", "query_accuracy", "query_loss", "encoder_step", "head_step", "head_norm")


def _norm(tensors) -> tf.Tensor:
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, tf.float32))) for t in tensors]))


def adaptation_trace(learner, episodes: Episode, steps: int, batch: int = 16) -> dict:
    """Per-episode arrays (episodes, steps + 1) of every quantity in ``TRACED``.

    Column k is measured at the fast weights after k steps (0: where the task starts).
    ``encoder_step``/``head_step`` at column k are the size of step k (Frobenius norm of the
    change; the encoder's relative to its norm at the start), 0 in column 0; ``head_norm`` is
    the head's norm at column k.
    """
    ways = int(episodes.class_ids.shape[-1])
    meta_params = [tf.convert_to_tensor(p) for p in learner.meta_params]
    rates = learner.learning_rates(ways)
    loop = learner.loop

    def one(episode):
        support_x, support_y, query_x, query_y = episode
        params = loop.task_params(meta_params, support_x, support_y, ways)
        encoder_size = _norm(params[:-2])
        trace = {name: [] for name in TRACED}

        def measure(params, previous):
            outputs = loop.logits(params, support_x)
            trace["support_loss"].append(loop.loss(outputs, support_y))
            query = il.query_logits(loop, params, support_x, query_x)
            hits = tf.equal(tf.argmax(query, -1, output_type=tf.int32), query_y)
            trace["query_accuracy"].append(tf.reduce_mean(tf.cast(hits, tf.float32)))
            trace["query_loss"].append(loop.loss(query, query_y))
            if previous is None:
                trace["encoder_step"].append(tf.constant(0.0))
                trace["head_step"].append(tf.constant(0.0))
            else:
                trace["encoder_step"].append(_norm([a - b for a, b in zip(params[:-2], previous[:-2])])
                                             / encoder_size)
                trace["head_step"].append(_norm([a - b for a, b in zip(params[-2:], previous[-2:])]))
            trace["head_norm"].append(_norm(params[-2:]))

        measure(params, None)
        for step in range(steps):
            _, new = loop.step(params, support_x, support_y, rates(step), first_order=True)
            measure(new, params)
            params = new
        return tuple(tf.cast(tf.stack(trace[name]), tf.float32) for name in TRACED)

    fields = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    signature = [tf.TensorSpec([None, *f.shape[1:]], tf.as_dtype(f.dtype)) for f in fields]
    run = tf.function(lambda *f: tf.map_fn(
        one, f, fn_output_signature=tuple(tf.TensorSpec([steps + 1], tf.float32) for _ in TRACED),
        parallel_iterations=learner.config.parallel_iterations), input_signature=signature)
    parts = {name: [] for name in TRACED}
    for start in range(0, len(episodes.support_x), batch):
        for name, values in zip(TRACED, run(*(f[start:start + batch] for f in fields))):
            parts[name].append(values.numpy())
    return {name: np.concatenate(values).astype(np.float64) for name, values in parts.items()}


def summarise(trace: dict) -> dict:
    """Means over episodes (and the 95% CI of query accuracy) per step: {name: [per step]}."""
    summary = {name: [float(np.mean(values[:, k])) for k in range(values.shape[1])]
               for name, values in trace.items()}
    summary["query_accuracy_ci95"] = [mean_and_ci95(trace["query_accuracy"][:, k])[1]
                                      for k in range(trace["query_accuracy"].shape[1])]
    return summary
