"""Evaluation on fixed sets of episodes: query accuracy after every adaptation step, means with a
95% confidence interval, and the same episodes scored through the device runtime."""

from __future__ import annotations

import os
import typing

import numpy as np
import tensorflow as tf

from mmtl_tf.data.episodes import Episode
from mmtl_tf.meta import inner_loop as il


class Setting(typing.NamedTuple):
    """One evaluation task shape: N-way K-shot with Q queries per class; ``within_alphabet``
    draws all N classes of an episode from one alphabet (harder: similar characters)."""

    ways: int
    shots: int
    queries: int
    within_alphabet: bool = False

    @property
    def name(self) -> str:
        return f"{self.ways}-way {self.shots}-shot" + (", one alphabet" if self.within_alphabet else "")

    @property
    def tag(self) -> str:
        """A file-name fragment: ``20w1s5q_alphabet``."""
        return f"{self.ways}w{self.shots}s{self.queries}q" + ("_alphabet" if self.within_alphabet else "")


# The anchors' Omniglot table (MAML, Proto-MAML, MAML++ papers): 5-way and 20-way, 1 and 5 shots,
# and 20-way within one alphabet. 15 queries per class at 5 ways; 5 at 20 ways, where 20
# drawings per character leave 20 - K, and 100 queries already bound the CI.
ANCHOR_SETTINGS = (Setting(5, 1, 15), Setting(5, 5, 15), Setting(20, 1, 5), Setting(20, 5, 5),
                   Setting(20, 1, 5, within_alphabet=True))


def batch_norm_mode(transductive: bool) -> str:
    """How queries are normalised, in the words stated beside every score."""
    return "transductive (query batch statistics)" if transductive else "support statistics"


def accuracy_curve(learner, episodes: Episode, steps: int, batch: int = 16) -> dict:
    """Query accuracy and loss after 0, 1, ..., ``steps`` adaptation steps, each episode adapted
    once (the inner loop gives the query outputs after every step; step 0 is the starting head).

    ``episodes``: numpy, leading episode axis. Returns {"accuracy": (episodes, steps + 1),
    "loss": (episodes, steps + 1)} float64 arrays; a regression learner's has "loss" only (the
    query mean squared error). Episodes run ``batch`` at a time through ``tf.map_fn`` in one
    traced function (the leading axis is left unknown: no retrace), at least one episode per
    core at once (see pipelines/evaluate.py's thread setting).
    """
    regression = learner.task == "regression"
    ways = 1 if regression else int(episodes.class_ids.shape[-1])
    meta_params = [tf.convert_to_tensor(p) for p in learner.meta_params]
    rates = learner.learning_rates(ways)

    def one(episode):
        support_x, support_y, query_x, query_y = episode
        adapted = il.adapt(learner.loop, meta_params, support_x, support_y, ways, steps, rates,
                           first_order=True, query_x=query_x)
        outputs = [il.query_logits(learner.loop, adapted.start, support_x, query_x),
                   *adapted.query_outputs]  # (steps + 1) x (N*Q, N)
        losses = tf.stack([tf.cast(learner.loop.loss(o, query_y), tf.float32) for o in outputs])
        if regression:  # no classes to count
            return tf.zeros([steps + 1], tf.int32), losses
        correct = [tf.equal(tf.argmax(o, -1, output_type=tf.int32), query_y) for o in outputs]
        return tf.reduce_sum(tf.cast(tf.stack(correct), tf.int32), axis=1), losses

    fields = (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
    signature = [tf.TensorSpec([None, *f.shape[1:]], tf.as_dtype(f.dtype)) for f in fields]
    run = tf.function(lambda *f: tf.map_fn(
        one, f, fn_output_signature=(tf.TensorSpec([steps + 1], tf.int32),
                                     tf.TensorSpec([steps + 1], tf.float32)),
        parallel_iterations=max(learner.config.parallel_iterations, os.cpu_count() or 1)),
        input_signature=signature)
    correct, loss = [], []
    for start in range(0, len(episodes.support_x), batch):
        c, l = run(*(f[start:start + batch] for f in fields))
        correct.append(c.numpy())
        loss.append(l.numpy())
    result = {"loss": np.concatenate(loss).astype(np.float64)}
    if not regression:
        # correct / queries in float64: the same numbers as numpy's mean of the device's hits
        result["accuracy"] = np.concatenate(correct) / episodes.query_y.shape[1]
    return result


def predicted_labels(learner, episode: Episode, steps: int) -> np.ndarray:
    """Predicted query labels (N*Q,) of one episode (no episode axis) after exactly ``steps``
    steps: the table's and the curve's protocol, not the best step a user's ``adapt`` keeps."""
    ways = int(episode.class_ids.shape[-1])
    meta_params = [tf.convert_to_tensor(p) for p in learner.meta_params]
    adapted = il.adapt(learner.loop, meta_params, tf.convert_to_tensor(episode.support_x),
                       tf.convert_to_tensor(episode.support_y), ways, steps,
                       learner.learning_rates(ways), first_order=True)
    logits = learner.predict_adapted(adapted.params, episode.query_x, episode.support_x)
    return np.argmax(np.asarray(logits), axis=-1)


def evaluate_episodes(learner, episodes: Episode, steps: int | None = None,
                      batch: int = 16) -> dict:
    """Adapts ``learner`` to every episode (numpy, leading episode axis) and scores its queries.

    Returns per-metric means and, for each, the half-width of the 95% confidence interval over
    episodes (1.96 standard errors), e.g. {"accuracy": 0.93, "accuracy_ci95": 0.01, ...}.
    """
    steps = steps or learner.config.eval_inner_steps
    total = len(episodes.support_x)
    run = tf.function(lambda e: learner.task_metrics(e, steps))
    collected: dict[str, list] = {}
    for start in range(0, total, batch):
        chunk = Episode(*(tf.constant(f[start:start + batch]) for f in episodes))
        for name, values in run(chunk).items():
            collected.setdefault(name, []).append(values.numpy())
    report = {"episodes": total, "inner_steps": steps}
    for name, parts in sorted(collected.items()):
        if name == "meta_loss":
            continue
        report[name], report[name + "_ci95"] = mean_and_ci95(np.concatenate(parts))
    return report


def mean_and_ci95(values) -> tuple[float, float]:
    """Mean over episodes and the half-width of its 95% confidence interval (1.96 standard
    errors; 0 for a single episode)."""
    values = np.asarray(values, np.float64)
    ci = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(ci)


def device_accuracies(model, episodes: Episode, steps: int) -> np.ndarray:
    """Query accuracy (episodes,) of an export through the device runtime (``model``: an
    ``ondevice.ExportedModel``; onnxruntime runs the exported adaptation graphs). Every episode
    keeps its last step's weights, as ``evaluate_episodes`` does (not the best step a user's
    ``adapt`` keeps), so the two scores are comparable."""
    accuracies = []
    for e in range(len(episodes.support_x)):
        personal = model.adapt(list(episodes.support_x[e]), episodes.support_y[e].tolist(),
                               steps=steps, keep_best=False)  # TensorFlow's fixed-step protocol
        predicted = personal.logits(episodes.query_x[e]).argmax(axis=1)
        labels = np.asarray(personal.class_names)[predicted]  # class names are the int labels
        accuracies.append(float(np.mean(labels == episodes.query_y[e])))
    return np.asarray(accuracies)
