"""Class splits on the real Omniglot release, configs, and the training run folder."""

import json

import numpy as np
import pytest

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


def test_train_writes_a_complete_run_folder_and_refuses_to_overwrite(tmp_path, omniglot_zips):
    from mmtl_tf.training import CHECKPOINT, load_learner, train

    config = preset("tiny").replace(train={"steps": 5, "log_every": 2})  # 2 + 2 + 1 steps
    metrics = train(config, tmp_path)
    for name in ("config.json", CHECKPOINT, "history.json", "metrics.json"):
        assert (tmp_path / name).is_file()
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["step"] for row in history] == [2, 4, 5], "exactly --steps meta-steps, logged"
    assert "small1" in metrics["protocol"]
    assert ExperimentConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    assert not list(tmp_path.glob("*.tmp*")), "no temporary file is left behind"
    learner, loaded = load_learner(tmp_path)
    assert loaded == config
    # the saved checkpoint is the model that was scored: recompute its accuracy query by query
    accuracy, queries = _query_accuracy(learner, config)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # train() averages float32 per-episode accuracies: equal up to that rounding
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6), (metrics, accuracy, queries)
    with pytest.raises(FileExistsError, match="--force"):
        train(config, tmp_path)


def _query_accuracy(learner, config):
    """(fraction of query images whose largest adapted logit is their label, query count) on
    the episodes train() scores (evaluation split, eval_seed, eval_episodes), through the
    learner's public adapt/predict_adapted and numpy."""
    from mmtl_tf.data.episode_files import draw_episodes
    from mmtl_tf.training import samplers

    _, eval_sampler, _ = samplers(config)
    episodes = draw_episodes(eval_sampler, config.train.eval_seed, config.train.eval_episodes)
    hits = []
    for support_x, support_y, query_x, query_y in zip(*episodes[:4]):
        params = learner.adapt(support_x, support_y, ways=config.data.ways)
        logits = learner.predict_adapted(params, query_x, support_x).numpy()
        hits.append(logits.argmax(axis=1) == query_y)
    hits = np.concatenate(hits)
    assert len(hits) == config.train.eval_episodes * config.data.ways * config.data.queries
    return float(hits.mean()), len(hits)


def test_meta_training_beats_chance_on_held_out_characters(trained_export):
    """trained_export: 150 meta-steps on small1 characters, scored on small2's (other alphabets).
    8 episodes x 5 ways x 3 queries = 120 queries at ~55%; chance is 20%: 40% is twice chance
    and over three standard errors below what it reaches."""
    metrics = json.loads((trained_export.workdir / "metrics.json").read_text())
    assert "tested on small2" in metrics["protocol"] and metrics["ways"] == 5
    assert metrics["accuracy"] >= 0.4, metrics


@pytest.mark.parametrize("jit_compile", [False, True])  # XLA drops the step's assertion
def test_non_finite_loss_stops_training_and_keeps_no_nan_checkpoint(tmp_path, jit_compile,
                                                                    omniglot_zips):
    from mmtl_tf.training import CHECKPOINT, NonFiniteLossError, train

    config = preset("tiny").replace(meta={"inner_lr": 1e30}, train={
        "steps": 2, "log_every": 1, "jit_compile": jit_compile})
    with pytest.raises(NonFiniteLossError, match=r"meta-step.*1.*inner_lr=1e\+30"):
        train(config, tmp_path)
    assert not (tmp_path / CHECKPOINT).exists(), "no checkpoint is written from a NaN step"


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
