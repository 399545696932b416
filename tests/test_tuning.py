"""A hyperparameter search finds what is known to be best, reads validation episodes only,
survives a kill, scales out to worker processes and refuses bad input in one line."""

import csv
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmtl_tf.config import Choice, ExperimentConfig, preset

PIPELINES = Path(__file__).parents[1] / "pipelines"
TUNE = PIPELINES / "tune.py"
# Everything but the searched field fixed at the tiny preset's values, so a trial is a few
# seconds of training and the answer depends on the searched field alone.
FIXED = ["--set", "meta.inner_steps=2", "--set", "meta.eval_inner_steps=2", "--set",
         "train.meta_lr=0.001", "--set", "train.meta_batch_size=4", "--set", "meta.head_init=zero",
         "--set", "data.ways=5", "--set", "data.shots=1"]
# The constructed case. 1e-40 is below float32's normal range and TensorFlow flushes it to
# zero on CPU: the zero head never moves, every query logit is 0, argmax picks class 0, and the
# score is exactly chance (1/5). 1e20 makes the first meta-step's loss NaN: the trial fails.
# 0.4 (the preset's) adapts a prototype-like head from the first step: above chance.
USELESS, GOOD, DIVERGING = 1e-40, 0.4, 1e20


def _load_pipeline(name):
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(workdir):
    with open(workdir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def constructed_search(tmp_path_factory, omniglot_zips):
    """The constructed 3-trial search run in this process while every way to the evaluation
    characters raises: episode_sampler(part="test") and loading the tiny preset's evaluation
    split (small2). Returns (workdir, summary, parts asked, splits loaded)."""
    from mmtl_tf import training
    from mmtl_tf.data import omniglot
    from mmtl_tf.tuning.search import search

    parts, splits = [], []
    real_sampler, real_load = training.episode_sampler, omniglot.load_omniglot_classes

    def sampler(config, part):
        parts.append(part)
        if part == "test":
            raise AssertionError("a trial asked for the test characters")
        return real_sampler(config, part)

    def load(split, *args, **kwargs):
        splits.append(split)
        if split == preset("tiny").data.eval_split:
            raise AssertionError(f"a trial loaded the evaluation split {split}")
        return real_load(split, *args, **kwargs)

    workdir = tmp_path_factory.mktemp("constructed")
    base = preset("tiny")
    space = {"meta.inner_lr": Choice((USELESS, GOOD, DIVERGING))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "episode_sampler", sampler)
        patch.setattr(omniglot, "load_omniglot_classes", load)
        summary = search(base, space, workdir, algorithm="random", trials=3, steps_per_trial=4)
    return workdir, summary, parts, splits


def test_a_tiny_search_finds_the_configuration_known_to_be_best(constructed_search):
    workdir, summary, _, _ = constructed_search
    rows = _rows(workdir)
    assert [float(r["meta.inner_lr"]) for r in rows] == [GOOD, USELESS, DIVERGING]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    assert float(rows[1]["val_accuracy"]) == pytest.approx(1 / 5, abs=1e-6)  # exactly chance
    assert float(rows[0]["val_accuracy"]) > 1 / 5 + 0.05
    assert rows[2]["note"].startswith("diverged: at meta-step 1 (loss nan)")
    assert summary["best"]["meta.inner_lr"] == GOOD and summary["trials"] == 3
    best = ExperimentConfig.from_file(workdir / "best_config.json")
    assert best == dataclasses.replace(preset("tiny").replace(meta={"inner_lr": GOOD}),
                                       name="tiny-tuned")  # full length: the preset's steps
    table = [line for line in (workdir / "trials.md").read_text().splitlines()
             if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[3] for line in table] == ["0.4", "1e-40", "1e+20"]
    assert (workdir / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_objective_reads_validation_episodes_only(constructed_search):
    _, _, parts, splits = constructed_search
    assert set(parts) == {"train", "validation"}, "the fixture's guards raise on the test part"
    assert set(splits) == {preset("tiny").data.train_split}


def test_train_py_accepts_the_best_configuration_with_set_on_top(constructed_search, tmp_path,
                                                                 monkeypatch):
    from mmtl_tf import training

    workdir = constructed_search[0]
    trained = []
    monkeypatch.setattr(training, "train", lambda config, *a, **k: trained.append(config) or {})
    _load_pipeline("train").main(["--config", str(workdir / "best_config.json"), "--workdir",
                                  str(tmp_path), "--set", "train.meta_lr=0.002"])
    (config,) = trained
    assert config.name == "tiny-tuned" and config.meta.inner_lr == GOOD
    assert config.train.meta_lr == 0.002 and config.train.steps == preset("tiny").train.steps


def _tune(workdir, *args):
    return [sys.executable, str(TUNE), "--preset", "tiny", "--workdir", str(workdir), *FIXED, *args]


def _oracle_state(workdir):
    path = workdir / "search" / "oracle.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_a_sigkilled_search_resumes_without_rerunning_finished_trials(tmp_path, omniglot_zips):
    from mmtl_tf import checkpoints

    command = _tune(tmp_path, "--trials", "2", "--steps-per-trial", "6", "--algorithm", "random",
                    "--space", "meta.inner_lr=0.2,0.4")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    flight = tmp_path / "search" / "trial_1" / "run"
    start = time.monotonic()
    while checkpoints.latest(flight) is None:  # trial 0 ended, trial 1 has a checkpoint
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - start < 600, "trial 1 wrote no checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoints.read_record(checkpoints.latest(flight))["step"]
    assert _oracle_state(tmp_path)["end_order"] == ["0"] and killed_at < 6, "killed mid-trial 1"
    finished = tmp_path / "search" / "trial_0"
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert (f"resuming the search in {tmp_path}: 1 of 2 trials ended; trial 1 was in flight"
            in rerun.stdout)
    assert f"resuming {flight} at meta-step {killed_at} of 6" in rerun.stdout
    assert "trial 0 (" not in rerun.stdout, "the finished trial ran again"
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == before
    assert sorted((r["trial"], r["status"]) for r in _rows(tmp_path)) == [
        ("0", "completed"), ("1", "completed")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_chief_and_two_workers_share_one_search(tmp_path, omniglot_zips):
    command = _tune(tmp_path, "--trials", "2", "--steps-per-trial", "2", "--algorithm", "random",
                    "--space", "meta.inner_lr=0.2,0.4")
    port = str(_free_port())

    def start(tuner_id):
        env = {**os.environ, "KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": "127.0.0.1",
               "KERASTUNER_ORACLE_PORT": port}
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    processes = {name: start(name) for name in ("chief", "tuner0", "tuner1")}
    outputs = {name: p.communicate(timeout=900) for name, p in processes.items()}
    for name, p in processes.items():
        assert p.returncode == 0, (name, outputs[name][1])
    ran = {name: {line.split()[1] for line in outputs[name][0].splitlines()
                  if line.startswith("trial ") and f"({name})" in line} for name in ("tuner0", "tuner1")}
    # Both start together and a trial takes seconds: each takes one before the other ends
    assert sorted(ran["tuner0"] | ran["tuner1"]) == ["0", "1"] and len(ran["tuner0"]) == 1
    for name in ("tuner0", "tuner1"):
        assert "no trial left; the chief writes the results" in outputs[name][0]
    assert "best: trial" in outputs["chief"][0]
    rows = _rows(tmp_path)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    assert ExperimentConfig.from_file(tmp_path / "best_config.json").meta.inner_lr == float(
        rows[0]["meta.inner_lr"])


@pytest.mark.parametrize("args, message", [
    (["--space", "meta.inner_rate=0.05:0.5"],
     "error: --space 'meta.inner_rate': no configuration field of that name; close names: "
     "meta.inner_lr"),
    (["--set", "train.meta_rate=0.01"],
     "error: --set 'train.meta_rate': no configuration field of that name; close names: "
     "train.meta_lr"),
    (["--space", "meta.inner_lr=0.5:0.05:log"],
     "error: --space meta.inner_lr=0.5:0.05:log: the range is empty (low 0.5 > high 0.05)"),
    (["--space", "meta.head_init=,"], "error: --space meta.head_init=,: the choice is empty"),
    (["--space", "data.queries=5,10"], "error: --space data.queries: cannot be searched: it "
                                      "defines the validation episodes every trial is scored on"),
    (["--set", "data.protocol=vinyals", "--set", "data.train_split=null", "--set",
      "data.eval_split=null"],
     "error: tiny with data.protocol='vinyals' has no validation part, and a search scores "
     "validation alphabets only (never test characters)"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, args,
                                                                    message):
    from mmtl_tf import cli

    workdir = tmp_path / "search"
    with pytest.raises(SystemExit) as exit_:
        cli.run(_load_pipeline("tune").main, ["--preset", "tiny", "--workdir", str(workdir), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
    assert not workdir.exists()


def test_with_task_families_the_single_family_task_shape_is_neither_searched_nor_set():
    from mmtl_tf.config import preset
    from mmtl_tf.tuning import space as sp

    families = preset("multitask")
    _, space = sp.resolve(families, [], [])
    assert {"data.ways", "data.shots"}.isdisjoint(space) and "meta.inner_lr" in space
    _, single = sp.resolve(preset("tiny"), [], [])
    assert {"data.ways", "data.shots"} <= set(single)
    for args, flag in (([], ["data.ways=5,20"]), (["data.shots"], [])):
        with pytest.raises(ValueError, match=r"^--(space|set) data\.(ways|shots): has no effect "
                                             r"with task families \(.*\); drop it$"):
            sp.resolve(families, args, flag)
