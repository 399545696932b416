"""Experiment configuration: frozen dataclasses, one per component, composed; and presets.

A resolved config is written as ``config.json`` next to every artifact (run folder, export) and
read back with ``ExperimentConfig.from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from mmtl_tf.meta.algorithms import MetaConfig

FAMILIES = ("omniglot", "sinusoid")
SOURCE_KINDS = ("omniglot", "tfds", "folder")
OMNIGLOT_SOURCE_SPLITS = ("train", "small1", "small2")
FAMILY_MIXES = ("fixed", "proportional")
# Per-family metrics are named "<family>_loss", "<family>_accuracy": names that would collide
# with the learner's own metrics (pre_loss, support_loss) or Keras' validation prefix are refused.
RESERVED_FAMILY_NAMES = ("pre", "support", "val", "meta", "inner", "update")


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """One task family of a meta-multi-task configuration (``DataConfig.families``).

    Attributes:
      name: a short identifier ([A-Za-z][A-Za-z0-9_]*); metrics are logged as ``<name>_loss``
        and ``<name>_accuracy``.
      source: where its classes come from: ``"omniglot"`` (the background characters minus
        the validation alphabets), ``"omniglot:small1"`` (another split of the Omniglot
        builder: train, small1, small2), ``"tfds:<name>"`` (a prepared TFDS image
        classification dataset, its "train" split, classes split into train / validation /
        test parts) or ``"folder:<path>"`` (one subfolder of images per class, split likewise).
      ways, shots, queries: N, K and Q of its tasks (queries per class).
      within_alphabet: all classes of a task from one alphabet (Omniglot sources only).
      rotations: rotated images (90, 180, 270 degrees) as extra classes in meta-training.
      image_size: the side its images are decoded at (None: the model's input size); the
        pipeline then brings them to the model's input size.
      weight: alpha_k, its relative weight in the meta-loss (normalised over the families:
        alpha_k = weight_k / sum of weights); >= 0 and finite.
    """

    name: str
    source: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    within_alphabet: bool = False
    rotations: bool = False
    image_size: int | None = None
    weight: float = 1.0

    def __post_init__(self):
        where = f"family {self.name!r}"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(self.name)):
            raise ValueError(f"{where}: a family name is a letter then letters, digits or _, "
                             "e.g. name=chars")
        if self.name in RESERVED_FAMILY_NAMES:
            raise ValueError(f"{where}: the name collides with the learner's own metrics; "
                             f"avoid {RESERVED_FAMILY_NAMES}")
        kind, location = self.source_parts
        if kind not in SOURCE_KINDS:
            raise ValueError(f"{where}: source={self.source!r} is unknown; use 'omniglot', "
                             "'omniglot:<split>', 'tfds:<dataset>' or 'folder:<path>'")
        if kind == "omniglot" and location and location not in OMNIGLOT_SOURCE_SPLITS:
            raise ValueError(f"{where}: source={self.source!r} names no Omniglot training split; "
                             f"choose one of {OMNIGLOT_SOURCE_SPLITS}")
        if kind in ("tfds", "folder") and not location:
            raise ValueError(f"{where}: source={self.source!r} needs a {kind} name after "
                             f"'{kind}:', e.g. '{kind}:{'mnist' if kind == 'tfds' else '~/symbols'}'")
        for field, low in (("ways", 2), ("shots", 1), ("queries", 1)):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < low:
                raise ValueError(f"{where}: {field}={getattr(self, field)!r} must be an integer "
                                 f">= {low}")
        if self.image_size is not None and not 4 <= int(self.image_size) <= 1024:
            raise ValueError(f"{where}: image_size={self.image_size} must be between 4 and 1024")
        if self.within_alphabet and kind != "omniglot":
            raise ValueError(f"{where}: within_alphabet needs an Omniglot source (alphabets); "
                             f"{self.source!r} has none")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(
                weight) or weight < 0:
            raise ValueError(f"{where}: weight={weight!r} must be a finite number >= 0")

    @property
    def source_parts(self) -> tuple[str, str]:
        """("omniglot" | "tfds" | "folder", the split, dataset name or path; "" if none)."""
        kind, _, location = str(self.source).partition(":")
        return kind, location


def parse_family(text: str) -> FamilyConfig:
    """A FamilyConfig from ``--family`` text, comma-separated key=value pairs:
    "name=chars,source=omniglot,ways=5,shots=1,weight=1". Values are JSON or text."""
    fields = {f.name: f for f in dataclasses.fields(FamilyConfig)}
    values = {}
    for item in str(text).split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--family {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(fields)}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
        if key in ("name", "source"):
            values[key] = value  # names and paths stay text ("1", "folder:1")
    if "name" not in values:
        raise ValueError(f"--family {text!r} has no name=...; every family needs a name")
    return FamilyConfig(**values)


# The task shape of a single-family run (and its image jitter); with task families each family
# has its own shape and no jitter.
SINGLE_FAMILY_SHAPE = ("ways", "shots", "within_alphabet", "rotations", "jitter")


def single_family_defaults() -> dict:
    """{field: DataConfig's default} of SINGLE_FAMILY_SHAPE: what a run with families holds."""
    return {name: DataConfig.__dataclass_fields__[name].default for name in SINGLE_FAMILY_SHAPE}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where episodes come from.

    Attributes:
      family: "omniglot" or "sinusoid".
      protocol: Omniglot class split, "background" (ours) or "vinyals" (published MAML numbers).
      train_split / eval_split: override the protocol's Omniglot splits with TFDS splits of the
        background set ("small1", "small2"), for quick runs; None follows the protocol.
      ways, shots, queries: N, K and Q (queries per class; per task for the sinusoid).
      image_size: 28 (default) or 105 (original); ink_as_one maps ink to 1.0.
      within_alphabet: all classes of an episode from one alphabet.
      rotations: rotated characters (90, 180, 270 degrees) as extra classes of meta-training;
        None means the protocol's default (vinyals: on). Validation and test episodes always
        follow the protocol (background: never rotated), so the test stays the published one.
      jitter: strength j >= 0 of a random affine distortion of every meta-training image
        (rotation up to +-15j degrees, scale 1 +- 0.15j, shear +- 0.15j, shift +- 2j pixels;
        j = 1 is light jitter); 0 (default) leaves images as they are. Validation and test
        images are never distorted.
      seed: fixes the training episode stream (and the jitter).
      families: meta-multi-task learning: the task families meta-trained together (see
        FamilyConfig); empty (the default) trains on the single family above. With families,
        meta-training episodes come from them only; validation scores each family
        on its held-out classes and keeps the state of the best alpha-weighted mean.
      family_mix: "fixed" (default): every meta-batch holds a fixed number of tasks of each
        family (meta_batch_size split evenly) and alpha_k weights each family's mean loss;
        "proportional": each task's family is drawn with probability alpha_k, every task
        weighs the same. Both estimate sum_k alpha_k L_k; "fixed" has no sampling noise in
        the mix and gives every family a gradient at every step.
    """

    family: str = "omniglot"
    protocol: str = "background"
    train_split: str | None = None
    eval_split: str | None = None
    ways: int = 5
    shots: int = 1
    queries: int = 15
    image_size: int = 28
    ink_as_one: bool = True
    within_alphabet: bool = False
    rotations: bool | None = None
    jitter: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    source_dir: str | None = None
    families: tuple[FamilyConfig, ...] = ()
    family_mix: str = "fixed"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is unknown; choose one of {FAMILIES}")
        # config.json and --set give dicts: typed here, so every way in reads the same
        families = tuple(FamilyConfig(**f) if isinstance(f, dict) else f for f in self.families)
        object.__setattr__(self, "families", families)
        if self.family_mix not in FAMILY_MIXES:
            raise ValueError(f"data.family_mix={self.family_mix!r} is unknown; choose one of "
                             f"{FAMILY_MIXES}")
        if not (self.jitter >= 0 and math.isfinite(self.jitter)):
            raise ValueError(f"data.jitter={self.jitter!r} must be a finite number >= 0 (0: off, "
                             "1: light affine jitter)")
        if self.jitter and (families or self.family != "omniglot"):
            raise ValueError(f"data.jitter={self.jitter} distorts the images of a single Omniglot "
                             "family; task families and the sinusoid take none: drop it")
        if not families:
            return
        if self.family != "omniglot":
            raise ValueError(f"task families are image classification; data.family="
                             f"{self.family!r} takes none")
        for name, default in single_family_defaults().items():  # each family sets its own
            if getattr(self, name) != default:
                raise ValueError(f"data.{name}={getattr(self, name)!r} has no effect with task "
                                 f"families (each family sets its own {name}); drop it or set "
                                 f"data.{name}={default!r}")
        names = [f.name for f in families]
        if len(set(names)) < len(names):
            raise ValueError(f"family names must differ; got {names}")
        if not sum(f.weight for f in families) > 0:
            raise ValueError(f"the family weights {[f.weight for f in families]} are all zero; "
                             "give at least one family a positive weight")

    @property
    def family_weights(self) -> tuple[float, ...]:
        """alpha_k: the families' weights normalised to sum to 1."""
        total = float(sum(f.weight for f in self.families))
        return tuple(float(f.weight) / total for f in self.families)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The encoder: conv4 (images) or mlp (sinusoid)."""

    backbone: str = "conv4"
    filters: int = 64
    downsample: str = "stride"
    hidden: tuple[int, ...] = (40, 40)


LR_SCHEDULES = ("constant", "cosine")


def parse_setting(setting: str) -> tuple[int, int]:
    """(ways, shots) of a setting written "<N>w<K>s", e.g. "20w1s" -> (20, 1)."""
    match = re.fullmatch(r"(\d+)w(\d+)s", str(setting))
    if not match or int(match[1]) < 2 or int(match[2]) < 1:
        raise ValueError(f"setting {setting!r} is not <N>w<K>s with N >= 2 and K >= 1, e.g. '5w1s'")
    return int(match[1]), int(match[2])


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The outer loop: Adam on the meta-batch mean query loss.

    Attributes:
      steps: meta-steps of the run; log_every: steps per logging period (history row).
      checkpoint_every: steps between checkpoints (the last two are kept; one more at the end).
      eval_every: steps between validations on ``eval_episodes`` fixed episodes of the
        validation alphabets (seed ``eval_seed``); the best state is kept. 0: only at the end.
      lr_schedule: "constant" or "cosine" (decay to ``meta_lr * lr_floor`` over the run, after
        ``warmup_steps`` of linear warm-up from 0).
      early_stopping_patience: stop after this many validations without improvement (0: off).
      also_validate: more validation settings, scored beside the training one at each
        validation and logged as ``val_<setting>_accuracy`` (e.g. ("5w1s",)); selection and
        early stopping use the training setting only.
    """

    steps: int = 2000
    meta_batch_size: int = 32
    meta_lr: float = 1e-3
    log_every: int = 100
    checkpoint_every: int = 500
    eval_every: int = 500
    eval_episodes: int = 200
    eval_seed: int = 1234
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_floor: float = 0.0
    early_stopping_patience: int = 0
    jit_compile: bool = False
    mixed_precision: str | None = None  # None, "mixed_bfloat16" or "mixed_float16"
    also_validate: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("steps", "meta_batch_size", "log_every", "checkpoint_every", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "warmup_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r} is unknown; choose one of "
                             f"{LR_SCHEDULES}")
        if self.warmup_steps >= self.steps and self.lr_schedule == "cosine":
            raise ValueError(f"train.warmup_steps={self.warmup_steps} leaves no decay in "
                             f"{self.steps} steps; lower it")
        for setting in self.also_validate:
            parse_setting(setting)
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("train.early_stopping_patience needs validation during the run: "
                             "set train.eval_every")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    meta: MetaConfig = MetaConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        families = self.data.families
        for f in families:
            if f.ways > self.meta.max_ways:
                raise ValueError(f"family {f.name!r}: ways={f.ways} is more than the head's "
                                 f"meta.max_ways={self.meta.max_ways}; raise max_ways or lower ways")
        if families and self.data.family_mix == "fixed" and (
                self.train.meta_batch_size < len(families)):
            raise ValueError(f"train.meta_batch_size={self.train.meta_batch_size} cannot hold a "
                             f"task of each of the {len(families)} families; raise it or use "
                             "data.family_mix=proportional")
        if self.meta.family_weighting != "fixed" and not families:
            raise ValueError(f"meta.family_weighting={self.meta.family_weighting!r} weights task "
                             "families, and data.families is empty; declare families or drop it")
        if families and self.meta.reptile:
            raise ValueError("algorithm='reptile' does not weight tasks; task families need a "
                             "gradient-based algorithm (maml, fomaml, metasgd, mamlpp, anil)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields {unknown}; known: {sorted(names)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(name=d["name"], data=build(DataConfig, d.get("data", {})),
                   model=build(ModelConfig, d.get("model", {})),
                   meta=build(MetaConfig, d.get("meta", {})), train=build(TrainConfig, d.get("train", {})))

    @classmethod
    def from_file(cls, path) -> "ExperimentConfig":
        """The config of a JSON file (a run's config.json, a search's best_config.json);
        ValueError or FileNotFoundError naming the file if it is not one."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict) or "name" not in d:
                raise ValueError("not a configuration object with a 'name'")
            return cls.from_dict(d)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path} is not a configuration: {str(err).splitlines()[0]}") from None

    def replace(self, **sections) -> "ExperimentConfig":
        """A copy with fields of sections replaced: replace(train={"steps": 10})."""
        changes = {k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()}
        return dataclasses.replace(self, **changes)


# MAML paper section 5.1: 10-shot sinusoid regression, MLP 40-40, inner lr 0.01, meta-batch 25;
# one inner step in training, 10 at evaluation. Validation (every 500 steps, 200 tasks of seed
# 1234) keeps the state with the lowest query MSE after 10 steps.
SINUSOID = ExperimentConfig(
    "sinusoid", data=DataConfig(family="sinusoid", shots=10, queries=10),
    model=ModelConfig(backbone="mlp"),
    meta=MetaConfig(inner_steps=1, eval_inner_steps=10, inner_lr=0.01, head_init="learned"),
    train=TrainConfig(steps=5000, meta_batch_size=25, log_every=500))

PRESETS = {
    # The MAML paper's Omniglot 5-way 1-shot setting on our protocol (background characters),
    # with two product choices: a zero-initialised head (any N up to 20 at adaptation time) and
    # queries normalised with the support set's statistics, so a device can predict one image.
    # Two inner steps: at a zero head the first step moves only the head, the second the encoder.
    "omniglot-5w1s": ExperimentConfig(
        "omniglot-5w1s", meta=MetaConfig(inner_steps=2, eval_inner_steps=3, inner_lr=0.4,
                                         head_init="zero", transductive=False),
        train=TrainConfig(steps=2000, meta_batch_size=32)),
    # The flagship: way-agnostic Proto-MAML. Every task starts from the nearest-prototype
    # classifier of its support set (any N up to 40, any K); one first-order inner step adapts
    # encoder and head in training (first_order_until lies beyond the run: every meta-step is
    # first order; at 1 shot the step's gradient is ~0, so second order would add cost, not signal);
    # 40-way 1-shot training tasks with rotated characters as extra classes and light affine
    # jitter (both levers added ~3 points of 20-way validation accuracy at 1,500 steps, README);
    # queries are normalised by the support set's statistics (a device predicts one image at a
    # time). Validated on 40-way 1-shot (selection), 5-way and 20-way 1-shot episodes of the
    # held-out background alphabets. Adaptation applies 0 steps (the prototype head): at 1 shot
    # the support loss is 1e-3 or less (~5e-5 within the first 100 meta-steps), so the step
    # changes nothing, and at 5 shots steps lowered validation accuracy (its MODEL_CARD.md).
    "omniglot": ExperimentConfig(
        "omniglot", data=DataConfig(ways=40, shots=1, queries=5, rotations=True, jitter=1.0),
        meta=MetaConfig(inner_steps=1, eval_inner_steps=0, inner_lr=0.1, head_init="proto",
                        transductive=False, first_order_until=100_000, max_ways=40),
        train=TrainConfig(steps=8000, meta_batch_size=16, meta_lr=1e-3, lr_schedule="cosine",
                          warmup_steps=200, lr_floor=0.05, log_every=100, checkpoint_every=250,
                          eval_every=500, eval_episodes=300, also_validate=("5w1s", "20w1s"))),
    "omniglot-20w1s": ExperimentConfig(
        "omniglot-20w1s", data=DataConfig(ways=20, shots=1, queries=5),
        meta=MetaConfig(inner_steps=5, eval_inner_steps=5, inner_lr=0.1),
        train=TrainConfig(steps=2000, meta_batch_size=16)),
    "sinusoid": SINUSOID,
    # Its baseline of the same budget (the paper's "pretrained" model, figures 2 and 3): the
    # same network, tasks and steps, trained by plain regression on each task's 20 points (no
    # inner loop), then fine-tuned at evaluation exactly as the meta-model adapts (10 steps of
    # SGD at 0.01), and validated the same way.
    "sinusoid-pretrained": dataclasses.replace(SINUSOID.replace(meta={"algorithm": "pretrain"}),
                                               name="sinusoid-pretrained"),
    # Meta-multi-task learning (issue #14), offline on the shared Omniglot zips: one Proto-MAML
    # model over three task families of the background characters, each validated on the
    # held-out background alphabets and tested on the evaluation characters: 5-way 1-shot
    # characters, 20-way 1-shot within one alphabet (similar characters), and 5-way 5-shot with
    # rotated characters as extra training classes drawn at 20x20 pixels (brought to the
    # model's 28x28 by the pipeline: a coarser rendering of the same symbols). A fixed mix, two
    # tasks of each family per meta-batch, alpha equal. First order throughout, to keep the
    # default run modest (2,000 meta-steps).
    "multitask": ExperimentConfig(
        "multitask", data=DataConfig(families=(
            FamilyConfig("chars", "omniglot", ways=5, shots=1, queries=15),
            FamilyConfig("alphabet", "omniglot", ways=20, shots=1, queries=5,
                         within_alphabet=True),
            FamilyConfig("rotated", "omniglot", ways=5, shots=5, queries=10, rotations=True,
                         image_size=20))),
        meta=MetaConfig(algorithm="fomaml", inner_steps=1, eval_inner_steps=1, inner_lr=0.1,
                        head_init="proto", transductive=False),
        train=TrainConfig(steps=2000, meta_batch_size=6, meta_lr=1e-3, log_every=50,
                          checkpoint_every=250, eval_every=250, eval_episodes=100)),
    # A few seconds of training on small Omniglot subsets: tests and smoke runs only.
    "tiny": ExperimentConfig(
        "tiny", data=DataConfig(train_split="small1", eval_split="small2", ways=5, shots=1,
                                queries=3),
        model=ModelConfig(filters=8),
        meta=MetaConfig(inner_steps=2, eval_inner_steps=2, inner_lr=0.4),
        train=TrainConfig(steps=4, meta_batch_size=4, log_every=2, checkpoint_every=2,
                          eval_every=2, eval_episodes=8)),
}


# ----- The search space of pipelines/tune.py, in the configuration's own names ---------------

@dataclasses.dataclass(frozen=True)
class Range:
    """Values from ``low`` to ``high`` (inclusive), sampled on a "linear" or "log" scale;
    integers when the field is an integer."""

    low: float
    high: float
    scale: str = "linear"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``values``."""

    values: tuple


# What a search varies unless its command line fixes or narrows it (`--set`, `--space`). Each
# trial is the preset shortened to --steps-per-trial meta-steps and scored on fixed episodes of
# the validation alphabets in the preset's own setting (ways, shots), whatever ways and shots
# it trained on. Draws the engine refuses (a zero head with one inner step) fail at once.
SEARCH_SPACE = {
    "meta.inner_lr": Range(0.03, 1.0, "log"),
    "meta.inner_steps": Range(1, 5),
    "meta.eval_inner_steps": Range(1, 10),
    "train.meta_lr": Range(1e-4, 1e-2, "log"),
    "train.meta_batch_size": Choice((4, 8, 16, 32)),
    "meta.head_init": Choice(("zero", "proto", "learned")),
    "data.ways": Choice((5, 10, 20)),
    "data.shots": Choice((1, 5)),
}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


SECTIONS = ("data", "model", "meta", "train")


def apply_overrides(config: ExperimentConfig, overrides) -> ExperimentConfig:
    """``config`` with ``section.field=value`` overrides applied (values read as JSON, else
    as text), e.g. ["train.meta_lr=5e-4", "meta.head_init=proto"]. Unknown names are refused."""
    changes: dict[str, dict] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, _, field = key.strip().partition(".")
        if not sep or section not in SECTIONS or not field:
            raise ValueError(f"--set {item!r} is not SECTION.FIELD=VALUE with SECTION one of "
                             f"{SECTIONS}, e.g. --set train.meta_lr=5e-4")
        known = {f.name for f in dataclasses.fields(getattr(config, section))}
        if field not in known:
            raise ValueError(f"--set {item!r}: {section} has no field {field!r}; known: "
                             f"{', '.join(sorted(known))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        changes.setdefault(section, {})[field] = tuple(value) if isinstance(value, list) else value
    return config.replace(**changes)


def with_families(config: ExperimentConfig, families) -> ExperimentConfig:
    """``config`` meta-training on ``families`` (FamilyConfig or dicts) instead of its own
    task shape (the SINGLE_FAMILY_SHAPE fields, jitter included, go back to their defaults)."""
    return config.replace(data={"families": tuple(families), **single_family_defaults()})
