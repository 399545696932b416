"""Folders in, predictions out: what ``pipelines/adapt_on_device.py`` calls."""

from __future__ import annotations

import collections
from pathlib import Path

from mmtl_tf.ondevice import images as image_io
from mmtl_tf.ondevice.personal import finite_or_none
from mmtl_tf.ondevice.runtime import load


def personalize(model_folder, support_folder, queries, steps: int | None = None,
                lr: float | None = None, save=None) -> dict:
    """Adapts the export in ``model_folder`` to ``support_folder/<class>/<images>`` and
    predicts every query image (files, or folders of files).

    Returns a JSON-ready dict: ``predictions`` (query name -> class name), ``probabilities``
    (query name -> probability of that class), ``class_probabilities``, ``classes``, ``shots``,
    ``steps`` (steps whose result is kept), ``support_losses`` (after 0, 1, ... steps; null
    when not finite), ``status`` ("ok", "kept_best_step: ..." or "stopped: ...") and, when
    ``save`` is given, ``saved``: the state file, or None when adaptation stopped at a
    non-finite loss; such a state is never saved, so a good one saved before stays in place
    (``not_saved`` says so). Query names are file names, or the paths when two queries share a
    file name.
    """
    model = load(model_folder)
    paths, labels = image_io.support_folder(support_folder)
    query_paths = image_io.query_files(queries)  # checked before the slower adaptation
    personal = model.adapt(paths, labels, steps=steps, lr=lr)
    probabilities = personal.predict_proba(query_paths)  # (Q, N)
    counts = collections.Counter(p.name for p in query_paths)
    keys = [p.name if counts[p.name] == 1 else str(p) for p in query_paths]
    best = probabilities.argmax(axis=1)
    result = {
        "model": str(model_folder), "classes": personal.class_names,
        "shots": dict(collections.Counter(labels)),
        "steps": personal.steps_run, "status": personal.status,
        "support_losses": finite_or_none(personal.support_losses),
        "predictions": {k: personal.class_names[int(b)] for k, b in zip(keys, best)},
        "probabilities": {k: float(p[b]) for k, p, b in zip(keys, probabilities, best)},
        "class_probabilities": {k: dict(zip(personal.class_names, map(float, p)))
                                for k, p in zip(keys, probabilities)},
    }
    if save is not None and personal.status.startswith("stopped:"):
        result["saved"] = None
        result["not_saved"] = (f"adaptation stopped at a non-finite support loss, so {save} was "
                               "left as it was; adapt again with a smaller --lr or fewer --steps")
    elif save is not None:
        result["saved"] = str(personal.save(Path(save)))
    return result
