"""Meta-multi-task learning (issue #14): meta-batches mixing task families, the weighted
meta-loss sum_k alpha_k L_k, per-family metrics, lambda R(theta), the proximal inner-loop term,
and families from a folder and from TFDS mixed with Omniglot."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.episodes import Episode, EpisodeSampler
from mmtl_tf.data.families import FamilyBatch, FamilyMix
from mmtl_tf.meta import inner_loop as il
from mmtl_tf.meta.algorithms import MetaConfig
from mmtl_tf.meta.learner import MetaLearner
from mmtl_tf.models.conv4 import conv4_encoder, mlp_encoder

SIDE = 14  # 14 -> 7 -> 4 -> 2 -> 1 through Conv4's four stride-2 blocks
# Two families that agree on nothing: ways, shots and queries all differ.
SHAPES = {"chars": (5, 3, 7), "wide": (3, 1, 4)}  # (ways, shots, queries)


def _classes(num_classes=24, seed=0, images=11):
    rng = np.random.default_rng(seed)
    patterns = (rng.random((num_classes, SIDE, SIDE, 1)) < 0.3).astype(np.float32)
    x = np.clip(np.repeat(patterns, images, 0) + rng.normal(0, 0.4, (num_classes * images, SIDE,
                                                                     SIDE, 1)), 0, 1)
    return ClassImages.from_labels(x.astype(np.float32), np.repeat(np.arange(num_classes) + 7 * seed,
                                                                   images))


def _samplers(shapes=SHAPES):
    return [EpisodeSampler(_classes(seed=k + 1), *shape) for k, shape in enumerate(shapes.values())]


def _learner(config, families=tuple(SHAPES), seed=1):
    keras.utils.set_random_seed(seed)
    return MetaLearner(conv4_encoder(image_size=SIDE, filters=4), config, families=families)


def _as_float64(batch):
    """A meta-batch's images in float64 (masks and weights keep their float32)."""
    episodes = batch.episodes if isinstance(batch, FamilyBatch) else batch
    episodes = episodes._replace(support_x=tf.cast(episodes.support_x, tf.float64),
                                 query_x=tf.cast(episodes.query_x, tf.float64))
    return batch._replace(episodes=episodes) if isinstance(batch, FamilyBatch) else episodes


# ----- the sampler ------------------------------------------------------------------------------
def test_proportional_mix_honours_alpha_over_many_meta_batches():
    weights = np.array([0.5, 0.3, 0.2, 0.0])
    shapes = {"a": (5, 1, 2), "b": (3, 2, 2), "c": (4, 1, 3), "d": (2, 1, 1)}
    mix = FamilyMix(_samplers(shapes), weights, "proportional")
    batches, tasks = 40, 64
    draw = tf.function(lambda i: mix.sample(tf.stack([tf.constant(11, tf.int64), i]), tasks).family)
    families = np.concatenate([draw(tf.constant(i, tf.int64)).numpy() for i in range(batches)])
    n = batches * tasks
    share = np.bincount(families, minlength=4) / n
    bound = 4 * np.sqrt(weights * (1 - weights) / n)  # four binomial standard deviations
    assert (np.abs(share - weights) <= bound).all(), (share, bound)
    assert share[3] == 0.0  # a zero weight is never drawn
    batch = mix.sample(tf.constant([11, 0], tf.int64), tasks)
    np.testing.assert_allclose(batch.weight.numpy(), np.full(tasks, 1 / tasks))


def test_fixed_mix_splits_the_batch_and_weights_each_family_by_alpha():
    mix = FamilyMix(_samplers(), [0.75, 0.25], "fixed")
    batch = mix.sample(tf.constant([3, 0], tf.int64), 7)
    np.testing.assert_array_equal(batch.family.numpy(), [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(batch.weight.numpy(), [0.75 / 4] * 4 + [0.25 / 3] * 3, rtol=1e-6)
    assert abs(float(tf.reduce_sum(batch.weight)) - 1.0) < 1e-6


def test_padded_tasks_carry_their_family_episode_and_masks_exactly():
    samplers = _samplers()
    mix = FamilyMix(samplers, [0.5, 0.5], "fixed")
    seed = tf.constant([5, 2], tf.int64)
    batch = mix.sample(seed, 4)  # two tasks of each family
    seeds = tf.random.experimental.stateless_split(seed, 3)
    assert batch.episodes.support_x.shape == (4, 15, SIDE, SIDE, 1)  # max N*K = 5*3
    assert batch.episodes.query_x.shape == (4, 35, SIDE, SIDE, 1)  # max N*Q = 5*7
    for k, sampler in enumerate(samplers):
        plain = sampler.sample(seeds[k + 1], 2)
        rows = slice(2 * k, 2 * k + 2)
        s, q, n = sampler.ways * sampler.shots, sampler.ways * sampler.queries, sampler.ways
        np.testing.assert_array_equal(batch.episodes.support_x[rows, :s], plain.support_x)
        np.testing.assert_array_equal(batch.episodes.query_y[rows, :q], plain.query_y)
        np.testing.assert_array_equal(batch.episodes.class_ids[rows, :n], plain.class_ids)
        assert (batch.episodes.class_ids[rows, n:].numpy() == -1).all()
        assert batch.support_mask[rows].numpy().sum(1).tolist() == [s, s]
        assert batch.query_mask[rows].numpy().sum(1).tolist() == [q, q]
        assert batch.class_mask[rows].numpy().sum(1).tolist() == [n, n]
        assert (batch.episodes.support_x[rows, s:].numpy() == 0).all()


# ----- the learner ------------------------------------------------------------------------------
def _counting_traces(learner):
    traces = []
    step = learner.train_step
    learner.train_step = lambda data: (traces.append(1), step(data))[1]
    return traces


def test_families_of_different_ways_and_shots_share_one_traced_step():
    mix = FamilyMix(_samplers(), [0.6, 0.4], "proportional")
    batches = [mix.sample(tf.constant([9, i], tf.int64), 4) for i in range(4)]
    mixes = {tuple(b.family.numpy()) for b in batches}
    assert len(mixes) >= 3, mixes  # the family mix changes from batch to batch
    learner = _learner(MetaConfig(algorithm="fomaml", inner_steps=1, inner_lr=0.3, max_ways=6,
                                  head_init="learned"))  # the smallest graph: quicker to trace
    learner.compile(optimizer=keras.optimizers.SGD(0.01))
    traces = _counting_traces(learner)
    ds = tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda *f: tf.stack(f), *batches))
    history = learner.fit(ds, epochs=1, verbose=0, shuffle=False)
    assert len(traces) == 1
    for name in ("loss", "accuracy", "chars_loss", "chars_accuracy", "wide_loss", "wide_accuracy"):
        assert np.isfinite(history.history[name][-1]), name


def test_meta_loss_and_its_gradient_are_the_alpha_weighted_sum_over_families(float64):
    """By hand: each family's tasks unpadded, their mean query loss L_k and its meta-gradient
    through the plain (single-family) path; the padded mixed step must give sum_k alpha_k L_k
    and move theta by the gradient of that sum. Support-set batch statistics (the presets'):
    padded support rows must not reach them. In float64: the two paths agree to rounding
    (in float32 the second-order terms through 3-row batch statistics differ by ~1e-4)."""
    samplers = _samplers()
    alpha = [0.7, 0.3]
    mix = FamilyMix(samplers, alpha, "fixed")
    seed = tf.constant([4, 1], tf.int64)
    batch = _as_float64(mix.sample(seed, 5))  # 3 tasks of chars, 2 of wide
    seeds = tf.random.experimental.stateless_split(seed, 3)
    config = MetaConfig(inner_steps=2, inner_lr=0.3, max_ways=6, head_init="learned",
                        transductive=False)
    learner = _learner(config)
    lr = 0.05
    learner.compile(optimizer=keras.optimizers.SGD(lr))
    variables = learner.meta_variables
    with tf.GradientTape() as tape:
        family_losses = []
        for k, (sampler, n) in enumerate(zip(samplers, mix.tasks_per_family(5))):
            plain = _as_float64(sampler.sample(seeds[k + 1], n))
            family_losses.append(tf.reduce_mean(
                learner.task_metrics(plain, 2, False, training=True)["meta_loss"]))
        by_hand = tf.add_n([a * l for a, l in zip(alpha, family_losses)])
    reference = tape.gradient(by_hand, variables)
    before = [v.numpy().copy() for v in variables]
    logs = learner.train_on_batch(batch, return_dict=True)
    np.testing.assert_allclose(logs["loss"], float(by_hand), rtol=1e-6)  # logs are float32
    np.testing.assert_allclose([logs["chars_loss"], logs["wide_loss"]],
                               [float(l) for l in family_losses], rtol=1e-6)
    for b, v, g in zip(before, variables, reference):
        # atol: a convolution bias before batch norm has no gradient, only rounding
        np.testing.assert_allclose((b - v.numpy()) / lr, g.numpy(), rtol=1e-7, atol=1e-9)
    assert max(float(np.abs(g).max()) for g in reference) > 1e-3


def test_weight_decay_adds_exactly_two_lambda_theta_to_the_update():
    batch = FamilyMix(_samplers(), [0.5, 0.5], "fixed").sample(tf.constant([2, 0], tf.int64), 4)
    lr, decay, moved = 0.05, 0.01, []
    for weight_decay in (0.0, decay):
        learner = _learner(MetaConfig(algorithm="fomaml", inner_steps=1, inner_lr=0.3,
                                      max_ways=6, head_init="learned",
                                      weight_decay=weight_decay))
        learner.compile(optimizer=keras.optimizers.SGD(lr))
        theta = [p.numpy().copy() for p in learner.meta_params]
        learner.train_on_batch(batch)
        moved.append([t - p.numpy() for t, p in zip(theta, learner.meta_params)])
    for t, plain, decayed in zip(theta, *moved):
        np.testing.assert_allclose(decayed - plain, lr * 2 * decay * t, rtol=1e-3, atol=1e-7)


def test_the_proximal_term_adds_mu_times_phi_minus_phi0_to_each_inner_step(float64):
    keras.utils.set_random_seed(3)
    encoder = mlp_encoder(input_dim=4, hidden=(6, 5))
    rng = np.random.default_rng(0)
    x, y = tf.constant(rng.normal(size=(6, 4))), tf.constant([0, 1, 2, 0, 1, 2], tf.int32)
    params = [tf.constant(rng.normal(size=p.shape)) for p in encoder.trainable_variables] + [
        tf.constant(rng.normal(size=(5, 3))), tf.constant(rng.normal(size=(3,)))]
    anchor = [p + tf.constant(rng.normal(size=p.shape)) for p in params]
    lr, mu = 0.3, 0.7
    rates = [tf.constant(lr, tf.float64)] * len(params)
    plain = il.InnerLoop(encoder, head_init="learned").step(params, x, y, rates, False)[1]
    loss, proximal = il.InnerLoop(encoder, head_init="learned", proximal=mu).step(
        params, x, y, rates, False, anchor=anchor)
    for p, a, without, with_term in zip(params, anchor, plain, proximal):
        np.testing.assert_allclose(with_term - without, -lr * mu * (p - a), rtol=1e-10, atol=1e-12)


def test_the_proximal_meta_gradient_matches_finite_differences(float64):
    """Through two inner steps (at the first step phi = phi_0 and the term is zero), the
    meta-gradient of the query loss with the proximal term matches central differences of
    that loss, and differs from the meta-gradient without the term."""
    keras.utils.set_random_seed(3)
    encoder = mlp_encoder(input_dim=4, hidden=(6, 5))
    rng = np.random.default_rng(1)
    ways, shots, queries = 3, 2, 4
    centres = rng.normal(size=(ways, 4))
    sy = rng.permutation(np.repeat(np.arange(ways), shots)).astype(np.int32)
    qy = rng.permutation(np.repeat(np.arange(ways), queries)).astype(np.int32)
    sx, qx = centres[sy] + rng.normal(size=(ways * shots, 4)), centres[qy] + rng.normal(size=(ways * queries, 4))
    theta = [tf.constant(v.numpy() + 0.1 * rng.normal(size=v.shape)) for v in
             encoder.trainable_variables] + [tf.constant(rng.normal(size=(5, 4)) * 0.5),
                                              tf.constant(rng.normal(size=(4,)) * 0.1)]

    def query_loss_fn(mu):
        loop = il.InnerLoop(encoder, head_init="learned", proximal=mu)

        @tf.function
        def query_loss(params):
            rates = lambda step: [tf.constant(0.5, tf.float64)] * len(params)
            adapted = il.adapt(loop, params, tf.constant(sx), tf.constant(sy), ways, 2, rates)
            return loop.loss(il.query_logits(loop, adapted.params, None, tf.constant(qx)),
                             tf.constant(qy))
        return query_loss

    def gradient(fn):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = fn(theta)
        return [g.numpy() for g in tape.gradient(loss, theta)]

    with_term, without = query_loss_fn(2.0), query_loss_fn(0.0)
    grads = gradient(with_term)
    h, checked = 1e-6, 0
    for i, p in enumerate(theta):
        for j in rng.choice(p.numpy().size, size=min(3, p.numpy().size), replace=False):
            def at(delta):
                flat = p.numpy().ravel().copy()
                flat[j] += delta
                return float(with_term(theta[:i] + [tf.constant(flat.reshape(p.shape))] + theta[i + 1:]))
            numeric = (at(h) - at(-h)) / (2 * h)
            np.testing.assert_allclose(grads[i].ravel()[j], numeric, rtol=1e-5, atol=1e-8)
            checked += 1
    assert checked >= 12
    change = max(float(np.abs(a - b).max()) for a, b in zip(grads, gradient(without)))
    assert change > 1e-3, change  # the term really changes the meta-gradient


def test_recent_loss_weighting_scales_alpha_by_each_family_recent_loss():
    """Step 1 uses alpha itself (no family seen yet) and records each family's mean
    post-adaptation loss; step 2's shares are alpha_k * recent_k renormalised, and the moving
    average then moves halfway (momentum 0.5) to step 2's losses. A zero meta learning rate
    keeps theta fixed, so the losses can be recomputed by hand."""
    mix = FamilyMix(_samplers(), [0.6, 0.4], "fixed")
    batches = [mix.sample(tf.constant([6, i], tf.int64), 4) for i in range(2)]
    learner = _learner(MetaConfig(algorithm="fomaml", inner_steps=1, inner_lr=0.3, max_ways=6,
                                  head_init="learned", family_weighting="recent_loss",
                                  family_loss_momentum=0.5))
    learner.compile(optimizer=keras.optimizers.SGD(0.0))

    def family_means(batch):
        losses = learner.task_metrics(batch, 1)["loss"].numpy()
        family = batch.family.numpy()
        return np.array([losses[family == k].mean() for k in range(2)])

    first = learner.train_on_batch(batches[0], return_dict=True)
    np.testing.assert_allclose([first["chars_alpha"], first["wide_alpha"]], [0.6, 0.4], rtol=1e-6)
    recent = family_means(batches[0])
    np.testing.assert_allclose(learner.family_loss.numpy(), recent, rtol=1e-5)
    second = learner.train_on_batch(batches[1], return_dict=True)
    expected = np.array([0.6, 0.4]) * recent / (np.array([0.6, 0.4]) @ recent)
    np.testing.assert_allclose([second["chars_alpha"], second["wide_alpha"]], expected, rtol=1e-5)
    assert second["chars_alpha"] > 0.6  # 5-way characters lose more than 3-way ones
    np.testing.assert_allclose(learner.family_loss.numpy(),
                               0.5 * recent + 0.5 * family_means(batches[1]), rtol=1e-5)
