"""N-way K-shot episodes sampled in tf.data from a class-indexed image cache.

Every episode is a pure function of ``(seed, episode_index)`` through TensorFlow's stateless
random ops, so a seed fixes the whole stream whatever the parallelism, and no global random state
is touched. Sampling is vectorised over a block of episodes: one ``map`` call gathers a whole
meta-batch from the cache.
"""

from __future__ import annotations

import typing

import numpy as np
import tensorflow as tf

from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.jitter import random_affine

ROTATIONS = 4  # 0, 90, 180 and 270 degrees: each rotation of a character is a class of its own
JITTER_STREAM = 7919  # folded into an episode's seed for its jitter


class Episode(typing.NamedTuple):
    """One few-shot task, or a batch of them with a leading task axis.

    Shapes for a single N-way K-shot Q-query classification episode:
      support_x: float32 (N*K, H, W, C); support_y: int32 (N*K,), episode labels 0..N-1.
      query_x: float32 (N*Q, H, W, C); query_y: int32 (N*Q,).
      class_ids: int64 (N,), the dataset class behind episode label i (with rotation classes,
        ``base_id * 4 + quarter_turns``).
      task_params: float32 (P,), parameters of a procedural task (sinusoid: amplitude, phase);
        empty for classification.
    Regression episodes (sinusoid) carry float32 targets of shape (K, 1) in support_y/query_y.
    """

    support_x: typing.Any
    support_y: typing.Any
    query_x: typing.Any
    query_y: typing.Any
    class_ids: typing.Any
    task_params: typing.Any


class EpisodeIndices(typing.NamedTuple):
    """Episodes without their pixels, a leading task axis on every field: what a fixed episode
    file keeps (``episode_files``), and what ``EpisodeSampler.gather`` turns into an Episode.

      support, query: int64 (tasks, N*K), (tasks, N*Q): rows of the sampler's image table
        (``ClassImages.images``) in episode order.
      support_y, query_y: int32 episode labels 0..N-1 of those rows.
      class_ids: int64 (tasks, N), as in Episode.
      quarter_turns: int64 (tasks, N), the rotation of each class (0 without rotation classes).
    """

    support: typing.Any
    support_y: typing.Any
    query: typing.Any
    query_y: typing.Any
    class_ids: typing.Any
    quarter_turns: typing.Any


def check_episode_shape(classes: ClassImages, ways: int, shots: int, queries: int,
                        within_group: bool = False, rotations: bool = False) -> None:
    """Raises ValueError, naming the value and the fix, when no episode can be drawn."""
    for name, value, low in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1)):
        if int(value) < low:
            raise ValueError(f"{name}={value} is invalid: it must be at least {low}.")
    available = classes.num_classes * (ROTATIONS if rotations else 1)
    if ways > available:
        raise ValueError(
            f"ways={ways} is larger than the {available} classes available in this split; "
            f"choose ways <= {available} or a split with more classes.")
    per_class = shots + queries
    if classes.num_classes and per_class > int(classes.counts.min()):
        small = int((classes.counts < per_class).sum())
        raise ValueError(
            f"shots + queries = {shots} + {queries} = {per_class} is larger than the images of "
            f"{small} classes (the smallest has {int(classes.counts.min())}); lower shots or "
            f"queries so that shots + queries <= {int(classes.counts.min())}.")
    if within_group:
        if (classes.groups < 0).any():
            raise ValueError("within_group sampling needs a group (alphabet) per class, and this "
                             "dataset has none; set within_group=False.")
        largest = int(np.bincount(classes.groups).max()) * (ROTATIONS if rotations else 1)
        if ways > largest:
            raise ValueError(f"ways={ways} is larger than the largest alphabet ({largest} "
                             f"classes); lower ways or set within_group=False.")


class EpisodeSampler:
    """Draws blocks of episodes from a ClassImages cache with stateless random ops.

    Args:
      classes: the class cache of one split.
      ways, shots, queries: N, K and Q (queries per class).
      within_group: all N classes of an episode come from one group (Omniglot: one alphabet).
      rotations: every class also appears rotated by 90, 180 and 270 degrees as 3 new classes.
      jitter: strength of a random affine distortion of every image (``mmtl_tf.data.jitter``;
        0: none), drawn from the episode's seed.
    """

    def __init__(self, classes: ClassImages, ways: int, shots: int, queries: int,
                 within_group: bool = False, rotations: bool = False, jitter: float = 0.0):
        check_episode_shape(classes, ways, shots, queries, within_group, rotations)
        self.classes = classes  # the classes episodes are drawn from (before rotations)
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.within_group, self.rotations = bool(within_group), bool(rotations)
        self.jitter = float(jitter)
        repeat = ROTATIONS if rotations else 1
        self._images = tf.constant(classes.images)
        self._offsets = tf.constant(np.repeat(classes.offsets, repeat))
        self._counts = tf.constant(np.repeat(classes.counts, repeat))
        self._class_ids = tf.constant(
            np.repeat(classes.class_ids, repeat) * repeat + np.tile(np.arange(repeat), classes.num_classes)
            if rotations else classes.class_ids)
        groups = np.repeat(classes.groups, repeat)
        self._groups = tf.constant(groups)
        if within_group:
            sizes = np.bincount(groups)
            self._eligible_groups = tf.constant(np.flatnonzero(sizes >= ways), tf.int64)
        self._max_count = int(classes.counts.max())
        self.image_shape = classes.image_shape

    def sample(self, seed, block: int) -> Episode:
        """``block`` episodes with a leading task axis; ``seed`` is a shape-(2,) int tensor."""
        episode = self.gather(self.sample_indices(seed, block))
        if not self.jitter:
            return episode
        # a stream of its own: the episodes' classes and images stay those of the seed
        seeds = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), JITTER_STREAM), 2)
        return episode._replace(support_x=random_affine(episode.support_x, seeds[0], self.jitter),
                                query_x=random_affine(episode.query_x, seeds[1], self.jitter))

    def sample_indices(self, seed, block: int) -> EpisodeIndices:
        """Where the images of ``sample(seed, block)`` lie in the image table (no pixels)."""
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
        n, k, q = self.ways, self.shots, self.queries
        classes = self._choose_classes(seeds[0], seeds[1], block)  # (block, N) rows of the table
        # Distinct images per class: the K+Q smallest of random scores, padding slots excluded.
        scores = tf.random.stateless_uniform([block, n, self._max_count], seeds[2])
        counts = tf.gather(self._counts, classes)
        scores = tf.where(tf.range(self._max_count, dtype=tf.int64)[None, None] < counts[..., None],
                          scores, 2.0)
        picks = tf.math.top_k(-scores, k + q).indices  # (block, N, K+Q)
        rows = tf.gather(self._offsets, classes)[..., None] + tf.cast(picks, tf.int64)
        labels = tf.broadcast_to(tf.range(n, dtype=tf.int32)[None, :, None], [block, n, k + q])
        support, support_y = _shuffled(rows[:, :, :k], labels[:, :, :k], seeds[3])
        query, query_y = _shuffled(rows[:, :, k:], labels[:, :, k:], seeds[4])
        class_ids = tf.gather(self._class_ids, classes)
        turns = class_ids % ROTATIONS if self.rotations else tf.zeros_like(class_ids)
        return EpisodeIndices(support, support_y, query, query_y, class_ids, turns)

    def gather(self, indices: EpisodeIndices) -> Episode:
        """The episodes ``indices`` describe (numpy or tensors, leading task axis): images
        gathered from the table and turned by their class's quarter turns."""
        support_y = tf.cast(indices.support_y, tf.int32)
        query_y = tf.cast(indices.query_y, tf.int32)

        def images(rows, labels):
            x = tf.gather(self._images, tf.cast(rows, tf.int64))  # (block, rows, H, W, C)
            if not self.rotations:
                return x
            return _rotate(x, tf.gather(tf.cast(indices.quarter_turns, tf.int64), labels,
                                        batch_dims=1))

        class_ids = tf.cast(indices.class_ids, tf.int64)
        return Episode(images(indices.support, support_y), support_y,
                       images(indices.query, query_y), query_y, class_ids,
                       tf.zeros([tf.shape(class_ids)[0], 0], tf.float32))

    def _choose_classes(self, group_seed, class_seed, block):
        num_classes = tf.shape(self._class_ids, out_type=tf.int64)[0]
        scores = tf.random.stateless_uniform([block, num_classes], class_seed)
        if self.within_group:
            pick = tf.random.stateless_uniform(
                [block], group_seed, 0, tf.shape(self._eligible_groups, out_type=tf.int64)[0],
                dtype=tf.int64)
            group = tf.gather(self._eligible_groups, pick)
            scores = tf.where(self._groups[None] == group[:, None], scores, -1.0)
        # top_k orders the chosen classes by their random score: label i is a random class.
        return tf.cast(tf.math.top_k(scores, self.ways).indices, tf.int64)


def _rotate(images, quarter_turns):
    """Rotates images (B, R, H, W, C) counter-clockwise by quarter_turns[b, r] * 90 degrees,
    as ``np.rot90`` does: one gather of a pixel permutation."""
    shape = tf.shape(images)
    height, width = images.shape[2], images.shape[3]
    if height != width:
        raise ValueError(f"rotation classes need square images, got {height}x{width}")
    grid = np.arange(height * width).reshape(height, width)
    table = tf.constant(np.stack([np.rot90(grid, k).ravel() for k in range(ROTATIONS)]))
    flat = tf.reshape(images, tf.concat([shape[:2], [height * width], shape[4:]], 0))
    rotated = tf.gather(flat, tf.gather(table, quarter_turns), axis=2, batch_dims=2)
    return tf.reshape(rotated, shape)


def _shuffled(rows, labels, seed):
    """Flattens (B, N, S) to (B, N*S) and shuffles each episode's rows."""
    block, count = tf.shape(rows)[0], tf.shape(rows)[1] * tf.shape(rows)[2]
    rows, labels = tf.reshape(rows, [block, count]), tf.reshape(labels, [block, count])
    order = tf.argsort(tf.random.stateless_uniform([block, count], seed), axis=1)
    return tf.gather(rows, order, batch_dims=1), tf.gather(labels, order, batch_dims=1)


def episode_dataset(sampler, seed: int, meta_batch_size: int | None = None,
                    num_episodes: int | None = None, start: int = 0) -> tf.data.Dataset:
    """A tf.data stream of episodes, a pure function of ``seed``: element i is drawn from
    (seed, i), so ``start`` (an element index: the meta-step for meta-batches) resumes the
    stream exactly where an earlier one stopped.

    Args:
      sampler: an EpisodeSampler (or any object with ``sample(seed, block) -> Episode``).
      seed: fixes the whole stream; two seeds give different streams.
      meta_batch_size: if set, elements are meta-batches with a leading task axis of this size;
        otherwise single episodes.
      num_episodes: stop after this many episodes (rounded up to whole meta-batches); infinite
        when None.
    """
    block = meta_batch_size or 64
    blocks = None if num_episodes is None else -(-int(num_episodes) // block)
    if start and meta_batch_size is None:
        raise ValueError("start counts meta-batches: give meta_batch_size")
    ds = tf.data.Dataset.range(start, blocks) if blocks is not None else tf.data.Dataset.counter(start)

    def draw(i):
        return sampler.sample(tf.stack([tf.constant(seed, tf.int64), tf.cast(i, tf.int64)]), block)

    ds = ds.map(draw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if meta_batch_size is None:
        # unbatch() crashes TF 2.21 on the zero-size task_params of classification episodes;
        # rebatch to 1 and drop the axis instead.
        ds = ds.rebatch(1).map(lambda e: tf.nest.map_structure(lambda t: t[0], e))
        if num_episodes is not None:
            ds = ds.take(num_episodes)
    return ds.prefetch(tf.data.AUTOTUNE)
