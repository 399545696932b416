"""A personalised model: predictions, and its state saved atomically as one file.

The state file is a zip archive (stored, not compressed) holding ``personal.json`` (class names,
the ``meta_init_sha256`` of the export it was adapted from, steps run, status), one ``.npy`` per
adapted parameter and batch-norm statistic, and ``personalized.onnx``: the export's predict
graph with those arrays baked in as initializers, runnable by any ONNX runtime with the single
input ``images`` (B, size, size, 1) and the output ``logits`` (B, max_ways), of which the first
N columns are the classes in ``class_names`` order (also in the ONNX metadata). It is the
user's data: written owner-only (0600). ``read_state`` checks a state file against the export it
must come from (``runtime.load_personal`` loads both).
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
STATE_KEYS = ("format", "format_version", "class_names", "meta_init_sha256", "steps_run",
              "support_losses", "status")
USER_FILE_MODE = 0o600  # a personal state is one user's data: owner read and write only
MAX_STATE_JSON = 1 << 20  # bytes; personal.json holds class names and a few numbers


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
      status: "ok", or a sentence saying which earlier step was kept and why (starting with
        "kept_best_step:" or "stopped:", see ``mmtl_tf.best_step.status``).
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
        metadata = {"mmtl_tf.class_names": json.dumps(self.class_names),
                    "mmtl_tf.meta_init_sha256": self.export.meta_init_sha256,
                    "mmtl_tf.logits": f"the first {self.ways} of the max_ways logits columns are "
                                      "class_names in order"}
        return onnx_edit.bake_initializers(self.export.graph_bytes("predict"),
                                           {**self.params, **(self.bn_stats or {})}, metadata)

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                "class_names": self.class_names, "meta_init_sha256": self.export.meta_init_sha256,
                "model": self.export.manifest.get("name"), "steps_run": self.steps_run,
                "support_losses": finite_or_none(self.support_losses), "status": self.status,
                "transductive": self.export.transductive}

    def save(self, path) -> Path:
        """Writes the state to ``path`` atomically, owner-only (0600): a temporary file in the
        same folder, synced, then renamed over ``path``. A failure leaves any previous state at
        ``path`` intact."""
        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
                archive.writestr(STATE_JSON, json.dumps(self.state(), indent=2, allow_nan=False))
                for name, array in {**self.params, **(self.bn_stats or {})}.items():
                    buffer = io.BytesIO()
                    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
                    archive.writestr(f"arrays/{name}.npy", buffer.getvalue())
                archive.writestr(PERSONALIZED_ONNX, self.personalized_onnx())

        return atomic_write(path, write, USER_FILE_MODE)

    def write_personalized_onnx(self, path) -> Path:
        """Writes only ``personalized.onnx`` (atomically, 0600) for another ONNX runtime."""
        return atomic_write(path, lambda f: f.write(self.personalized_onnx()), USER_FILE_MODE)


def finite_or_none(values) -> list:
    """Floats for JSON: a non-finite loss becomes null (JSON has no NaN or Infinity)."""
    return [float(v) if v is not None and np.isfinite(v) else None for v in values]


def read_state(export, path) -> PersonalModel:
    """The state saved at ``path``, checked against ``export`` (an ``ExportedModel``): the same
    meta-initialisation, every key and array present, of its shape and finite, and no archive
    member larger than this export's state can be. Raises PersonalStateError naming the fault."""
    path = Path(path)
    state, arrays = _read_archive(export, path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get(
            "format_version") != STATE_VERSION:
        raise PersonalStateError(f"{path} is not an mmtl_tf personal state of version "
                                 f"{STATE_VERSION}")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise PersonalStateError(f"{path}: {STATE_JSON} lacks the key(s) {', '.join(missing)}; "
                                 "the file is damaged: adapt again and save")
    if state["meta_init_sha256"] != export.meta_init_sha256:
        raise PersonalStateError(
            f"{path} was adapted from the meta-initialisation "
            f"{str(state['meta_init_sha256'])[:12]}... but {export.folder} holds "
            f"{export.meta_init_sha256[:12]}...; a state works only with the export it came "
            "from: adapt this model again")
    names = state["class_names"]
    if not isinstance(names, list) or not 2 <= len(names) <= export.max_ways:
        raise PersonalStateError(f"{path}: class_names must be a list of 2 to max_ways="
                                 f"{export.max_ways} names; the file is damaged: adapt again "
                                 "and save")
    params = _checked_arrays(path, arrays, export.param_names, export.params)
    bn = None if export.transductive else _checked_arrays(path, arrays, export.bn_names,
                                                          export.bn_stats)
    return PersonalModel(export, names, params, bn, state["steps_run"], state["support_losses"],
                         state["status"])


def _read_archive(export, path: Path) -> tuple[dict, dict]:
    """(personal.json's content, arrays by name) of the archive at ``path``."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_sizes(archive, export, path)
            if archive.testzip() is not None:
                raise zipfile.BadZipFile("a member fails its CRC check")
            arrays = {n[len("arrays/"):-len(".npy")]: np.lib.format.read_array(
                io.BytesIO(archive.read(n)), allow_pickle=False)
                for n in archive.namelist() if n.startswith("arrays/") and n.endswith(".npy")}
            return json.loads(archive.read(STATE_JSON)), arrays
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise PersonalStateError(f"{path} is not a readable personal state ({err}); adapt again "
                                 "and save") from None


def _checked_arrays(path: Path, arrays: dict, names: list, reference: dict) -> dict:
    """``arrays[name]`` for each name, each of its reference's dtype and shape, and finite."""
    for name in names:
        array, expected = arrays.get(name), reference[name]
        if array is None or array.shape != expected.shape or array.dtype != expected.dtype:
            raise PersonalStateError(f"{path}: parameter {name} is missing or not "
                                     f"{expected.dtype} of shape {expected.shape}; adapt again "
                                     "and save")
        if not np.isfinite(array).all():
            raise PersonalStateError(f"{path}: parameter {name} holds non-finite values (NaN or "
                                     "infinity); the state is damaged: adapt again and save")
    return {name: arrays[name] for name in names}


def _check_sizes(archive: zipfile.ZipFile, export, path: Path) -> None:
    """Refuses any member larger than the state of ``export`` can be, before reading it (a
    damaged or hostile file could declare gigabytes)."""
    arrays = export.params | export.bn_stats
    header = 1 << 16  # an .npy header is at most 64 KiB
    limits = {STATE_JSON: MAX_STATE_JSON,
              PERSONALIZED_ONNX: len(export.graph_bytes("predict")) + sum(
                  a.nbytes + header for a in arrays.values()) + MAX_STATE_JSON}
    limits.update({f"arrays/{n}.npy": a.nbytes + header for n, a in arrays.items()})
    for info in archive.infolist():
        limit = limits.get(info.filename)
        if limit is None:
            raise PersonalStateError(f"{path} holds {info.filename!r}, which no personal state of "
                                     "this model has; adapt again and save")
        if info.file_size > limit:
            raise PersonalStateError(f"{path}: {info.filename} is {info.file_size} bytes, more "
                                     f"than the {limit} a state of this model can hold; adapt "
                                     "again and save")
