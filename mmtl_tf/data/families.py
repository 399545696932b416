"""Meta-batches mixing task families (meta-multi-task learning, issue #14).

Each family is an ``EpisodeSampler`` over its own classes with its own N, K and Q. ``FamilyMix``
draws a meta-batch holding tasks of several families: every task is padded to the largest N,
N*K and N*Q of the mix, with masks marking its real support rows, query rows and classes, so the
traced train step sees one shape whatever the mix (no retracing). Each task also carries its
family's index and its share of the meta-loss, ``weight``; the weights of a meta-batch sum to 1
and make ``sum_t weight_t * L_t`` an estimate of ``sum_k alpha_k L_k``.

Like ``episode_dataset``'s samplers, a meta-batch is a pure function of its seed.
"""

from __future__ import annotations

import typing

import numpy as np
import tensorflow as tf

from mmtl_tf.data.episodes import Episode, EpisodeSampler

MIXES = ("fixed", "proportional")


class FamilyBatch(typing.NamedTuple):
    """A meta-batch of padded tasks from several families (leading task axis T on every field).

      episodes: Episode with support_x (T, S, H, W, C), support_y (T, S), query_x (T, Q, H, W, C),
        query_y (T, Q), class_ids (T, N) (-1 for padding classes), task_params (T, 0); S, Q and N
        are the mix's largest N*K, N*Q and N. Padding rows are zero images with label 0.
      support_mask: float32 (T, S), 1 on a task's real support rows, 0 on padding.
      query_mask: float32 (T, Q); class_mask: float32 (T, N), 1 on the task's N classes.
      family: int32 (T,), the family index (the order of ``DataConfig.families``).
      weight: float32 (T,), the task's share of the meta-loss; sums to 1 over the batch.
    """

    episodes: Episode
    support_mask: typing.Any
    query_mask: typing.Any
    class_mask: typing.Any
    family: typing.Any
    weight: typing.Any


class FamilyMix:
    """Draws meta-batches mixing families.

    Args:
      samplers: one EpisodeSampler per family, images of one shape (the model's input).
      weights: alpha_k per family, >= 0, summing to 1.
      mix: "fixed": ``tasks_per_family(block)`` tasks of every family, a task of family k
        weighing alpha_k / n_k; "proportional": each task's family drawn with probability
        alpha_k, every task weighing 1 / T.
    """

    def __init__(self, samplers: typing.Sequence[EpisodeSampler], weights, mix: str = "fixed"):
        if mix not in MIXES:
            raise ValueError(f"mix={mix!r} is unknown; choose one of {MIXES}")
        weights = np.asarray(weights, np.float64)
        if len(weights) != len(samplers) or not len(samplers):
            raise ValueError(f"{len(samplers)} samplers but {len(weights)} weights")
        if not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
            raise ValueError(f"family weights {weights.tolist()} must be finite, >= 0 and not "
                             "all zero")
        shapes = {tuple(s.image_shape) for s in samplers}
        if len(shapes) > 1:
            raise ValueError(f"families give images of shapes {sorted(shapes)}; bring them to the "
                             "model's input size first (family_sources.fit_to_model)")
        self.samplers, self.mix = list(samplers), mix
        self.weights = weights / weights.sum()
        self.ways = max(s.ways for s in samplers)
        self.support_rows = max(s.ways * s.shots for s in samplers)
        self.query_rows = max(s.ways * s.queries for s in samplers)
        self.image_shape = samplers[0].image_shape

    def tasks_per_family(self, block: int) -> list[int]:
        """The fixed mix's tasks of each family in a meta-batch of ``block``: an even split,
        the remainder to the first families."""
        count = len(self.samplers)
        if block < count:
            raise ValueError(f"a meta-batch of {block} tasks cannot hold a task of each of the "
                             f"{count} families; raise meta_batch_size or mix proportionally")
        return [block // count + (k < block % count) for k in range(count)]

    def sample(self, seed, block: int) -> FamilyBatch:
        """``block`` padded tasks; ``seed`` is a shape-(2,) int tensor."""
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64),
                                                       len(self.samplers) + 1)
        if self.mix == "fixed":
            counts = self.tasks_per_family(block)
            parts = [self._padded(k, seeds[k + 1], n) for k, n in enumerate(counts)]
            family = tf.concat([tf.fill([n], k) for k, n in enumerate(counts)], 0)
            weight = tf.concat([tf.fill([n], float(self.weights[k] / n))
                                for k, n in enumerate(counts)], 0)
            return FamilyBatch(*tf.nest.map_structure(lambda *f: tf.concat(f, 0), *parts),
                               family, weight)
        # Proportional: the family of task t is the first k with u_t < alpha_1 + ... + alpha_k.
        edges = tf.constant(np.cumsum(self.weights)[:-1], tf.float32)
        uniform = tf.random.stateless_uniform([block], seeds[0])
        family = tf.searchsorted(edges, uniform, side="right", out_type=tf.int32)  # (T,)
        # Every family draws a whole block and each task keeps its family's draw: a gather
        # from pixels already in memory, far cheaper than the step that consumes it.
        parts = [self._padded(k, seeds[k + 1], block) for k in range(len(self.samplers))]
        stacked = tf.nest.map_structure(lambda *f: tf.stack(f, 0), *parts)  # (K, T, ...)
        pick = tf.stack([family, tf.range(block, dtype=tf.int32)], 1)  # (T, 2): family, task
        # (gather_nd refuses empty fields: task_params has no values to pick)
        chosen = tf.nest.map_structure(
            lambda f: f[0] if f.shape.num_elements() == 0 else tf.gather_nd(f, pick), stacked)
        return FamilyBatch(*chosen, family, tf.fill([block], 1.0 / block))

    def _padded(self, k: int, seed, block: int):
        """Family k's ``block`` episodes padded to the mix's shape, with their three masks."""
        sampler = self.samplers[k]
        episodes = sampler.sample(seed, block)
        support = sampler.ways * sampler.shots
        query = sampler.ways * sampler.queries

        def rows(x, total, value=0):
            pad = [[0, 0], [0, total - x.shape[1]]] + [[0, 0]] * (len(x.shape) - 2)
            return tf.pad(x, pad, constant_values=value)

        def mask(real, total):
            return tf.tile(tf.concat([tf.ones([real]), tf.zeros([total - real])], 0)[None],
                           [block, 1])

        padded = Episode(rows(episodes.support_x, self.support_rows),
                         rows(episodes.support_y, self.support_rows),
                         rows(episodes.query_x, self.query_rows),
                         rows(episodes.query_y, self.query_rows),
                         rows(episodes.class_ids, self.ways, -1), episodes.task_params)
        return (padded, mask(support, self.support_rows), mask(query, self.query_rows),
                mask(sampler.ways, self.ways))
