"""Configurations that would train something other than what they say are refused; MAML++ runs
evaluate; loss scaling under mixed_float16 gives the float32 update (review issue #11)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.episodes import Episode, EpisodeSampler, episode_dataset
from mmtl_tf.meta import inner_loop as il
from mmtl_tf.meta.algorithms import ALGORITHMS, MetaConfig
from mmtl_tf.meta.learner import MetaLearner
from mmtl_tf.models.conv4 import conv4_encoder

WAYS, SHOTS, QUERIES, SIDE = 5, 3, 7, 14


def _classes(seed=0):
    rng = np.random.default_rng(seed)
    return ClassImages.from_labels(rng.random((30 * 11, SIDE, SIDE, 1), dtype=np.float32),
                                   np.repeat(np.arange(30) + 200, 11))


def _batch(tasks=3, seed=5):
    return EpisodeSampler(_classes(), WAYS, SHOTS, QUERIES).sample(
        tf.constant([seed, 0], tf.int64), tasks)


def _learner(**meta):
    keras.utils.set_random_seed(1)
    return MetaLearner(conv4_encoder(SIDE, filters=4), MetaConfig(inner_lr=0.4, **meta))


def test_a_zero_head_gives_the_encoder_no_inner_gradient_at_the_first_step_only():
    """The fact behind the refusal: at a zero head the support loss does not depend on the
    encoder; after one head step it does."""
    learner = _learner(inner_steps=2)
    e = Episode(*(f[0] for f in _batch()))
    theta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    start = learner.loop.task_params(theta, e.support_x, e.support_y, WAYS)
    _, first = learner.loop.step(start, e.support_x, e.support_y, [0.4] * len(start), True)
    for before, after in zip(start[:-2], first[:-2]):
        np.testing.assert_array_equal(after.numpy(), before.numpy())
    assert np.abs(first[-2].numpy()).max() > 1e-3, "the head moved"
    _, second = learner.loop.step(first, e.support_x, e.support_y, [0.4] * len(start), True)
    assert max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(second[:-2], first[:-2])) > 1e-5


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "mamlpp"])
def test_one_step_at_a_zero_head_is_refused_naming_anil_and_the_fixes(algorithm):
    learner = _learner(algorithm=algorithm, inner_steps=1)
    with pytest.raises(ValueError, match=r"trains what ANIL trains; use inner_steps>=2, "
                                         r"head_init='proto' or 'learned', or say algorithm='anil'"):
        learner.compile(optimizer="adam")


def test_reptile_that_would_learn_nothing_is_refused_before_training():
    learner = _learner(algorithm="reptile", inner_steps=1)
    with pytest.raises(ValueError, match=r"algorithm='reptile' with head_init='zero' and "
                                         r"inner_steps=1 learns nothing.*inner_steps>=2"):
        learner.compile(optimizer=keras.optimizers.SGD(0.5))


@pytest.mark.parametrize("meta", [dict(algorithm="anil", inner_steps=1),
                                  dict(inner_steps=1, head_init="proto"),
                                  dict(algorithm="reptile", inner_steps=2)])
def test_the_named_fixes_are_accepted_and_train_the_encoder(meta):
    learner = _learner(**meta)
    optimizer = keras.optimizers.SGD(0.5) if meta.get("algorithm") == "reptile" else "adam"
    learner.compile(optimizer=optimizer)
    before = [v.numpy().copy() for v in learner.encoder.trainable_variables]
    learner.train_on_batch(_batch())
    moved = [np.abs(v.numpy() - b).max() for v, b in zip(learner.encoder.trainable_variables, before)]
    assert max(moved) > 1e-4


def test_loading_a_refused_configuration_for_evaluation_still_works():
    """Shipped models trained before the refusal keep loading and adapting (no compile)."""
    learner = _learner(inner_steps=1)
    e = Episode(*(f[0] for f in _batch()))
    params = learner.adapt(e.support_x, e.support_y, steps=3)
    assert params[-2].shape == (learner.head_w.shape[0], WAYS)


def test_evaluation_of_a_mamlpp_model_needs_no_optimizer():
    """test_step of an uncompiled MAML++ model (what evaluate.py loads) scores the last step,
    equal to adapting and predicting by hand."""
    learner = _learner(algorithm="mamlpp", inner_steps=2, eval_inner_steps=3)
    batch = _batch()
    got = learner.task_metrics(batch, 3)["loss"].numpy()
    rates = learner.learning_rates(WAYS)
    theta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    want = []
    for t in range(3):
        e = Episode(*(f[t] for f in batch))
        adapted = il.adapt(learner.loop, theta, e.support_x, e.support_y, WAYS, 3, rates)
        logits = il.query_logits(learner.loop, adapted.params, e.support_x, e.query_x)
        want.append(float(learner.loop.loss(logits, e.query_y)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----- mixed_float16: the loss is scaled, the update is float32's --------------------------------
def _one_step(policy, optimizer):
    keras.mixed_precision.set_global_policy(policy)
    try:
        learner = _learner(inner_steps=2, head_init="learned")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    learner.compile(optimizer=optimizer)
    batch = _batch(tasks=4)
    before = [v.numpy().copy() for v in learner.meta_params]
    logs = learner.train_on_batch(batch, return_dict=True)
    update = np.concatenate([(v.numpy() - b).ravel() for v, b in zip(learner.meta_params, before)])
    return learner, logs, update


def test_mixed_float16_update_matches_float32_in_direction_and_size():
    _, full_logs, full = _one_step("float32", keras.optimizers.SGD(0.1))
    mixed, mixed_logs, half = _one_step("mixed_float16", keras.optimizers.SGD(0.1))
    assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
    assert mixed.encoder.compute_dtype == "float16"
    np.testing.assert_allclose(mixed_logs["loss"], full_logs["loss"], rtol=2e-2)
    cosine = full @ half / np.linalg.norm(full) / np.linalg.norm(half)
    assert cosine > 0.95, cosine  # as bfloat16 (tests/test_precision.py)
    # Without scale_loss the gradients came out divided by the loss scale (32768 at first).
    np.testing.assert_allclose(np.linalg.norm(half) / np.linalg.norm(full), 1.0, atol=0.1)


def test_an_overflowing_loss_scale_is_lowered_instead_of_stopping_training():
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**40)
    learner, logs, update = _one_step("mixed_float16", scaled)
    assert np.isfinite(logs["loss"])
    np.testing.assert_array_equal(update, 0.0)  # the overflowing step was skipped
    assert float(learner.optimizer.dynamic_scale) == 2.0**39


# ----- every algorithm: train a tiny run, then evaluate it ---------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_tiny_run_of_every_algorithm_trains_and_evaluates(tmp_path, algorithm):
    from mmtl_tf.config import preset
    from mmtl_tf.evaluation import Setting
    from mmtl_tf.runs import evaluate_run
    from mmtl_tf.training import train

    config = preset("tiny").replace(meta={"algorithm": algorithm},
                                    train={"steps": 2, "eval_episodes": 4, "log_every": 2})
    metrics = train(config, tmp_path / algorithm)
    assert metrics["part"] == "validation" and metrics["episodes"] == 4
    report = evaluate_run(tmp_path / algorithm, settings=[Setting(None, None, None)], episodes=6,
                          seed=11, curve_steps=0)  # the run's own task, no curve past its steps
    (row,) = report["settings"]
    assert report["part"] == "test" and row["episodes"] == 6
    assert row["inner_steps"] == config.meta.eval_inner_steps
    assert row["loss"] > 0 and np.isfinite(row["loss"])


# ----- validation: choices are made on held-out training alphabets, never on test characters ----
def test_training_scores_validation_alphabets_and_never_loads_the_test_characters(tmp_path,
                                                                                  monkeypatch):
    from mmtl_tf.config import preset
    from mmtl_tf.data import omniglot
    from mmtl_tf.preprocessing import Preprocessing
    from mmtl_tf.training import episode_sampler, train

    config = preset("tiny").replace(train={"steps": 2, "eval_episodes": 4, "log_every": 2})
    loaded, load = [], omniglot.load_omniglot_classes

    def spy(split, *args, **kwargs):
        if split == config.data.eval_split:
            raise AssertionError(f"meta-training loaded the test split {split!r}")
        loaded.append(split)
        return load(split, *args, **kwargs)

    monkeypatch.setattr(omniglot, "load_omniglot_classes", spy)
    metrics = train(config, tmp_path / "run")
    assert set(loaded) == {config.data.train_split}
    assert metrics["part"] == "validation" and "validation alphabets" in metrics["scored_on"]
    train_part = episode_sampler(config, "train").classes
    validation = episode_sampler(config, "validation").classes
    assert set(train_part.groups) & set(validation.groups) == set(), "disjoint alphabets"
    assert len(set(validation.groups)) == 1 and validation.num_classes > WAYS
    everything = load(config.data.train_split, Preprocessing(config.data.image_size))
    assert train_part.num_classes + validation.num_classes == everything.num_classes


def test_the_vinyals_protocol_has_no_validation_part_and_says_so():
    from mmtl_tf.config import preset
    from mmtl_tf.training import episode_sampler

    with pytest.raises(ValueError, match="no validation part"):
        episode_sampler(preset("omniglot-5w1s").replace(data={"protocol": "vinyals"}), "validation")
