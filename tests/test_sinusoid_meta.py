"""Sinusoid regression (MAML paper, section 5.1): a short meta-training run adapts better from
10 shots than a network pretrained on the pooled tasks and fine-tuned the same way."""

import keras
import numpy as np
import tensorflow as tf

from mmtl_tf.data.episodes import episode_dataset
from mmtl_tf.data.sinusoid import SinusoidSampler
from mmtl_tf.meta.algorithms import MetaConfig
from mmtl_tf.meta.learner import MetaLearner
from mmtl_tf.models.conv4 import mlp_encoder

SHOTS, QUERIES = 10, 10
META_BATCH = 10
TRAIN_STEPS = 400
META_LR = 3e-3
CONFIG = MetaConfig(inner_steps=2, eval_inner_steps=5, inner_lr=0.02)


def _fresh_learner(seed=0):
    keras.utils.set_random_seed(seed)
    learner = MetaLearner(mlp_encoder(hidden=(40, 40)), CONFIG, task="regression")
    learner.compile(optimizer=keras.optimizers.Adam(META_LR))
    return learner


def _pretrained_baseline(sampler, seed=0):
    """The same network trained by plain regression on the pooled support and query points of
    the same stream of tasks, for the same number of steps, then wrapped in a MetaLearner so
    that it is fine-tuned by exactly the same inner loop (steps, learning rate)."""
    keras.utils.set_random_seed(seed)
    encoder = mlp_encoder(hidden=(40, 40))
    head = keras.layers.Dense(1)
    network = keras.Model(encoder.input, head(encoder.output))
    network.compile(optimizer=keras.optimizers.Adam(META_LR), loss="mse")

    def pooled(e):  # (tasks, K + Q, 1) -> (tasks * (K + Q), 1)
        return (tf.reshape(tf.concat([e.support_x, e.query_x], 1), [-1, 1]),
                tf.reshape(tf.concat([e.support_y, e.query_y], 1), [-1, 1]))

    network.fit(episode_dataset(sampler, seed=0, meta_batch_size=META_BATCH).map(pooled),
                steps_per_epoch=TRAIN_STEPS, verbose=0)
    baseline = MetaLearner(encoder, CONFIG, task="regression")
    baseline.head_w.assign(head.kernel)
    baseline.head_b.assign(head.bias)
    baseline.compile(optimizer=keras.optimizers.Adam(META_LR))
    return baseline


def test_maml_adapts_from_ten_shots_better_than_before_and_than_a_pretrained_baseline():
    sampler = SinusoidSampler(shots=SHOTS, queries=QUERIES)
    learner = _fresh_learner()
    learner.fit(episode_dataset(sampler, seed=0, meta_batch_size=META_BATCH),
                steps_per_epoch=TRAIN_STEPS, verbose=0)
    held_out = episode_dataset(sampler, seed=99, meta_batch_size=25, num_episodes=100)

    maml = learner.evaluate(held_out, verbose=0, return_dict=True)
    baseline = _pretrained_baseline(sampler).evaluate(held_out, verbose=0, return_dict=True)
    # query MSE after 5 steps on the 10 support points; "pre_loss" is before any step
    assert maml["loss"] < 0.5 * maml["pre_loss"], maml
    assert maml["loss"] < 0.7 * baseline["loss"], (maml, baseline)
    assert np.isfinite(baseline["loss"]) and baseline["loss"] < baseline["pre_loss"], baseline
