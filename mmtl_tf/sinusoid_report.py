"""The sinusoid family's evaluation report (MAML paper, section 5.1, figures 2 and 3).

Query mean squared error after 1 and 10 adaptation steps (the table's steps) with K = 5, 10 and
20 support points, with 95% confidence intervals over a fixed, seeded set of test tasks, beside
a baseline (the pretrained model of the same budget, preset ``sinusoid-pretrained``) adapted
with the same steps and rate. Written as evaluation.json (with every task's error at the
table's steps), evaluation.md (the table for a model card), curves.png (error against steps)
and tasks.png (a few tasks: the sine, the support points, both models after 1 and 10 steps).
``runs.evaluate_run`` calls ``evaluate`` for sinusoid runs and exports.
"""

from __future__ import annotations

import json
import re
import time
import typing
from pathlib import Path

import numpy as np
import tensorflow as tf

from mmtl_tf.data.episodes import Episode
from mmtl_tf.data.sinusoid import SinusoidSampler
from mmtl_tf.evaluation import accuracy_curve, mean_and_ci95
from mmtl_tf.files import atomic_write
from mmtl_tf.meta import inner_loop as il
from mmtl_tf.reports import pyplot, save_figure

SHOTS = (5, 10, 20)  # the paper's K
QUERIES = 100  # query points per task, uniform on the task's x range
BLOCK = 64  # tasks drawn per sampler call: task i is a function of (seed, i // BLOCK, i % BLOCK)
PICTURED = 3  # tasks drawn in tasks.png, per K
FILES = ("evaluation.json", "evaluation.md", "curves.png", "tasks.png")
ROLES = ("model", "baseline")


class Scored(typing.NamedTuple):
    """A model to score: its learner (MetaLearner), a short name and where it came from."""

    learner: typing.Any
    name: str
    source: str


def draw_tasks(shots: int, queries: int, seed: int, count: int) -> Episode:
    """``count`` sinusoid tasks (numpy, leading task axis) of ``shots`` support and ``queries``
    query points. Drawn in blocks of BLOCK, so the first n tasks of a larger set are the set of
    n; amplitudes and phases do not depend on ``shots``: every K sees the same sinusoids, with
    their points drawn anew."""
    if count < 1:
        raise ValueError(f"tasks={count} must be >= 1")
    sampler = SinusoidSampler(shots, queries)
    blocks = [sampler.sample(tf.constant([seed, b], tf.int64), BLOCK)
              for b in range(-(-count // BLOCK))]
    return Episode(*(np.concatenate([np.asarray(f) for f in fields])[:count]
                     for fields in zip(*blocks)))


def mse_after_steps(learner, tasks: Episode, steps: int) -> np.ndarray:
    """Query mean squared error (tasks, steps + 1) of every task after 0..steps SGD steps on its
    support points at the learner's inner rate (the one inner loop, each task adapted once)."""
    return accuracy_curve(learner, tasks, steps)["loss"]


def evaluate(model: Scored, baseline: Scored | None, out, protocol: str, part: str,
             scored_on: str, shots=SHOTS, queries: int = QUERIES, tasks: int = 600,
             seed: int = 2024, steps: int = 10, curve_steps: int = 10,
             command: str | None = None, log=None) -> dict:
    """Scores ``model`` (and ``baseline``, on the same tasks) at every K of ``shots`` after 1 and
    ``steps`` steps, writes the report's files to ``out`` and returns the report.

    ``curve_steps``: the error curve runs from 0 to max(curve_steps, steps) steps. ``log`` is
    called with a line per K, then with the table.
    """
    started = time.perf_counter()
    if steps < 1 or curve_steps < 0 or queries < 1:
        raise ValueError(f"steps={steps} and queries={queries} must be >= 1 (curve_steps="
                         f"{curve_steps} >= 0)")
    if baseline is not None and baseline.learner.config.inner_lr != model.learner.config.inner_lr:
        raise ValueError(f"the baseline {baseline.source} adapts at inner_lr="
                         f"{baseline.learner.config.inner_lr}, the model at "
                         f"{model.learner.config.inner_lr}: a baseline is fine-tuned at the "
                         "model's rate; train it with --set meta.inner_lr="
                         f"{model.learner.config.inner_lr}")
    table_steps = sorted({1, steps})
    last = max(curve_steps, steps)
    scored = [model] + ([baseline] if baseline is not None else [])
    rows, pictures = [], []
    for k in shots:
        clock = time.perf_counter()
        drawn = draw_tasks(k, queries, seed, tasks)
        row = {"shots": k, "queries": queries, "tasks": tasks}
        for role, s in zip(ROLES, scored):
            row[role] = _scores(mse_after_steps(s.learner, drawn, last), table_steps)
        row["seconds"] = round(time.perf_counter() - clock, 1)
        rows.append(row)
        pictures.append(_pictured(scored, drawn, table_steps))
        if log:
            log(_progress(row, scored, table_steps))
    report = {"family": "sinusoid", "model": _describe(model), "protocol": protocol,
              "part": part, "scored_on": scored_on, "seed": seed, "tasks": tasks,
              "queries": queries, "table_steps": table_steps, "curve_steps": last,
              "inner_lr": model.learner.config.inner_lr,
              "baseline": None if baseline is None else _describe(baseline),
              "command": command, "out": str(out), "settings": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    report["files"] = write_report(out, report, pictures)
    if log:
        log("\n" + table(report))
    return report


def _progress(row: dict, scored, table_steps) -> str:
    """The line printed for one K: each model's MSE and CI after each of the table's steps."""
    parts = []
    for role, s in zip(ROLES, scored):
        after = [f"{m:.3f} ± {c:.3f} after {n} step{'s' * (n > 1)}"
                 for n, m, c in zip(table_steps, row[role]["mse"], row[role]["mse_ci95"])]
        parts.append(f"{s.name} " + ", ".join(after))
    return (f"K={row['shots']}: " + "; ".join(parts) +
            f" ({row['tasks']} tasks, {row['seconds']:.0f} s)")


def _describe(s: Scored) -> dict:
    return {"name": s.name, "source": s.source, "algorithm": s.learner.config.algorithm}


def _scores(mse: np.ndarray, table_steps) -> dict:
    """Means, 95% CIs and per-task values at the table's steps, and the mean curve."""
    at = [mean_and_ci95(mse[:, n]) for n in table_steps]
    curve = [mean_and_ci95(mse[:, n]) for n in range(mse.shape[1])]
    return {"mse": [m for m, _ in at], "mse_ci95": [c for _, c in at],
            "per_task": [[float32_value(v) for v in mse[:, n]] for n in table_steps],
            "curve": {"steps": list(range(mse.shape[1])), "mse": [m for m, _ in curve],
                      "mse_ci95": [c for _, c in curve]}}


def float32_value(value) -> float:
    """A float32 result as the shortest decimal that ``np.float32`` reads back as the same
    float32 (about 9 digits instead of 17): the means and intervals are those of
    ``np.float32(stored values)``."""
    return float(str(np.float32(value)))


def _pictured(scored, drawn: Episode, table_steps) -> dict:
    """The first PICTURED tasks: support points, a grid, the true sine and each model's
    prediction on the grid after each of the table's steps."""
    grid = np.linspace(-5.0, 5.0, 201, dtype=np.float32)[:, None]  # (201, 1)
    count = min(PICTURED, len(drawn.support_x))
    amplitude, phase = drawn.task_params[:count, 0], drawn.task_params[:count, 1]
    shown = {"x": grid[:, 0].tolist(), "support_x": drawn.support_x[:count, :, 0].tolist(),
             "support_y": drawn.support_y[:count, :, 0].tolist(),
             "true": (amplitude[:, None] * np.sin(grid[:, 0] - phase[:, None])).tolist(),
             "predictions": {}}
    for role, s in zip(ROLES, scored):
        meta_params = [tf.convert_to_tensor(p) for p in s.learner.meta_params]
        per_task = []
        for t in range(count):
            adapted = il.adapt(s.learner.loop, meta_params, drawn.support_x[t], drawn.support_y[t],
                               1, max(table_steps), s.learner.learning_rates(1), True,
                               query_x=grid)
            per_task.append([np.asarray(adapted.query_outputs[n - 1])[:, 0].tolist()
                             for n in table_steps])
        shown["predictions"][role] = per_task
    return shown


# ----- files --------------------------------------------------------------------------------
def write_report(out, report: dict, pictures: list[dict]) -> list[str]:
    """Writes evaluation.json, evaluation.md, curves.png and tasks.png atomically into ``out``."""
    out = Path(out)
    text = json.dumps({**report, "files": list(FILES)}, indent=2, sort_keys=True) + "\n"
    # a list of numbers on one line, not one line per number
    text = _NUMBER_LIST.sub(lambda m: "[" + " ".join(m[1].split()) + "]", text)
    atomic_write(out / "evaluation.json", lambda f: f.write(text.encode()))
    atomic_write(out / "evaluation.md", lambda f: f.write(markdown(report).encode()))
    save_figure(curves_figure(report), out / "curves.png")
    save_figure(tasks_figure(report, pictures), out / "tasks.png")
    return list(FILES)


# An indented JSON list of numbers (JSON strings hold no raw line breaks: only lists match).
_NUMBER_LIST = re.compile(r"\[\n\s*((?:-?[0-9.eE+-]+,\n\s*)*-?[0-9.eE+-]+)\n\s*\]")


def _cell(mean: float, ci: float) -> str:
    return f"{mean:.3f} ± {ci:.3f}"


def _label(described: dict) -> str:
    return f"{described['name']} ({described['algorithm']})"


def table(report: dict) -> str:
    """The Markdown table: one row per K, the query MSE (95% CI) of the model and of the
    baseline after each of the table's steps."""
    roles = ["model"] + (["baseline"] if report["baseline"] else [])
    header = ["K (support points)", "tasks"] + [
        f"{_label(report[role])}, {n} step{'s' * (n > 1)}"
        for role in roles for n in report["table_steps"]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in report["settings"]:
        cells = [str(row["shots"]), str(row["tasks"])] + [
            _cell(m, c) for role in roles for m, c in zip(row[role]["mse"], row[role]["mse_ci95"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    """evaluation.md: the protocol sentence, the table and the command that wrote it."""
    baseline = report["baseline"]
    against = (f" Beside it, the baseline {baseline['name']} ({baseline['algorithm']}, "
               f"`{baseline['source']}`), adapted on the same tasks with the same steps and "
               "rate." if baseline else "")
    lines = [f"## Evaluation of {report['model']['name']} ({report['part']})", "",
             f"Protocol: {report['protocol']}. Scored on {report['scored_on']}: "
             f"{report['tasks']} fixed tasks (seed {report['seed']}; the same sinusoids at every "
             f"K), each adapted on its K support points with {max(report['table_steps'])} steps "
             f"of SGD at rate {report['inner_lr']} and scored on {report['queries']} query points "
             "drawn uniformly from [-5, 5]: mean squared error, mean over tasks with its 95% "
             "confidence interval (1.96 standard errors). Model: "
             f"{_label(report['model'])}, `{report['model']['source']}`.{against}", "",
             table(report)]
    if report.get("command"):
        lines += [f"Command: `{report['command']}` ({report['seconds']:.0f} s).", ""]
    return "\n".join(lines)


COLOURS = dict(zip(ROLES, ("tab:green", "tab:red")))


def curves_figure(report: dict):
    """Query MSE (95% CI band, log scale) against adaptation steps, one panel per K, the model
    solid and the baseline dashed (the paper's figure 3)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    plt = pyplot()
    rows = report["settings"]
    figure, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.3), squeeze=False)
    roles = [("model", "-")] + ([("baseline", "--")] if report["baseline"] else [])
    for axis, row in zip(axes[0], rows):
        for role, style in roles:
            curve = row[role]["curve"]
            steps, mean = np.asarray(curve["steps"]), np.asarray(curve["mse"])
            ci = np.asarray(curve["mse_ci95"])
            axis.plot(steps, mean, style, color=COLOURS[role], label=_label(report[role]))
            axis.fill_between(steps, np.maximum(mean - ci, 1e-4), mean + ci, alpha=0.2,
                              color=COLOURS[role], linewidth=0)
        for n in report["table_steps"]:
            axis.axvline(n, color="grey", linestyle=":", linewidth=1)
        axis.set(yscale="log", xlabel="adaptation steps (0: the starting weights)",
                 title=f"K = {row['shots']} ({row['tasks']} {report['part']} tasks)")
        axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.1 0.2 0.5 1 2 5
        axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("query mean squared error (log scale)")
    axes[0, -1].legend(fontsize=7)
    figure.tight_layout()
    return figure


def tasks_figure(report: dict, pictures: list[dict]):
    """A few tasks per K (rows): the true sine, the K support points, and each model's
    prediction after the table's steps (the paper's figure 2)."""
    plt = pyplot()
    count = len(pictures[0]["support_x"])
    figure, axes = plt.subplots(len(pictures), count, figsize=(3.4 * count, 2.4 * len(pictures)),
                                squeeze=False)
    steps = report["table_steps"]
    for row, (axes_row, shown, setting) in enumerate(zip(axes, pictures, report["settings"])):
        for t, axis in enumerate(axes_row):
            axis.plot(shown["x"], shown["true"][t], color="black", linewidth=1.5, label="true sine")
            for role, predictions in shown["predictions"].items():
                for n, prediction in zip(steps, predictions[t]):
                    axis.plot(shown["x"], prediction, color=COLOURS[role],
                              linestyle=":" if n == 1 and len(steps) > 1 else "-", linewidth=1.2,
                              label=f"{report[role]['name']}, {n} step{'s' * (n > 1)}")
            axis.scatter(shown["support_x"][t], shown["support_y"][t], color="tab:blue",
                         zorder=3, s=14, label="support points")
            axis.set(xlim=(-5, 5), title=f"K = {setting['shots']}, {report['part']} task {t + 1}")
            axis.title.set_fontsize(9)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
                  frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure
