"""The evaluation report of a training run or an export folder: what pipelines/evaluate.py calls.

It sits above ``training`` (which rebuilds the learner of a run) and ``evaluation`` (which
scores episodes), so neither of those reaches up to the other.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path

import numpy as np

from mmtl_tf.config import ExperimentConfig
from mmtl_tf.data.episode_files import fixed_episodes
from mmtl_tf.data.family_sources import held_out_samplers
from mmtl_tf.evaluation import (ANCHOR_SETTINGS, Setting, accuracy_curve, batch_norm_mode,
                                device_accuracies, mean_and_ci95, predicted_labels)
from mmtl_tf.checkpoints import FOLDER
from mmtl_tf.training import PARTS, episode_sampler, load_learner, protocol_of, scored_on

CURVE_STEPS = 20


class Model(typing.NamedTuple):
    learner: typing.Any  # MetaLearner
    config: ExperimentConfig
    export: Path | None  # the export folder, when the model came from one


def load_model(path, checkpoint: str = "best") -> Model:
    """The learner of a training run (config.json, checkpoints/: its "best" or "latest" state)
    or of an export folder (manifest.json, config.json, model.keras: the Keras model the
    export was made from)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        import keras

        import mmtl_tf.meta.learner  # noqa: F401  (registers the classes model.keras names)
        import mmtl_tf.models.conv4  # noqa: F401

        missing = [n for n in ("config.json", "model.keras") if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"the export folder {path} lacks {', '.join(missing)}; "
                                    "export the run again with pipelines/export.py")
        config = ExperimentConfig.from_dict(json.loads((path / "config.json").read_text()))
        return Model(keras.saving.load_model(path / "model.keras"), config, path)
    if not (path / "config.json").is_file() or not (path / FOLDER).is_dir():
        raise FileNotFoundError(
            f"{path} is neither a training run (config.json and {FOLDER}/) nor an export "
            "folder (manifest.json); give a --workdir written by pipelines/train.py or "
            "pipelines/export.py")
    learner, config = load_learner(path, checkpoint)
    return Model(learner, config, None)


def evaluate_run(workdir, out=None, part: str = "test", settings=None, queries: int | None = None,
                 episodes: int = 600, seed: int = 2024, steps: int | None = None,
                 curve_steps: int = CURVE_STEPS, export=None, checkpoint: str = "best",
                 command: str | None = None, log=None, baseline=None) -> dict:
    """Scores a run or an export folder on fixed episodes of one part of its protocol and
    writes the report (``reports.write_report``) to ``out``.

    Args:
      workdir: a training run folder or an export folder.
      out: the report folder (default ``<workdir>/evaluation/<part>``; required for an export,
        whose files its manifest hashes). Episodes are kept in ``<out>/episodes/``.
      part: "test" (the evaluation characters: the final score) or "validation".
      settings: Settings to score (None: ``ANCHOR_SETTINGS``); a None field of a setting takes
        the run's value. ``queries`` overrides every setting's queries per class.
      steps: adaptation steps of the table (None: the model's ``eval_inner_steps``).
      curve_steps: the accuracy curve runs from 0 to max(curve_steps, steps) steps.
      export: an export folder of the run, also scored through the device runtime (an export
        ``workdir`` always is).
      checkpoint: a run's "best" (validation) or "latest" state.
      log: called with a line of progress per setting.
      baseline: a sinusoid run or export scored beside the model on the same tasks with the
        same steps (``sinusoid_report``; a sinusoid model's settings may only give shots).
    Returns the report (also written as evaluation.json).
    """
    from mmtl_tf import reports

    started = time.perf_counter()
    if part not in PARTS[1:]:
        raise ValueError(f"part={part!r} is unknown; choose 'test' or 'validation'")
    model = load_model(workdir, checkpoint)
    out = _report_folder(model, workdir, out, part)
    steps = model.learner.config.eval_inner_steps if steps is None else steps
    if steps < 0 or curve_steps < 0:
        raise ValueError(f"steps={steps} must be >= 0 (curve_steps={curve_steps} >= 0)")
    if model.config.data.family == "sinusoid":
        return _evaluate_sinusoid(model, workdir, baseline, out, part, settings, queries,
                                  episodes, seed, steps, curve_steps, export, checkpoint,
                                  command, log)
    if baseline is not None:
        raise ValueError(f"--baseline compares sinusoid regression models; {workdir} is an "
                         f"{model.config.data.family} model")
    curve_steps = max(curve_steps, steps)
    if model.config.data.families:
        tasks, not_scored = _family_tasks(model, settings, queries, part)
    else:
        chosen = _settings(settings, queries, model.config, model.learner.config.max_ways)
        tasks, not_scored = [(s, None, _setting_sampler(model.config, s, part))
                             for s in chosen], {}
    device = _device_model(export if export is not None else model.export)
    rows, pictured = [], None
    for setting, family, sampler in tasks:
        row, fixed = _evaluate_setting(model, setting, part, out, episodes, seed, steps,
                                       curve_steps, device, sampler, family)
        rows.append(row)
        if pictured is None:  # the report draws the first episode of the first task
            first = type(fixed)(*(f[0] for f in fixed))
            pictured = (setting, first, predicted_labels(model.learner, first, steps))
        if log:
            on_device = row.get("device", {})
            log(f"{row['setting']}: {row['accuracy']:.1%} ± {row['accuracy_ci95']:.1%} after "
                f"{steps} steps over {episodes} episodes ({row['seconds']:.0f} s)" + (
                    f"; device runtime {on_device['accuracy']:.1%} ({on_device['seconds']:.0f} s)"
                    if "accuracy" in on_device else ""))
    learner, config = model.learner, model.config
    report = {"model": str(workdir), "name": config.name, "algorithm": learner.config.algorithm,
              "kind": "export" if model.export else f"run ({checkpoint} checkpoint)",
              "protocol": protocol_of(config), "part": part, "scored_on": scored_on(config, part),
              "seed": seed, "episodes": episodes, "inner_steps": steps, "curve_steps": curve_steps,
              "batch_norm": batch_norm_mode(learner.config.transductive),
              "device": None if device is None else {
                  "runtime": "mmtl_tf.ondevice (onnxruntime)", "export": str(device.folder)},
              "command": command, "out": str(out), "settings": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    if config.data.families:
        report["families"] = {r["family"]: {k: r[k] for k in ("source", "setting", "accuracy",
                                                              "accuracy_ci95")} for r in rows}
        report["families_not_scored"] = not_scored
    report["files"] = reports.write_report(out, report, *pictured)
    return report


def _evaluate_sinusoid(model, workdir, baseline, out, part, settings, queries, episodes, seed,
                       steps, curve_steps, export, checkpoint, command, log) -> dict:
    """``evaluate_run`` for the sinusoid family: query MSE after 1 and ``steps`` steps at
    K = 5, 10, 20 (or the settings' shots), beside ``baseline`` (``sinusoid_report``)."""
    from mmtl_tf import sinusoid_report as sr

    if export is not None:
        raise ValueError("--export scores image classifiers through the device runtime; a "
                         "sinusoid model is scored with TensorFlow only: drop --export")
    if any(s.ways or s.within_alphabet or not s.shots for s in settings or ()):
        raise ValueError("a sinusoid task has no ways or alphabets: give --shots K only")
    against = None
    if baseline is not None:
        other = load_model(baseline, checkpoint)
        if other.config.data.family != "sinusoid":
            raise ValueError(f"--baseline {baseline} is an {other.config.data.family} model; "
                             "give a sinusoid run or export (preset sinusoid-pretrained)")
        against = sr.Scored(other.learner, other.config.name, str(baseline))
    shots = tuple(s.shots for s in settings) if settings else sr.SHOTS
    return sr.evaluate(sr.Scored(model.learner, model.config.name, str(workdir)), against, out,
                       protocol_of(model.config), part, scored_on(model.config, part), shots,
                       queries or sr.QUERIES, episodes, seed, steps, curve_steps, command, log)


def _report_folder(model: Model, workdir, out, part: str) -> Path:
    """Where the report goes: ``out``, or ``<workdir>/evaluation/<part>`` for a run (an export
    folder's files are hashed by its manifest, so it needs ``out``)."""
    if model.export is not None and out is None:
        raise ValueError(f"{workdir} is an export folder, whose files its manifest hashes; give "
                         "--out, a folder for the report")
    return Path(out) if out is not None else Path(workdir) / "evaluation" / part


def _settings(settings, queries, config, max_ways: int) -> list[Setting]:
    """The settings to score, None fields taken from the run; a setting beyond the model's
    max_ways is refused (an explicit one) or left out (the default table)."""
    d = config.data
    chosen = []
    for s in settings or ANCHOR_SETTINGS:
        s = Setting(s.ways or d.ways, s.shots or d.shots, queries or s.queries or d.queries,
                    bool(s.within_alphabet))
        if s.ways > max_ways:
            if settings:
                raise ValueError(f"ways={s.ways} exceeds the model's max_ways={max_ways}; choose "
                                 f"--ways <= {max_ways}")
            continue
        chosen.append(s)
    if not chosen:
        raise ValueError(f"every task of the table has more ways than the model's max_ways="
                         f"{max_ways}; choose one with --ways <= {max_ways} --shots K")
    return chosen


def _device_model(folder):
    if folder is None:
        return None
    from mmtl_tf import ondevice

    # One onnxruntime thread: its default pool spins on the small graphs of one episode. On this
    # project's 2-core machine, with another job on one core, device_accuracies took 14-15 ms
    # per 5-way 1-shot episode on one thread and 93-156 ms with the default pool (2 Dec).
    return ondevice.load(folder, threads=1)


def _setting_sampler(config: ExperimentConfig, setting: Setting, part: str):
    """``() -> the EpisodeSampler`` of a table row: its classes load when the row is scored."""
    data = config.replace(data={"ways": setting.ways, "shots": setting.shots,
                                "queries": setting.queries,
                                "within_alphabet": setting.within_alphabet})
    return lambda: episode_sampler(data, part)


def _family_tasks(model: Model, settings, queries, part: str) -> tuple[list, dict]:
    """A multi-family run's rows: (its own Setting, FamilyConfig, ``() -> EpisodeSampler`` of
    its held-out ``part`` classes) per family, and {family name: why it is not scored}."""
    d = model.config.data
    if settings:
        raise ValueError(f"{model.config.name} meta-trained on task families, each scored in its "
                         "own setting on its own held-out classes; drop --ways/--shots/"
                         "--within-alphabet (--queries still applies)")
    samplers, not_scored = held_out_samplers(
        [dataclasses.replace(f, queries=queries or f.queries) for f in d.families], part,
        d.image_size, d.ink_as_one, d.data_dir, d.source_dir)
    tasks = [(Setting(f.ways, f.shots, queries or f.queries, f.within_alphabet), f,
              lambda s=samplers[f.name]: s) for f in d.families if f.name in samplers]
    if not tasks:
        raise ValueError(f"no family of {model.config.name} has {part} classes enough for its "
                         f"ways: {'; '.join(not_scored.values())}")
    return tasks, not_scored


def _evaluate_setting(model: Model, setting: Setting, part: str, out: Path, episodes: int,
                      seed: int, steps: int, curve_steps: int, device, sampler,
                      family=None) -> tuple[dict, object]:
    """One row of the report and its fixed episodes (of ``sampler()``; a task family's row is
    named after ``family``): accuracy and loss after ``steps`` steps with their 95% CI, the
    curve from 0 to ``curve_steps`` steps (one adaptation per episode) and the device
    runtime's score of the same episodes."""
    clock = time.perf_counter()
    tag = setting.tag if family is None else f"{family.name}_{setting.tag}"
    file = out / "episodes" / f"{part}_{tag}_seed{seed}_n{episodes}.npz"
    fixed = fixed_episodes(file, sampler(), seed, episodes)
    curve = accuracy_curve(model.learner, fixed, curve_steps)
    accuracy, loss = curve["accuracy"], curve["loss"]
    name = setting.name if family is None else f"{family.name} ({setting.name})"
    row = {"setting": name, **setting._asdict(), "episodes": len(accuracy),
           "inner_steps": steps, "batch_norm": batch_norm_mode(model.learner.config.transductive),
           "episode_file": str(file.relative_to(out))}
    row["accuracy"], row["accuracy_ci95"] = mean_and_ci95(accuracy[:, steps])
    row["loss"], row["loss_ci95"] = mean_and_ci95(loss[:, steps])
    means = [mean_and_ci95(accuracy[:, k]) for k in range(curve_steps + 1)]
    row["curve"] = {"steps": list(range(curve_steps + 1)), "accuracy": [m for m, _ in means],
                    "accuracy_ci95": [c for _, c in means]}
    if family is not None:
        row.update(family=family.name, source=family.source)
    row["seconds"] = round(time.perf_counter() - clock, 1)
    if device is not None:
        row["device"] = _device_score(device, fixed, setting, steps, accuracy[:, steps])
    return row, fixed


def _device_score(device, fixed, setting: Setting, steps: int, tensorflow) -> dict:
    """The export's accuracy through the device runtime, and how far it is from TensorFlow's
    per-episode accuracies ``tensorflow`` on the same episodes."""
    if setting.ways > device.max_ways or setting.shots > device.max_shots:
        return {"skipped": f"the export takes at most {device.max_ways} ways and "
                           f"{device.max_shots} shots"}
    clock = time.perf_counter()
    on_device = device_accuracies(device, fixed, steps)
    mean, ci = mean_and_ci95(on_device)
    return {"accuracy": mean, "accuracy_ci95": ci, "inner_steps": steps,
            "seconds": round(time.perf_counter() - clock, 1),
            "episodes_differing": int(np.sum(on_device != tensorflow)),
            "largest_episode_difference": float(np.abs(on_device - tensorflow).max())}
