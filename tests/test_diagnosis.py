"""pipelines/diagnose.py: the per-step trace of adaptation (support loss, query accuracy, step
sizes) agrees with the mathematics of the zero head and with the evaluation's accuracy curve."""

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, EPISODES = 3, 6


@pytest.fixture(scope="module")
def traced(trained_export):
    from mmtl_tf.data.episode_files import draw_episodes
    from mmtl_tf.diagnosis import adaptation_trace
    from mmtl_tf.runs import load_model
    from mmtl_tf.training import episode_sampler

    model = load_model(trained_export.folder)
    config = model.config.replace(data={"ways": 5, "shots": 2, "queries": 3})
    episodes = draw_episodes(episode_sampler(config, "validation"), 3, EPISODES)
    return model, episodes, adaptation_trace(model.learner, episodes, STEPS)


def test_a_zero_head_starts_at_chance_and_its_first_step_moves_the_head_only(traced):
    model, _, trace = traced
    assert model.learner.config.head_init == "zero"
    np.testing.assert_allclose(trace["support_loss"][:, 0], math.log(5), rtol=1e-6)
    np.testing.assert_allclose(trace["query_accuracy"][:, 0], 1 / 5)  # all ties: class 0
    assert np.all(trace["encoder_step"][:, 1] == 0.0), "no encoder gradient at a zero head"
    assert np.all(trace["head_step"][:, 1] > 0)
    np.testing.assert_allclose(trace["head_step"][:, 1], trace["head_norm"][:, 1], rtol=1e-6)
    assert np.all(trace["encoder_step"][:, 2] > 0), "the second step reaches the encoder"


def test_the_trace_gives_the_accuracy_curve_of_the_evaluation(traced):
    from mmtl_tf.evaluation import accuracy_curve

    model, episodes, trace = traced
    curve = accuracy_curve(model.learner, episodes, STEPS)
    np.testing.assert_allclose(trace["query_accuracy"], curve["accuracy"], atol=1e-6)
    np.testing.assert_allclose(trace["query_loss"], curve["loss"], rtol=1e-4, atol=1e-6)


def test_diagnose_prints_each_step_and_writes_json(trained_export, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "pipelines" / "diagnose.py"))["main"]
    out = tmp_path / "trace.json"
    main(["--workdir", str(trained_export.folder), "--settings", "5w1s", "--steps", "2",
          "--episodes", "4", "--queries", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "5w1s" in printed and "   2:" in printed
    written = json.loads(out.read_text())["settings"]["5w1s"]
    assert len(written["query_accuracy"]) == 3 and written["support_loss"][0] == pytest.approx(math.log(5), rel=1e-6)


def test_a_malformed_setting_is_one_line_naming_it(trained_export):
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "diagnose.py"), "--workdir",
                           str(trained_export.folder), "--settings", "5x1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: setting '5x1' is not <N>w<K>s with N >= 2 and K >= 1, e.g. '5w1s'"]
