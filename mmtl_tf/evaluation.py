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
    run = tf.function(lambda e: learner._meta_batch(e, steps, True))
    collected: dict[str, list] = {}
    for start in range(0, total, batch):
        chunk = Episode(*(tf.constant(f[start:start + batch]) for f in episodes))
        for name, values in run(chunk).items():
            collected.setdefault(name, []).append(values.numpy())
    report = {"episodes": total, "inner_steps": steps}
    for name, parts in sorted(collected.items()):
        if name == "meta_loss":
            continue
        values = np.concatenate(parts)
        report[name] = float(values.mean())
        report[name + "_ci95"] = float(1.96 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return report
