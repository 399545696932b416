"""The ``multitask`` preset (issue #14): three Omniglot task families that work offline with the
shared zips, each with held-out validation and test classes, and a couple of training steps."""

import json

import numpy as np

from mmtl_tf.config import ExperimentConfig, preset


def test_the_preset_declares_three_families_and_survives_config_json():
    config = preset("multitask")
    chars, alphabet, rotated = config.data.families
    assert (chars.ways, chars.shots, chars.within_alphabet) == (5, 1, False)
    assert (alphabet.ways, alphabet.shots, alphabet.within_alphabet) == (20, 1, True)
    assert (rotated.ways, rotated.shots, rotated.rotations, rotated.image_size) == (5, 5, True, 20)
    assert config.data.family_weights == (1 / 3, 1 / 3, 1 / 3)
    assert config.train.meta_batch_size % 3 == 0  # the fixed mix: as many tasks per family
    assert ExperimentConfig.from_dict(json.loads(config.to_json())) == config


def test_the_preset_trains_offline_and_scores_every_family(tmp_path, omniglot_zips):
    from mmtl_tf.data.family_sources import family_classes
    from mmtl_tf.run_callbacks import read_history
    from mmtl_tf.training import train

    config = preset("multitask").replace(train={
        "steps": 2, "meta_batch_size": 3, "log_every": 1, "checkpoint_every": 2,
        "eval_every": 2, "eval_episodes": 3})
    chars, _, rotated = config.data.families
    # the rotated family is drawn at 20x20 and brought to the model's 28x28: the same
    # character as the chars family, another rendering
    coarse, fine = (family_classes(f, "train", 28)[0].images[0] for f in (rotated, chars))
    assert coarse.shape == fine.shape == (28, 28, 1) and np.abs(coarse - fine).max() > 0.1
    metrics = train(config, tmp_path / "run", verbose=0)
    assert set(metrics["families"]) == {"chars", "alphabet", "rotated"}
    assert "families_not_validated" not in metrics
    assert all(0 <= a <= 1 for a in metrics["families"].values())
    rows = read_history(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("chars_loss", "alphabet_loss", "rotated_loss", "alphabet_accuracy"):
        assert all(np.isfinite(r[name]) for r in rows), name
    assert rows[-1]["val_alphabet_accuracy"] == metrics["families"]["alphabet"]

    # exported like any other model: the device adapts to a test task of the coarse family
    # (20x20 characters brought to 28x28) as TensorFlow's inner loop does
    _device_matches_tensorflow(config, tmp_path / "run", tmp_path / "export", rotated)


def _device_matches_tensorflow(config, workdir, out, family):
    import tensorflow as tf

    from mmtl_tf.data.family_sources import held_out_samplers
    from mmtl_tf.export.exporter import export
    from mmtl_tf.meta import inner_loop as il
    from mmtl_tf.ondevice import runtime
    from mmtl_tf.training import load_learner

    manifest = export(workdir, out)
    assert manifest["default_steps"] == config.meta.eval_inner_steps == 1
    samplers, missing = held_out_samplers([family], "test", config.data.image_size)
    assert not missing
    task = samplers[family.name].sample(tf.constant([7, 3], tf.int64), 1)
    support_x, support_y = task.support_x[0].numpy(), task.support_y[0].numpy()  # (25, 28, 28, 1)
    query_x = task.query_x[0].numpy()
    assert support_x.shape == (family.ways * family.shots, 28, 28, 1)
    personal = runtime.load(out).adapt(list(support_x), [int(y) for y in support_y],
                                       keep_best=False)
    learner, _ = load_learner(workdir)
    adapted = il.adapt(learner.loop, [tf.convert_to_tensor(p) for p in learner.meta_params],
                       support_x, support_y, family.ways, 1, learner.learning_rates(family.ways),
                       first_order=True)
    logits = il.query_logits(learner.loop, adapted.params, support_x, query_x).numpy()
    # float32 on both sides, and a logit is 2 p.f - |p|^2, a difference of terms ~100: the
    # tolerance is float32's relative precision times 100 on the scale of the logits
    scale = np.abs(logits).max()
    device = personal.logits(query_x)
    np.testing.assert_allclose(device, logits, atol=1e-5 * scale, rtol=0)
    top_two = np.sort(logits, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2e-5 * scale  # not a near-tie
    assert clear.sum() >= len(clear) - 2 and (device.argmax(1) == logits.argmax(1))[clear].all()
