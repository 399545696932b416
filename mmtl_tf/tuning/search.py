"""search(...): a hyperparameter search with KerasTuner over a declared space of the
configuration, each trial a short meta-training run (``training.train``) scored on fixed
episodes of the validation alphabets only; what ``pipelines/tune.py`` calls.

The work folder holds ``search.json`` (the search's setup; a rerun with another is refused),
``search/`` (KerasTuner's oracle and one ``trial_<id>/`` per trial: its ``trial.json`` and the
training run folder ``run/``), and the results of ``tuning.report``. Rerunning continues the
search: finished trials are kept, the trial in flight starts again from its last checkpoint.
Distributed (KerasTuner's ``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP`` and
``KERASTUNER_ORACLE_PORT``): the chief holds the oracle and writes the results, the workers run
trials.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import keras
import keras_tuner as kt
from keras_tuner.src import config as kt_config

from mmtl_tf.config import ExperimentConfig
from mmtl_tf.run_callbacks import NonFiniteLossError, TrainingInterrupted
from mmtl_tf.training import (config_differences, has_validation_part, protocol_of, train,
                              write_json)
from mmtl_tf.tuning import report
from mmtl_tf.tuning import space as sp

ALGORITHMS = ("hyperband", "bayesian", "random")
PROJECT, SETUP = "search", "search.json"
# Hyperband's budgets, in shares of --steps-per-trial: 1/9, 1/3 and all of it.
HYPERBAND_MAX_EPOCHS, HYPERBAND_FACTOR = 9, 3


class _SearchStopped(kt.errors.FatalError):
    """An error that is not the trial's (a signal, a full disk, a bug): it ends the search and
    ``search`` re-raises its cause; the trial stays in flight and a rerun starts it again."""


def role() -> str:
    """"single", or in KerasTuner's distributed mode "chief" (a tuner id containing "chief",
    KerasTuner's rule) or "worker"."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


def target_setting(config: ExperimentConfig) -> str:
    return f"{config.data.ways}w{config.data.shots}s"


def trial_config(base: ExperimentConfig, values: dict, steps: int) -> ExperimentConfig:
    """The trial's configuration: ``base`` with the trial's values, shortened to ``steps``
    meta-steps (the fields counted in steps scaled alike), validated once, at its end, on its
    own setting and on the base's setting (the score) if they differ."""
    config = sp.with_values(base, values)
    t, m, share = config.train, config.meta, steps / base.train.steps
    own, target = target_setting(config), target_setting(base)
    return config.replace(
        train={"steps": steps, "log_every": min(t.log_every, steps), "eval_every": steps,
               "checkpoint_every": min(t.checkpoint_every, steps), "early_stopping_patience": 0,
               "warmup_steps": min(round(t.warmup_steps * share), steps - 1),
               "also_validate": () if own == target else (target,)},
        meta={"first_order_until": round(m.first_order_until * share),
              "multi_step_anneal": max(1, round(m.multi_step_anneal * share))})


def trial_score(config: ExperimentConfig, metrics: dict, target: str) -> tuple[float, float]:
    """(accuracy, 95% CI half-width) of a trial's final validation on ``target``; with task
    families, the alpha-weighted mean over the families (what chooses a run's best state)."""
    if config.data.families:
        return metrics["weighted_accuracy"], metrics["weighted_accuracy_ci95"]
    if target in config.train.also_validate:
        return metrics["settings"][target], metrics["settings_ci95"][target]
    return metrics["accuracy"], metrics["accuracy_ci95"]


class _Tuner(kt.engine.base_tuner.BaseTuner):
    """Runs a trial as a training run in ``<trial folder>/run`` and reports its score."""

    def __init__(self, oracle, base: ExperimentConfig, steps: int, directory, overwrite, log):
        self.base, self.steps, self.log = base, steps, log
        super().__init__(oracle, directory=str(directory), project_name=PROJECT,
                         overwrite=overwrite)

    def run_trial(self, trial, *args, **kwargs):
        values = trial.hyperparameters.values
        steps = self.steps
        if "tuner/epochs" in values:  # Hyperband's budget; a promoted trial trains from scratch
            steps = max(1, round(steps * values["tuner/epochs"] / HYPERBAND_MAX_EPOCHS))
        shown = ", ".join(f"{n}={report.short(v)}" for n, v in values.items() if "/" not in n)
        self.log(f"trial {trial.trial_id} ({self.tuner_id}): {shown}; {steps} meta-steps")
        keras.utils.clear_session()  # the previous trial's traced functions
        folder, start = Path(self.get_trial_dir(trial.trial_id)), time.monotonic()
        try:
            config = trial_config(self.base, values, steps)
            metrics = train(config, folder / "run", verbose=0)
        except (NonFiniteLossError, ValueError) as err:  # diverged, or a refused combination
            reason = f"{'diverged' if isinstance(err, NonFiniteLossError) else 'refused'}: {err}"
            # KerasTuner's gRPC messages do not carry a trial's message: the chief reads it here
            report.write_reason(folder, reason)
            raise kt.errors.FailedTrialError(reason) from None
        except Exception as err:  # noqa: BLE001 -- re-raised by search()
            raise _SearchStopped(str(err)) from err
        score, ci = trial_score(config, metrics, target_setting(self.base))
        return {report.OBJECTIVE: score, report.OBJECTIVE + "_ci95": ci, "steps": steps,
                "seconds": time.monotonic() - start}

    def save(self):  # BaseTuner.save, with atomic writes
        if role() != "worker":
            self.oracle.save()
        write_json(Path(self._get_tuner_fname()), self.get_state())


class _Records:
    """What the three oracles do here beyond KerasTuner's: state files written atomically (a
    kill leaves the previous oracle.json or trial.json, never a torn one), one line per ended
    trial. Overrides KerasTuner 1.4's Oracle.save and _save_trial (the version is pinned)."""

    log = print

    def save(self):
        write_json(Path(self._get_oracle_fname()), self.get_state())

    def _save_trial(self, trial):
        write_json(Path(self._get_trial_dir(trial.trial_id)) / "trial.json", trial.get_state())

    def end_trial(self, trial):
        super().end_trial(trial)
        self.log(report.trial_line(self.trials[trial.trial_id], self._get_trial_dir(trial.trial_id)))


def _oracle(algorithm: str, trials: int, seed: int, hp, log):
    common = dict(objective=kt.Objective(report.OBJECTIVE, "max"), seed=seed, hyperparameters=hp,
                  allow_new_entries=False, max_consecutive_failed_trials=trials + 1)
    if algorithm == "hyperband":
        kind, extra = kt.oracles.HyperbandOracle, dict(max_epochs=HYPERBAND_MAX_EPOCHS,
                                                        factor=HYPERBAND_FACTOR)
    else:
        kind = {"bayesian": kt.oracles.BayesianOptimizationOracle,
                "random": kt.oracles.RandomSearchOracle}[algorithm]
        extra = dict(max_trials=trials)
    oracle = type(kind.__name__, (_Records, kind), {"log": staticmethod(log)})(**common, **extra)
    oracle.max_trials = trials  # Hyperband stops at --trials too
    return oracle


def check_searchable(base: ExperimentConfig) -> None:
    """Refuses a configuration a search cannot score: no validation part, or not classification."""
    if base.data.family != "omniglot":
        raise ValueError(f"{base.name}: a search scores validation accuracy of Omniglot episodes; "
                         f"data.family={base.data.family!r} has no accuracy to score")
    if not has_validation_part(base):
        raise ValueError(f"{base.name} with data.protocol={base.data.protocol!r} has no validation "
                         "part, and a search scores validation alphabets only (never test "
                         "characters); use data.protocol='background'")


def _setup(base, space, algorithm, steps_per_trial, seed) -> dict:
    t, target = base.train, target_setting(base)
    ways, shots = base.data.ways, base.data.shots
    target_name, scored_on = f"{ways}-way {shots}-shot", (
        f"{t.eval_episodes} fixed {ways}-way {shots}-shot episodes of the validation "
        f"alphabets (seed {t.eval_seed}, {base.data.queries} queries per class); the "
        "evaluation characters are never read")
    if base.data.families:
        target_name = "alpha-weighted family"
        scored_on = (f"{t.eval_episodes} fixed episodes of each task family in its own setting, "
                     f"on its held-out validation classes (seed {t.eval_seed}), the score being "
                     "the alpha-weighted mean of the families' accuracies (CI in quadrature); "
                     "no family's test classes are read")
    return json.loads(json.dumps({
        "preset": base.name, "config": base.to_dict(), "space": sp.describe(space),
        "algorithm": algorithm, "steps_per_trial": steps_per_trial, "seed": seed,
        "target": target, "target_name": target_name, "protocol": protocol_of(base),
        "scored_on": scored_on}))


def _check_setup(workdir: Path, setup: dict, overwrite: bool) -> None:
    """Refuses a work folder holding a search of another setup, naming what differs; clears a
    search's files with ``overwrite``; writes search.json."""
    stored = workdir / SETUP
    if overwrite and role() != "worker":
        for name in (SETUP, report.BEST, report.TABLE_MD, report.TABLE_CSV, report.FIGURE):
            (workdir / name).unlink(missing_ok=True)
        shutil.rmtree(workdir / PROJECT, ignore_errors=True)
    elif stored.is_file():
        differ = config_differences(json.loads(stored.read_text()), setup)
        if differ:
            raise ValueError(f"{workdir} holds a search of another setup (differs in "
                             f"{', '.join(differ)}); use another --workdir, or --force to start over")
    write_json(stored, setup)


def search(base: ExperimentConfig, space: dict, workdir, algorithm: str = "bayesian",
           trials: int = 20, steps_per_trial: int = 200, seed: int = 1, overwrite: bool = False,
           log=print) -> dict | None:
    """Runs or resumes the search of ``space`` (``tuning.space.resolve``) around ``base`` in
    ``workdir``: at most ``trials`` trials of ``steps_per_trial`` meta-steps, chosen by
    ``algorithm`` (seeded by ``seed``). Returns the summary (best row, trial count, files
    written), or None on a distributed worker (the chief writes the results)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is unknown; choose one of {ALGORITHMS}")
    if trials < 1 or steps_per_trial < 1:
        raise ValueError(f"trials={trials} and steps_per_trial={steps_per_trial} must be >= 1")
    check_searchable(base)
    workdir = Path(workdir)
    setup = _setup(base, space, algorithm, steps_per_trial, seed)
    _check_setup(workdir, setup, overwrite)
    hp = kt.HyperParameters()
    sp.declare(space, hp, base)
    oracle = _oracle(algorithm, trials, seed, hp, log)
    # only the chief (or a lone tuner) clears a search: a worker's KerasTuner would delete it too
    tuner = _Tuner(oracle, base, steps_per_trial, workdir, overwrite and role() != "worker", log)
    if role() != "worker" and oracle.trials:
        ended, flight = oracle.end_order, sorted(set(oracle.trials) - set(oracle.end_order))
        log(f"resuming the search in {workdir}: {len(ended)} of {trials} trials ended"
            + (f"; trial {', '.join(flight)} was in flight and starts again from its last "
               "checkpoint" if flight else ""))
    # KerasTuner 1.4 prints a failed trial's traceback while its (internal) DEBUG flag is on,
    # as it is by default; here its reason is one line, printed by the oracle and kept.
    debug, kt_config.DEBUG = kt_config.DEBUG, False
    try:
        tuner.search(verbose=0)
    except _SearchStopped as stop:
        raise stop.__cause__  # noqa: B904 -- the trial's own error, with its traceback
    except KeyboardInterrupt:
        raise TrainingInterrupted("SIGINT: search stopped; rerun the same command to resume", 2) from None
    finally:
        kt_config.DEBUG = debug
    if role() == "worker":
        log(f"worker {tuner.tuner_id}: no trial left; the chief writes the results")
        return None
    return report.write_results(list(oracle.trials.values()), workdir / PROJECT, workdir, base,
                                space, setup)
