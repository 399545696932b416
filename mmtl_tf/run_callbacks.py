"""The Keras callbacks of a run folder: checkpoints, validation, signals, history and curves.

``RunFolder`` acts after every meta-step (stop signals, validation, checkpoints, the end);
``MetricsLog`` after every logging period (history.csv, TensorBoard scalars, PNG curves).
"""

from __future__ import annotations

import csv
import io
import signal
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mmtl_tf import checkpoints
from mmtl_tf.files import atomic_write

HISTORY = "history.csv"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"


class NonFiniteLossError(FloatingPointError):
    """Meta-training produced a non-finite loss; no checkpoint was written for that step."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint; ``signal`` names which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGINT and SIGTERM set a flag instead of killing the process, so the step
    in flight finishes and a checkpoint is written (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.received, self._previous = None, {}

    def __enter__(self):
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


MONITORS = ("accuracy", "loss", "weighted_accuracy")  # highest, lowest, highest


class RunFolder(keras.callbacks.Callback):
    """After each meta-step: stop on a signal or a non-finite loss, validate every
    ``eval_every`` steps (keeping the best state), checkpoint every ``checkpoint_every`` steps,
    stop at ``steps`` or when validation has not improved for ``patience`` evaluations.

    ``validate()`` returns the validation report (``evaluate_episodes``); ``prepare()`` runs
    before any state is saved (batch-norm calibration); ``state`` is the record restored from
    the last checkpoint (best score and its step, evaluations without improvement);
    ``config`` (the run's configuration) goes into every checkpoint's record, so a checkpoint
    is never resumed under another configuration even when config.json is gone.
    ``monitor``: the validation metric that chooses the best state, "accuracy" (highest),
    "loss" (lowest: regression) or "weighted_accuracy" (highest: task families' alpha-weighted
    mean); the state keeps it as ``best_<monitor>``."""

    def __init__(self, workdir, steps, checkpoint_every, eval_every, patience, validate,
                 signals: StopSignals, inner_lr: float, state: dict, prepare=None,
                 config: dict | None = None, monitor: str = "accuracy"):
        super().__init__()
        if monitor not in MONITORS:
            raise ValueError(f"monitor={monitor!r} is not one of {MONITORS}")
        self.workdir, self.steps = Path(workdir), steps
        self.checkpoint_every, self.eval_every, self.patience = checkpoint_every, eval_every, patience
        self.validate, self.signals, self.inner_lr = validate, signals, inner_lr
        self.monitor, self.best_key = monitor, f"best_{monitor}"
        self.state = {self.best_key: None, "best_step": None, "stale": 0, **state}
        self.prepare, self.on_checkpoint = prepare or (lambda: None), lambda: None
        self.validated = {}  # step -> validation report, this process
        self.stopped = False
        self.period_sums = None  # metric sums of a period cut by a crash, restored once
        self.config = config  # the run's configuration, stored in every checkpoint's record

    def on_epoch_begin(self, epoch, logs=None):
        # fit() has just reset the trackers: a run resumed mid-period continues its sums, so
        # the period's row is what an uninterrupted run writes.
        if self.period_sums is not None:
            for variable, value in zip(self.model.metrics_variables, self.period_sums):
                variable.assign(value)
            self.period_sums = None

    def on_train_batch_end(self, batch, logs=None):
        logs = {k: float(np.asarray(v).ravel()[0]) for k, v in (logs or {}).items()}
        step = int(self.model.optimizer.iterations)
        if not np.isfinite(logs.get("loss", 0.0)) or logs.get("update_dropped", 0.0) > 0:
            raise NonFiniteLossError(
                f"at meta-step {step} (running mean loss {logs.get('loss')}; non-finite loss or "
                f"gradient); inner_lr={self.inner_lr} or the meta learning rate is too large for "
                "this model: lower them. With jit_compile the step's update was zeroed; the last "
                f"good checkpoint is kept in {self.workdir / checkpoints.FOLDER}.")
        last = step >= self.steps
        if self.eval_every and (step % self.eval_every == 0 or last):
            self._validate(step)
        stopping = last or self.signals.received is not None or self.model.stop_training
        if stopping or step % self.checkpoint_every == 0:
            self.checkpoint(step)
        if stopping:
            self.model.stop_training = self.stopped = True

    def _validate(self, step):
        report = self.validated[step] = self.validate()
        score, best = report[self.monitor], self.state[self.best_key]
        if best is None or (score < best if self.monitor == "loss" else score > best):
            self.state.update({self.best_key: score, "best_step": step, "stale": 0})
            self.prepare()
            checkpoints.save(self.model, checkpoints.folder(self.workdir) / checkpoints.BEST,
                             self.record(step))
        else:
            self.state["stale"] += 1
            if self.patience and self.state["stale"] >= self.patience:
                print(f"early stopping at meta-step {step}: validation {self.monitor} has not "
                      f"improved for {self.patience} evaluations (best {best:.4f} at step "
                      f"{self.state['best_step']})")
                self.model.stop_training = True

    def record(self, step):
        return {"step": step, **self.state,
                **({"config": self.config} if self.config is not None else {})}

    def checkpoint(self, step):
        self.prepare()
        try:
            checkpoints.save_step(self.model, self.workdir, step, self.record(step))
        except OSError as err:
            raise OSError(f"cannot write a checkpoint in {checkpoints.folder(self.workdir)} "
                          f"({err.strerror or err}); free space or make the folder writable, then "
                          "rerun the same command: the previous checkpoint is intact") from None
        self.on_checkpoint()


class MetricsLog(keras.callbacks.Callback):
    """At the end of each logging period: a row of ``history.csv`` (the step, the period's
    meta-metrics, the meta learning rate, the training wall time so far in ``seconds``, and
    the validation accuracy when validation ran at that step), the same scalars for
    TensorBoard (``<workdir>/tensorboard``), and on request (``write_curves``) the PNG learning
    curves. Rows after ``resumed_step`` (written after the checkpoint a run resumed from) are
    dropped, so the history has no gap and no duplicate; the TensorBoard events are rewritten
    from the rows kept (``tensorboard_writer``), so the steps the resumed run logs again
    appear once there too."""

    def __init__(self, workdir, run: RunFolder, resumed_step: int = 0):
        super().__init__()
        self.workdir, self.run = Path(workdir), run
        self.rows = [r for r in read_history(self.workdir) if r["step"] <= resumed_step]
        self.writer = tensorboard_writer(self.workdir / TENSORBOARD, self.rows)
        self.period_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self.period_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations)
        row = {"step": step, **{k: float(np.asarray(v).ravel()[0]) for k, v in (logs or {}).items()
                                if k != "update_dropped"}}
        # wall time of training so far (validation and checkpoints included): the time of the
        # kept rows plus this period's; work lost to a crash after the last checkpoint is not
        # counted twice
        before = self.rows[-1].get("seconds", 0.0) if self.rows else 0.0
        row["seconds"] = round(before + time.monotonic() - (self.period_start or time.monotonic()), 1)
        row["meta_lr"] = float(self.model.optimizer.learning_rate)  # the schedule's, now
        if step in self.run.validated:  # also into logs: the progress line shows it
            report = self.run.validated[step]
            for metric in dict.fromkeys((self.run.monitor, "accuracy")):  # selection's first
                if metric in report:
                    row[f"val_{metric}"] = logs[f"val_{metric}"] = report[metric]
            # also_validate settings ("20w1s") and task families (names start with a letter)
            for setting, accuracy in {**report.get("settings", {}),
                                      **report.get("families", {})}.items():
                row[f"val_{setting}_accuracy"] = logs[f"val_{setting}_accuracy"] = accuracy
        self.rows.append(row)
        write_history(self.workdir, self.rows)
        write_scalars(self.writer, row)
        self.writer.flush()

    def write_curves(self):
        write_curves(self.workdir / CURVES, self.rows)


def read_history(workdir) -> list[dict]:
    path = Path(workdir) / HISTORY
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]


def write_history(workdir, rows: list[dict]) -> None:
    names = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(workdir) / HISTORY, lambda f: f.write(text.getvalue().encode()))


def write_scalars(writer, row: dict) -> None:
    """A history row's values as TensorBoard scalars at its step (its training wall time,
    ``seconds``, stays in history.csv: rewritten events carry the time of their rewriting)."""
    with writer.as_default(step=row["step"]):
        for name, value in row.items():
            if name not in ("step", "seconds"):
                tf.summary.scalar(name, value)


def tensorboard_writer(folder, rows: list[dict]):
    """A summary writer on ``folder`` whose events are exactly the scalars of ``rows``
    (history.csv's, as kept when a run starts or resumes), in one new events file; the events
    files there before are removed once it is written. A run killed after its last checkpoint
    has logged steps that its rerun logs again, and TensorBoard would draw both points (TF2's
    summary writers cannot write TF1's SessionLog.START, the restart mark that makes it drop
    them); so those events go, as their history rows do. An interruption in between leaves a
    rerun's duplicates or an old file, which the next rerun removes in turn: history.csv,
    written atomically, is the record."""
    folder = Path(folder)
    previous = sorted(folder.glob("events.out.tfevents.*"))
    writer = tf.summary.create_file_writer(str(folder))
    for row in rows:
        write_scalars(writer, row)
    writer.flush()
    for path in previous:
        path.unlink()
    return writer


def write_curves(path, rows: list[dict]) -> None:
    """Meta-loss, pre/post-adaptation query accuracy and validation accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    series = lambda name: [(r["step"], r[name]) for r in rows if name in r]  # noqa: E731
    validation = sorted({k for r in rows for k in r if k.startswith("val_") and k != "val_loss"})
    for axis, names, label in ((left, ["loss", "val_loss"], "meta-loss (query, after adaptation)"),
                               (right, ["accuracy", "pre_accuracy", *validation], "accuracy")):
        for name in names:
            points = series(name)
            if points:
                axis.plot(*zip(*points), marker="." if name.startswith("val_") else None, label=name)
        axis.set_xlabel("meta-step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
