"""A search's results as files: the best configuration (a JSON ``train.py --config`` reads), the
table of all trials sorted by validation score (Markdown and CSV) and the score against each
searched hyperparameter (PNG). Every file is written atomically."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

from mmtl_tf.config import Choice, ExperimentConfig
from mmtl_tf.files import atomic_write
from mmtl_tf.tuning import space as sp

OBJECTIVE = "val_accuracy"
BEST, TABLE_MD, TABLE_CSV, FIGURE = "best_config.json", "trials.md", "trials.csv", "scores.png"


REASON = "failed.txt"  # in a failed trial's folder: why


def write_reason(trial_dir, reason: str) -> None:
    atomic_write(Path(trial_dir) / REASON, lambda f: f.write(reason.encode()))


def failure_reason(trial, trial_dir) -> str:
    """Why a trial failed: the reason its tuner wrote in its folder, else the last line of
    KerasTuner's message (a traceback) without the exception's class name."""
    path = Path(trial_dir) / REASON
    if path.is_file():
        return path.read_text()
    lines = [line for line in (trial.message or "").splitlines() if line.strip()]
    return lines[-1].split("Error: ", 1)[-1].strip() if lines else (
        f"no reason reached the chief: see the output of the worker that ran it, or {path}")


def _metric(trial, name):
    return trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None


def rows(trials, project, names) -> list[dict]:
    """One dict per trial, completed ones by validation score (best first), then the others;
    ``project``: KerasTuner's folder, holding ``trial_<id>/``."""
    out = []
    for t in trials:
        done = t.status == "COMPLETED" and t.score is not None
        out.append({"trial": t.trial_id, "status": t.status.lower(),
                    OBJECTIVE: t.score if done else None,
                    "ci95": _metric(t, OBJECTIVE + "_ci95"),
                    **{n: t.hyperparameters.values.get(n) for n in names},
                    "meta_steps": steps if (steps := _metric(t, "steps")) is None else int(steps),
                    "seconds": _metric(t, "seconds"),
                    "note": failure_reason(t, Path(project) / f"trial_{t.trial_id}")
                    if t.status == "FAILED" else ""})
    return sorted(out, key=lambda r: (r[OBJECTIVE] is None, -(r[OBJECTIVE] or 0), r["trial"]))


def short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def trial_line(trial, trial_dir) -> str:
    """The line printed when a trial ends."""
    seconds = _metric(trial, "seconds")
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    if trial.status == "COMPLETED":
        ci = _metric(trial, OBJECTIVE + "_ci95") or 0.0
        return f"trial {trial.trial_id} done: validation accuracy {100 * trial.score:.1f}% ± " \
               f"{100 * ci:.1f}{took}"
    return f"trial {trial.trial_id} {trial.status.lower()}: {failure_reason(trial, trial_dir)}"


def best_config(base: ExperimentConfig, values: dict, target: str) -> ExperimentConfig:
    """``base`` (full length) with the best trial's values; when it trains on another setting
    than the one the search scored, that setting is validated beside it (logged)."""
    config = sp.with_values(base, values)
    also = config.train.also_validate
    if f"{config.data.ways}w{config.data.shots}s" != target and target not in also:
        also += (target,)
    return config.replace(train={"also_validate": also})


def write_results(trials, project, workdir, base: ExperimentConfig, space: dict,
                  setup: dict) -> dict:
    """Writes the four files into ``workdir``; returns the summary (best row or None, trial
    count, files written). ``project``: KerasTuner's folder of the trials."""
    workdir, names = Path(workdir), sorted(space)
    table = rows(trials, project, names)
    best = table[0] if table and table[0][OBJECTIVE] is not None else None
    files = [TABLE_MD, TABLE_CSV, FIGURE]
    if best is not None:
        chosen = best_config(base, {n: best[n] for n in names}, setup["target"])
        chosen = dataclasses.replace(chosen, name=f"{base.name}-tuned")
        text = chosen.to_json() + "\n"
        atomic_write(workdir / BEST, lambda f: f.write(text.encode()))
        files.insert(0, BEST)
    _write_text(workdir / TABLE_MD, markdown(table, names, setup))
    _write_text(workdir / TABLE_CSV, _csv(table, names))
    figure(table, names, space, setup, workdir / FIGURE)
    return {"best": best, "trials": len(table), "files": files}


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def markdown(table: list[dict], names: list[str], setup: dict) -> str:
    header = ["rank", "trial", "validation accuracy", *names, "meta-steps", "seconds", "note"]
    lines = [f"## Search over {setup['preset']}: {len(table)} trials ({setup['algorithm']}), "
             f"{setup['steps_per_trial']} meta-steps per trial", "",
             f"Protocol: {setup['protocol']}. Each trial meta-trains for its meta-steps and is "
             f"scored on {setup['scored_on']}: mean query accuracy after the trial's "
             "eval_inner_steps, with its 95% confidence interval over episodes. Fields not "
             "listed are the base configuration's.", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    rank = 0
    for row in table:
        scored = row[OBJECTIVE] is not None
        rank += scored
        score = f"{100 * row[OBJECTIVE]:.1f}% ± {100 * (row['ci95'] or 0):.1f}" if scored else row["status"]
        cells = [str(rank) if scored else "", row["trial"], score, *(short(row[n]) for n in names),
                 short(row["meta_steps"]), short(row["seconds"] and round(row["seconds"])),
                 row["note"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(table: list[dict], names: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, ["trial", "status", OBJECTIVE, "ci95", *names, "meta_steps",
                                   "seconds", "note"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return text.getvalue()


def figure(table: list[dict], names: list[str], space: dict, setup: dict, path: Path) -> None:
    """One panel per searched hyperparameter: each completed trial's score against its value
    (log axis for log ranges, categories for choices), the best starred, failed trials as
    crosses under the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    columns = min(4, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / columns), columns, squeeze=False,
                             figsize=(max(6.0, 3.2 * columns), 0.6 + 2.8 * math.ceil(len(names) / columns)))
    scores = [r[OBJECTIVE] for r in table if r[OBJECTIVE] is not None]
    floor = min(scores, default=0.0) - 0.05
    for axis, name in zip(axes.flat, names):
        spec = space[name]
        position = ((lambda v: list(spec.values).index(v)) if isinstance(spec, Choice)
                    else (lambda v: v))
        for i, row in enumerate(table):
            if row[name] is None:
                continue
            x = position(row[name])
            if row[OBJECTIVE] is None:
                axis.plot(x, floor, "x", color="tab:red", label="failed")
            else:
                axis.plot(x, row[OBJECTIVE], "*" if i == 0 else "o", markersize=12 if i == 0 else 6,
                          color="tab:orange" if i == 0 else "tab:blue")
        if isinstance(spec, Choice):
            axis.set_xticks(range(len(spec.values)), [str(v) for v in spec.values])
        elif spec.scale == "log":
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    for row in axes:
        row[0].set_ylabel("validation accuracy")
    fig.suptitle(f"{setup['preset']}: {len(table)} trials of {setup['steps_per_trial']} meta-steps, "
                 f"scored on {setup['target_name']} validation episodes\n(star: best; x: failed)",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
