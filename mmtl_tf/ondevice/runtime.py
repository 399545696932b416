"""An exported model on a device: load and verify it, adapt it to a user's support set.

``load(folder)`` reads the folder once and checks it (``export_folder.read_verified``: the
manifest against its own hash, every file against the manifest's SHA-256); sessions and
parameters are built from the verified bytes. ``adapt`` then runs the exported graphs the way
``Exportable.adapt`` (``mmtl_tf/export/signatures.py``) defines them: pad the support set to a
size bucket, start from the meta-initialisation with the head from ``init_head``, chain
``adapt_step`` ``steps`` times, and (non-transductive models) compute the batch-norm statistics
of the support set at the final parameters, with the support logits that give the final support
loss. It keeps the step with the lowest support loss (``mmtl_tf.best_step``). The result is a
``PersonalModel`` (``mmtl_tf.ondevice.personal``). A proximal export (manifest ``proximal`` mu
> 0) gets the parameters the task starts from (after ``init_head``) as ``anchor_<param>`` at
every step, as TensorFlow's ``adapt`` anchors its term at ``start``.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mmtl_tf import best_step
from mmtl_tf.meta.algorithms import rate_step  # TensorFlow-free: the one per-step rate rule
from mmtl_tf.best_step import AdaptationWarning  # noqa: F401  (part of this module's API)
from mmtl_tf.ondevice import images as image_io
from mmtl_tf.ondevice import support as support_set
from mmtl_tf.ondevice.export_folder import MANIFEST, ExportError, read_verified
from mmtl_tf.ondevice.personal import PersonalModel, cross_entropy, read_state
from mmtl_tf.ondevice.support import AdaptationError  # noqa: F401  (part of this module's API)
from mmtl_tf.preprocessing import Preprocessing

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def load(folder, threads: int | None = None) -> "ExportedModel":
    """Opens and verifies an export folder. ``threads``: onnxruntime intra-op threads
    (None: onnxruntime's default; 1 for a single-core measurement)."""
    folder = Path(folder)
    manifest, files = read_verified(folder)
    try:
        return ExportedModel(folder, manifest, files, threads)
    except KeyError as err:
        raise ExportError(f"{folder / MANIFEST} lacks the key {err}; re-export the "
                          "model") from None


def load_personal(export_folder, path, threads: int | None = None) -> PersonalModel:
    """A saved personal state (``PersonalModel.save``), checked against the export in
    ``export_folder``, which it must have been adapted from."""
    return read_state(load(export_folder, threads), path)


_SHARED_ARENA = []


def _register_shared_arena() -> None:
    """Registers onnxruntime's process-wide CPU arena once (sessions opt in to it)."""
    if not _SHARED_ARENA:
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                   ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, None)
        _SHARED_ARENA.append(memory)


class ExportedModel:
    """A verified export folder; ``adapt`` personalises it. Sessions are created on first use,
    from ``files``: the verified bytes of the graphs and the parameter file."""

    def __init__(self, folder: Path, manifest: dict, files: dict, threads: int | None = None):
        self.folder, self.manifest, self._files = folder, manifest, files
        p = manifest["preprocessing"]
        self.prep = Preprocessing(p["image_size"], p["ink_as_one"], p.get("channels", 1))
        self.max_ways, self.max_shots = int(manifest["max_ways"]), int(manifest["max_shots"])
        self.max_support = int(manifest["max_support"])
        self.default_steps = int(manifest["default_steps"])
        self.transductive = bool(manifest["transductive"])
        self.proximal = float(manifest.get("proximal", 0.0))  # absent: exported before the term
        self.param_names = list(manifest["parameters"])
        self.bn_names = list(manifest["batch_norm_statistics"])
        self.meta_init_sha256 = manifest["meta_init_sha256"]
        self.params, self.bn_stats, self.lrs = self._read_params(manifest["params_file"])
        self._check_anchors()
        self._options = ort.SessionOptions()
        # The graphs take their weights as inputs, so onnxruntime's extended optimisations
        # (layout changes that pre-pack constant weights) cannot pay off and re-pack at every
        # run; its transpose optimiser also re-merges split_kernel_transposes' fast pair. One core
        # of the development machine: predict 0.26 ms off vs 0.65 ms all, adapt_step_s5 3.2 vs 3.7.
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # One memory arena for all the graphs of an adaptation (each session has its own by
        # default): the chained graphs then reuse warm memory; 10 steps of 5-way 1-shot took
        # ~0.7 ms less of ~20 on one core.
        _register_shared_arena()
        self._options.add_session_config_entry("session.use_env_allocators", "1")
        if threads is not None:
            self._options.intra_op_num_threads = int(threads)
            self._options.inter_op_num_threads = 1
        self._sessions, self._inputs, self._graph_names = {}, {}, {}

    def _read_params(self, name: str):
        with np.load(io.BytesIO(self._files[name]), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        wanted = self.param_names + self.bn_names + ["lr_" + n for n in self.param_names]
        missing = [n for n in wanted if n not in arrays]
        if missing:
            raise ExportError(f"{self.folder / name} lacks arrays {missing[:5]}; re-export the "
                              "model")
        pick = lambda names: {n: arrays[n].astype(np.float32) for n in names}
        return (pick(self.param_names), pick(self.bn_names),
                {n: arrays["lr_" + n].astype(np.float32) for n in self.param_names})

    def _check_anchors(self) -> None:
        """Refuses a proximal manifest whose adaptation graphs lack the anchor inputs: fed
        as extras they would be ignored, and the device would adapt without the term."""
        for stem, graph in self.manifest["graphs"].items() if self.proximal else ():
            inputs = {i["name"] for i in graph["inputs"]}
            if "class_mask" in inputs and "anchor_head_w" not in inputs:  # an adaptation step
                raise ExportError(f"{self.folder / MANIFEST} says proximal={self.proximal} but "
                                  f"graph {stem} takes no anchor_<param> inputs; re-export the "
                                  "model")

    # ----- graphs ---------------------------------------------------------------------------
    def graph(self, stem: str, rows: int | None = None) -> str:
        """The graph for ``stem``: the smallest support bucket ``<stem>_s<R>`` with R >= rows,
        else the unsuffixed graph (``max_support`` rows)."""
        if (stem, rows) not in self._graph_names:  # asked once per step: remember the answer
            self._graph_names[stem, rows] = self._find_graph(stem, rows)
        return self._graph_names[stem, rows]

    def _find_graph(self, stem: str, rows: int | None) -> str:
        buckets = sorted((int(m.group(1)), name) for name in self.manifest["graphs"]
                         if (m := re.fullmatch(re.escape(stem) + r"_s(\d+)", name)))
        if rows is not None:
            for bucket_rows, name in buckets:
                if rows <= bucket_rows < self.max_support:
                    return name
        if stem not in self.manifest["graphs"]:
            raise ExportError(f"{self.folder / MANIFEST} has no {stem!r} graph")
        return stem

    def graph_bytes(self, name: str) -> bytes:
        """The verified ONNX bytes of graph ``name`` (as hashed when the export was loaded)."""
        return self._files[self.manifest["graphs"][name]["file"]]

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            self._sessions[name] = ort.InferenceSession(self.graph_bytes(name), self._options,
                                                        providers=["CPUExecutionProvider"])
            self._inputs[name] = [(spec.name, np.dtype(_ORT_DTYPES.get(spec.type, np.float32)))
                                  for spec in self._sessions[name].get_inputs()]
        return self._sessions[name]

    def run(self, name: str, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        """Runs graph ``name``; inputs are taken by name from ``feeds`` and cast to the graph's
        dtypes."""
        session = self.session(name)
        inputs = {}
        for input_name, dtype in self._inputs[name]:
            value = feeds.get(input_name)
            if value is None:
                raise ExportError(f"graph {name} needs an input {input_name!r} this runtime does "
                                  "not provide; is the export newer than mmtl_tf?")
            if type(value) is not np.ndarray or value.dtype != dtype:
                value = np.asarray(value, dtype)
            inputs[input_name] = value
        return session.run(outputs, inputs)

    def _has(self, stem: str) -> bool:
        return stem in self.manifest["graphs"]

    def support_rows(self, name: str) -> int:
        """Rows of the padded support set graph ``name`` takes."""
        spec = next(i for i in self.session(name).get_inputs() if i.name == "support_images")
        return int(spec.shape[0])

    # ----- adaptation ---------------------------------------------------------------------------
    def adapt(self, images, labels, steps: int | None = None, lr: float | None = None,
              head_only: bool = False, keep_best: bool = True) -> PersonalModel:
        """Personalises the model to a support set.

        Args:
          images: the support images: file paths, PIL images, uint8 arrays or preprocessed
            float32 (size, size, 1) arrays (see ``images.to_input``).
          labels: one class name per image (str or int, not mixed); classes are sorted, and
            predictions report these names.
          steps: SGD steps (None: the manifest's ``default_steps``; 0 keeps the initial head).
          lr: one inner learning rate for every parameter (None: the exported rates).
          head_only: adapt only the head (``head_step`` graph): faster, usually less accurate.
          keep_best: keep the step with the lowest support loss (``mmtl_tf.best_step``); False
            keeps the last finite step, as meta-training's evaluation does (for parity checks).
        Returns a PersonalModel; its ``status`` says when it is not the last step's (warned as
        an AdaptationWarning too).
        """
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, (int, np.integer)) or steps < 0:
            raise AdaptationError(f"steps={steps!r} must be an integer >= 0 (the model's default "
                                  f"is {self.default_steps})")
        if lr is not None and not (np.isfinite(lr) and lr > 0):
            raise AdaptationError(f"lr={lr!r} must be a positive finite number (or None for the "
                                  "exported learning rates)")
        images = list(images)
        class_names, y = support_set.class_indices(labels, len(images), self.max_ways,
                                                   self.max_shots)
        x = image_io.to_batch(images, self.prep)  # (S, size, size, 1)
        lrs = self.lrs if lr is None else {n: np.full_like(v, lr) for n, v in self.lrs.items()}
        params = dict(self.params)
        name = self.graph("init_head", len(y))
        outputs = {o.name for o in self.session(name).get_outputs()}
        heads = ["new_head_w", "new_head_b"] if "new_head_w" in outputs else ["head_w", "head_b"]
        params["head_w"], params["head_b"] = self.run(
            name, heads, {**self._support(name, x, y, len(class_names)), **params})
        anchor = {"anchor_" + n: v for n, v in params.items()} if self.proximal else {}
        return self._adapt_loop(x, y, class_names, params, lrs, steps, head_only, keep_best,
                                anchor)

    def adapt_folder(self, folder, **kwargs) -> PersonalModel:
        """``adapt`` on ``folder/<class name>/<images>``."""
        paths, labels = image_io.support_folder(folder)
        return self.adapt(paths, labels, **kwargs)

    def _support(self, name: str, x, y, ways: int) -> dict:
        """The support set padded to graph ``name``'s rows."""
        return support_set.padded(x, y, self.support_rows(name), ways, self.max_ways)

    def _step_lrs(self, lrs, step: int) -> dict:
        """Learning-rate feeds of one step; MAML++ ships a rate per step (the last one after)."""
        if self.manifest.get("learned_inner_lr") == "per_layer_per_step":
            return {"lr_" + n: np.asarray(v[rate_step(step, len(v))], np.float32) for n, v in lrs.items()}
        return {"lr_" + n: v for n, v in lrs.items()}

    def _adapt_loop(self, x, y, class_names, params, lrs, steps, head_only, keep_best,
                    anchor):
        """Chains the SGD steps, stopping at a non-finite support loss, and keeps the
        parameters ``best_step.kept_step`` picks. ``support_losses[k]`` is the support loss
        after k steps; the last one comes from a forward pass at the final parameters.
        ``anchor``: the proximal term's feeds (``anchor_<param>``: the starting parameters),
        empty without the term; they go with the support set into every step."""
        stem = "head_step" if head_only else "adapt_step"
        support = {**self._support(self.graph(stem, len(y)), x, y, len(class_names)), **anchor}
        losses, kept = [], None
        for loss, at in self._chain(support, params, lrs, steps, head_only):
            bn = None
            if loss is None:  # the final parameters
                bn, loss = self._final_state(x, y, class_names, at)
            losses.append(float(loss))
            if best_step.kept_step(losses, keep_best) == len(losses) - 1:
                kept = (at, bn)
            if not np.isfinite(loss):
                break
        step = best_step.kept_step(losses, keep_best)
        if step < 0:
            raise AdaptationError(f"the support loss is {losses[0]} even before adaptation; the "
                                  "export or the support images are broken")
        status = best_step.status(losses, step)
        if status != "ok":
            warnings.warn(status, AdaptationWarning, stacklevel=3)
        params, bn = kept
        if bn is None:  # not the final parameters: their support statistics
            bn, _ = self._support_state(x, y, len(class_names), params)
        return PersonalModel(self, list(class_names), params, bn, step, losses, status)

    def _chain(self, support, params, lrs, steps: int, head_only: bool):
        """Yields (support loss, the parameters it is the loss of) after 0 .. steps-1 steps,
        then (None, the final parameters)."""
        step = 0
        while step < steps:
            for loss, update in self._next_steps(support, params, lrs, step, steps, head_only):
                yield loss, params
                params, step = {**params, **update}, step + 1
        yield None, params

    def _final_state(self, x, y, class_names, params):
        """(support batch-norm statistics, support loss) at the final parameters."""
        bn, loss = self._support_state(x, y, len(class_names), params)
        if loss is None:  # transductive, or an export without support logits
            loss = PersonalModel(self, list(class_names), params, bn, 0, [], "").support_loss(x, y)
        return bn, loss

    def _next_steps(self, support, params, lrs, step: int, steps: int, head_only: bool):
        """Runs step ``step`` (and step + 1 when one graph does both): [(support loss before
        the step, the parameters it changed)] for each step taken."""
        rows = len(support["support_labels"])
        graph, changed = self.graph("adapt_step", rows), self.param_names
        if head_only or (not params["head_w"].any() and self._encoder_at_anchor(support, params)):
            # A zero head passes a zero gradient to the encoder (d features = d logits @
            # head_w^T), so a full step leaves the encoder exactly as it is: the head-only
            # graph gives the same step for a fraction of the work (zero-head models' step 1),
            # and head_then_adapt_step also takes the next full step on the same forward pass.
            graph, changed = self.graph("head_step", rows), ["head_w", "head_b"]
            if not head_only and steps - step >= 2 and self._has("head_then_adapt_step"):
                return self._head_then_adapt_step(support, params, lrs, step)
        feeds = {**support, **params, **self._step_lrs(lrs, step)}
        loss, *new = self.run(graph, ["loss"] + ["new_" + n for n in changed], feeds)
        return [(loss, dict(zip(changed, new)))]

    def _encoder_at_anchor(self, support, params) -> bool:
        """True unless the proximal term pulls the encoder: away from its anchor it moves even
        under a zero head, so the head-only shortcut would not be the full step."""
        return not self.proximal or all(
            np.array_equal(params[n], support["anchor_" + n]) for n in self.param_names[:-2])

    def _head_then_adapt_step(self, support, params, lrs, step: int):
        rows = len(support["support_labels"])
        next_lrs = {"next_" + k: v for k, v in self._step_lrs(lrs, step + 1).items()}
        loss, head_w, head_b, next_loss, *new = self.run(
            self.graph("head_then_adapt_step", rows),
            ["loss", "head_w_1", "head_b_1", "next_loss"] + ["new_" + n for n in self.param_names],
            {**support, **params, **self._step_lrs(lrs, step), **next_lrs})
        return [(loss, {"head_w": head_w, "head_b": head_b}),
                (next_loss, dict(zip(self.param_names, new)))]

    def _support_state(self, x, y, ways: int, params):
        """(support batch-norm statistics, support loss at ``params``) of a non-transductive
        model, both from one support_stats run; the loss is None when the graph does not give
        the support logits (exports before they were added). (None, None) if transductive."""
        if self.transductive:
            return None, None
        name = self.graph("support_stats", len(y))
        with_logits = "support_logits" in {o.name for o in self.session(name).get_outputs()}
        values = self.run(name, self.bn_names + ["support_logits"] * with_logits,
                          {**self._support(name, x, y, ways), **params})
        loss = cross_entropy(values[-1][:len(y), :ways], y) if with_logits else None
        return dict(zip(self.bn_names, values)), loss
