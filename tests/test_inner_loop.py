"""The inner loop's mathematics: meta-gradients against finite differences, the first-order
approximation, support-loss descent, untouched meta-parameters, eager/graph agreement."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.data.episodes import Episode
from mmtl_tf.meta import inner_loop as il
from mmtl_tf.meta.algorithms import MetaConfig
from mmtl_tf.meta.learner import MetaLearner, feature_dim
from mmtl_tf.models.conv4 import conv4_encoder, mlp_encoder

WAYS, SHOTS, QUERIES = 5, 3, 7
HEAD = 8  # columns of the meta-learned head (max_ways): wider than WAYS
INNER_STEPS = 2
IMAGE = 8  # 8x8 images: 4 stride-2 blocks leave 1x1, so F = filters
MLP_INPUT = 4


def _encoder(kind):
    keras.utils.set_random_seed(3)
    if kind == "mlp":
        return mlp_encoder(input_dim=MLP_INPUT, hidden=(6, 5))
    return conv4_encoder(image_size=IMAGE, filters=3)


def _task(kind, rng, dtype):
    """A 5-way 3-shot 7-query task, each class a random pattern plus noise; labels shuffled
    so that no order can be relied on."""
    shape = (MLP_INPUT,) if kind == "mlp" else (IMAGE, IMAGE, 1)
    patterns = rng.normal(size=(WAYS, *shape))
    support_y = rng.permutation(np.repeat(np.arange(WAYS), SHOTS)).astype(np.int32)
    query_y = rng.permutation(np.repeat(np.arange(WAYS), QUERIES)).astype(np.int32)
    support_x = (patterns[support_y] + rng.normal(size=(WAYS * SHOTS, *shape))).astype(dtype)
    query_x = (patterns[query_y] + rng.normal(size=(WAYS * QUERIES, *shape))).astype(dtype)
    return tf.constant(support_x), tf.constant(support_y), tf.constant(query_x), tf.constant(query_y)


def _meta_params(encoder, rng, dtype):
    """theta as tensors: the encoder's weights and a random (F, HEAD) head.

    Every weight is jittered: Keras' zero biases would put a ReLU exactly at its kink for an
    input whose previous layer is all zero, where the adapted weights jump.
    """
    jitter = lambda v: v.numpy() + 0.1 * rng.normal(size=v.shape).astype(dtype)
    return [tf.constant(jitter(v)) for v in encoder.trainable_variables] + [
        tf.constant(rng.normal(size=(feature_dim(encoder), HEAD)).astype(dtype) * 0.5),
        tf.constant(rng.normal(size=(HEAD,)).astype(dtype) * 0.1)]


def _query_loss_fn(loop, task, lr, first_order=False, support_mask=None):
    """theta -> query loss after INNER_STEPS SGD steps on the support set (a tf.function)."""
    support_x, support_y, query_x, query_y = task

    @tf.function
    def query_loss(meta_params):
        rates = lambda step: [tf.constant(lr, meta_params[0].dtype)] * len(meta_params)
        adapted = il.adapt(loop, meta_params, support_x, support_y, WAYS, INNER_STEPS, rates,
                           first_order, sample_mask=support_mask)
        return loop.loss(il.query_logits(loop, adapted.params, support_x, query_x), query_y)

    return query_loss


def _tape_gradient(fn, meta_params):
    with tf.GradientTape() as tape:
        tape.watch(meta_params)
        loss = fn(meta_params)
    return [g.numpy() for g in tape.gradient(loss, meta_params, unconnected_gradients="zero")]


SECOND_ORDER_CASES = [
    ("mlp", "learned", True, False),
    ("mlp", "proto", True, False),
    # A padded support set (explicit sample mask) and a plain one: Conv4 sends both through
    # Keras' masked moments, whose variance keeps the gradient through the mean.
    ("conv4", "proto", False, True),
    ("conv4", "learned", True, False),
]


@pytest.mark.parametrize("kind,head_init,transductive,masked", SECOND_ORDER_CASES)
def test_meta_gradient_matches_finite_differences(float64, kind, head_init, transductive,
                                                  masked):
    rng = np.random.default_rng(17)
    encoder = _encoder(kind)
    task = _task(kind, rng, np.float64)
    theta = _meta_params(encoder, rng, np.float64)
    loop = il.InnerLoop(encoder, "classification", head_init, transductive)
    mask = tf.ones([WAYS * SHOTS], tf.float64) if masked else None
    query_loss = _query_loss_fn(loop, task, lr=0.3, support_mask=mask)
    grads = _tape_gradient(query_loss, theta)
    used = len(theta) if head_init == "learned" else len(theta) - 2  # a proto head ignores theta's
    _assert_matches_finite_differences(query_loss, theta, grads, rng, used,
                                       per_tensor=3 if kind == "mlp" else 2)


def _assert_matches_finite_differences(loss_fn, theta, grads, rng, used, per_tensor):
    """Central differences (h = 1e-6, float64) of ``loss_fn`` at ``theta`` against ``grads`` on
    ``per_tensor`` random coordinates of each of the first ``used`` tensors."""
    h, analytic, numeric = 1e-6, [], []
    for i, p in enumerate(theta[:used]):
        for j in rng.choice(p.numpy().size, size=min(per_tensor, p.numpy().size), replace=False):
            flat = p.numpy().ravel()

            def at(delta):
                shifted = flat.copy()
                shifted[j] += delta
                moved = list(theta)
                moved[i] = tf.constant(shifted.reshape(p.shape))
                return float(loss_fn(moved))

            numeric.append((at(h) - at(-h)) / (2 * h))
            analytic.append(grads[i].ravel()[j])
    assert len(analytic) >= 12
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def _query_gradient_at_adapted_weights(loop, task, theta, lr):
    """The first-order reference, in theta's layout: the query loss's gradient at the adapted
    weights phi (a constant), the task head's gradient in theta's first WAYS columns."""
    support_x, support_y, query_x, query_y = task
    rates = lambda step: [tf.constant(lr, tf.float64)] * len(theta)
    phi = il.adapt(loop, theta, support_x, support_y, WAYS, INNER_STEPS, rates).params
    at_phi = _tape_gradient(
        lambda params: loop.loss(il.query_logits(loop, params, support_x, query_x), query_y),
        [tf.constant(p.numpy()) for p in phi])
    head_w, head_b = np.zeros(theta[-2].shape), np.zeros(theta[-1].shape)
    head_w[:, :WAYS], head_b[:WAYS] = at_phi[-2], at_phi[-1]
    return at_phi[:-2] + [head_w, head_b]


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights(float64):
    rng = np.random.default_rng(5)
    encoder = _encoder("mlp")
    task = _task("mlp", rng, np.float64)
    theta = _meta_params(encoder, rng, np.float64)
    loop = il.InnerLoop(encoder, "classification", "learned", True)
    first = _tape_gradient(_query_loss_fn(loop, task, lr=0.3, first_order=True), theta)
    at_phi = _query_gradient_at_adapted_weights(loop, task, theta, lr=0.3)

    # the task's head is theta's first WAYS columns; the other columns get no gradient
    for g, expected in zip(first, at_phi):
        np.testing.assert_allclose(g, expected, rtol=1e-9, atol=1e-12)
    assert not first[-2][:, WAYS:].any() and not first[-1][WAYS:].any()

    second = _tape_gradient(_query_loss_fn(loop, task, lr=0.3), theta)
    difference = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(second, first)))
    size = np.sqrt(sum(np.sum(a ** 2) for a in second))
    assert difference > 1e-2 * size, "second order must differ from first order"


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_one_sgd_meta_step_of_train_step_moves_theta_by_minus_the_meta_gradient(float64, algorithm):
    """The real MetaLearner.train_step (tf.map_fn over tasks, the outer tape, the optimizer),
    compiled with SGD at rate 1: theta moves by exactly minus the mean over tasks of the
    meta-gradient. Second order: the gradient that finite differences verify here; first
    order: the query gradient at the adapted weights. float64 throughout, so the tolerance is
    rounding only (the inner rate 0.25 is exact in the float32 the config stores it in)."""
    lr, tasks = 0.25, 2  # 1/2, the mean's factor, is exact in the float32 of the step's loss
    rng = np.random.default_rng(41)
    encoder = _encoder("conv4")
    episodes = [_task("conv4", rng, np.float64) for _ in range(tasks)]
    theta = _meta_params(encoder, rng, np.float64)
    learner = MetaLearner(encoder, MetaConfig(algorithm=algorithm, head_init="learned",
                                              max_ways=HEAD, inner_steps=INNER_STEPS, inner_lr=lr))
    for variable, value in zip(learner.meta_params, theta):
        variable.assign(value)
    learner.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))

    losses = [_query_loss_fn(learner.loop, e, lr) for e in episodes]
    meta_loss = lambda params: tf.add_n([f(params) for f in losses]) / tasks  # noqa: E731
    # eager: one second-order gradient costs less than tracing it in the tf.function
    second = _tape_gradient(lambda params: tf.add_n([f.python_function(params) for f in losses])
                            / tasks, theta)
    first = [np.mean(g, 0) for g in zip(*(_query_gradient_at_adapted_weights(
        learner.loop, e, theta, lr) for e in episodes))]
    gap = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(second, first)))
    assert gap > 1e-2 * np.sqrt(sum(np.sum(a ** 2) for a in second)), "the two orders differ here"
    if algorithm == "maml":
        _assert_matches_finite_differences(meta_loss, theta, second, rng, len(theta), per_tensor=1)

    batch = Episode(*(tf.stack(field) for field in zip(*episodes)),
                    class_ids=tf.tile(tf.range(WAYS, dtype=tf.int64)[None], [tasks, 1]),
                    task_params=tf.zeros([tasks, 0]))
    learner.train_on_batch(batch)
    expected = second if algorithm == "maml" else first
    for variable, before, gradient in zip(learner.meta_params, theta, expected):
        np.testing.assert_allclose(before.numpy() - variable.numpy(), gradient, rtol=1e-9,
                                   atol=1e-12, err_msg=variable.path)
    # the head columns beyond the tasks' WAYS take no part: they do not move at all
    np.testing.assert_array_equal(learner.head_w.numpy()[:, WAYS:], theta[-2].numpy()[:, WAYS:])


def _graph_ops(fn, *args):
    graph = fn.get_concrete_function(*args).graph.as_graph_def()
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


@pytest.mark.parametrize("transductive", [True, False])
def test_fused_batch_norm_gives_the_elementwise_second_order_meta_gradient(transductive):
    """The fast float32 path (FusedBatchNormV3, its registered gradient and gradient of the
    gradient) against the element-wise path whose float64 twin matches finite differences."""
    rng = np.random.default_rng(29)
    encoder = _encoder("conv4")
    task = _task("conv4", rng, np.float32)
    theta = _meta_params(encoder, rng, np.float32)
    loop = il.InnerLoop(encoder, "classification", "learned", transductive)
    results = {}
    for fused in (True, False):
        for norm in encoder.norms:
            norm.fused = fused
        query_loss = _query_loss_fn(loop, task, lr=0.3)
        ops = _graph_ops(query_loss, theta)
        assert ("FusedBatchNormV3" in ops) == fused and ("FusedBatchNormGradV3" in ops) == fused
        results[fused] = (float(query_loss(theta)), _tape_gradient(query_loss, theta))
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    # A bias before batch norm has a zero gradient: compare against the largest gradient, not
    # against each tensor's own rounding noise.
    scale = max(np.abs(g).max() for g in results[False][1])
    for fused, plain in zip(results[True][1], results[False][1]):
        np.testing.assert_allclose(fused, plain, rtol=2e-3, atol=1e-5 * scale)


def _float32_setup(seed=11):
    rng = np.random.default_rng(seed)
    encoder = _encoder("conv4")
    task = _task("conv4", rng, np.float32)
    return encoder, task, _meta_params(encoder, rng, np.float32), il.InnerLoop(encoder)


def test_inner_loop_lowers_the_support_loss():
    _, (support_x, support_y, _, _), theta, loop = _float32_setup(seed=11)
    rates = lambda step: [tf.constant(0.1)] * len(theta)
    adapted = il.adapt(loop, theta, support_x, support_y, WAYS, 5, rates)

    losses = adapted.support_losses.numpy()
    assert losses.shape == (6,)
    assert np.all(np.diff(losses) < 0), f"support loss must fall at every step: {losses}"
    assert losses[-1] < 0.8 * losses[0]


def test_adaptation_leaves_the_meta_parameters_untouched():
    keras.utils.set_random_seed(4)
    learner = MetaLearner(conv4_encoder(image_size=IMAGE, filters=3),
                          MetaConfig(max_ways=HEAD, head_init="learned", eval_inner_steps=4))
    support_x, support_y, query_x, _ = _task("conv4", np.random.default_rng(8), np.float32)
    before = [w.numpy().copy() for w in learner.weights]  # batch-norm statistics included
    params = learner.adapt(support_x, support_y)
    learner.predict_adapted(params, query_x)

    for b, w in zip(before, learner.weights):
        np.testing.assert_array_equal(w.numpy(), b, err_msg=w.path)
    start = [v.numpy() for v in learner.meta_params]
    start[-2:] = [start[-2][:, :WAYS], start[-1][:WAYS]]  # the task's slice of the head
    moved = [not np.allclose(p.numpy(), s) for p, s in zip(params, start)]
    assert all(moved[-2:]) and sum(moved) >= len(moved) // 2, "the fast weights did move"


def test_eager_and_tf_function_agree():
    _, (support_x, support_y, query_x, _), theta, loop = _float32_setup(seed=23)
    rates = lambda step: [tf.constant(0.1)] * len(theta)

    def run():
        adapted = il.adapt(loop, theta, support_x, support_y, WAYS, 3, rates, query_x=query_x)
        return adapted.params, adapted.support_losses, adapted.query_outputs

    eager, graph = run(), tf.function(run)()
    for e, g in zip(tf.nest.flatten(eager), tf.nest.flatten(graph)):
        np.testing.assert_allclose(e.numpy(), g.numpy(), rtol=1e-5, atol=1e-6)
