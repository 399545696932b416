"""The export folder: SavedModel parity, manifest, determinism, and refusals.

Determinism, atomic replacement and refusals use the untrained export (no data needed)."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tensorflow as tf

from mmtl_tf.export.exporter import export
from mmtl_tf.meta import inner_loop as il
from mmtl_tf.training import load_learner

WAYS, SHOTS, QUERIES = 4, 2, 3


def _max_shots(export_folder) -> int:
    """The max_shots an export was made with, to export its run again the same way."""
    return json.loads((Path(export_folder) / "manifest.json").read_text())["max_shots"]


@pytest.fixture(scope="module")
def episode(trained_export):
    from mmtl_tf.data.episode_files import draw_episodes
    from mmtl_tf.training import episode_sampler

    _, config = load_learner(trained_export.workdir)
    config = config.replace(data={"ways": WAYS, "shots": SHOTS, "queries": QUERIES})
    e = draw_episodes(episode_sampler(config, "test"), seed=5, num_episodes=1)
    return type(e)(*(f[0] for f in e))


def test_manifest_hashes_every_file_and_describes_every_graph(trained_export):
    folder = trained_export.folder
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                     if p.is_file() and p.name not in ("manifest.json", "manifest.json.sha256"))
    assert sorted(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    # a zero head with support statistics: every graph, and the adaptation graphs again for
    # padded support sets of 5 and 25 rows (20-way 5-shot: 100 rows in full)
    adaptation = ("adapt_step", "head_step", "init_head", "support_stats", "head_then_adapt_step")
    assert set(manifest["graphs"]) == {"predict", "meta_init", *adaptation} | {
        f"{stem}_s{rows}" for stem in adaptation for rows in (5, 25)}
    for stem, graph in manifest["graphs"].items():  # what the manifest says is what the file is
        model = onnx.load(folder / graph["file"])
        assert [i["name"] for i in graph["inputs"]] == [i.name for i in model.graph.input], stem
        assert [o["name"] for o in graph["outputs"]] == [o.name for o in model.graph.output], stem
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {
            manifest["onnx_opset"]}, stem
    assert manifest["max_support"] == manifest["max_ways"] * manifest["max_shots"] == 100
    assert manifest["preprocessing"]["image_size"] == 28 and manifest["transductive"] is False
    assert manifest["training_config"] == json.loads((trained_export.workdir / "config.json").read_text())
    assert manifest["metrics"] == json.loads((trained_export.workdir / "metrics.json").read_text())


def test_savedmodel_signatures_reproduce_keras_and_the_inner_loop(trained_export, episode):
    learner, _ = load_learner(trained_export.workdir)
    loaded = tf.saved_model.load(str(trained_export.folder / "saved_model"))
    # serving_default: the meta-initialisation, batch norm with its calibrated statistics
    images = tf.constant(episode.query_x)
    keras_logits = learner(images, training=False)
    np.testing.assert_allclose(loaded.signatures["serving_default"](images=images)["logits"],
                               keras_logits, atol=1e-5)
    # adapt / adapt_and_predict: the inner loop on the unpadded support, head sliced to N
    steps = 3
    reference = il.adapt(learner.loop, [tf.convert_to_tensor(p) for p in learner.meta_params],
                         episode.support_x, episode.support_y, WAYS, steps,
                         learner.learning_rates(WAYS), True).params
    expected = il.query_logits(learner.loop, reference, episode.support_x, episode.query_x)
    args = dict(support_images=tf.constant(episode.support_x),
                support_labels=tf.constant(episode.support_y), steps=tf.constant(steps),
                inner_lr=tf.constant(-1.0))
    got = loaded.signatures["adapt_and_predict"](query_images=images, **args)["logits"]
    assert got.shape == (WAYS * QUERIES, WAYS)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    adapted = loaded.signatures["adapt"](**args)
    np.testing.assert_allclose(adapted["head_w"][:, :WAYS], reference[-2], atol=1e-4)
    np.testing.assert_allclose(adapted["head_w"][:, WAYS:], 0.0, atol=1e-7)  # absent classes
    # steps <= 0 means the exported default; a different count gives different weights
    assert learner.config.eval_inner_steps != steps
    default = loaded.signatures["adapt"](**{**args, "steps": tf.constant(0)})
    reference_default = il.adapt(learner.loop, [tf.convert_to_tensor(p) for p in learner.meta_params],
                                 episode.support_x, episode.support_y, WAYS,
                                 learner.config.eval_inner_steps, learner.learning_rates(WAYS), True).params
    np.testing.assert_allclose(default["head_w"][:, :WAYS], reference_default[-2], atol=1e-4)


def test_exporting_twice_gives_identical_onnx_and_params(untrained_export, tmp_path):
    again = tmp_path / "again"
    export(untrained_export.workdir, again, max_shots=_max_shots(untrained_export.folder))
    first = json.loads((untrained_export.folder / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    deterministic = [n for n in first if n.endswith(".onnx") or n == "params.npz"]
    assert len(deterministic) >= 8
    assert {n: first[n] for n in deterministic} == {n: second[n] for n in deterministic}


def test_refuses_missing_checkpoint_existing_folder_and_foreign_architecture(untrained_export,
                                                                            tmp_path):
    with pytest.raises(FileNotFoundError, match="pipelines/train.py"):
        export(tmp_path / "no-run", tmp_path / "out")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export(untrained_export.workdir, existing)
    assert (existing / "keep.txt").read_text() == "mine", "the old folder is untouched"
    # a checkpoint from another architecture: same run folder, config says 16 filters
    foreign = tmp_path / "foreign"
    shutil.copytree(untrained_export.workdir, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["model"]["filters"] = 16
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match this configuration.*another architecture"):
        export(foreign, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")], "no half-written folder"


def test_force_replaces_a_folder_atomically(untrained_export, tmp_path, monkeypatch):
    from mmtl_tf.export import exporter

    out = Path(shutil.copytree(untrained_export.folder, tmp_path / "model"))
    before = (out / "manifest.json").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(exporter, "write_params", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export(untrained_export.workdir, out, force=True, max_shots=_max_shots(out))
    assert (out / "manifest.json").read_bytes() == before, "the previous export survives"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary folder is left"
