"""MetaLearner: learned inner rates, Reptile's update rule, way-agnostic adaptation, batch-norm
semantics, bad inputs, and XLA agreement."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset
from mmtl_tf.data.sinusoid import SinusoidSampler
from mmtl_tf.meta.algorithms import MetaConfig
from mmtl_tf.meta.learner import NONFINITE_MARKER, MetaLearner
from mmtl_tf.models.conv4 import conv4_encoder, mlp_encoder

WAYS, SHOTS, QUERIES, TASKS = 5, 3, 7, 4
SIDE = 14  # image side: 14 -> 7 -> 4 -> 2 -> 1 through Conv4's four stride-2 blocks
IMAGES_PER_CLASS = 13


def _pattern_classes(num_classes=40, seed=0, noise=0.5):
    """Synthetic classes: each a fixed random binary 14x14 pattern, its images the pattern
    plus Gaussian noise, clipped to [0, 1]. Class ids start at 100 so they are not positions."""
    rng = np.random.default_rng(seed)
    patterns = (rng.random((num_classes, SIDE, SIDE, 1)) < 0.3).astype(np.float32)
    images = np.repeat(patterns, IMAGES_PER_CLASS, axis=0)
    images = np.clip(images + rng.normal(0.0, noise, images.shape), 0.0, 1.0).astype(np.float32)
    labels = np.repeat(np.arange(num_classes) + 100, IMAGES_PER_CLASS)
    return ClassImages.from_labels(images, labels)


def _meta_batch(classes, ways=WAYS, seed=3):
    """One meta-batch of TASKS episodes (a leading task axis) as a one-element dataset."""
    batch = EpisodeSampler(classes, ways, SHOTS, QUERIES).sample(tf.constant([seed, 0], tf.int64),
                                                               TASKS)
    return batch, tf.data.Dataset.from_tensors(batch)


def _learner(config, filters=4, seed=1):
    keras.utils.set_random_seed(seed)
    return MetaLearner(conv4_encoder(image_size=SIDE, filters=filters), config)


def _sinusoid_learner(config, jit_compile=False, seed=2):
    keras.utils.set_random_seed(seed)
    learner = MetaLearner(mlp_encoder(hidden=(16, 16)), config, task="regression")
    learner.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=jit_compile)
    return learner


def _sinusoid_batch(seed=3):
    return tf.data.Dataset.from_tensors(
        SinusoidSampler(shots=10, queries=7).sample(tf.constant([seed, 0], tf.int64), TASKS))


def _values(variables):
    return [v.numpy().copy() for v in variables]


# ----- learned inner learning rates ----------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["metasgd", "mamlpp"])
def test_learned_inner_rates_receive_gradients(algorithm):
    learner = _sinusoid_learner(MetaConfig(algorithm=algorithm, inner_steps=2, inner_lr=0.02))
    assert len(learner.inner_lrs) == len(learner.meta_params)
    before = _values(learner.inner_lrs)
    learner.fit(_sinusoid_batch(), verbose=0)

    for old, v, p in zip(before, learner.inner_lrs, learner.meta_params):
        changed = v.numpy() != old
        if algorithm == "mamlpp":  # one rate per tensor and step: every one of them moves
            assert old.shape == (2,) and changed.all(), v.path
        else:  # one rate per element: most move (a ReLU unit dead on every input cannot)
            assert old.shape == tuple(p.shape)
            assert changed.mean() > 0.5, (v.path, changed.mean())


# ----- Reptile -------------------------------------------------------------------------------
def _sgd_on_task(encoder, theta, x, y, ways, steps, lr):
    """Reference Reptile inner loop, written independently of InnerLoop: plain SGD on
    TensorFlow's sparse cross-entropy from theta (head sliced to the task's ways)."""
    params = [tf.constant(p) for p in theta[:-2]] + [tf.constant(theta[-2][:, :ways]),
                                                      tf.constant(theta[-1][:ways])]
    state = [v.value for v in encoder.non_trainable_variables]
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(params)
            features, _ = encoder.stateless_call(params[:-2], state, x, training=True)
            logits = tf.matmul(features, params[-2]) + params[-1]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        params = [p - lr * g for p, g in zip(params, tape.gradient(loss, params))]
    return [p.numpy() for p in params]


def test_reptile_update_is_theta_plus_epsilon_times_mean_adapted_minus_theta():
    epsilon, inner_lr, inner_steps, max_ways = 0.25, 0.1, 3, 8
    learner = _learner(MetaConfig(algorithm="reptile", head_init="learned", max_ways=max_ways,
                                  inner_steps=inner_steps, inner_lr=inner_lr))
    learner.compile(optimizer=keras.optimizers.SGD(epsilon))
    batch, dataset = _meta_batch(_pattern_classes(num_classes=12))
    theta = _values(learner.meta_params)

    phis = []
    for t in range(TASKS):  # each task adapts on its support set (its queries are held out)
        phis.append(_sgd_on_task(learner.encoder, theta, batch.support_x[t], batch.support_y[t],
                                 WAYS, inner_steps, inner_lr))
    learner.fit(dataset, verbose=0)

    updated = _values(learner.meta_params)
    expected = [th + epsilon * (np.mean([phi[i] for phi in phis], 0) - th)
                for i, th in enumerate(theta[:-2])]
    moved = [not np.allclose(u, th) for u, th in zip(updated[:-2], theta[:-2])]
    assert sum(moved) >= len(moved) - 4, "the encoder moved (bar biases cancelled by batch norm)"
    for e, u in zip(expected, updated[:-2]):
        np.testing.assert_allclose(u, e, rtol=1e-4, atol=1e-6)
    for i in (-2, -1):  # the head: its first WAYS columns move, the others stay put
        head_th, head_u = theta[i], updated[i]
        mean_phi = np.mean([phi[i] for phi in phis], 0)
        np.testing.assert_allclose(head_u[..., :WAYS],
                                   head_th[..., :WAYS] + epsilon * (mean_phi - head_th[..., :WAYS]),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(head_u[..., WAYS:], head_th[..., WAYS:])


# ----- way-agnostic adaptation ---------------------------------------------------------------
def _adapted_accuracy(learner, classes, ways, seed):
    """Mean query accuracy over TASKS held-out tasks, through adapt() and predict_adapted()."""
    batch, _ = _meta_batch(classes, ways=ways, seed=seed)
    hits = []
    for t in range(TASKS):
        params = learner.adapt(batch.support_x[t], batch.support_y[t])
        assert params[-2].shape[-1] == ways
        logits = learner.predict_adapted(params, batch.query_x[t], batch.support_x[t])
        assert logits.shape == (ways * QUERIES, ways)
        hits.append(np.argmax(logits.numpy(), axis=-1) == batch.query_y[t].numpy())
    return float(np.mean(hits))


# A zero head trains two inner steps: its first moves only the head.
@pytest.mark.parametrize("head_init,inner_lr,inner_steps,eval_steps",
                         [("zero", 0.4, 2, 8), ("proto", 0.1, 1, 3)])
def test_model_meta_trained_five_way_adapts_to_three_and_twelve_ways(head_init, inner_lr,
                                                                     inner_steps, eval_steps):
    classes = _pattern_classes()
    train, test = classes.select(np.arange(24)), classes.select(np.arange(24, 40))
    learner = _learner(MetaConfig(head_init=head_init, max_ways=20, inner_steps=inner_steps,
                                  eval_inner_steps=eval_steps, inner_lr=inner_lr), filters=16)
    learner.compile(optimizer=keras.optimizers.Adam(3e-3))
    learner.fit(episode_dataset(EpisodeSampler(train, WAYS, SHOTS, QUERIES), seed=0,
                                meta_batch_size=TASKS), steps_per_epoch=8, verbose=0)

    three = _adapted_accuracy(learner, test, ways=3, seed=7)
    twelve = _adapted_accuracy(learner, test, ways=12, seed=8)
    assert three > 0.8, three  # chance: 1/3
    assert twelve > 0.4, twelve  # chance: 1/12


# ----- batch-norm semantics ------------------------------------------------------------------
@pytest.mark.parametrize("transductive", [False, True])
def test_a_query_prediction_depends_on_other_queries_only_when_transductive(transductive):
    learner = _learner(MetaConfig(transductive=transductive, eval_inner_steps=2))
    batch, _ = _meta_batch(_pattern_classes(num_classes=12))
    support_x, support_y, query_x = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    params = learner.adapt(support_x, support_y)
    together = learner.predict_adapted(params, query_x, support_x).numpy()
    alone = np.concatenate([learner.predict_adapted(params, query_x[i:i + 1], support_x).numpy()
                            for i in range(3)])
    if transductive:
        assert np.abs(alone - together[:3]).max() > 1e-2
    else:
        np.testing.assert_allclose(alone, together[:3], rtol=1e-5, atol=1e-5)


# ----- bad input -----------------------------------------------------------------------------
def test_images_of_the_wrong_size_are_a_clear_error():
    learner = _learner(MetaConfig())
    learner.compile(optimizer=keras.optimizers.SGD(0.1))
    classes = ClassImages.from_labels(np.zeros((60, 13, 13, 1), np.float32), np.arange(60) // 10)
    # 13x13 images give the same feature size as 14x14 ones: only an explicit check sees them
    _, dataset = _meta_batch(classes)
    with pytest.raises(ValueError, match=r"(?s)13, 13, 1.*\(batch, 14, 14, 1\)"):
        learner.fit(dataset, verbose=0)
    with pytest.raises(ValueError, match=r"\(batch, 14, 14, 1\)"):
        learner.adapt(np.zeros((6, 20, 20, 1), np.float32), np.arange(6) % 2)


def test_more_ways_than_max_ways_is_a_value_error_naming_it():
    learner = _learner(MetaConfig(max_ways=4))
    learner.compile(optimizer=keras.optimizers.SGD(0.1))
    _, dataset = _meta_batch(_pattern_classes(num_classes=12))
    with pytest.raises(ValueError, match="max_ways=4"):
        learner.fit(dataset, verbose=0)


def test_a_non_finite_meta_loss_stops_fit_and_writes_nothing():
    learner = _sinusoid_learner(MetaConfig(inner_steps=2, inner_lr=1e30))
    before = _values(learner.weights)
    with pytest.raises(tf.errors.InvalidArgumentError, match=NONFINITE_MARKER):
        learner.fit(_sinusoid_batch(), verbose=0)
    for old, v in zip(before, learner.weights):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)


def test_adapting_on_an_empty_support_set_is_a_value_error():
    learner = _learner(MetaConfig())
    with pytest.raises(ValueError, match="empty"):
        learner.adapt(np.zeros((0, SIDE, SIDE, 1), np.float32), np.zeros((0,), np.int32))
    with pytest.raises(ValueError, match="empty"):
        learner.adapt(np.zeros((0, SIDE, SIDE, 1), np.float32), np.zeros((0,), np.int32), ways=3)


def test_adapt_refuses_too_many_ways_and_a_diverging_loss_by_name():
    batch, _ = _meta_batch(_pattern_classes())
    e = _first_episode(batch)
    with pytest.raises(ValueError, match=r"ways=5 is outside 2..max_ways=4"):
        _learner(MetaConfig(max_ways=4)).adapt(e.support_x, e.support_y)
    with pytest.raises(ValueError, match=r"ways=1 is outside"):
        _learner(MetaConfig()).adapt(e.support_x[:1], e.support_y[:1] * 0)
    diverging = _learner(MetaConfig(inner_lr=1e30, eval_inner_steps=3, head_init="learned"))
    with pytest.raises(FloatingPointError, match=r"not finite after [1-3] adaptation step"):
        diverging.adapt(e.support_x, e.support_y)
    fine = _learner(MetaConfig(inner_lr=0.1)).adapt(e.support_x, e.support_y)
    assert fine[-2].shape[1] == WAYS and all(np.isfinite(p.numpy()).all() for p in fine)


# ----- XLA -----------------------------------------------------------------------------------
def test_jit_compiled_step_matches_the_uncompiled_one():
    config = MetaConfig(inner_steps=2, inner_lr=0.05)
    results = []
    for jit_compile in (False, True):
        learner = _sinusoid_learner(config, jit_compile=jit_compile)
        history = learner.fit(_sinusoid_batch(), verbose=0).history
        results.append((history, _values(learner.meta_params)))
    (plain, plain_weights), (xla, xla_weights) = results
    for name in ("loss", "pre_loss", "support_loss"):
        np.testing.assert_allclose(xla[name], plain[name], rtol=1e-4)
    for a, b in zip(xla_weights, plain_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_non_finite_jit_compiled_step_writes_no_nan():
    # XLA drops tf.debugging.Assert, so the step cannot raise: it must still leave theta intact
    learner = _sinusoid_learner(MetaConfig(inner_steps=2, inner_lr=1e30), jit_compile=True)
    before = _values(learner.weights)
    history = learner.fit(_sinusoid_batch(), verbose=0).history
    assert not np.isfinite(history["loss"][0])
    for old, v in zip(before, learner.weights):  # plain SGD: a zero update changes nothing
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)


# ----- MAML++ derivative-order annealing ------------------------------------------------------
@pytest.mark.parametrize("algorithm,first_order_until,same_as_first_order", [
    ("maml", 5, True),    # annealing: the first meta-steps are first order
    ("maml", 0, False),   # plain MAML: second order from the start
])
def test_derivative_order_annealing_starts_first_order(algorithm, first_order_until,
                                                       same_as_first_order):
    batch, _ = _meta_batch(_pattern_classes(), seed=9)

    def one_step(config):
        learner = _learner(config)
        learner.compile(optimizer=keras.optimizers.SGD(0.5))
        learner.train_on_batch(batch)
        return _values(learner.meta_params)

    base = dict(inner_lr=0.3, max_ways=WAYS, head_init="learned")
    annealed = one_step(MetaConfig(algorithm=algorithm, first_order_until=first_order_until, **base))
    first_order = one_step(MetaConfig(algorithm="fomaml", **base))
    gap = max(float(np.abs(a - b).max()) for a, b in zip(annealed, first_order))
    if same_as_first_order:
        assert gap < 1e-6, gap
    else:
        assert gap > 1e-5, gap


# ----- ANIL, MAML++'s multi-step loss, the traced graph ---------------------------------------
def _first_episode(batch):
    from mmtl_tf.data.episodes import Episode

    return Episode(*(f[0] for f in batch))


def test_anil_is_maml_with_a_zero_inner_rate_on_the_encoder():
    from mmtl_tf.meta import inner_loop as il

    batch, _ = _meta_batch(_pattern_classes())
    e = _first_episode(batch)
    learner = _learner(MetaConfig(algorithm="anil", inner_steps=2, inner_lr=0.4, head_init="learned"))
    theta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    encoder_count = len(theta) - 2
    maml_loop = il.InnerLoop(learner.encoder, "classification", "learned", True, None)
    frozen_encoder = lambda step: [0.0] * encoder_count + [0.4, 0.4]  # noqa: E731

    def meta_gradient(loop, rates):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            adapted = il.adapt(loop, theta, e.support_x, e.support_y, WAYS, 2, rates)
            loss = loop.loss(il.query_logits(loop, adapted.params, e.support_x, e.query_x), e.query_y)
        return adapted, tape.gradient(loss, theta)

    anil, anil_grads = meta_gradient(learner.loop, learner.learning_rates(WAYS))
    reference, reference_grads = meta_gradient(maml_loop, frozen_encoder)
    for a, t in zip(anil.params[:encoder_count], theta):  # the encoder is not adapted at all
        np.testing.assert_array_equal(a.numpy(), t.numpy())
    assert not np.allclose(anil.params[-2].numpy(), theta[-2][:, :WAYS].numpy())
    assert anil.support_losses[-1] < anil.support_losses[0]
    for g, r in zip(anil_grads, reference_grads):  # the same meta-gradient, encoder included
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-6)
    assert min(np.abs(g.numpy()).max() for g in anil_grads[:encoder_count]) > 0


def test_mamlpp_multi_step_loss_weights_every_step_then_anneals_to_the_last():
    from mmtl_tf.meta import inner_loop as il

    steps, anneal = 3, 10
    batch, _ = _meta_batch(_pattern_classes())
    learner = _learner(MetaConfig(algorithm="mamlpp", inner_steps=steps, inner_lr=0.3,
                                  multi_step_anneal=anneal))
    learner.compile(optimizer=keras.optimizers.SGD(0.0))
    theta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    rates = learner.learning_rates(WAYS)
    per_step = []  # query loss after k steps, each from its own adaptation of k steps
    for k in range(1, steps + 1):
        losses = []
        for t in range(TASKS):
            e = _first_episode([f[t:] for f in batch])
            adapted = il.adapt(learner.loop, theta, e.support_x, e.support_y, WAYS, k, rates)
            logits = il.query_logits(learner.loop, adapted.params, e.support_x, e.query_x)
            losses.append(float(learner.loop.loss(logits, e.query_y)))
        per_step.append(losses)
    per_step = np.array(per_step)  # (steps, tasks)
    assert np.ptp(per_step[:, 0]) > 1e-3, "the steps' losses differ, so the weighting matters"
    for iteration, weights in ((0, [1 / 3, 1 / 3, 1 / 3]),
                               (anneal, [0.01, 0.01, 0.98])):  # 0.03 / steps on early steps
        learner.optimizer.iterations.assign(iteration)
        meta = learner.task_metrics(batch, steps, False, training=True)["meta_loss"].numpy()
        np.testing.assert_allclose(meta, np.array(weights) @ per_step, rtol=1e-5)


def test_the_traced_train_step_does_not_grow_with_the_meta_batch():
    from mmtl_tf.benchmarking import _train_graph_size
    from mmtl_tf.data.episodes import Episode

    batch, _ = _meta_batch(_pattern_classes())  # TASKS tasks
    learner = _learner(MetaConfig(inner_steps=2, inner_lr=0.4))
    learner.compile(optimizer=keras.optimizers.SGD(0.01))
    learner.train_on_batch(batch)
    two = Episode(*(f[:2] for f in batch))
    eight = Episode(*(tf.concat([f, f], 0) for f in batch))
    assert _train_graph_size(learner, two) == _train_graph_size(learner, eight)


@pytest.mark.parametrize("algorithm,weight_decay", [("maml", 0.0), ("fomaml", 0.0),
                                                    ("metasgd", 0.0), ("maml", 0.01)])
def test_train_step_applies_the_gradient_of_the_mean_meta_loss(algorithm, weight_decay):
    """The step takes each task's gradient inside tf.map_fn and sums them (issue #15): that
    sum must be the gradient of the mean meta-loss taken through the whole map."""
    batch, _ = _meta_batch(_pattern_classes(), seed=5)
    learner = _learner(MetaConfig(algorithm=algorithm, inner_lr=0.3, max_ways=WAYS,
                                  head_init="learned", weight_decay=weight_decay))
    lr = 0.1
    learner.compile(optimizer=keras.optimizers.SGD(lr))
    variables = learner.meta_variables
    first_order = learner.config.first_order
    with tf.GradientTape() as tape:
        meta = learner.task_metrics(batch, learner.config.inner_steps, first_order,
                                    training=True)["meta_loss"]
        loss = tf.reduce_mean(meta) + learner._regularizer()
    reference = tape.gradient(loss, variables)
    before = _values(variables)
    learner.train_on_batch(batch)
    for b, v, g in zip(before, variables, reference):
        np.testing.assert_allclose((b - v.numpy()) / lr, g.numpy(), rtol=1e-3, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in reference[:-2]) > 1e-4
