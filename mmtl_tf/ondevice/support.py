"""A user's support set as the exported graphs take it: class indices, then padded rows."""

from __future__ import annotations

import numpy as np


class AdaptationError(ValueError):
    """The support set or the adaptation arguments cannot be used; the message says why."""


def class_indices(labels, count: int, max_ways: int, max_shots: int):
    """(sorted class names, int32 labels (count,) indexing them) for one label per image.

    Labels are all class names (str) or all integers; 2 to ``max_ways`` classes of at most
    ``max_shots`` images each. Anything else raises AdaptationError saying what to change.
    """
    labels = list(labels)
    if len(labels) != count:
        raise AdaptationError(f"{count} support images but {len(labels)} labels; give one "
                              "label per image")
    kinds = {isinstance(label, str) for label in labels}
    if len(kinds) > 1 or (kinds == {False} and not all(
            isinstance(label, (int, np.integer)) for label in labels)):
        raise AdaptationError("labels must be all class names (str) or all integers")
    labels = [label if isinstance(label, str) else int(label) for label in labels]  # JSON-able
    class_names = sorted(set(labels))
    ways = len(class_names)
    if ways < 2:
        raise AdaptationError(f"the support set has {ways} class(es); give at least 2 "
                              "classes (one folder per class)")
    if ways > max_ways:
        raise AdaptationError(f"the support set has {ways} classes but this model takes at "
                              f"most max_ways={max_ways}; use fewer classes or export a "
                              "model with a wider head")
    index = {name: i for i, name in enumerate(class_names)}
    y = np.asarray([index[label] for label in labels], np.int32)
    shots = np.bincount(y, minlength=ways)
    if shots.max() > max_shots:
        worst = class_names[int(shots.argmax())]
        raise AdaptationError(f"class {worst!r} has {shots.max()} images but this model takes "
                              f"at most max_shots={max_shots} per class; remove some or "
                              "re-export with a larger --max-shots")
    return class_names, y


def padded(x, y, rows: int, ways: int, max_ways: int) -> dict:
    """Feeds of a support set x (S, size, size, C), labels y (S,) padded to ``rows`` rows
    (zero images, label 0, sample_mask 0) with the first ``ways`` of ``max_ways`` classes on."""
    count = len(y)
    images = np.zeros((rows, *x.shape[1:]), np.float32)
    images[:count] = x
    labels = np.zeros(rows, np.int32)
    labels[:count] = y
    mask = np.zeros(rows, np.float32)
    mask[:count] = 1.0
    class_mask = (np.arange(max_ways) < ways).astype(np.float32)
    return {"support_images": images, "support_labels": labels, "sample_mask": mask,
            "class_mask": class_mask}
