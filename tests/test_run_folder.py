"""A run folder survives a kill, a signal and a failing disk, and says what it is doing."""

import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest

from mmtl_tf import checkpoints
from mmtl_tf.config import preset
from mmtl_tf.run_callbacks import read_history

TRAIN = Path(__file__).parents[1] / "pipelines" / "train.py"
STEPS = 10
# Short periods and checkpoints 5 steps apart, so that a kill can land after a period logged
# past the last checkpoint (step 6, 7 or 8 after the checkpoint at 5), mid-period.
SETTINGS = ["--set", "train.log_every=2", "--set", "train.checkpoint_every=5",
            "--set", "train.eval_every=4", "--steps", str(STEPS)]


def _config():
    return preset("tiny").replace(train={"steps": STEPS, "log_every": 2, "checkpoint_every": 5,
                                         "eval_every": 4})


def _command(workdir):
    return [sys.executable, str(TRAIN), "--preset", "tiny", "--workdir", str(workdir), *SETTINGS]


def _start(workdir):
    return subprocess.Popen(_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(process, ready, what, timeout=300):
    start = time.monotonic()
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - start < timeout, f"no {what} appeared"
        time.sleep(0.02)


def _wait_for_checkpoint(process, workdir):
    _wait_for(process, lambda: checkpoints.latest(workdir) is not None, "checkpoint")


def _checkpointed_step(workdir) -> int:
    latest = checkpoints.latest(workdir)
    return -1 if latest is None else int(latest.stem.split("-")[1])  # step-00000005.npz


def _logged_past_checkpoint(workdir) -> bool:
    """TensorBoard holds a step after the latest checkpoint: a kill now leaves events of a
    step that the rerun logs again."""
    import tensorflow as tf

    checkpointed = _checkpointed_step(workdir)
    try:
        steps = [step for step, _ in _scalar_events(workdir).get("loss", [])]
    except tf.errors.DataLossError:  # a record half written
        return False
    return checkpointed >= 0 and bool(steps) and max(steps) > checkpointed


def _scalar_events(workdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every TensorBoard event file of a run, in file order."""
    import tensorflow as tf

    tags = {}
    for event_file in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                    else value.simple_value
                tags.setdefault(value.tag, []).append((event.step, number))
    return tags


def _arrays(path, group):
    with np.load(path) as data:
        return [data[n] for n in sorted(data.files) if n.startswith(group + "/")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from mmtl_tf.training import train

    workdir = tmp_path_factory.mktemp("uninterrupted")
    train(_config(), workdir, verbose=0)
    return workdir


class Resumed(typing.NamedTuple):
    workdir: Path
    killed_at: int  # the step of the checkpoint the rerun resumed from
    logged_before_rerun: dict  # the killed run's TensorBoard scalars


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Resumed:
    """A real train.py process killed with SIGKILL after it logged a period past its last
    checkpoint, then the same command rerun to the end."""
    workdir = tmp_path_factory.mktemp("killed")
    process = _start(workdir)
    _wait_for(process, lambda: _logged_past_checkpoint(workdir), "period logged past a checkpoint")
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoints.read_record(checkpoints.latest(workdir))["step"]
    assert killed_at < STEPS, "the kill landed before the end"
    logged = _scalar_events(workdir)
    rerun = subprocess.run(_command(workdir), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {workdir} at meta-step {killed_at} of {STEPS}" in rerun.stdout
    return Resumed(workdir, killed_at, logged)


def test_a_sigkilled_run_rerun_ends_where_an_uninterrupted_one_does(resumed, uninterrupted):
    tmp_path = resumed.workdir
    final, reference = checkpoints.latest(tmp_path), checkpoints.latest(uninterrupted)
    assert final.name == reference.name == f"step-{STEPS:08d}.npz"
    # The same episodes, optimizer moments and step counter: equal up to float32 round-off
    # of the two processes' reductions (1e-5 relative).
    for group in ("model", "optimizer"):
        for got, want in zip(_arrays(final, group), _arrays(reference, group), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    rows, want = read_history(tmp_path), read_history(uninterrupted)
    assert [r["step"] for r in rows] == [r["step"] for r in want] == [2, 4, 6, 8, 10]
    for got, expected in zip(rows, want):  # a period cut by the kill reports its whole mean
        assert got.keys() == expected.keys()
        for name in set(got) - {"seconds"}:  # wall time differs between processes
            assert got[name] == pytest.approx(expected[name], rel=1e-4), name


def test_tensorboard_has_each_step_once_after_a_sigkill_and_rerun(resumed, uninterrupted):
    before = resumed.logged_before_rerun["loss"]
    assert max(step for step, _ in before) > resumed.killed_at, \
        "the killed run had logged a step past its checkpoint, which the rerun logs again"
    logged, want = _scalar_events(resumed.workdir), _scalar_events(uninterrupted)
    assert logged.keys() == want.keys()
    rows = {r["step"]: r for r in read_history(resumed.workdir)}
    for tag, points in logged.items():
        steps = [step for step, _ in points]
        assert steps == [step for step, _ in want[tag]], tag  # each once, in order
        for step, value in points:  # the rerun's history, also where the kill cut a period
            assert value == pytest.approx(rows[step][tag], rel=1e-6), (tag, step)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(tmp_path):
    process = _start(tmp_path)
    _wait_for_checkpoint(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    stopped = int(err.split("stopped after meta-step ")[1].split()[0])
    assert err.strip().endswith("rerun the same command to resume")
    assert "Traceback" not in err
    assert checkpoints.read_record(checkpoints.latest(tmp_path))["step"] == stopped


def test_a_failing_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from mmtl_tf.training import train

    saved = []
    real_save = checkpoints.save

    def failing(learner, path, record):
        if path.name.startswith("step-") and saved:
            raise OSError(28, "No space left on device")
        saved.append(path)
        return real_save(learner, path, record)

    monkeypatch.setattr(checkpoints, "save", failing)
    config = preset("tiny").replace(train={"steps": 6, "checkpoint_every": 2, "eval_every": 0})
    with pytest.raises(OSError, match=rf"cannot write a checkpoint in {tmp_path / 'checkpoints'} "
                                      r"\(No space left on device\).*previous checkpoint is intact"):
        train(config, tmp_path, verbose=0)
    (kept,) = checkpoints.step_files(tmp_path)
    assert kept.name == "step-00000002.npz" and not list(tmp_path.rglob("*.tmp*"))
    monkeypatch.undo()
    from mmtl_tf.training import build_learner

    record = checkpoints.restore(build_learner(config), kept, groups=("model",))
    assert record["step"] == 2


def test_truncated_and_foreign_checkpoints_are_refused_naming_the_file(tmp_path):
    from mmtl_tf.training import build_learner

    learner = build_learner(preset("tiny"))
    path = checkpoints.save(learner, tmp_path / "state.npz", {"step": 1})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoints.CheckpointError, match=rf"{truncated} is truncated"):
        checkpoints.restore(learner, truncated)
    wider = build_learner(preset("tiny").replace(model={"filters": 16}))
    with pytest.raises(checkpoints.CheckpointError, match=r"does not match this configuration: "
                       r"26 model variables where it has 26, number 0 of shape \(32, 20\) "
                       r"where it needs \(64, 20\).*another architecture"):
        checkpoints.restore(wider, path)


def test_the_cosine_schedule_warms_up_then_decays_to_its_floor():
    from mmtl_tf.training import meta_lr_schedule

    config = preset("tiny").replace(train={"steps": 100, "meta_lr": 2e-3, "lr_schedule": "cosine",
                                           "warmup_steps": 10, "lr_floor": 0.1})
    rate = meta_lr_schedule(config.train)
    assert float(rate(0)) == 0.0
    assert float(rate(5)) == pytest.approx(1e-3)
    assert float(rate(10)) == pytest.approx(2e-3)
    assert float(rate(55)) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5), rel=1e-4)
    assert float(rate(100)) == pytest.approx(2e-4)


def test_early_stopping_stops_after_patience_validations_without_improvement(tmp_path):
    from mmtl_tf.training import train

    config = preset("tiny").replace(meta={"inner_lr": 1e-6}, train={
        "steps": 40, "log_every": 2, "eval_every": 2, "early_stopping_patience": 2,
        "meta_lr": 1e-9})  # nothing moves: validation cannot improve after its first score
    metrics = train(config, tmp_path, verbose=0)
    assert metrics["best_step"] == 2 and metrics["validated_at"] == 6 and metrics["steps"] == 6


def test_history_and_tensorboard_carry_the_meta_metrics_and_validation(uninterrupted):
    rows = read_history(uninterrupted)
    assert {"loss", "accuracy", "support_loss", "meta_lr", "val_accuracy"} <= set(rows[1])
    seconds = [r["seconds"] for r in rows]  # training wall time so far: grows with every row
    assert 0 < seconds[0] and all(a < b for a, b in zip(seconds, seconds[1:]))
    tags = {tag: [step for step, _ in points]
            for tag, points in _scalar_events(uninterrupted).items()}
    assert tags["val_accuracy"] == [4, 8, 10] and tags["loss"] == [2, 4, 6, 8, 10]
    assert (uninterrupted / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(rows[-1]["val_accuracy"])


def test_the_command_line_refuses_bad_input_in_one_line(tmp_path):
    def run(*args):
        env = dict(os.environ)
        return subprocess.run([sys.executable, str(TRAIN), "--preset", "tiny", "--workdir",
                               str(tmp_path), *args], capture_output=True, text=True, env=env,
                              timeout=300)

    unknown = run("--set", "train.meta_rate=1")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].startswith(
        "error: --set 'train.meta_rate=1': train has no field 'meta_rate'")
    (tmp_path / "config.json").write_text(json.dumps(
        json.loads(preset("tiny").replace(train={"meta_lr": 0.5}).to_json())))
    other = run()
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "holds a run of another configuration (differs in train.meta_lr (0.5 -> 0.001))" in other.stderr


def test_a_checkpoint_is_not_resumed_under_another_configuration_without_config_json(tmp_path):
    """A checkpoint carries the configuration that wrote it: with config.json gone (deleted, or
    the folder half cleared while a stopping run wrote its last checkpoint), a rerun with other
    settings is refused naming the fields, instead of continuing the old run as the new one."""
    from mmtl_tf.training import train

    config = preset("tiny").replace(train={"steps": 2, "checkpoint_every": 2, "eval_every": 0})
    train(config, tmp_path, verbose=0)
    (tmp_path / "config.json").unlink()
    other = config.replace(meta={"inner_lr": 0.2}, train={"steps": 4})
    with pytest.raises(ValueError, match=r"step-00000002.npz was written by a run of another "
                       r"configuration \(differs in meta.inner_lr \(0.4 -> 0.2\), train.steps "
                       r"\(2 -> 4\)\); use another --workdir, or --force"):
        train(other, tmp_path, verbose=0)
    longer = config.replace(train={"steps": 2})  # the same configuration resumes
    assert train(longer, tmp_path, verbose=0)["steps"] == 2


def test_a_run_whose_inner_loop_changes_nothing_says_so(tmp_path, capsys):
    """An inner step too small to move any prediction (here a rate of 1e-9) is not reported as
    adaptation: the run ends naming the gain over the starting head and what it means."""
    from mmtl_tf.training import train

    config = preset("tiny").replace(meta={"head_init": "learned", "inner_lr": 1e-9},
                                    train={"steps": 2, "eval_every": 2, "checkpoint_every": 2})
    metrics = train(config, tmp_path, verbose=0)
    assert metrics["adaptation_gain"] == metrics["accuracy"] - metrics["pre_accuracy"]
    assert abs(metrics["adaptation_gain"]) < 1e-6
    assert metrics["note"].startswith("adaptation changed validation accuracy by +0.00 points")
    assert "the inner loop does not matter" in capsys.readouterr().out
