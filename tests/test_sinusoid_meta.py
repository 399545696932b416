"""Sinusoid regression (MAML paper, section 5.1) and its pretrained baseline (algorithm
"pretrain"): the baseline's training step is plain regression on every point of the
meta-batch, no inner loop; it is refused where it would mean nothing; and a short meta-training
run adapts better from 10 shots than the baseline of the same budget fine-tuned the same way."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.data.episodes import episode_dataset
from mmtl_tf.data.sinusoid import SinusoidSampler
from mmtl_tf.meta.algorithms import MetaConfig
from mmtl_tf.meta.learner import MetaLearner
from mmtl_tf.models.conv4 import conv4_encoder, mlp_encoder

SHOTS, QUERIES = 10, 10
META_BATCH = 10
TRAIN_STEPS = 400
META_LR = 3e-3
CONFIG = MetaConfig(inner_steps=2, eval_inner_steps=5, inner_lr=0.02)


def _trained(config, sampler, seed=0):
    """A 40-40 MLP trained by ``config`` for TRAIN_STEPS steps of META_BATCH tasks."""
    keras.utils.set_random_seed(seed)
    learner = MetaLearner(mlp_encoder(hidden=(40, 40)), config, task="regression")
    learner.compile(optimizer=keras.optimizers.Adam(META_LR))
    learner.fit(episode_dataset(sampler, seed=0, meta_batch_size=META_BATCH),
                steps_per_epoch=TRAIN_STEPS, verbose=0)
    return learner


def test_maml_adapts_from_ten_shots_better_than_before_and_than_a_pretrained_baseline():
    sampler = SinusoidSampler(shots=SHOTS, queries=QUERIES)
    learner = _trained(CONFIG, sampler)
    # the same network, tasks, steps and optimizer, trained without an inner loop; evaluated
    # with the same 5 steps at the same rate
    baseline = _trained(MetaConfig(algorithm="pretrain", inner_steps=2, eval_inner_steps=5,
                                   inner_lr=0.02), sampler)
    held_out = episode_dataset(sampler, seed=99, meta_batch_size=25, num_episodes=100)

    maml = learner.evaluate(held_out, verbose=0, return_dict=True)
    pretrained = baseline.evaluate(held_out, verbose=0, return_dict=True)
    # query MSE after 5 steps on the 10 support points; "pre_loss" is before any step
    assert maml["loss"] < 0.5 * maml["pre_loss"], maml
    assert maml["loss"] < 0.7 * pretrained["loss"], (maml, pretrained)
    assert np.isfinite(pretrained["loss"]), pretrained
    assert pretrained["loss"] < pretrained["pre_loss"], pretrained


def _pretrain_learner(inner_lr, inner_steps, seed=4):
    keras.utils.set_random_seed(seed)
    config = MetaConfig(algorithm="pretrain", inner_steps=inner_steps, inner_lr=inner_lr)
    learner = MetaLearner(mlp_encoder(hidden=(16, 12)), config, task="regression")
    learner.compile(optimizer=keras.optimizers.SGD(0.1))
    return learner


@pytest.mark.parametrize("inner_lr, inner_steps", [(0.01, 1), (0.5, 3)])
def test_a_pretrain_step_applies_the_plain_regression_gradient(inner_lr, inner_steps):
    """theta <- theta - 0.1 * grad of the mean squared error of the plain network (encoder and
    head, no adaptation) on the meta-batch's support and query points pooled, whatever the inner
    rate and steps (they only shape evaluation)."""
    batch = SinusoidSampler(shots=3, queries=7).sample(tf.constant([5, 0], tf.int64), 6)
    learner = _pretrain_learner(inner_lr, inner_steps)
    x = tf.reshape(tf.concat([batch.support_x, batch.query_x], 1), [-1, 1])  # (6 * 10, 1)
    y = tf.reshape(tf.concat([batch.support_y, batch.query_y], 1), [-1, 1])
    theta = [v.numpy() for v in learner.meta_params]
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, learner(x))
    grads = tape.gradient(loss, learner.meta_params)
    expected = [t - 0.1 * g.numpy() for t, g in zip(theta, grads)]

    learner.train_on_batch(batch)
    for v, want, start in zip(learner.meta_params, expected, theta):
        assert np.abs(want - start).max() > 1e-4, v.path  # every tensor moves
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=v.path)


def test_pretrain_logs_the_adapted_query_loss_as_maml_does():
    """Training reports the same metrics as MAML (query loss after the inner steps), computed
    with the weights before the update; only what is minimised differs."""
    batch = SinusoidSampler(shots=3, queries=7).sample(tf.constant([6, 0], tf.int64), 5)
    learner = _pretrain_learner(0.05, 2)
    expected = learner.task_metrics(batch, 2)
    logs = learner.train_on_batch(batch, return_dict=True)
    np.testing.assert_allclose(logs["loss"], np.mean(expected["loss"]), rtol=1e-5)
    np.testing.assert_allclose(logs["pre_loss"], np.mean(expected["pre_loss"]), rtol=1e-5)


def test_pretrain_is_refused_where_it_would_mean_nothing():
    for switches in ({"first_order": True}, {"learned_inner_lr": "per_element"},
                     {"multi_step_loss": True}, {"first_order_until": 100}):
        with pytest.raises(ValueError, match="no inner loop in training") as err:
            MetaConfig(algorithm="pretrain", **switches)
        assert "\n" not in str(err.value) and next(iter(switches)) in str(err.value)
    classifier = MetaLearner(conv4_encoder(image_size=14, filters=4),
                             MetaConfig(algorithm="pretrain", head_init="learned"))
    with pytest.raises(ValueError, match="regression tasks only") as err:
        classifier.compile(optimizer="adam")
    assert "\n" not in str(err.value) and "sinusoid-pretrained" in str(err.value)


def test_the_baseline_preset_differs_from_the_sinusoid_preset_only_by_its_algorithm():
    from mmtl_tf.config import preset

    meta, baseline = preset("sinusoid"), preset("sinusoid-pretrained")
    assert baseline.meta.algorithm == "pretrain" and meta.meta.algorithm == "maml"
    assert baseline.replace(meta={"algorithm": "maml"}).to_dict() == {
        **meta.to_dict(), "name": "sinusoid-pretrained"}
    assert (meta.train.steps, meta.train.meta_batch_size, meta.data.shots, meta.data.queries,
            meta.meta.inner_lr, meta.meta.inner_steps, meta.meta.eval_inner_steps) == (
        5000, 25, 10, 10, 0.01, 1, 10)
