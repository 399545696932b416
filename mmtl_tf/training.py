"""train(config, workdir): what pipelines/train.py and the tests both call.

A run folder holds ``config.json`` (the resolved configuration), ``checkpoint.weights.h5``
(the meta-learned weights, written atomically), ``history.json`` (metrics per logging period) and
``metrics.json`` (the final score on the validation alphabets, with its protocol: the test
characters are scored only by ``runs.evaluate_run``, never during training).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mmtl_tf.config import ExperimentConfig
from mmtl_tf.data.episode_files import draw_episodes
from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset
from mmtl_tf.data.sinusoid import SinusoidSampler
from mmtl_tf.evaluation import evaluate_episodes
from mmtl_tf.files import atomic_save, atomic_write
from mmtl_tf.meta.learner import NONFINITE_MARKER, MetaLearner
from mmtl_tf.models.conv4 import conv4_encoder, mlp_encoder
from mmtl_tf.preprocessing import Preprocessing

CHECKPOINT = "checkpoint.weights.h5"


class NonFiniteLossError(FloatingPointError):
    """Meta-training produced a non-finite loss; no checkpoint was written for that step."""


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
    learner = MetaLearner(encoder, config.meta, task=task)
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
    if d.family == "sinusoid":  # tasks are generated: the parts differ by their seeds only
        return SinusoidSampler(d.shots, d.queries)
    from mmtl_tf.data.splits import hold_out_validation, omniglot_split

    prep = Preprocessing(d.image_size, d.ink_as_one)
    if d.train_split or d.eval_split:
        from mmtl_tf.data.omniglot import load_omniglot_classes

        load = lambda split: load_omniglot_classes(split, prep, d.data_dir, d.source_dir)  # noqa: E731
        classes = (load(d.eval_split or "test") if part == "test" else
                   hold_out_validation(load(d.train_split or "train"), part))
        rotations = bool(d.rotations)
    else:
        classes, rotations = omniglot_split(d.protocol, part, prep, d.data_dir, d.source_dir)
        rotations = rotations if d.rotations is None else d.rotations
    return EpisodeSampler(classes, d.ways, d.shots, d.queries, d.within_alphabet, rotations)


def protocol_of(config: ExperimentConfig) -> str:
    """The sentence stated next to every metric: what was meta-trained on, what was tested on."""
    d = config.data
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


def train(config: ExperimentConfig, workdir, overwrite: bool = False, strategy=None) -> dict:
    """Meta-trains with fit() and evaluates on fixed held-out episodes. Returns the metrics.

    ``strategy``: a tf.distribute strategy; the meta-batch is split across its replicas.
    """
    workdir = Path(workdir)
    if (workdir / CHECKPOINT).exists() and not overwrite:
        raise FileExistsError(f"{workdir} already holds a checkpoint; choose another --workdir "
                              "or pass --force to overwrite it")
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "config.json", config.to_dict())
    t = config.train
    train_sampler = episode_sampler(config, "train")
    with (strategy or tf.distribute.get_strategy()).scope():
        learner = build_learner(config)
        learner.compile(optimizer=_optimizer(config), jit_compile=t.jit_compile)
    dataset = episode_dataset(train_sampler, config.data.seed, meta_batch_size=t.meta_batch_size)
    log_every = max(1, min(t.log_every, t.steps))
    history = []
    try:  # the last logging period may be shorter: _StopAt ends fit after exactly t.steps
        learner.fit(dataset, steps_per_epoch=log_every, epochs=-(-t.steps // log_every),
                    verbose=2, shuffle=False,
                    callbacks=[_StopAt(t.steps, config.meta.inner_lr),
                               _AtomicCheckpoint(workdir / CHECKPOINT), _History(history)])
    except tf.errors.InvalidArgumentError as err:
        if NONFINITE_MARKER in str(err):
            raise NonFiniteLossError(str(err).split(NONFINITE_MARKER)[-1].split("\n")[0].strip(
                " .[]") + f" -- last good checkpoint kept in {workdir}") from None
        raise
    calibrate_batch_norm(learner, train_sampler, config.data.seed)
    save_checkpoint(learner, workdir / CHECKPOINT)
    write_json(workdir / "history.json", history)
    metrics = {"protocol": protocol_of(config), "ways": config.data.ways,
               "shots": config.data.shots, "eval_seed": t.eval_seed}
    if config.data.protocol == "vinyals" and config.data.family == "omniglot":
        metrics["validation"] = ("none: the vinyals protocol has no validation part; score the "
                                 "test characters with pipelines/evaluate.py")
    else:  # validation, never the test characters: runs are compared and chosen on this
        episodes = draw_episodes(episode_sampler(config, "validation"), t.eval_seed,
                                 t.eval_episodes)
        metrics.update(part="validation", scored_on=scored_on(config, "validation"),
                       **evaluate_episodes(learner, episodes))
    write_json(workdir / "metrics.json", metrics)
    return metrics


def calibrate_batch_norm(learner, sampler, seed: int, episodes: int = 64) -> None:
    """Sets the encoder's batch-norm statistics to those of many meta-training images.

    Meta-training normalises every batch by its own statistics and never touches the stored
    ones; this gives the meta-initialisation sensible inference-mode statistics, used when it
    predicts without a support set (``learner(images)``, serving_default, meta_init.onnx).
    """
    if not learner.encoder.non_trainable_variables or not hasattr(sampler, "ways"):
        return
    batch = sampler.sample(tf.constant([seed, -1], tf.int64), episodes)
    images = tf.reshape(batch.query_x, [-1, *batch.query_x.shape[2:]])
    _, state = learner.loop.features([tf.convert_to_tensor(p) for p in learner.encoder.trainable_variables],
                                     images)
    for variable, value in zip(learner.encoder.non_trainable_variables, state):
        variable.assign(value)


def load_learner(workdir) -> tuple[MetaLearner, ExperimentConfig]:
    """Rebuilds the learner of a run folder and loads its checkpoint."""
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file() or not (workdir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{workdir} is not a training run: it needs config.json and "
                                f"{CHECKPOINT}; run pipelines/train.py --workdir {workdir} first")
    config = ExperimentConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    learner = build_learner(config)
    try:
        learner.load_weights(workdir / CHECKPOINT)
    except ValueError as err:
        raise ValueError(f"the checkpoint in {workdir} does not match its config.json "
                         f"architecture: {err}") from err
    return learner, config


def _optimizer(config):
    if config.meta.reptile:  # Reptile's formula: theta += epsilon * (phi - theta)
        return keras.optimizers.SGD(config.train.meta_lr)
    return keras.optimizers.Adam(config.train.meta_lr)


def write_json(path: Path, value) -> None:
    """Writes JSON atomically: a temporary file in the same folder, then a rename."""
    text = json.dumps(value, indent=2, sort_keys=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(model, path: Path) -> None:
    """Saves weights atomically (``files.atomic_save``: a reader sees the old or the new file)."""
    atomic_save(path, model.save_weights)


class _StopAt(keras.callbacks.Callback):
    """Ends fit after ``steps`` meta-steps, and stops at a non-finite loss.

    The train step itself asserts a finite loss; under XLA, which drops assertions, it zeroes
    the step's gradients instead, and this is what stops training there, before the epoch's
    checkpoint is written."""

    def __init__(self, steps: int, inner_lr: float):
        super().__init__()
        self.steps, self.inner_lr = steps, inner_lr

    def on_train_batch_end(self, batch, logs=None):
        logs = {k: float(np.asarray(v).ravel()[0]) for k, v in (logs or {}).items()}
        step = int(self.model.optimizer.iterations)
        if not np.isfinite(logs.get("loss", 0.0)) or logs.get("update_dropped", 0.0) > 0:
            raise NonFiniteLossError(
                f"at meta-step {step} (running mean loss {logs.get('loss')}; non-finite loss or "
                f"gradient); inner_lr={self.inner_lr} or "
                "the meta learning rate is too large for this model: lower them. With "
                "jit_compile the step's update was zeroed; the last good checkpoint is kept.")
        if step >= self.steps:
            self.model.stop_training = True


class _AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the weights after every logging period (see save_checkpoint)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        save_checkpoint(self.model, self.path)


class _History(keras.callbacks.Callback):
    def __init__(self, rows: list):
        super().__init__()
        self.rows = rows

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations)  # the last period may be shorter
        self.rows.append({"step": step, **{k: float(v) for k, v in (logs or {}).items()
                                           if k != "update_dropped"}})
