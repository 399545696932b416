"""The evaluation report as files: evaluation.json, evaluation.md (a table ready for a model
card), curves.png (accuracy against adaptation steps) and episode.png (one episode's support
and query images with predicted and true classes). Plots use matplotlib's Agg backend."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from mmtl_tf.files import atomic_write

FILES = ("evaluation.json", "evaluation.md", "curves.png", "episode.png")


def write_report(out, report: dict, setting, episode, predicted) -> list[str]:
    """Writes the report's files atomically into ``out``; returns their names. ``episode``
    (one Episode, no episode axis) of ``setting`` is drawn with the ``predicted`` query labels."""
    out = Path(out)
    text = json.dumps({**report, "files": list(FILES)}, indent=2, sort_keys=True) + "\n"
    atomic_write(out / "evaluation.json", lambda f: f.write(text.encode()))
    atomic_write(out / "evaluation.md", lambda f: f.write(markdown(report).encode()))
    save_figure(curves_figure(report), out / "curves.png")
    title = (f"{setting.name}, {report['part']} episode 1 of {report['episodes']}: "
             f"{report['inner_steps']} adaptation steps, {report['batch_norm']} batch norm")
    save_figure(episode_figure(episode, predicted, title), out / "episode.png")
    return list(FILES)


def _percent(mean: float, ci: float) -> str:
    return f"{100 * mean:.1f}% ± {100 * ci:.1f}"


def markdown(report: dict) -> str:
    """The table: one row per setting, accuracy (95% CI) after the report's adaptation steps and
    after the curve's last step, each row stating its steps and batch-norm mode."""
    steps, last = report["inner_steps"], report["curve_steps"]
    device = report["device"] is not None
    header = ["task", "queries per class", "episodes", "batch norm",
              f"accuracy, {steps} steps", f"accuracy, {last} steps"] + (
        [f"device runtime, {steps} steps"] * device)
    lines = [f"## Evaluation of {report['name']} ({report['part']})", "",
             f"Protocol: {report['protocol']}. Scored on {report['scored_on']}: "
             f"{report['episodes']} fixed episodes per task (seed {report['seed']}), mean query "
             "accuracy with its 95% confidence interval over episodes (1.96 standard errors). "
             f"Algorithm: {report['algorithm']}; batch norm: {report['batch_norm']}.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in report["settings"]:
        cells = [row["setting"], str(row["queries"]), str(row["episodes"]), row["batch_norm"],
                 _percent(row["accuracy"], row["accuracy_ci95"]),
                 _percent(row["curve"]["accuracy"][last], row["curve"]["accuracy_ci95"][last])]
        if device:
            d = row.get("device", {})
            cells.append(d["skipped"] if "skipped" in d else _percent(d["accuracy"], d["accuracy_ci95"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report.get("families_not_scored"):  # a task family without held-out classes enough
        lines += [f"Not scored: {reason}." for reason in report["families_not_scored"].values()]
        lines.append("")
    if device:
        lines += [f"Device runtime: {report['device']['runtime']} running the export "
                  f"`{report['device']['export']}` on the same episodes.", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}` ({report['seconds']:.0f} s).", ""]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(report: dict):
    """Mean query accuracy (95% CI band) against adaptation steps, one line per setting."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in report["settings"]:
        steps = np.asarray(row["curve"]["steps"])
        mean, ci = np.asarray(row["curve"]["accuracy"]), np.asarray(row["curve"]["accuracy_ci95"])
        line, = axes.plot(steps, 100 * mean, marker=".", label=row["setting"])
        axes.fill_between(steps, 100 * (mean - ci), 100 * (mean + ci), alpha=0.2,
                          color=line.get_color())
    axes.axvline(report["inner_steps"], color="grey", linestyle="--", linewidth=1,
                 label=f"table: {report['inner_steps']} steps")
    axes.set(xlabel="adaptation steps (0: the starting head)", ylabel="query accuracy (%)",
             ylim=(0, 100), title=f"{report['name']}, {report['part']} episodes "
                                  f"({report['episodes']} per task; {report['batch_norm']} batch norm)")
    axes.title.set_fontsize(9)
    axes.set_xticks(range(0, report["curve_steps"] + 1, max(1, report["curve_steps"] // 10)))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def episode_figure(episode, predicted, title: str, columns: int = 15):
    """One episode: the support images (labelled) above the queries ("predicted / true", red
    when wrong). ``episode`` has no episode axis; ``predicted`` (N*Q,) labels."""
    plt = pyplot()
    support_order = np.argsort(episode.support_y, kind="stable")
    support_rows = -(-len(support_order) // columns)
    query_rows = -(-len(episode.query_y) // columns)
    rows = support_rows + 1 + query_rows  # an empty row between the two sets
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 0.75, rows * 0.95), squeeze=False)
    for a in axes.ravel():
        a.axis("off")
    for i, s in enumerate(support_order):
        a = axes[i // columns, i % columns]
        a.imshow(episode.support_x[s][..., 0], cmap="gray_r", vmin=0, vmax=1)
        a.set_title(f"class {episode.support_y[s]}", fontsize=7)
    for i, (image, truth, guess) in enumerate(zip(episode.query_x, episode.query_y, predicted)):
        a = axes[support_rows + 1 + i // columns, i % columns]
        a.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1)
        a.set_title(f"{guess} / {truth}", fontsize=7, color="black" if guess == truth else "red")
    axes[support_rows, 0].text(0, 0.5, "queries: predicted / true class (red: wrong)",
                               fontsize=8, transform=axes[support_rows, 0].transAxes)
    figure.suptitle(title + "\nsupport set", fontsize=8)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.5 / rows, hspace=0.6)
    return figure


def save_figure(figure, path: Path) -> None:
    """Writes ``figure`` as a PNG atomically and closes it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
