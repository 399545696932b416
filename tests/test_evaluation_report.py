"""pipelines/evaluate.py's report: the five anchor tasks with 95% CIs, the accuracy-against-steps
curve from one adaptation per episode, the export scored through the device runtime on the same
episodes, fixed episodes kept as kilobyte index files, and one-line errors for bad input."""

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmtl_tf import cli
from mmtl_tf.evaluation import ANCHOR_SETTINGS, Setting

REPO = Path(__file__).resolve().parents[1]
EPISODES, QUERIES, CURVE_STEPS = 8, 3, 3  # the tiny preset adapts 2 steps (eval_inner_steps)


@pytest.fixture(scope="module")
def export_report(trained_export, tmp_path_factory):
    """The default table of the trained tiny export, scored by TensorFlow (its model.keras)
    and by the device runtime on the same 8 episodes per task."""
    from mmtl_tf.runs import evaluate_run

    out = tmp_path_factory.mktemp("report")
    report = evaluate_run(trained_export.folder, out, queries=QUERIES, episodes=EPISODES,
                          curve_steps=CURVE_STEPS)
    return report, out


def _evaluate_main():
    return runpy.run_path(str(REPO / "pipelines" / "evaluate.py"))["main"]


def test_the_table_has_the_five_anchor_tasks_each_with_ci_steps_and_batch_norm(export_report):
    report, out = export_report
    rows = report["settings"]
    assert [r["setting"] for r in rows] == [s.name for s in ANCHOR_SETTINGS]
    assert [r["ways"] for r in rows] == [5, 5, 20, 20, 20] and rows[-1]["within_alphabet"]
    for row in rows:
        assert row["episodes"] == EPISODES and row["inner_steps"] == 2
        assert row["batch_norm"] == "support statistics"  # the fixture trains transductive=False
        assert 0 < row["accuracy_ci95"] < 1 and 0 <= row["accuracy"] <= 1
        assert row["curve"]["steps"] == list(range(CURVE_STEPS + 1))
    five_way = rows[0]["accuracy"]
    assert five_way > 1.5 / 5, "an adapted model, not the zero head"
    table = (out / "evaluation.md").read_text()
    assert report["protocol"] in table and "95% confidence interval" in table
    assert "| 20-way 1-shot, one alphabet | 3 | 8 | support statistics |" in table
    assert "accuracy, 2 steps" in table and "accuracy, 3 steps" in table
    assert json.loads((out / "evaluation.json").read_text())["settings"] == rows
    for name in ("curves.png", "episode.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_curve_after_k_steps_equals_adapting_k_steps_then_predicting(export_report,
                                                                       trained_export):
    from mmtl_tf.data.episode_files import gather_episodes, load_indices
    from mmtl_tf.evaluation import predicted_labels
    from mmtl_tf.runs import load_model
    from mmtl_tf.training import episode_sampler

    report, out = export_report
    model = load_model(trained_export.folder)
    row = report["settings"][1]  # 5-way 5-shot: 25 support images, 15 queries
    indices, _ = load_indices(out / row["episode_file"])
    setting = model.config.replace(data={"ways": 5, "shots": 5, "queries": QUERIES})
    episodes = gather_episodes(episode_sampler(setting, "test"), indices)
    curve = np.asarray(row["curve"]["accuracy"])
    assert curve[0] == pytest.approx(1 / 5), "step 0 is the zero head: every query gets class 0"
    for k in (1, CURVE_STEPS):  # one step, and past the table's two
        hits = [np.mean(predicted_labels(model.learner, type(episodes)(*(f[e] for f in episodes)), k)
                        == episodes.query_y[e]) for e in range(EPISODES)]
        assert np.mean(hits) == pytest.approx(curve[k], abs=1e-12)


def test_the_pictured_predictions_follow_the_tables_steps_where_adapt_keeps_an_earlier_one():
    import warnings

    from mmtl_tf.best_step import AdaptationWarning
    from mmtl_tf.config import preset
    from mmtl_tf.data.episodes import Episode
    from mmtl_tf.evaluation import accuracy_curve, predicted_labels
    from mmtl_tf.training import build_learner

    # An untrained tiny learner at inner_lr 2 on random images: the support loss falls at the
    # first step (the head alone) and rises at the next two.
    learner = build_learner(preset("tiny").replace(meta={"inner_lr": 2.0, "transductive": False}))
    rng = np.random.default_rng(0)
    ways, shots, queries, steps = 5, 3, 7, 3
    episode = Episode(rng.random((ways * shots, 28, 28, 1), dtype=np.float32),
                      np.repeat(np.arange(ways, dtype=np.int32), shots),
                      rng.random((ways * queries, 28, 28, 1), dtype=np.float32),
                      np.repeat(np.arange(ways, dtype=np.int32), queries),
                      np.arange(ways, dtype=np.int64), np.zeros(0, np.float32))
    with pytest.warns(AdaptationWarning, match="kept_best_step"):
        kept = learner.adapt(episode.support_x, episode.support_y, ways, steps)
    assert kept.steps_run < steps, "a user's adapt() keeps an earlier step here"
    curve = accuracy_curve(learner, Episode(*(f[None] for f in episode)), steps)["accuracy"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the table's fixed steps neither keep nor warn
        predicted = predicted_labels(learner, episode, steps)
    assert np.mean(predicted == episode.query_y) == pytest.approx(curve[steps], abs=1e-12)
    assert curve[steps] != pytest.approx(curve[kept.steps_run], abs=1e-12), \
        "the table's step and the kept one score differently, so the test can tell them apart"


def test_the_device_runtime_scores_the_same_episodes_as_tensorflow(export_report):
    report, _ = export_report
    assert report["device"]["runtime"].startswith("mmtl_tf.ondevice")
    for row in report["settings"]:
        device, queries = row["device"], row["ways"] * row["queries"]
        assert device["inner_steps"] == row["inner_steps"]
        # Logits agree to ~1e-5: at most one near-tie query per episode may flip.
        assert device["largest_episode_difference"] <= 1 / queries + 1e-12
        assert abs(device["accuracy"] - row["accuracy"]) <= 1 / queries


def test_fixed_episodes_are_kilobyte_files_read_back_bit_identically(export_report,
                                                                    trained_export):
    from mmtl_tf.data.episode_files import draw_episodes, fixed_episodes
    from mmtl_tf.runs import load_model
    from mmtl_tf.training import episode_sampler

    report, out = export_report
    config = load_model(trained_export.folder).config
    for row, setting in zip(report["settings"], ANCHOR_SETTINGS):
        path = out / row["episode_file"]
        images = EPISODES * setting.ways * (setting.shots + QUERIES)
        assert path.stat().st_size < 3 * images + 2_000, "a uint16 row and a label per image"
        sampler = episode_sampler(config.replace(data={
            "ways": setting.ways, "shots": setting.shots, "queries": QUERIES,
            "within_alphabet": setting.within_alphabet}), "test")
        reread = fixed_episodes(path, sampler, 2024, EPISODES)
        drawn = draw_episodes(sampler, 2024, EPISODES)
        for a, b in zip(reread, drawn):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        assert path.stat().st_size * 100 < sum(a.nbytes for a in drawn)


def test_a_run_folder_scores_what_its_export_scores(export_report, trained_export, tmp_path,
                                                    capsys):
    run = shutil.copytree(trained_export.workdir, tmp_path / "run")
    _evaluate_main()(["--workdir", str(run), "--ways", "5", "--shots", "1", "--queries",
                      str(QUERIES), "--episodes", str(EPISODES), "--curve-steps",
                      str(CURVE_STEPS)])
    assert "5-way 1-shot:" in capsys.readouterr().out
    (row,) = json.loads((run / "evaluation" / "test" / "evaluation.json").read_text())["settings"]
    exported = export_report[0]["settings"][0]
    assert row["setting"] == exported["setting"] == "5-way 1-shot"
    assert row["curve"] == exported["curve"], "same weights, same episodes, same numbers"
    assert "device" not in row


def test_the_validation_part_scores_validation_alphabets(trained_export, tmp_path):
    from mmtl_tf.runs import evaluate_run

    report = evaluate_run(trained_export.workdir, tmp_path, "validation", [Setting(5, 1, 2)],
                          episodes=4, curve_steps=0)
    assert "validation alphabets" in report["scored_on"]
    assert report["settings"][0]["episode_file"].startswith("episodes/validation_5w1s2q")


@pytest.mark.parametrize("arguments,message", [
    (["--ways", "30"], "ways=30 exceeds the model's max_ways=20; choose --ways <= 20"),
    (["--part", "train"], "invalid choice: 'train'"),
    ([], "is an export folder, whose files its manifest hashes; give --out"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(trained_export, capsys, arguments, message):
    target = trained_export.folder if not arguments else trained_export.workdir
    with pytest.raises(SystemExit) as exit_:
        cli.run(_evaluate_main(), ["--workdir", str(target), *arguments])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_folder_that_is_not_a_run_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(_evaluate_main(), ["--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert f"{tmp_path} is neither a training run" in err


def test_a_table_with_no_task_within_max_ways_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    from mmtl_tf import checkpoints
    from mmtl_tf.config import preset
    from mmtl_tf.training import build_learner

    config = preset("tiny").replace(data={"ways": 3}, meta={"max_ways": 4})  # no data read
    (tmp_path / "config.json").write_text(config.to_json())
    checkpoints.save(build_learner(config), checkpoints.folder(tmp_path) / checkpoints.BEST,
                     {"step": 0})
    with pytest.raises(SystemExit) as exit_:
        cli.run(_evaluate_main(), ["--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert ("every task of the table has more ways than the model's max_ways=4; choose one "
            "with --ways <= 4 --shots K") in err
