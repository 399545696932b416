"""Affine jitter of meta-training images (``data.jitter``): the map is the one its docstring
states (identity, integer shifts and a quarter turn checked against numpy), the episodes keep
their classes and labels and are a pure function of the seed, and only meta-training images move."""

import math

import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.data.jitter import affine, random_affine


def _images(count=3, side=11, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((count, side, side, 1), np.float32)
    images[:, 2:-2, 2:-2] = rng.uniform(0.2, 1.0, (count, side - 4, side - 4, 1))
    return images


def _map(images, angle=0.0, scale=1.0, shear=0.0, shift=(0.0, 0.0)):
    count = len(images)
    full = lambda v: tf.fill([count], float(v))  # noqa: E731
    return affine(tf.constant(images), full(angle), full(scale), full(shear),
                  tf.constant([shift] * count, tf.float32)).numpy()


def test_identity_parameters_leave_the_images_as_they_are():
    images = _images()
    np.testing.assert_allclose(_map(images), images, atol=1e-6)


def test_an_integer_shift_moves_every_pixel_and_fills_with_the_background():
    images = _images() + 0.25  # a background of 0.25: what comes in from outside is 0.25
    moved = _map(images, shift=(2.0, -1.0))  # 2 pixels right, 1 up
    expected = np.full_like(images, 0.25)
    expected[:, :-1, 2:] = images[:, 1:, :-2]
    np.testing.assert_allclose(moved, expected, atol=1e-5)


def test_a_quarter_turn_is_numpys_counter_clockwise_rot90():
    images = _images(side=9)
    np.testing.assert_allclose(_map(images, angle=math.pi / 2), np.rot90(images, axes=(1, 2)),
                               atol=1e-5)


def test_random_jitter_is_a_pure_function_of_its_seed_and_bounded_by_its_strength():
    images = tf.constant(_images(count=6, side=28))[None]  # (1, 6, 28, 28, 1): a task axis
    seed = tf.constant([3, 5], tf.int64)
    once, again = (random_affine(images, seed, 1.0).numpy() for _ in range(2))
    np.testing.assert_array_equal(once, again)
    assert once.shape == images.shape and np.abs(once - images.numpy()).max() > 0.1
    other = random_affine(images, tf.constant([3, 6], tf.int64), 1.0).numpy()
    assert np.abs(other - once).max() > 0.1
    np.testing.assert_allclose(random_affine(images, seed, 0.0).numpy(), images.numpy(),
                               atol=1e-6)


def test_only_meta_training_episodes_are_jittered_and_they_keep_their_classes(omniglot_zips):
    from mmtl_tf.config import preset
    from mmtl_tf.training import episode_sampler

    config = preset("tiny").replace(data={"jitter": 1.0})
    train = episode_sampler(config, "train")
    assert train.jitter == 1.0
    assert episode_sampler(config, "validation").jitter == 0.0
    assert episode_sampler(config, "test").jitter == 0.0
    plain = episode_sampler(preset("tiny"), "train")
    seed = tf.constant([11, 2], tf.int64)
    moved, still = train.sample(seed, 2), plain.sample(seed, 2)
    for name in ("support_y", "query_y", "class_ids"):
        np.testing.assert_array_equal(getattr(moved, name), getattr(still, name))
    assert np.abs(moved.support_x.numpy() - still.support_x.numpy()).max() > 0.1
    np.testing.assert_array_equal(train.sample(seed, 2).query_x, moved.query_x)


@pytest.mark.parametrize("value, message", [
    (-0.5, "data.jitter=-0.5 must be a finite number >= 0"),
    (float("nan"), "data.jitter=nan must be a finite number >= 0"),
])
def test_a_bad_jitter_is_refused_naming_the_value(value, message):
    from mmtl_tf.config import preset

    with pytest.raises(ValueError, match=message):
        preset("tiny").replace(data={"jitter": value})


def test_jitter_is_refused_where_it_would_do_nothing():
    from mmtl_tf.config import preset

    with pytest.raises(ValueError, match="task families and the sinusoid take none: drop it"):
        preset("multitask").replace(data={"jitter": 1.0})
    with pytest.raises(ValueError, match="task families and the sinusoid take none: drop it"):
        preset("sinusoid").replace(data={"jitter": 1.0})
