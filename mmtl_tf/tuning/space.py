"""The search space of one search: ``config.SEARCH_SPACE`` narrowed by the command line.

``--set section.field=value`` fixes a field (it leaves the space); ``--space`` changes one:
``NAME=LOW:HIGH`` (a range, keeping the declared scale), ``NAME=LOW:HIGH:log`` (or ``:linear``),
``NAME=A,B,C`` (a choice), ``NAME=VALUE`` (fixed). Any configuration field may be searched
except those that define the validation episodes every trial is scored on, and those the
search sets itself. Standard library only: errors come before TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import json

from mmtl_tf.config import (SEARCH_SPACE, SECTIONS, SINGLE_FAMILY_SHAPE, Choice, ExperimentConfig,
                            Range)

SCALES = ("linear", "log")
# Fields no trial may change, and why: the first define the episodes every trial is scored on
# (so the scores compare), the others are what the search sets on each trial.
NOT_SEARCHABLE = dict.fromkeys(
    ("data.family", "data.protocol", "data.train_split", "data.eval_split", "data.queries",
     "data.within_alphabet", "data.image_size", "data.data_dir", "data.source_dir",
     "train.eval_seed", "train.eval_episodes", "train.also_validate"),
    "it defines the validation episodes every trial is scored on (fix it with --set)")
NOT_SEARCHABLE.update(dict.fromkeys(
    ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
     "train.early_stopping_patience"),
    "the search sets it on every trial (the trial's length is --steps-per-trial)"))
# With task families each family sets its own task shape: these fields would change nothing.
FAMILY_OWNED = tuple(f"data.{name}" for name in SINGLE_FAMILY_SHAPE)
NO_EFFECT = ("has no effect with task families (each family sets its own task shape in "
             "data.families); drop it")


def field_names(config: ExperimentConfig) -> list[str]:
    """Every configuration field as ``section.field``."""
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(config, s))]


def field_value(config: ExperimentConfig, name: str):
    section, field = name.split(".", 1)
    return getattr(getattr(config, section), field)


def with_values(config: ExperimentConfig, values: dict) -> ExperimentConfig:
    """``config`` with ``{"section.field": value}`` applied (other keys, such as Hyperband's
    ``tuner/epochs``, are ignored); the dataclasses refuse invalid values (ValueError)."""
    changes: dict[str, dict] = {}
    for name, value in values.items():
        section, _, field = name.partition(".")
        if section in SECTIONS and field:
            changes.setdefault(section, {})[field] = value
    return config.replace(**changes)


def check_name(name: str, config: ExperimentConfig, flag: str) -> None:
    """Refuses a name that is not a configuration field, listing the closest ones."""
    names = field_names(config)
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    section = name.partition(".")[0]
    hint = (f"close names: {', '.join(close)}" if close else
            f"{section} has {', '.join(n for n in names if n.startswith(section + '.'))}"
            if section in SECTIONS else f"names are SECTION.FIELD with SECTION one of {SECTIONS}")
    raise ValueError(f"{flag} {name!r}: no configuration field of that name; {hint}")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _typed(value, kind, where: str):
    """``value`` as the field's type (an int field takes integers only; a float field ints)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not type(value) and not (kind is type(None)):
        raise ValueError(f"{where}: {value!r} is not of this field's type ({kind.__name__})")
    return value


def parse_spec(name: str, text: str, config: ExperimentConfig, declared=None):
    """A Range, a Choice or a single (fixed) value from ``--space NAME=TEXT``."""
    where = f"--space {name}={text}"
    kind = type(field_value(config, name))
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in SCALES):
            raise ValueError(f"{where}: a range is LOW:HIGH or LOW:HIGH:SCALE with SCALE one of "
                             f"{SCALES}, e.g. --space meta.inner_lr=0.05:0.5:log")
        if kind not in (int, float):
            raise ValueError(f"{where}: {name} is a {kind.__name__}; give a choice A,B,C instead")
        low, high = (_typed(_value(p), kind, where) for p in parts[:2])
        scale = parts[2] if len(parts) == 3 else getattr(declared, "scale", "linear")
        if low > high:
            raise ValueError(f"{where}: the range is empty (low {low} > high {high})")
        if scale == "log" and low <= 0:
            raise ValueError(f"{where}: a log-scale range needs low > 0; use :linear or a positive low")
        return Range(low, high, scale) if low < high else low
    values = tuple(_typed(_value(v), kind, where) for v in text.split(",") if v.strip())
    if not values:
        raise ValueError(f"{where}: the choice is empty; give VALUE, A,B,C or LOW:HIGH")
    return Choice(tuple(dict.fromkeys(values))) if len(set(values)) > 1 else values[0]


def _check_values(config: ExperimentConfig, name: str, spec, flag: str) -> None:
    """Refuses a range or choice holding a value the configuration refuses."""
    values = (spec.low, spec.high) if isinstance(spec, Range) else spec.values
    for value in values:
        try:
            with_values(config, {name: value})
        except ValueError as err:
            raise ValueError(f"{flag} {name}: {value!r} is not a valid value ({err})") from None


def resolve(config: ExperimentConfig, fixed_by_set, narrowing) -> tuple[ExperimentConfig, dict]:
    """(base config, space): ``config`` already carries the ``--set`` overrides, whose names
    (``fixed_by_set``) leave the space; ``narrowing`` are the ``--space NAME=SPEC`` items. A
    fixed value from ``--space`` goes into the base config. Raises ValueError naming the item."""
    owned = FAMILY_OWNED if config.data.families else ()
    if clash := sorted(set(fixed_by_set) & set(owned)):
        raise ValueError(f"--set {clash[0]}: {NO_EFFECT}")
    space = {n: s for n, s in SEARCH_SPACE.items() if n not in set(fixed_by_set) | set(owned)}
    for item in narrowing:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not text.strip():
            raise ValueError(f"--space {item!r} is not NAME=SPEC, e.g. --space meta.inner_lr="
                             "0.05:0.5:log, --space meta.head_init=zero,proto, --space data.shots=1")
        check_name(name, config, "--space")
        if name in NOT_SEARCHABLE:
            raise ValueError(f"--space {name}: cannot be searched: {NOT_SEARCHABLE[name]}")
        if name in owned:
            raise ValueError(f"--space {name}: {NO_EFFECT}")
        if name in fixed_by_set:
            raise ValueError(f"--space {name}: --set already fixes it; give one of the two")
        spec = parse_spec(name, text.strip(), config, SEARCH_SPACE.get(name))
        if isinstance(spec, (Range, Choice)):
            _check_values(config, name, spec, "--space")
            space[name] = spec
        else:
            config = with_values(config, {name: spec})
            space.pop(name, None)
    if not space:
        raise ValueError("nothing left to search: --set and --space fix every field of the space; "
                         "open one with --space NAME=LOW:HIGH or NAME=A,B")
    return config, space


def describe(space: dict) -> dict:
    """The space as JSON: {"meta.inner_lr": {"low": .., "high": .., "scale": "log"}, ...}."""
    return json.loads(json.dumps({n: dataclasses.asdict(s) for n, s in sorted(space.items())}))


def declare(space: dict, hp, config: ExperimentConfig) -> None:
    """Declares the space on KerasTuner's ``HyperParameters`` ``hp`` (ints for int fields)."""
    for name, spec in space.items():
        if isinstance(spec, Choice):
            hp.Choice(name, list(spec.values))
        elif isinstance(field_value(config, name), int):
            hp.Int(name, int(spec.low), int(spec.high), sampling=spec.scale)
        else:
            hp.Float(name, float(spec.low), float(spec.high), sampling=spec.scale)
