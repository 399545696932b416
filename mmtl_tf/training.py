"""train(config, workdir): what pipelines/train.py and the tests both call.

A run folder holds ``config.json`` (the resolved configuration), ``checkpoints/`` (the last two
periodic states and the best by validation, see ``mmtl_tf.checkpoints``), ``history.csv`` (the
meta-metrics of each logging period), ``tensorboard/`` (the same scalars), ``curves.png`` and
``metrics.json`` (the validation report of the end of training, with its protocol: the test
characters are scored only by ``runs.evaluate_run``, never during training). Rerunning the same
command on the folder resumes the run exactly where its last checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import keras
import tensorflow as tf

from mmtl_tf import checkpoints
from mmtl_tf.config import ExperimentConfig, parse_setting
from mmtl_tf.data.episode_files import draw_episodes
from mmtl_tf.data.family_sources import held_out_samplers
from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset
from mmtl_tf.data.sinusoid import SinusoidSampler
from mmtl_tf.evaluation import evaluate_episodes
from mmtl_tf.files import atomic_write
from mmtl_tf.meta.learner import NONFINITE_MARKER, MetaLearner
from mmtl_tf.models.conv4 import conv4_encoder, mlp_encoder
from mmtl_tf.preprocessing import Preprocessing
from mmtl_tf.run_callbacks import (CURVES, HISTORY, TENSORBOARD, MetricsLog, NonFiniteLossError,
                                   RunFolder, StopSignals, TrainingInterrupted)

RUN_FILES = ("config.json", "metrics.json", HISTORY, CURVES, checkpoints.FOLDER, TENSORBOARD)
WHERE_DATA_IS = ("data_dir", "source_dir")  # where data is found does not change a run


def build_learner(config: ExperimentConfig) -> MetaLearner:
    """The MetaLearner of a config, weights freshly initialised (deterministic per data.seed)."""
    keras.utils.set_random_seed(config.data.seed)
    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy(config.train.mixed_precision)
    if config.model.backbone == "conv4":
        encoder = conv4_encoder(config.data.image_size, 1, config.model.filters, config.model.downsample)
    elif config.model.backbone == "mlp":
        encoder = mlp_encoder(1, config.model.hidden)
    else:
        raise ValueError(f"backbone={config.model.backbone!r} is not 'conv4' or 'mlp'")
    task = "regression" if config.data.family == "sinusoid" else "classification"
    learner = MetaLearner(encoder, config.meta, task=task,
                          families=tuple(f.name for f in config.data.families))
    keras.mixed_precision.set_global_policy("float32")
    return learner


PARTS = ("train", "validation", "test")


def episode_sampler(config: ExperimentConfig, part: str):
    """The episode sampler of one part of a config's protocol: "train" (meta-training),
    "validation" (held-out training alphabets: every choice is made on these) or "test" (the
    evaluation characters, for the final score only). Only the part asked for is loaded."""
    if part not in PARTS:
        raise ValueError(f"part={part!r} is unknown; choose one of {PARTS}")
    d = config.data
    if d.families:
        return _family_sampler(config, part)
    if d.family == "sinusoid":  # tasks are generated: the parts differ by their seeds only
        return SinusoidSampler(d.shots, d.queries)
    from mmtl_tf.data.splits import hold_out_validation, omniglot_split

    prep = Preprocessing(d.image_size, d.ink_as_one)
    if d.train_split or d.eval_split:
        from mmtl_tf.data.omniglot import load_omniglot_classes

        load = lambda split: load_omniglot_classes(split, prep, d.data_dir, d.source_dir)  # noqa: E731
        classes = (load(d.eval_split or "test") if part == "test" else
                   hold_out_validation(load(d.train_split or "train"), part))
        rotations = bool(d.rotations) and part == "train"
    else:
        classes, rotations = omniglot_split(d.protocol, part, prep, d.data_dir, d.source_dir)
        if part == "train" and d.rotations is not None:  # scored parts follow the protocol
            rotations = d.rotations
    return EpisodeSampler(classes, d.ways, d.shots, d.queries, d.within_alphabet, rotations,
                          d.jitter if part == "train" else 0.0)


def _family_sampler(config: ExperimentConfig, part: str, first=None):
    """Meta-training: a FamilyMix of every family; validation and test: the first family's
    (``first``, e.g. another setting of it) held-out classes. Every family is loaded and
    checked here, before any training step."""
    from mmtl_tf.data.families import FamilyMix
    from mmtl_tf.data.family_sources import family_sampler

    d = config.data
    load = lambda family: family_sampler(family, part, d.image_size, d.ink_as_one,  # noqa: E731
                                         d.data_dir, d.source_dir)
    if part != "train":
        return load(first or d.families[0])
    return FamilyMix([load(f) for f in d.families], d.family_weights, d.family_mix)


def monitor_of(config: ExperimentConfig) -> str:
    """The validation metric that chooses a run's best state: query accuracy (highest) for
    classification, query mean squared error (lowest) for the sinusoid's regression, and for
    task families the alpha-weighted mean of the validated families' accuracies (highest)."""
    if config.data.families:
        return "weighted_accuracy"
    return "loss" if config.data.family == "sinusoid" else "accuracy"


def protocol_of(config: ExperimentConfig) -> str:
    """The sentence stated next to every metric: what was meta-trained on, what was tested on."""
    d = config.data
    if d.families:
        mix = "; ".join(f"{f.name}: {f.source} {f.ways}-way {f.shots}-shot, alpha {a:.3g}"
                        for f, a in zip(d.families, d.family_weights))
        return (f"meta-multi-task ({d.family_mix} mix) over {mix}; each family's validation "
                "and test classes held out of its training classes")
    if d.family == "sinusoid":
        return "sinusoid regression, amplitude 0.1-5, phase 0-pi, x in [-5, 5]"
    if d.train_split or d.eval_split:
        return (f"meta-trained on Omniglot {d.train_split or 'train'} characters minus held-out "
                f"validation alphabets, tested on {d.eval_split or 'test'} characters "
                "(quick-run splits)")
    return {"background": "meta-trained on Omniglot background characters (25 alphabets, 5 more "
                          "held out for validation); tested on the 659 evaluation characters "
                          "(20 unseen alphabets)",
            "vinyals": "Vinyals random split: 1200 characters x 4 rotations for meta-training, "
                       "423 x 4 for testing (only for comparison with published MAML numbers)"}[d.protocol]


def scored_on(config: ExperimentConfig, part: str) -> str:
    """What a score of ``part`` was measured on, stated beside it."""
    if config.data.family == "sinusoid":
        return f"{part} tasks (sinusoids drawn from their own seed)"
    if config.data.families and part == "train":
        return "each family's meta-training classes"
    if config.data.families:
        held = ("Omniglot sources: the evaluation characters" if part == "test" else
                "Omniglot sources: the validation alphabets") + (
            "; TFDS and folder sources: a fixed 20% of their classes")
        if part == "validation":
            return (f"validation classes of family {config.data.families[0].name!r} "
                    f"('accuracy'); every family's own under 'families', whose alpha-weighted "
                    f"mean ('weighted_accuracy') chooses the best state ({held})")
        return f"each family's {part} classes, held out of its training classes ({held})"
    return {"validation": "validation alphabets (held out of the training characters; used for "
                          "every choice)",
            "test": "test characters (final score only; no choice is made on them)",
            "train": "meta-training characters"}[part]


def make_strategy(name: str | None):
    """None/"default", "mirrored" (all local devices) or "multiworker" (TF_CONFIG's cluster)."""
    if name in (None, "default"):
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy={name!r} is not one of 'default', 'mirrored', 'multiworker'")


def train(config: ExperimentConfig, workdir, overwrite: bool = False, strategy=None,
          verbose: int | None = None) -> dict:
    """Meta-trains with fit(), validating and checkpointing as it goes; resumes a run folder of
    the same configuration where its last checkpoint left it. Returns the final metrics.

    ``overwrite`` starts over in a folder that holds a run; ``strategy``: a tf.distribute
    strategy, the meta-batch split across its replicas; ``verbose``: Keras' (None: a progress
    bar on a terminal, one line per period otherwise). Raises TrainingInterrupted after SIGINT
    or SIGTERM (a checkpoint was written) and NonFiniteLossError on a diverging run.
    """
    workdir = Path(workdir)
    _prepare(config, workdir, overwrite)
    t = config.train
    train_sampler = episode_sampler(config, "train")
    validation = _validation_episodes(config)
    also = {s: _validation_episodes(config, s) for s in t.also_validate} if validation else {}
    families, not_validated = _family_validation(config, validation)
    weights = selection_weights(config, families)
    strategy = strategy or tf.distribute.get_strategy()
    if config.data.families and strategy.num_replicas_in_sync > 1:
        # A task's weight is its share of the whole meta-batch: split across replicas, the
        # per-replica sums would need a global normalisation not written yet.
        raise ValueError(f"task families train on one replica for now; this strategy has "
                         f"{strategy.num_replicas_in_sync}: use --strategy default")
    with strategy.scope():
        learner = build_learner(config)
        learner.compile(optimizer=_optimizer(config), jit_compile=t.jit_compile)
    step, state = 0, {}
    if (latest := checkpoints.latest(workdir)) is not None:
        record = checkpoints.restore(learner, latest)
        step, _ = record.pop("step"), record.pop("config", None)
        state = record
        if step >= t.steps and (workdir / "metrics.json").is_file():
            print(f"{workdir} holds a finished run of {t.steps} meta-steps; nothing to do")
            return json.loads((workdir / "metrics.json").read_text())
        print(f"resuming {workdir} at meta-step {step} of {t.steps} ({latest.name})")
    signals = StopSignals()
    run = RunFolder(workdir, t.steps, t.checkpoint_every, t.eval_every if validation else 0,
                    t.early_stopping_patience,
                    lambda: _validate(learner, validation, also, families, weights), signals,
                    config.meta.inner_lr, state,
                    prepare=lambda: calibrate_batch_norm(learner, train_sampler, config.data.seed),
                    config=config.to_dict(), monitor=monitor_of(config))
    if step % t.log_every:
        run.period_sums = [v.numpy() for v in learner.metrics_variables]
    log = MetricsLog(workdir, run, resumed_step=step)
    run.on_checkpoint = log.write_curves
    verbose = (1 if sys.stdout.isatty() else 2) if verbose is None else verbose
    with signals:
        try:
            for start, period, periods in _periods(step, t.steps, t.log_every):
                dataset = episode_dataset(train_sampler, config.data.seed,
                                          meta_batch_size=t.meta_batch_size, start=start)
                learner.fit(dataset, steps_per_epoch=period, epochs=periods, verbose=verbose,
                            shuffle=False, callbacks=[run, log])
                if run.stopped:
                    break
        except tf.errors.InvalidArgumentError as err:
            if NONFINITE_MARKER in str(err):  # tf.debugging.Assert's "[a] [b] [c]" as "a b c"
                words = str(err).split(NONFINITE_MARKER)[-1].split("\n")[0].split("] [")
                raise NonFiniteLossError(" ".join(words).strip(" .[]").replace(" )", ")") + " -- last "
                                         f"good checkpoint kept in {checkpoints.folder(workdir)}") from None
            raise
    step = int(learner.optimizer.iterations)
    log.write_curves()  # with the last period's row, which follows the last checkpoint
    if signals.received is not None:
        name = {2: "SIGINT", 15: "SIGTERM"}.get(signals.received, f"signal {signals.received}")
        raise TrainingInterrupted(f"{name}: stopped after meta-step {step} of {t.steps}; "
                                  f"checkpoint written in {checkpoints.folder(workdir)}; rerun "
                                  "the same command to resume", signals.received)
    return _final_metrics(config, workdir, run, step, not_validated)


def _prepare(config: ExperimentConfig, workdir: Path, overwrite: bool) -> None:
    """Refuses a folder holding a run of another configuration (naming the fields), clears a
    run's files with ``overwrite``, and writes config.json."""
    stored = workdir / "config.json"
    if overwrite:
        for name in RUN_FILES:
            target = workdir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    elif stored.is_file():
        differ = config_differences(json.loads(stored.read_text()), json.loads(config.to_json()))
        if differ:
            raise ValueError(f"{workdir} holds a run of another configuration (differs in "
                             f"{', '.join(differ)}); use another --workdir, or --force to start over")
    # A checkpoint names the configuration that wrote it: checked even without config.json
    # (deleted, or the folder cleared while a stopping run wrote its last checkpoint).
    if not overwrite and (latest := checkpoints.latest(workdir)) is not None:
        written_by = checkpoints.read_record(latest).get("config")
        differ = written_by and config_differences(written_by, json.loads(config.to_json()))
        if differ:
            raise ValueError(f"{latest} was written by a run of another configuration (differs "
                             f"in {', '.join(differ)}); use another --workdir, or --force to "
                             "start over")
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(stored, config.to_dict())


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields in which two config dicts differ (where data is read from
    is not a difference)."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and key not in WHERE_DATA_IS:
            names.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return names


def _periods(step: int, steps: int, log_every: int):
    """(first meta-step, steps per period, periods) of the fit() calls that take a run from
    ``step`` to ``steps`` with periods ending on multiples of ``log_every``: a run resumed
    mid-period first completes that period. The last period may be shorter (RunFolder stops)."""
    if step % log_every and step < steps:
        first = min(log_every - step % log_every, steps - step)
        yield step, first, 1
        step += first
    if step < steps:
        yield step, log_every, -(-(steps - step) // log_every)


def has_validation_part(config: ExperimentConfig) -> bool:
    """Whether the config's protocol holds validation classes out of meta-training (the
    vinyals protocol has none: its published numbers choose on the test characters). Task
    families always have one: every source holds validation classes out."""
    d = config.data
    return bool(d.families) or not (d.family == "omniglot" and d.protocol == "vinyals" and not (
        d.train_split or d.eval_split))


def _validation_episodes(config: ExperimentConfig, setting: str | None = None):
    """The fixed validation episodes (of the training setting, or of ``setting`` such as
    "5w1s"), or None for a protocol without a validation part."""
    t = config.train
    if config.data.families:
        first = config.data.families[0]
        if setting is not None:
            ways, shots = parse_setting(setting)
            first = dataclasses.replace(first, ways=ways, shots=shots)
        return draw_episodes(_family_sampler(config, "validation", first), t.eval_seed,
                             t.eval_episodes)
    if not has_validation_part(config):
        return None
    if setting is not None:
        ways, shots = parse_setting(setting)
        config = config.replace(data={"ways": ways, "shots": shots})
    t = config.train
    return draw_episodes(episode_sampler(config, "validation"), t.eval_seed, t.eval_episodes)


def _family_validation(config: ExperimentConfig, validation) -> tuple[dict, dict]:
    """({family name: its fixed validation episodes}, {family name: why it has none}) of a run
    with task families ({} and {} without): the first family's are the run's own
    ``validation`` (its report's ``accuracy``), the others' are drawn like them. A family
    left out is printed once, here, before training."""
    d, t = config.data, config.train
    if not d.families or validation is None:
        return {}, {}
    samplers, missing = held_out_samplers(d.families[1:], "validation", d.image_size,
                                          d.ink_as_one, d.data_dir, d.source_dir)
    for reason in missing.values():
        print(f"note: not validated: {reason}")
    drawn = {name: draw_episodes(s, t.eval_seed, t.eval_episodes) for name, s in samplers.items()}
    return {d.families[0].name: validation, **drawn}, missing


def selection_weights(config: ExperimentConfig, families: dict) -> dict:
    """{family name: its share of the best-state score} over the validated families: alpha_k
    renormalised over them; equal shares if every validated family has alpha 0 (said once)."""
    alpha = {f.name: a for f, a in zip(config.data.families, config.data.family_weights)}
    total = sum(alpha[name] for name in families)
    if families and total == 0:
        print(f"note: the validated families {sorted(families)} all have weight 0; the best "
              "state is chosen by their unweighted mean accuracy")
        return {name: 1.0 / len(families) for name in families}
    return {name: alpha[name] / total for name in families}


def _validate(learner, validation, also: dict, families: dict | None = None,
              weights: dict | None = None) -> dict:
    """The validation report of the training setting; ``settings`` holds the accuracy of each
    ``train.also_validate`` setting (logged, never used for selection), ``settings_ci95`` the
    half-width of its 95% confidence interval; ``families`` and ``families_ci95`` the same for
    each task family's validation episodes (``_family_validation``), and ``weighted_accuracy``
    their mean under ``weights`` (``selection_weights``), which chooses a family run's best state."""
    report = evaluate_episodes(learner, validation)
    for key, sets in {"settings": also, **({"families": families} if families else {})}.items():
        scores = {s: report if e is validation else evaluate_episodes(learner, e)
                  for s, e in sets.items()}
        report[key] = {s: r["accuracy"] for s, r in scores.items()}
        report[f"{key}_ci95"] = {s: r["accuracy_ci95"] for s, r in scores.items()}
    if families:
        report["weighted_accuracy"] = sum(w * report["families"][name]
                                          for name, w in weights.items())
        # the families' episodes are drawn independently: their half-widths add in quadrature
        report["weighted_accuracy_ci95"] = float(sum(
            (w * report["families_ci95"][name]) ** 2 for name, w in weights.items()) ** 0.5)
    return report


def _final_metrics(config, workdir: Path, run: RunFolder, step: int,
                   not_validated: dict | None = None) -> dict:
    scored = config.data.families[0] if config.data.families else config.data
    metrics = {"protocol": protocol_of(config), "ways": scored.ways, "shots": scored.shots,
               "eval_seed": config.train.eval_seed, "steps": step}
    if run.validated:
        last = max(run.validated)
        metrics.update(part="validation", scored_on=scored_on(config, "validation"),
                       validated_at=last, best_step=run.state["best_step"],
                       **{run.best_key: run.state[run.best_key]}, **run.validated[last])
        if "pre_accuracy" in metrics:  # what the inner loop adds over the starting head
            metrics["adaptation_gain"] = metrics["accuracy"] - metrics["pre_accuracy"]
            if abs(metrics["adaptation_gain"]) < NEGLIGIBLE_GAIN:
                metrics["note"] = adaptation_note(metrics, config.meta)
                print(f"note: {metrics['note']}")
        if not_validated:
            metrics["families_not_validated"] = not_validated
    elif run.state.get("best_step") is None:
        metrics["validation"] = ("none: the vinyals protocol has no validation part; score the "
                                 "test characters with pipelines/evaluate.py")
    write_json(workdir / "metrics.json", metrics)
    return metrics


NEGLIGIBLE_GAIN = 0.002  # validation accuracy, as a fraction


def adaptation_note(metrics: dict, meta) -> str:
    """The sentence a run ends with when adaptation does not change its validation accuracy."""
    return (f"adaptation changed validation accuracy by {100 * metrics['adaptation_gain']:+.2f} "
            f"points ({metrics['pre_accuracy']:.2%} at the starting {meta.head_init} head, "
            f"{metrics['accuracy']:.2%} after {metrics['inner_steps']} step(s)): at this setting "
            "the model classifies with its starting head and the inner loop does not matter "
            "(pipelines/diagnose.py shows each step)")


def calibrate_batch_norm(learner, sampler, seed: int, episodes: int = 64) -> None:
    """Sets the encoder's batch-norm statistics to those of many meta-training images.

    Meta-training normalises every batch by its own statistics and never touches the stored
    ones; this gives the meta-initialisation sensible inference-mode statistics, used when it
    predicts without a support set (``learner(images)``, serving_default, meta_init.onnx).
    """
    if not learner.encoder.non_trainable_variables or not hasattr(sampler, "ways"):
        return
    samplers = getattr(sampler, "samplers", [sampler])  # a FamilyMix: images of every family
    images = []
    for one in samplers:
        batch = one.sample(tf.constant([seed, -1], tf.int64), -(-episodes // len(samplers)))
        images.append(tf.reshape(batch.query_x, [-1, *batch.query_x.shape[2:]]))
    images = tf.concat(images, 0)
    _, state = learner.loop.features([tf.convert_to_tensor(p) for p in learner.encoder.trainable_variables],
                                     images)
    for variable, value in zip(learner.encoder.non_trainable_variables, state):
        variable.assign(value)


def load_learner(workdir, checkpoint: str = "best") -> tuple[MetaLearner, ExperimentConfig]:
    """Rebuilds the learner of a run folder with the weights of its "best" (validation) or
    "latest" checkpoint."""
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file() or not checkpoints.folder(workdir).is_dir():
        raise FileNotFoundError(f"{workdir} is not a training run: it needs config.json and "
                                f"{checkpoints.FOLDER}/; run pipelines/train.py --workdir "
                                f"{workdir} first")
    config = ExperimentConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    learner = build_learner(config)
    checkpoints.restore(learner, checkpoints.chosen(workdir, checkpoint), groups=("model",))
    return learner, config


def meta_lr_schedule(t):
    """The outer learning rate of TrainConfig ``t``: a constant, or a cosine decay to
    ``meta_lr * lr_floor`` at the last step after ``warmup_steps`` of linear warm-up from 0."""
    if t.lr_schedule == "constant":
        return t.meta_lr
    return keras.optimizers.schedules.CosineDecay(
        0.0 if t.warmup_steps else t.meta_lr, t.steps - t.warmup_steps, alpha=t.lr_floor,
        warmup_target=t.meta_lr if t.warmup_steps else None, warmup_steps=t.warmup_steps)


def _optimizer(config):
    rate = meta_lr_schedule(config.train)
    if config.meta.reptile:  # Reptile's formula: theta += epsilon * (phi - theta)
        return keras.optimizers.SGD(rate)
    return keras.optimizers.Adam(rate)


def write_json(path: Path, value) -> None:
    """Writes JSON atomically: a temporary file in the same folder, then a rename."""
    text = json.dumps(value, indent=2, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))
