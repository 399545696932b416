"""Adaptive task weighting across families: weight by each family's recent loss.

With ``MetaConfig(family_weighting="recent_loss")`` a family's share of the meta-loss is its
alpha_k times its recent post-adaptation query loss (an exponential moving average over
meta-steps), renormalised: families the model currently does worst on get more of the
gradient, in the spirit of loss-balanced multi-task weighting. Before a family has been seen
its factor is the mean of the others' (1 when none has been seen), so the first step uses the
plain alpha_k. The factors are constants of the step (no gradient flows through them).
"""

from __future__ import annotations

import tensorflow as tf

WEIGHTINGS = ("fixed", "recent_loss")


def reweighted(weight, family, recent):
    """Task weights (T,) of a FamilyBatch scaled by their family's recent loss and renormalised
    to sum to 1. ``family``: int (T,); ``recent``: (K,) moving averages, 0 for unseen families."""
    seen = recent > 0
    count = tf.reduce_sum(tf.cast(seen, recent.dtype))
    fallback = tf.math.divide_no_nan(tf.reduce_sum(recent), count)
    factor = tf.where(seen, recent, tf.where(count > 0, fallback, tf.ones_like(recent)))
    scaled = weight * tf.gather(factor, family)
    return tf.stop_gradient(scaled / tf.reduce_sum(scaled))


def updated_recent(recent, losses, family, momentum: float):
    """The moving averages (K,) after a meta-batch: family k's mean post-adaptation loss of
    this batch ``m`` enters as ``momentum * recent + (1 - momentum) * m`` (``m`` itself the
    first time); families without a task in the batch keep theirs."""
    members = tf.one_hot(family, tf.shape(recent)[0], dtype=recent.dtype)  # (T, K)
    counts = tf.reduce_sum(members, 0)
    means = tf.math.divide_no_nan(tf.linalg.matvec(members, tf.cast(losses, recent.dtype),
                                                   transpose_a=True), counts)
    moved = tf.where(recent > 0, momentum * recent + (1.0 - momentum) * means, means)
    return tf.where(counts > 0, moved, recent)


def family_shares(weight, family, families: int):
    """alpha'_k: the share of the meta-loss each family got in a meta-batch (K,)."""
    return tf.math.unsorted_segment_sum(weight, family, families)
