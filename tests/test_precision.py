"""Mixed precision is an option for accelerator users: on CPU it must stay within tolerance."""

import numpy as np
import tensorflow as tf

from mmtl_tf.config import preset
from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset
from mmtl_tf.training import build_learner


def _one_step(mixed_precision):
    config = preset("tiny").replace(data={"image_size": 14}, train={"mixed_precision": mixed_precision})
    learner = build_learner(config)
    learner.compile(optimizer="sgd")
    rng = np.random.default_rng(4)
    classes = ClassImages.from_labels(rng.random((30 * 9, 14, 14, 1), dtype=np.float32),
                                      np.repeat(np.arange(30), 9))
    batch = next(iter(episode_dataset(EpisodeSampler(classes, 5, 2, 3), seed=8, meta_batch_size=4)))
    before = [v.numpy().copy() for v in learner.meta_params]
    logs = learner.train_on_batch(batch, return_dict=True)
    after = [v.numpy() for v in learner.meta_params]
    return learner, logs, before, after


def test_mixed_bfloat16_matches_float32_within_tolerance():
    full, full_logs, full_before, full_after = _one_step(None)
    mixed, mixed_logs, mixed_before, mixed_after = _one_step("mixed_bfloat16")
    assert mixed.encoder.compute_dtype == "bfloat16" and mixed.head_w.dtype == "float32"
    assert tf.keras.mixed_precision.global_policy().name == "float32", "the policy is restored"
    for a, b in zip(full_before, mixed_before):
        np.testing.assert_array_equal(a, b)  # same initialisation
    assert "pre_loss" not in mixed_logs, "a zero head has nothing to report before adaptation"
    for name in ("loss", "support_loss"):
        assert np.isfinite(mixed_logs[name])
        np.testing.assert_allclose(mixed_logs[name], full_logs[name], rtol=5e-2, atol=1e-2)
    update_full = np.concatenate([(a - b).ravel() for a, b in zip(full_after, full_before)])
    update_mixed = np.concatenate([(a - b).ravel() for a, b in zip(mixed_after, mixed_before)])
    cosine = update_full @ update_mixed / np.linalg.norm(update_full) / np.linalg.norm(update_mixed)
    assert cosine > 0.95, f"the bfloat16 meta-update points elsewhere (cosine {cosine:.3f})"
