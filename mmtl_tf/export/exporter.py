"""export(workdir, out): one self-describing folder a device can adapt with.

The folder is assembled in a temporary sibling and swapped into place (``files.replace_folder``),
so a reader never sees a half-written export; an existing folder is replaced only with ``force``.
``manifest.json`` is covered by ``manifest.json.sha256`` (see ``write_manifest``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from mmtl_tf.files import replace_folder, sha256, write_checksummed
from mmtl_tf.preprocessing import Preprocessing

MANIFEST = "manifest.json"
PARAMS = "params.npz"
FORMAT_VERSION = 1


def export(workdir, out, force: bool = False, max_shots: int = 5, opset: int | None = None,
           model_card=None, checkpoint: str = "best", attachments=(),
           default_steps: int | None = None) -> dict:
    """Exports the training run in ``workdir`` to the folder ``out``. Returns the manifest.

    ``model_card``: a Markdown file copied in as MODEL_CARD.md (hashed like every file);
    ``checkpoint``: the run's "best" (by validation) or "latest" state; ``attachments``: more
    files (an evaluation report, its plots) copied in under their own names and hashed;
    ``default_steps``: the adaptation steps the export applies when a device asks for none (the
    run's ``eval_inner_steps`` when None), for a choice made on validation after training
    (``pipelines/diagnose.py``); the export's config.json, model.keras and manifest all carry it.
    A regression learner (the sinusoid) is exported by ``mmtl_tf.export.regression``: its
    parameters, model.keras and the predict and adapt_step graphs (no SavedModel, no device
    runtime graphs; ``max_shots`` does not apply).
    """
    from mmtl_tf.export import onnx_convert
    from mmtl_tf.training import load_learner

    opset = opset or onnx_convert.OPSET
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to "
                              "replace it")
    _check_attachments(attachments)
    learner, config = load_learner(workdir, checkpoint)
    if default_steps is not None:
        learner.config = dataclasses.replace(learner.config, eval_inner_steps=default_steps)
        config = dataclasses.replace(config, meta=dataclasses.replace(
            config.meta, eval_inner_steps=default_steps))
    if max_shots < 1:
        raise ValueError(f"max_shots={max_shots} must be >= 1")
    if learner.task == "regression":
        from mmtl_tf.export import regression

        regression.check_exportable(learner)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write = _write_regression if learner.task == "regression" else _write_classifier
        build = write(tmp, learner, config, max_shots, opset)
        learner.save(tmp / "model.keras")
        if model_card is not None:
            shutil.copyfile(model_card, tmp / "MODEL_CARD.md")
        (tmp / "config.json").write_text(config.to_json())
        if (Path(workdir) / "metrics.json").is_file():
            shutil.copyfile(Path(workdir) / "metrics.json", tmp / "metrics.json")
        for path in map(Path, attachments):
            if (tmp / path.name).exists():
                raise ValueError(f"the attachment {path} has the name of an exported file; "
                                 "rename it")
            shutil.copyfile(path, tmp / path.name)
        manifest = build()
        write_manifest(tmp, manifest)
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shipped
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_attachments(attachments) -> None:
    names = [Path(a).name for a in attachments]
    for path in map(Path, attachments):
        if not path.is_file():
            raise FileNotFoundError(f"the attachment {path} is not a file")
    if len(set(names)) != len(names):
        raise ValueError(f"attachments {names} repeat a file name; each is copied in under its own")
    reserved = sorted(set(names) & {MANIFEST, MANIFEST + ".sha256"})
    if reserved:
        raise ValueError(f"an attachment may not be named {reserved[0]}, which the export writes")


def _write_classifier(folder: Path, learner, config, max_shots: int, opset: int):
    """Writes a classifier's graphs (with the support-size buckets), params.npz and SavedModel;
    returns the function that builds the manifest once every file is in place."""
    from mmtl_tf.export import onnx_convert, saved_model
    from mmtl_tf.export.signatures import ExportSpec, Exportable

    spec = ExportSpec(config.data.image_size, 1, learner.config.max_ways, max_shots,
                      learner.config.transductive, learner.config.learned_inner_lr)
    exportable = Exportable(learner, spec)
    graphs = onnx_convert.export_graphs(exportable, opset=opset)
    graphs.update(_bucket_graphs(learner, spec, opset))
    for stem, model in sorted(graphs.items()):
        onnx_convert.write_onnx(model, folder / f"{stem}.onnx")
    write_params(folder / PARAMS, exportable)
    saved_model.save(exportable, learner.config.eval_inner_steps, folder / "saved_model")
    return lambda: build_manifest(folder, exportable, config, graphs, opset)


def _write_regression(folder: Path, learner, config, max_shots: int, opset: int):
    """Writes a regression learner's predict and adapt_step graphs and params.npz (the
    meta-initialisation and ``lr_<param>``); returns the manifest's builder."""
    from mmtl_tf.export import onnx_convert, regression

    graphs = regression.graphs(learner, opset)
    for stem, model in sorted(graphs.items()):
        onnx_convert.write_onnx(model, folder / f"{stem}.onnx")
    names, params = regression.parameters(learner)
    arrays = {n: np.asarray(p) for n, p in zip(names, params)}
    arrays.update({"lr_" + n: np.asarray(r, np.float32)
                   for n, r in zip(names, regression.inner_rates(learner))})
    write_npz(folder / PARAMS, arrays)
    return lambda: regression.manifest(folder, learner, config, graphs, opset, PARAMS,
                                       FORMAT_VERSION)


def rebuild_run(export_folder, workdir) -> Path:
    """Rebuilds a training-run folder (config.json, metrics.json, the checkpoint) from an
    export's model.keras, checked against its manifest hash: an export can then be rebuilt
    with the same weights after its run folder is gone (``pipelines/export.py --from-export``;
    params.npz comes out byte-identical)."""
    import keras

    import mmtl_tf.training  # noqa: F401  (registers the Keras classes)
    from mmtl_tf import checkpoints

    export_folder, workdir = Path(export_folder), Path(workdir)
    manifest = json.loads((export_folder / MANIFEST).read_text())
    for name in ("model.keras", "config.json"):
        if sha256(export_folder / name) != manifest["files"].get(name):
            raise ValueError(f"{export_folder / name} does not match its SHA-256 in the manifest; "
                             "rebuild from an intact export folder")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.json"):
        if (export_folder / name).is_file():
            shutil.copyfile(export_folder / name, workdir / name)
    learner = keras.saving.load_model(export_folder / "model.keras", compile=False)
    checkpoints.save(learner, checkpoints.folder(workdir) / checkpoints.BEST, {"step": None})
    return workdir


SUPPORT_BUCKETS = (5, 25, 100)  # support rows of the smaller graphs (5-way 1-shot, 5x5, 20x5)
BUCKET_GRAPHS = ("adapt_step", "head_step", "init_head", "support_stats", "head_then_adapt_step")


def _bucket_graphs(learner, spec, opset) -> dict:
    """Adaptation graphs for smaller padded support sets, named ``<stem>_s<rows>``: a padded
    graph pays for every row, so a 5-way 1-shot task on a device should not pay for 100."""
    import dataclasses

    from mmtl_tf.export import onnx_convert
    from mmtl_tf.export.signatures import Exportable

    graphs = {}
    for rows in SUPPORT_BUCKETS:
        if rows >= spec.max_support:
            continue
        bucket = Exportable(learner, dataclasses.replace(spec, support_rows=rows))
        wanted = [g for g in BUCKET_GRAPHS if g in onnx_convert.graph_names(bucket)]
        for stem, model in onnx_convert.export_graphs(bucket, wanted, opset).items():
            graphs[f"{stem}_s{rows}"] = model
    return graphs


def write_params(path: Path, exportable) -> None:
    """Meta-initialisation, batch-norm statistics and inner learning rates as a deterministic
    .npz (fixed zip timestamps, sorted names), readable by ``numpy.load``."""
    arrays = {n: np.asarray(p) for n, p in zip(exportable.names, exportable.params)}
    arrays.update({n: np.asarray(v) for n, v in zip(exportable.bn, exportable.bn_state)})
    arrays.update({"lr_" + n: np.asarray(lr, np.float32)
                   for n, lr in zip(exportable.names, exportable.stored_lrs())})
    write_npz(path, arrays)


def write_npz(path: Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    Path(path).write_bytes(buffer.getvalue())


def graph_io(model) -> dict:
    """Names, shapes and dtypes of a graph's inputs and outputs, as the manifest lists them."""
    import onnx

    def describe(values):
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            rows.append({"name": v.name, "shape": dims,
                         "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return rows

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def build_manifest(folder: Path, exportable, config, graphs: dict, opset: int) -> dict:
    """Everything a device needs to know, and the SHA-256 of every file in the folder."""
    spec, learner = exportable.spec, exportable.learner
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    metrics_path = folder / "metrics.json"
    return {
        "format_version": FORMAT_VERSION,
        "name": config.name,
        "task": "classification",
        "preprocessing": Preprocessing(config.data.image_size, config.data.ink_as_one).to_dict(),
        "max_ways": spec.max_ways, "max_shots": spec.max_shots, "max_support": spec.max_support,
        "default_steps": learner.config.eval_inner_steps,
        "inner_lr": learner.config.inner_lr,
        "learned_inner_lr": spec.learned_inner_lr,
        "head_init": learner.loop.head_init,
        "batch_norm": "transductive (query batch statistics)" if spec.transductive
                      else "support statistics (non-transductive)",
        "transductive": spec.transductive,
        "algorithm": learner.config.algorithm,
        # mu of the proximal term mu/2 * ||params - anchor||^2 every adaptation step descends;
        # > 0: the adaptation graphs take the task's starting params as anchor_<param>
        "proximal": exportable.proximal,
        "onnx_opset": opset,
        "parameters": exportable.names, "batch_norm_statistics": exportable.bn,
        "graphs": {stem: {"file": f"{stem}.onnx", **graph_io(model)} for stem, model in sorted(graphs.items())},
        "params_file": PARAMS,
        "meta_init_sha256": sha256(folder / PARAMS),
        "training_config": config.to_dict(),
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
        "files": {str(p.relative_to(folder)): sha256(p) for p in files},
    }


def write_manifest(folder, manifest: dict) -> Path:
    """Writes ``folder/manifest.json`` and ``manifest.json.sha256``, the SHA-256 of its bytes.

    The manifest lists every other file's hash but cannot hold its own, so without the second
    file its settings (preprocessing, batch-norm mode, rates, graph list) could be edited
    unseen; the device runtime refuses a manifest that does not match it. Like every hash here
    this catches corruption and unwitting edits, not a forger, who can rewrite both."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return write_checksummed(Path(folder) / MANIFEST, text.encode())
