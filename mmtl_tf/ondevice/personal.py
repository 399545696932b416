"""A personalised model: predictions, and its state saved atomically as one file.

The state file is a zip archive (stored, not compressed) holding ``personal.json`` (class names,
the ``meta_init_sha256`` of the export it was adapted from, steps run, status), one ``.npy`` per
adapted parameter and batch-norm statistic, and ``personalized.onnx``: the export's predict
graph with those arrays baked in as initializers, runnable by any ONNX runtime with the single
input ``images`` (B, size, size, 1) and the output ``logits`` (B, max_ways), of which the first
N columns are the classes in ``class_names`` order (also in the ONNX metadata).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from mmtl_tf.files import atomic_write
from mmtl_tf.ondevice import images as image_io
from mmtl_tf.ondevice import onnx_edit

STATE_FORMAT = "mmtl_tf personal state"
STATE_VERSION = 1
STATE_JSON, PERSONALIZED_ONNX = "personal.json", "personalized.onnx"


class PersonalStateError(ValueError):
    """A saved personal state is unreadable or belongs to another meta-initialisation."""


def cross_entropy(logits, y) -> float:
    """Mean cross-entropy of logits (S, N) with integer labels y (S,), in float64."""
    logits = np.asarray(logits, np.float64)
    with np.errstate(all="ignore"):  # non-finite logits give a non-finite loss, checked later
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return float(np.mean(log_z - logits[np.arange(len(y)), y]))


class PersonalModel:
    """The parameters adapted to one user's classes.

    Attributes:
      class_names: the classes, in the order of the probability columns.
      params: adapted parameters by name; bn_stats: support-set batch-norm statistics by name
        (None for a transductive model, which normalises each query batch by itself).
      steps_run: SGD steps whose result is kept; support_losses: the support loss after
        0, 1, ... steps (the last may be non-finite when adaptation stopped early).
      status: "ok", or a sentence starting with "stopped:" saying why adaptation stopped early.
    """

    def __init__(self, export, class_names, params, bn_stats, steps_run, support_losses, status):
        self.export, self.class_names = export, class_names
        self.params, self.bn_stats = params, bn_stats
        self.steps_run, self.support_losses, self.status = steps_run, support_losses, status

    @property
    def ways(self) -> int:
        return len(self.class_names)

    def logits(self, images) -> np.ndarray:
        """float32 (B, N) logits of the N classes for preprocessed images (B, size, size, 1)."""
        feeds = {"images": np.asarray(images, np.float32), **self.params, **(self.bn_stats or {})}
        return self.export.run("predict", ["logits"], feeds)[0][:, :self.ways]  # any batch size

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities (B, N), columns in ``class_names`` order. ``images`` as accepted
        by ``images.to_input`` (paths, PIL images, arrays). A transductive model normalises the
        batch by its own statistics, so give it the query images together."""
        logits = self.logits(image_io.to_batch(images, self.export.prep)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict(self, images) -> list[tuple]:
        """(class name, probability) of the most probable class for each image."""
        probabilities = self.predict_proba(images)
        best = probabilities.argmax(axis=1)
        return [(self.class_names[int(b)], float(p[b])) for b, p in zip(best, probabilities)]

    def support_loss(self, x, y) -> float:
        """Mean cross-entropy of preprocessed support images x (S, ...) with labels y (S,)."""
        return cross_entropy(self.logits(x), y)

    # ----- the saved state --------------------------------------------------------------------
    def personalized_onnx(self) -> bytes:
        """The predict graph with the adapted parameters (and statistics) as initializers."""
        path = self.export.folder / self.export.manifest["graphs"]["predict"]["file"]
        metadata = {"mmtl_tf.class_names": json.dumps(self.class_names),
                    "mmtl_tf.meta_init_sha256": self.export.meta_init_sha256,
                    "mmtl_tf.logits": f"the first {self.ways} of the max_ways logits columns are "
                                      "class_names in order"}
        return onnx_edit.bake_initializers(path.read_bytes(), {**self.params, **(self.bn_stats or {})},
                                           metadata)

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                "class_names": self.class_names, "meta_init_sha256": self.export.meta_init_sha256,
                "model": self.export.manifest.get("name"), "steps_run": self.steps_run,
                "support_losses": finite_or_none(self.support_losses), "status": self.status,
                "transductive": self.export.transductive}

    def save(self, path) -> Path:
        """Writes the state to ``path`` atomically: a temporary file in the same folder, synced,
        then renamed over ``path``. A failure leaves any previous state at ``path`` intact."""
        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
                archive.writestr(STATE_JSON, json.dumps(self.state(), indent=2, allow_nan=False))
                for name, array in {**self.params, **(self.bn_stats or {})}.items():
                    buffer = io.BytesIO()
                    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
                    archive.writestr(f"arrays/{name}.npy", buffer.getvalue())
                archive.writestr(PERSONALIZED_ONNX, self.personalized_onnx())

        return atomic_write(path, write)

    def write_personalized_onnx(self, path) -> Path:
        """Writes only ``personalized.onnx`` (atomically) for another ONNX runtime."""
        return atomic_write(path, lambda f: f.write(self.personalized_onnx()))


def finite_or_none(values) -> list:
    """Floats for JSON: a non-finite loss becomes null (JSON has no NaN or Infinity)."""
    return [float(v) if v is not None and np.isfinite(v) else None for v in values]


def load_personal(export_folder, path, threads: int | None = None) -> PersonalModel:
    """A saved state, checked against the export it must come from."""
    from mmtl_tf.ondevice.runtime import load

    export, path = load(export_folder, threads), Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                raise zipfile.BadZipFile("a member fails its CRC check")
            state = json.loads(archive.read(STATE_JSON))
            arrays = {n[len("arrays/"):-len(".npy")]: np.lib.format.read_array(
                io.BytesIO(archive.read(n)), allow_pickle=False)
                for n in archive.namelist() if n.startswith("arrays/") and n.endswith(".npy")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise PersonalStateError(f"{path} is not a readable personal state ({err}); adapt again "
                                 "and save") from None
    if state.get("format") != STATE_FORMAT or state.get("format_version") != STATE_VERSION:
        raise PersonalStateError(f"{path} is not an mmtl_tf personal state of version {STATE_VERSION}")
    if state["meta_init_sha256"] != export.meta_init_sha256:
        raise PersonalStateError(
            f"{path} was adapted from the meta-initialisation {state['meta_init_sha256'][:12]}... "
            f"but {export_folder} holds {export.meta_init_sha256[:12]}...; a state works only "
            "with the export it came from: adapt this model again")
    params = {n: arrays.get(n) for n in export.param_names}
    bn = None if export.transductive else {n: arrays.get(n) for n in export.bn_names}
    for name, array in {**params, **(bn or {})}.items():
        expected = (export.params | export.bn_stats)[name].shape
        if array is None or array.shape != expected:
            raise PersonalStateError(f"{path}: parameter {name} is missing or not of shape {expected}")
    return PersonalModel(export, state["class_names"], params, bn, state["steps_run"],
                         state["support_losses"], state["status"])
