"""Class splits on the real Omniglot release, configs, and the training run folder."""

import json

import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.config import PRESETS, ExperimentConfig, preset
from mmtl_tf.data import splits
from mmtl_tf.preprocessing import Preprocessing

PREP = Preprocessing(28)


@pytest.fixture(scope="module")
def background_parts(omniglot_zips):
    return {part: splits.omniglot_split("background", part, PREP)[0]
            for part in ("train", "validation", "test")}


def test_background_protocol_never_mixes_train_validation_and_test(background_parts):
    train, validation, test = (background_parts[p] for p in ("train", "validation", "test"))
    assert train.num_classes + validation.num_classes == 964 and test.num_classes == 659
    assert set(train.class_ids).isdisjoint(validation.class_ids)
    assert set(train.class_ids).isdisjoint(test.class_ids)
    assert set(validation.class_ids).isdisjoint(test.class_ids)
    # whole alphabets are held out: validation alphabets are never seen in training
    assert set(train.groups).isdisjoint(validation.groups)
    assert len(set(validation.groups)) == splits.VALIDATION_ALPHABETS
    assert set(train.groups).isdisjoint(test.groups)
    # background characters are 0..963 (ids - 1), evaluation characters 964..1622
    assert train.class_ids.max() < 964 and test.class_ids.min() >= 964


def test_vinyals_protocol_is_1200_and_423_disjoint_characters_with_rotations(omniglot_zips):
    train, rotations = splits.omniglot_split("vinyals", "train", PREP)
    test, _ = splits.omniglot_split("vinyals", "test", PREP)
    assert rotations is True
    assert (train.num_classes, test.num_classes) == (1200, 423)
    assert set(train.class_ids).isdisjoint(test.class_ids)
    assert train.class_ids.max() >= 964, "the Vinyals split mixes background and evaluation"
    again, _ = splits.omniglot_split("vinyals", "train", PREP)
    np.testing.assert_array_equal(train.class_ids, again.class_ids)
    with pytest.raises(ValueError, match="no validation part"):
        splits.omniglot_split("vinyals", "validation", PREP)


def test_unknown_protocol_and_part_are_named():
    with pytest.raises(ValueError, match="protocol='imagenet'"):
        splits.omniglot_split("imagenet", "train", PREP)
    with pytest.raises(ValueError, match="part='dev'"):
        splits.omniglot_split("background", "dev", PREP)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_json(name):
    config = preset(name)
    assert ExperimentConfig.from_dict(json.loads(config.to_json())) == config


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="preset 'omniglot-99w'"):
        preset("omniglot-99w")
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['stepz'\]"):
        ExperimentConfig.from_dict({"name": "x", "train": {"stepz": 3}})
    with pytest.raises(ValueError, match="family='cifar'"):
        preset("tiny").replace(data={"family": "cifar"})


def test_train_writes_a_complete_run_folder_and_refuses_another_configuration(tmp_path,
                                                                          omniglot_zips):
    from mmtl_tf import checkpoints
    from mmtl_tf.run_callbacks import read_history
    from mmtl_tf.training import load_learner, train

    config = preset("tiny").replace(train={"steps": 5, "log_every": 2})  # 2 + 2 + 1 steps
    metrics = train(config, tmp_path, verbose=0)
    for name in ("config.json", "history.csv", "metrics.json", "curves.png"):
        assert (tmp_path / name).is_file()
    assert [row["step"] for row in read_history(tmp_path)] == [2, 4, 5], "exactly --steps, logged"
    assert [p.name for p in checkpoints.step_files(tmp_path)] == ["step-00000004.npz",
                                                                  "step-00000005.npz"]
    assert metrics["part"] == "validation" and metrics["validated_at"] == 5
    assert metrics["best_step"] in (2, 4, 5) and metrics["episodes"] == 8
    assert ExperimentConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    assert not list(tmp_path.rglob("*.tmp*")), "no temporary file is left behind"
    learner, loaded = load_learner(tmp_path, "latest")
    assert loaded == config
    # the last checkpoint is the model that was scored: recompute its accuracy query by query
    accuracy, queries = _query_accuracy(learner, config)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # train() averages float32 per-episode accuracies: equal up to that rounding
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6), (metrics, accuracy, queries)
    assert train(config, tmp_path, verbose=0) == metrics, "a finished run is not trained again"
    with pytest.raises(ValueError, match=r"another configuration \(differs in train.meta_lr "
                                         r"\(0.001 -> 0.002\)\).*--force"):
        train(config.replace(train={"meta_lr": 2e-3}), tmp_path)


def _query_accuracy(learner, config):
    """(fraction of query images whose largest adapted logit is their label, query count) on
    the episodes train() scores (validation alphabets, eval_seed, eval_episodes), through the
    one inner loop with its fixed number of steps and numpy."""
    from mmtl_tf.data.episode_files import draw_episodes
    from mmtl_tf.meta import inner_loop as il
    from mmtl_tf.training import episode_sampler

    episodes = draw_episodes(episode_sampler(config, "validation"), config.train.eval_seed,
                             config.train.eval_episodes)
    theta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    ways, hits = config.data.ways, []
    for support_x, support_y, query_x, query_y in zip(*episodes[:4]):
        adapted = il.adapt(learner.loop, theta, tf.constant(support_x), tf.constant(support_y),
                           ways, config.meta.eval_inner_steps, learner.learning_rates(ways))
        logits = il.query_logits(learner.loop, adapted.params, tf.constant(support_x),
                                 tf.constant(query_x)).numpy()
        hits.append(logits.argmax(axis=1) == query_y)
    hits = np.concatenate(hits)
    assert len(hits) == config.train.eval_episodes * ways * config.data.queries
    return float(hits.mean()), len(hits)


def test_meta_training_beats_chance_on_held_out_characters(trained_export):
    """trained_export: 150 meta-steps on small1 characters minus one held-out alphabet, scored
    at the end on that validation alphabet. 8 episodes x 5 ways x 3 queries = 120 queries;
    chance is 20%: 40% is twice chance."""
    metrics = json.loads((trained_export.workdir / "metrics.json").read_text())
    assert metrics["part"] == "validation" and metrics["ways"] == 5
    assert metrics["accuracy"] >= 0.4, metrics


@pytest.mark.parametrize("jit_compile", [False, True])  # XLA drops the step's assertion
def test_non_finite_loss_stops_training_and_keeps_no_nan_checkpoint(tmp_path, jit_compile,
                                                                    omniglot_zips):
    from mmtl_tf import checkpoints
    from mmtl_tf.training import NonFiniteLossError, train

    config = preset("tiny").replace(meta={"inner_lr": 1e30}, train={
        "steps": 2, "log_every": 1, "checkpoint_every": 1, "jit_compile": jit_compile})
    with pytest.raises(NonFiniteLossError, match=r"meta-step.*1.*inner_lr=1e\+30"):
        train(config, tmp_path, verbose=0)
    assert checkpoints.latest(tmp_path) is None, "no checkpoint is written from a NaN step"


def test_load_learner_names_what_is_missing(tmp_path):
    from mmtl_tf.training import load_learner

    with pytest.raises(FileNotFoundError, match="pipelines/train.py --workdir"):
        load_learner(tmp_path)


def test_confidence_interval_is_1_96_standard_errors_over_episodes():
    from mmtl_tf.evaluation import mean_and_ci95

    rng = np.random.default_rng(4)
    values = rng.random(7)
    mean, ci = mean_and_ci95(values)
    standard_error = np.sqrt(((values - values.mean()) ** 2).sum() / 6 / 7)  # ddof 1, 7 episodes
    assert mean == pytest.approx(values.mean()) and ci == pytest.approx(1.96 * standard_error)
    assert mean_and_ci95([0.8]) == (0.8, 0.0)
