"""Class splits: which characters an episode may be drawn from.

Two protocols:
  * ``background`` (default, this project's protocol): meta-train on Omniglot's background
    characters (964), minus 5 background alphabets held out for validation; meta-test on the
    evaluation characters (659), which no shipped model has seen.
  * ``vinyals``: the random 1200 / 423 character split of Vinyals et al. (2016) over all 1623
    characters, every character also rotated by 90/180/270 degrees as new classes; offered only
    to compare with published MAML numbers, which use it. Its train and test characters mix
    background and evaluation alphabets.
"""

from __future__ import annotations

import numpy as np

from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.preprocessing import Preprocessing

PROTOCOLS = ("background", "vinyals")
PARTS = ("train", "validation", "test")
VALIDATION_ALPHABETS = 5
VINYALS_TRAIN_CHARACTERS = 1200
SPLIT_SEED = 0  # fixed: every user and every run sees the same split


def validation_groups(train_classes: ClassImages) -> np.ndarray:
    """The alphabets held out for validation (group ids), fixed by SPLIT_SEED: 5 of the 30
    background alphabets, and one in six (at least one) of a smaller set of alphabets."""
    groups = np.unique(train_classes.groups)
    count = min(VALIDATION_ALPHABETS, max(1, len(groups) // 6))
    if len(groups) < 2:
        raise ValueError(f"the training classes hold {len(groups)} alphabet(s); holding one out "
                         "for validation needs at least 2")
    rng = np.random.default_rng(SPLIT_SEED)
    return np.sort(rng.choice(groups, count, replace=False))


def hold_out_validation(train_classes: ClassImages, part: str) -> ClassImages:
    """The "train" or "validation" part of a set of training classes: the alphabets of
    ``validation_groups`` are validation, never meta-trained on."""
    held_out = np.isin(train_classes.groups, validation_groups(train_classes))
    return train_classes.select(np.flatnonzero(held_out if part == "validation" else ~held_out))


def omniglot_split(protocol: str, part: str, prep: Preprocessing, data_dir=None,
                   source_dir=None) -> tuple[ClassImages, bool]:
    """The classes of one part of a protocol, and whether rotation classes apply.

    Returns (classes, rotations): rotations is True for the Vinyals protocol.
    """
    from mmtl_tf.data.omniglot import load_omniglot_classes  # imports TFDS: only when used

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is unknown; choose one of {PROTOCOLS}")
    if part not in PARTS:
        raise ValueError(f"part={part!r} is unknown; choose one of {PARTS}")
    load = lambda split: load_omniglot_classes(split, prep, data_dir=data_dir, source_dir=source_dir)
    if protocol == "background":
        if part == "test":
            return load("test"), False
        return hold_out_validation(load("train"), part), False
    if part == "validation":
        raise ValueError("the vinyals protocol has no validation part (published MAML numbers use "
                         "train and test only); use protocol='background' for validation.")
    everything = ClassImages.concat(load("train"), load("test"))
    order = np.random.default_rng(SPLIT_SEED).permutation(everything.num_classes)
    chosen = order[:VINYALS_TRAIN_CHARACTERS] if part == "train" else order[VINYALS_TRAIN_CHARACTERS:]
    return everything.select(np.sort(chosen)), True
