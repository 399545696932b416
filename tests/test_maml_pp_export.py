"""MAML++ ships one learning rate per parameter and inner step: the device uses the right one."""

import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.config import preset
from mmtl_tf.meta import inner_loop as il
from mmtl_tf import checkpoints
from mmtl_tf.training import load_learner, train

WAYS, SHOTS, STEPS = 3, 2, 3


@pytest.fixture(scope="module")
def mamlpp_export(tmp_path_factory, omniglot_zips):  # the tiny preset trains on small1
    from mmtl_tf.export.exporter import export

    root = tmp_path_factory.mktemp("mamlpp")
    config = preset("tiny").replace(
        meta={"algorithm": "mamlpp", "inner_steps": 2, "eval_inner_steps": STEPS, "transductive": False},
        train={"steps": 2, "log_every": 1, "eval_episodes": 2})
    train(config, root / "run")
    learner, _ = load_learner(root / "run")
    # clearly different rates per step, so that using the wrong step's rate shows
    for i, v in enumerate(learner.inner_lrs):
        v.assign(np.array([0.5, 0.05], np.float32) * (1.0 + 0.01 * i))
    checkpoints.save(learner, checkpoints.chosen(root / "run", "best"), {"step": 2})
    export(root / "run", root / "export")
    return root / "run", root / "export", learner


def test_device_and_savedmodel_use_each_steps_rate(mamlpp_export):
    from mmtl_tf.ondevice import load

    workdir, folder, learner = mamlpp_export
    rng = np.random.default_rng(3)
    support = rng.random((WAYS * SHOTS, 28, 28, 1), dtype=np.float32)
    labels = np.repeat(np.arange(WAYS, dtype=np.int32), SHOTS)
    query = rng.random((4, 28, 28, 1), dtype=np.float32)
    meta = [tf.convert_to_tensor(p) for p in learner.meta_params]

    def tf_logits(rates):
        params = il.adapt(learner.loop, meta, support, labels, WAYS, STEPS, rates, True).params
        return il.query_logits(learner.loop, params, support, query).numpy()

    expected = tf_logits(learner.learning_rates(WAYS))
    only_first = tf_logits(lambda step: learner.learning_rates(WAYS)(0))
    assert np.abs(expected - only_first).max() > 1e-2, "the per-step rates matter here"

    personal = load(folder).adapt(support, labels.tolist(), steps=STEPS)
    np.testing.assert_allclose(personal.logits(query), expected, atol=1e-4)
    saved = tf.saved_model.load(str(folder / "saved_model"))
    got = saved.signatures["adapt_and_predict"](
        support_images=support, support_labels=labels, query_images=query,
        steps=tf.constant(STEPS), inner_lr=tf.constant(-1.0))["logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4)
