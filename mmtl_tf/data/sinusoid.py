"""The sinusoid regression family of the MAML paper (Finn et al., 2017, section 5.1).

A task is y = amplitude * sin(x - phase) with amplitude ~ U[0.1, 5], phase ~ U[0, pi] and
inputs x ~ U[-5, 5]; K support points and Q query points per task, delivered as an Episode.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from mmtl_tf.data.episodes import Episode


@dataclasses.dataclass(frozen=True)
class SinusoidSampler:
    """Draws blocks of sinusoid episodes; ``sample`` has the EpisodeSampler signature.

    support_x/support_y are float32 (K, 1), query_x/query_y (Q, 1); task_params holds
    (amplitude, phase); class_ids is empty.
    """

    shots: int = 10
    queries: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self):
        if self.shots < 1 or self.queries < 1:
            raise ValueError(f"shots={self.shots} and queries={self.queries} must both be >= 1")
        for name in ("amplitude", "phase", "x_range"):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(f"{name}={getattr(self, name)} must be an increasing (low, high)")

    def sample(self, seed, block: int) -> Episode:
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
        amplitude = tf.random.stateless_uniform([block, 1, 1], seeds[0], *self.amplitude)
        phase = tf.random.stateless_uniform([block, 1, 1], seeds[1], *self.phase)
        x = tf.random.stateless_uniform([block, self.shots + self.queries, 1], seeds[2],
                                        *self.x_range)  # (block, K+Q, 1)
        y = amplitude * tf.sin(x - phase)
        params = tf.concat([amplitude[:, 0], phase[:, 0]], axis=1)  # (block, 2)
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:],
                       tf.zeros([block, 0], tf.int64), params)
