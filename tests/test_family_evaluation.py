"""Per-family scores (issue #14): validation scores every task family during training
(history.csv, metrics.json), and the evaluation report scores each family on its own held-out
classes with a 95% confidence interval. One tiny run shared by the module: an Omniglot family,
a folder family with classes to hold out, and a folder family too small to hold any out."""

import json

import numpy as np
import pytest

from mmtl_tf.config import parse_family, preset, with_families
from test_family_sources import _write_folder

EVAL_EPISODES = 6  # validation episodes per family
REPORT_EPISODES = 7  # report episodes per family: a number no other count here shares


@pytest.fixture(scope="module")
def family_run(tmp_path_factory, omniglot_zips):
    from mmtl_tf.training import train

    root = tmp_path_factory.mktemp("family_run")
    # 20 classes: 4 held out for validation, 4 for test, 12 for training (3-way tasks fit);
    # 8 classes hold out 1 each: too few for 3 ways, so that family is left out, with a reason.
    mine = _write_folder(root / "mine", classes=20, images=5, side=20, seed=1)
    few = _write_folder(root / "few", classes=8, images=5, side=20, seed=2)
    config = with_families(preset("tiny").replace(train={
        "steps": 2, "log_every": 1, "checkpoint_every": 2, "eval_every": 2,
        "eval_episodes": EVAL_EPISODES, "meta_batch_size": 4}), [
        parse_family("name=chars,source=omniglot:small1,ways=5,shots=1,queries=3"),
        parse_family(f"name=mine,source=folder:{mine},ways=3,shots=2,queries=2"),
        parse_family(f"name=few,source=folder:{few},ways=3,shots=1,queries=2,weight=0.5")])
    workdir = root / "run"
    metrics = train(config, workdir, verbose=0)
    return workdir, config, metrics


def test_validation_scores_every_family_that_holds_out_classes(family_run):
    from mmtl_tf.data.episode_files import draw_episodes
    from mmtl_tf.data.family_sources import held_out_samplers
    from mmtl_tf.evaluation import evaluate_episodes
    from mmtl_tf.run_callbacks import read_history
    from mmtl_tf.training import load_learner

    workdir, config, metrics = family_run
    assert set(metrics["families"]) == {"chars", "mine"}
    assert "family 'few'" in metrics["families_not_validated"]["few"]
    assert "validation classes" in metrics["families_not_validated"]["few"]
    # the first family's validation is the run's own (it chooses the best state)
    assert metrics["families"]["chars"] == metrics["accuracy"]
    assert metrics["families_ci95"]["chars"] == metrics["accuracy_ci95"]
    row = [r for r in read_history(workdir) if "val_accuracy" in r][-1]
    assert row["val_chars_accuracy"] == pytest.approx(metrics["accuracy"])
    assert row["val_mine_accuracy"] == pytest.approx(metrics["families"]["mine"])
    assert "val_few_accuracy" not in row
    # the best state is chosen by alpha renormalised over the validated families (1:1 here;
    # 'few', alpha 0.5, holds out no validation classes)
    by_hand = (metrics["families"]["chars"] + metrics["families"]["mine"]) / 2
    assert metrics["weighted_accuracy"] == pytest.approx(by_hand, abs=1e-12)
    half_widths = np.array([metrics["families_ci95"][name] for name in ("chars", "mine")])
    assert metrics["weighted_accuracy_ci95"] == pytest.approx(np.hypot(*half_widths) / 2)
    validated = [r for r in read_history(workdir) if "val_weighted_accuracy" in r]
    assert row["val_weighted_accuracy"] == pytest.approx(by_hand)
    best = max(validated, key=lambda r: r["val_weighted_accuracy"])
    assert metrics["best_weighted_accuracy"] == pytest.approx(best["val_weighted_accuracy"])
    assert metrics["best_step"] == best["step"]
    # 'mine' was scored on its own validation classes: the same episodes, scored again
    learner, _ = load_learner(workdir, "latest")  # step 2: validated, then checkpointed
    d = config.data
    samplers, _ = held_out_samplers(d.families[1:2], "validation", d.image_size)
    again = evaluate_episodes(learner, draw_episodes(samplers["mine"], config.train.eval_seed,
                                                     EVAL_EPISODES))
    assert metrics["families"]["mine"] == pytest.approx(again["accuracy"], abs=1e-6)
    assert metrics["families_ci95"]["mine"] == pytest.approx(again["accuracy_ci95"], abs=1e-6)


def test_the_report_scores_each_family_on_its_own_held_out_test_classes(family_run, tmp_path):
    from mmtl_tf.data.episode_files import load_indices
    from mmtl_tf.data.family_sources import family_classes
    from mmtl_tf.evaluation import evaluate_episodes
    from mmtl_tf.runs import evaluate_run
    from mmtl_tf.training import load_learner

    workdir, config, _ = family_run
    report = evaluate_run(workdir, tmp_path, "test", episodes=REPORT_EPISODES, curve_steps=2)
    assert [r["family"] for r in report["settings"]] == ["chars", "mine"]
    assert set(report["families"]) == {"chars", "mine"}
    assert "family 'few'" in report["families_not_scored"]["few"]
    assert "evaluation characters" in report["scored_on"]
    chars, mine = report["settings"]
    assert (chars["ways"], chars["shots"], mine["ways"], mine["shots"]) == (5, 1, 3, 2)
    learner, _ = load_learner(workdir)
    for row in report["settings"]:
        assert row["episodes"] == REPORT_EPISODES and 0 <= row["accuracy"] <= 1
        assert row["accuracy_ci95"] >= 0
        assert report["families"][row["family"]]["accuracy"] == row["accuracy"]
    # 'mine''s episodes use only its test classes, none of its training classes
    family = config.data.families[1]
    test_ids = family_classes(family, "test", 28)[0].class_ids
    train_ids = family_classes(family, "train", 28)[0].class_ids
    indices, stored = load_indices(tmp_path / mine["episode_file"])
    assert (stored["ways"], stored["shots"], stored["episodes"]) == (3, 2, REPORT_EPISODES)
    assert len(test_ids) == 4 and not set(test_ids) & set(train_ids)
    # the row's mean and CI are the evaluation helpers' over the same fixed episodes
    from mmtl_tf.data.episode_files import fixed_episodes
    from mmtl_tf.data.family_sources import family_sampler

    fixed = fixed_episodes(tmp_path / mine["episode_file"], family_sampler(family, "test", 28),
                           report["seed"], REPORT_EPISODES)
    assert set(np.unique(fixed.class_ids)) <= set(test_ids)
    again = evaluate_episodes(learner, fixed, report["inner_steps"])
    assert mine["accuracy"] == pytest.approx(again["accuracy"], abs=1e-6)
    assert mine["accuracy_ci95"] == pytest.approx(again["accuracy_ci95"], abs=1e-6)
    table = (tmp_path / "evaluation.md").read_text()
    assert "chars (5-way 1-shot)" in table and "mine (3-way 2-shot)" in table
    assert "Not scored: family 'few'" in table
    assert json.loads((tmp_path / "evaluation.json").read_text())["families"]["mine"][
        "accuracy"] == mine["accuracy"]


def test_a_family_run_refuses_one_setting_in_one_line(family_run, tmp_path, capsys):
    import importlib.util

    from mmtl_tf import cli

    spec = importlib.util.spec_from_file_location("evaluate_pipeline", "pipelines/evaluate.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    workdir, _, _ = family_run
    with pytest.raises(SystemExit) as exit_:
        cli.run(pipeline.main, ["--workdir", str(workdir), "--out", str(tmp_path),
                                "--ways", "5", "--shots", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "meta-trained on task families" in err and "drop --ways/--shots" in err


def test_the_best_state_weighs_the_validated_families_by_their_renormalised_alpha(capsys):
    from mmtl_tf.training import selection_weights

    config = with_families(preset("tiny"), [
        parse_family(f"name={name},source=omniglot:small1,ways=5,shots=1,weight={weight}")
        for name, weight in (("a", 3), ("b", 1), ("c", 0.5))])
    weights = selection_weights(config, {"a": None, "c": None})  # 'b' not validated
    assert weights == pytest.approx({"a": 3 / 3.5, "c": 0.5 / 3.5}, abs=1e-12)
    zero = with_families(preset("tiny"), [
        parse_family(f"name={name},source=omniglot:small1,ways=5,shots=1,weight={weight}")
        for name, weight in (("a", 0), ("b", 1), ("c", 0))])
    assert selection_weights(zero, {"a": None, "c": None}) == {"a": 0.5, "c": 0.5}
    assert "all have weight 0; the best state is chosen by their unweighted mean" in capsys.readouterr().out
