"""Evaluation on a fixed set of episodes: mean query accuracy with a 95% confidence interval."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mmtl_tf.data.episodes import Episode


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


def evaluate_export(folder, episodes: Episode, steps: int) -> dict:
    """Scores an export folder through the device runtime (onnxruntime, the exported
    adaptation graphs) on the same episodes: accuracy with its 95% confidence interval. Every
    episode keeps its last step's weights, as ``evaluate_episodes`` does (not the best step a
    user's ``adapt`` keeps), so the two scores are comparable."""
    from mmtl_tf import ondevice

    model = ondevice.load(folder)
    accuracies = []
    for e in range(len(episodes.support_x)):
        personal = model.adapt(list(episodes.support_x[e]), episodes.support_y[e].tolist(),
                               steps=steps, keep_best=False)  # TensorFlow's fixed-step protocol
        predicted = personal.logits(episodes.query_x[e]).argmax(axis=1)
        labels = np.asarray(personal.class_names)[predicted]  # class names are the int labels
        accuracies.append(float(np.mean(labels == episodes.query_y[e])))
    accuracy, ci = mean_and_ci95(accuracies)
    return {"runtime": "mmtl_tf.ondevice (onnxruntime)", "export": str(folder),
            "inner_steps": steps, "episodes": len(accuracies), "accuracy": accuracy,
            "accuracy_ci95": ci}
