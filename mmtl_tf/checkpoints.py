"""Training state on disk: everything a run needs to continue exactly where it stopped.

A checkpoint is one ``.npz`` file written atomically (``files.atomic_write``): the learner's
variables (encoder, head, learned inner rates, batch-norm statistics), the optimizer's (its
step counter, moments and learning rate), the metric trackers' running sums (so a period cut
by a crash reports what an uninterrupted one would), and a JSON record (meta-step, validation
bookkeeping). The episode stream needs no state: it is a pure function of (seed, meta-step).

``<workdir>/checkpoints/`` keeps the last two ``step-XXXXXXXX.npz`` and ``best.npz``, the state
with the best validation accuracy so far.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from mmtl_tf.files import atomic_write

FOLDER = "checkpoints"
BEST = "best.npz"
KEEP = 2
CHOICES = ("best", "latest")


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored (truncated, or of another architecture)."""


def _groups(learner) -> dict:
    groups = {"model": list(learner.weights), "trackers": list(learner.metrics_variables)}
    if getattr(learner, "optimizer", None) is not None:  # set by compile()
        groups["optimizer"] = list(learner.optimizer.variables)
    return groups


def save(learner, path, record: dict) -> Path:
    """Writes the learner's (and its optimizer's) state and ``record`` to ``path`` atomically."""
    arrays = {"record": np.frombuffer(json.dumps(record, sort_keys=True).encode(), np.uint8)}
    for group, variables in _groups(learner).items():
        for i, v in enumerate(variables):
            arrays[f"{group}/{i:04d}"] = np.asarray(v.numpy())
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def restore(learner, path, groups=("model", "optimizer", "trackers")) -> dict:
    """Assigns the state in ``path`` to ``learner`` (its optimizer built first); returns the
    record. Raises CheckpointError naming the file for a truncated or mismatched checkpoint."""
    path = Path(path)
    optimizer = getattr(learner, "optimizer", None)
    if "optimizer" in groups and optimizer is not None and not optimizer.built:
        learner.optimizer.build(learner.meta_variables)
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({err}); restore it from a "
                              "copy, or start over with --force") from None
    record = json.loads(bytes(stored.pop("record", np.zeros(0, np.uint8))).decode() or "{}")
    for group, variables in _groups(learner).items():
        if group not in groups:
            continue
        names = sorted(n for n in stored if n.startswith(group + "/"))
        shapes, wanted = [tuple(stored[n].shape) for n in names], [tuple(v.shape) for v in variables]
        if shapes != wanted:
            first = next((i for i, (a, b) in enumerate(zip(shapes, wanted)) if a != b),
                         min(len(shapes), len(wanted)))
            raise CheckpointError(
                f"{path} does not match this configuration: {len(shapes)} {group} variables where "
                f"it has {len(wanted)}, number {first} of shape "
                f"{shapes[first] if first < len(shapes) else None} where it needs "
                f"{wanted[first] if first < len(wanted) else None}; it is from another "
                "architecture or algorithm: use the run folder it belongs to, or start over "
                "with --force")
        for name, v in zip(names, variables):
            v.assign(stored[name])
    return record


def folder(workdir) -> Path:
    return Path(workdir) / FOLDER


def step_files(workdir) -> list[Path]:
    """The periodic checkpoints of a run, oldest first."""
    return sorted(folder(workdir).glob("step-*.npz"))


def save_step(learner, workdir, step: int, record: dict) -> Path:
    """The checkpoint of meta-step ``step``; only the newest KEEP are kept."""
    path = save(learner, folder(workdir) / f"step-{step:08d}.npz", record)
    for old in step_files(workdir)[:-KEEP]:
        old.unlink()
    return path


def latest(workdir) -> Path | None:
    files = step_files(workdir)
    return files[-1] if files else None


def chosen(workdir, which: str = "best") -> Path:
    """The checkpoint a run is evaluated or exported from: "best" (validation) or "latest"."""
    if which not in CHOICES:
        raise ValueError(f"checkpoint={which!r} is unknown; choose one of {CHOICES}")
    path = folder(workdir) / BEST if which == "best" else latest(workdir)
    if path is None or not path.is_file():
        other = "--checkpoint latest" if which == "best" else "pipelines/train.py first"
        raise FileNotFoundError(f"{workdir} has no {which} checkpoint"
                                f"{' (no validation has run)' if which == 'best' else ''}; "
                                f"use {other}")
    return path


def read_record(path) -> dict:
    """The JSON record of a checkpoint, without loading its arrays."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("record.npy") as f:
            return json.loads(bytes(np.load(io.BytesIO(f.read()))).decode())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({err})") from None
