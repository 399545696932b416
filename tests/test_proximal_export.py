"""Exports of a model with iMAML's proximal term: the adaptation graphs take the task's starting
parameters as anchors, and the device adapts as TensorFlow's inner loop does with the term.

One untrained zero-head export (no data, no training) at mu = 0.7: a zero head's device path
runs head_step, then head_then_adapt_step, then adapt_step, so every adaptation graph is fed
anchors. At the first step the parameters equal their anchors and the term's gradient is zero:
the parity covers 4 steps, where it is not."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx
import pytest
import tensorflow as tf

from mmtl_tf.export import onnx_convert
from mmtl_tf.export.signatures import Exportable, ExportSpec

MU = 0.7
MAX_WAYS, MAX_SHOTS = 6, 3  # 18 support rows in full, and the 5-row bucket
STEPS = 4
QUERIES = 7
# (ways, shots): 15 rows run the full 18-row graphs, 4 rows the 5-row bucket
TASKS = ((5, 3), (4, 1))
TOLERANCE = 1e-5  # absolute, against TensorFlow in float64 (as test_ondevice's parity)
ADAPTATION = ("adapt_step", "head_step", "head_then_adapt_step")
stem_of = lambda graph: re.sub(r"_s\d+$", "", graph)  # noqa: E731  (adapt_step_s5 -> adapt_step)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, export folder) of the tiny preset's fresh learner trained with the term."""
    from mmtl_tf import checkpoints
    from mmtl_tf.config import preset
    from mmtl_tf.export.exporter import export
    from mmtl_tf.training import build_learner

    root = tmp_path_factory.mktemp("proximal_export")
    config = preset("tiny").replace(meta={"transductive": False, "max_ways": MAX_WAYS,
                                          "proximal": MU})
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(config.to_json())
    checkpoints.save(build_learner(config), checkpoints.folder(root / "run") / checkpoints.BEST,
                     {"step": 0})
    export(root / "run", root / "export", max_shots=MAX_SHOTS)
    return root / "run", root / "export"


@pytest.fixture(scope="module")
def model(run):
    from mmtl_tf import ondevice

    return ondevice.load(run[1])


def _task(ways, shots, seed):
    """Preprocessed support images (ways*shots, 28, 28, 1) with labels, and 7 queries per
    class: each class a random stroke pattern, each image it with 10% of the pixels flipped."""
    rng = np.random.default_rng(seed)
    patterns = np.kron(rng.random((ways, 7, 7)) < 0.3, np.ones((4, 4), bool))  # (N, 28, 28)
    support, query = (np.repeat(patterns, k, 0) ^ (rng.random((ways * k, 28, 28)) < 0.1)
                      for k in (shots, QUERIES))
    labels = np.repeat(np.arange(ways), shots).astype(np.int32)
    return (support[..., None].astype(np.float32), labels, query[..., None].astype(np.float32))


def test_the_manifest_records_mu_and_every_adaptation_graph_takes_anchors(run):
    manifest = json.loads((run[1] / "manifest.json").read_text())
    assert manifest["proximal"] == MU and manifest["training_config"]["meta"]["proximal"] == MU
    names, graphs = manifest["parameters"], manifest["graphs"]
    stems = {stem for stem in graphs if stem_of(stem) in ADAPTATION}
    assert stems == {f"{g}{suffix}" for g in ADAPTATION for suffix in ("", "_s5")}
    for stem, graph in graphs.items():
        inputs = [i["name"] for i in graph["inputs"]]
        anchors = [n for n in inputs if n.startswith("anchor_")]
        if stem.startswith("head_step"):
            assert anchors == inputs[-2:] == ["anchor_head_w", "anchor_head_b"], stem
        elif stem in stems:
            assert anchors == inputs[-len(names):] == ["anchor_" + n for n in names], stem
        else:  # predict, init_head, support_stats, meta_init: no step, no term
            assert anchors == [], stem


@pytest.mark.parametrize("ways, shots", TASKS)
@pytest.mark.parametrize("path", ["fused", "step_by_step"])
def test_device_adaptation_matches_tensorflows_proximal_inner_loop(run, model, monkeypatch,
                                                                   tensorflow_adaptation, ways,
                                                                   shots, path):
    """Params, support losses and query logits after 4 steps, through the fused first two
    steps (head_then_adapt_step) and without them (head_step, then adapt_step)."""
    if path == "step_by_step":
        monkeypatch.setattr(model, "_has", lambda stem: False)  # as an export without it
    used, run_graph = set(), model.run
    monkeypatch.setattr(model, "run", lambda name, *args: used.add(stem_of(name)) or run_graph(
        name, *args))
    support_x, support_y, query = _task(ways, shots, seed=ways * 10 + shots)
    personal = model.adapt(support_x, support_y.tolist(), steps=STEPS, keep_best=False)
    assert personal.steps_run == STEPS
    assert ("head_then_adapt_step" in used) == (path == "fused")
    want = tensorflow_adaptation(run[0], "float64", support_x, support_y, query, ways, STEPS)
    for name, expected in zip(model.param_names, want["params"]):
        got = personal.params[name]
        got = got[..., :ways] if name.startswith("head") else got  # the head's N active classes
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE, err_msg=name)
    np.testing.assert_allclose(personal.support_losses, want["support_losses"], rtol=0,
                               atol=TOLERANCE)
    np.testing.assert_allclose(personal.logits(query), want["logits"], rtol=0, atol=TOLERANCE)
    # without the term TensorFlow's steps land elsewhere, by far more than the tolerance
    plain = _without_the_term(tensorflow_adaptation, run[0], support_x, support_y, query, ways)
    assert np.abs(personal.logits(query) - plain["logits"]).max() > 100 * TOLERANCE


def _without_the_term(tensorflow_adaptation, workdir, support_x, support_y, query, ways):
    from mmtl_tf.meta import inner_loop as il

    original = il.InnerLoop.step

    def step(self, *args, **kwargs):
        return original(dataclasses.replace(self, proximal=0.0), *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(il.InnerLoop, "step", step)
        return tensorflow_adaptation(workdir, "float64", support_x, support_y, query, ways, STEPS)


def test_head_only_and_kept_best_adaptation_match_tensorflow(run, model, tensorflow_adaptation):
    support_x, support_y, query = _task(5, 3, seed=3)
    head_only = model.adapt(support_x, support_y.tolist(), steps=STEPS, head_only=True,
                            keep_best=False)
    want = tensorflow_adaptation(run[0], "float64", support_x, support_y, query, 5, STEPS,
                                 head_only=True)
    for name in model.param_names[:-2]:
        np.testing.assert_array_equal(head_only.params[name], model.params[name], err_msg=name)
    for name, expected in zip(("head_w", "head_b"), want["params"][-2:]):
        np.testing.assert_allclose(head_only.params[name][..., :5], expected, rtol=0,
                                   atol=TOLERANCE, err_msg=name)
    best = model.adapt(support_x, support_y.tolist(), steps=STEPS)  # keep_best: any kept step
    kept = tensorflow_adaptation(run[0], "float64", support_x, support_y, query, 5,
                                 best.steps_run)
    np.testing.assert_allclose(best.logits(query), kept["logits"], rtol=0, atol=TOLERANCE)


def test_a_zero_head_away_from_the_anchor_takes_the_full_step(model):
    """The device's head-only shortcut for a zero head holds only while the encoder sits at
    its anchor: elsewhere the term moves the encoder even under a zero head."""
    support_x, support_y, _ = _task(4, 1, seed=9)
    rng = np.random.default_rng(2)
    anchor = dict(model.params)
    params = {n: (a + rng.normal(0, 0.05, a.shape)).astype(np.float32) for n, a in anchor.items()}
    params["head_w"], params["head_b"] = (np.zeros_like(anchor[n]) for n in ("head_w", "head_b"))
    support = {**model._support(model.graph("adapt_step", 4), support_x, support_y, 4),
               **{"anchor_" + n: a for n, a in anchor.items()}}
    [(_, update)] = model._next_steps(support, params, model.lrs, 2, STEPS, head_only=False)
    assert sorted(update) == sorted(model.param_names)
    for name in model.param_names[:-2]:
        assert np.abs(update[name] - params[name]).max() > 1e-4, name


def test_a_proximal_manifest_over_graphs_without_anchors_is_refused_in_one_line(run, tmp_path):
    import shutil

    from mmtl_tf import ondevice
    from mmtl_tf.export.exporter import write_manifest

    folder = shutil.copytree(run[1], tmp_path / "export")
    manifest = json.loads((folder / "manifest.json").read_text())
    inputs = manifest["graphs"]["adapt_step_s5"]["inputs"]
    manifest["graphs"]["adapt_step_s5"]["inputs"] = [i for i in inputs
                                                     if not i["name"].startswith("anchor_")]
    write_manifest(folder, manifest)
    with pytest.raises(ondevice.ExportError, match="proximal=0.7 but graph adapt_step_s5 takes "
                                                   "no anchor_<param> inputs; re-export") as err:
        ondevice.load(folder)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def plain_adapt_step(run):
    """The full-size adapt_step graph of the same weights with mu = 0, and its Exportable."""
    from mmtl_tf.training import load_learner

    learner, config = load_learner(run[0])
    learner.loop = dataclasses.replace(learner.loop, proximal=0.0)
    spec = ExportSpec(config.data.image_size, 1, MAX_WAYS, MAX_SHOTS, False, "none")
    ex = Exportable(learner, spec)
    return ex, onnx_convert.export_graphs(ex, ["adapt_step"])["adapt_step"]


def test_a_step_is_the_plain_step_pulled_toward_the_anchor_by_lr_mu(model, plain_adapt_step):
    """new = p - lr * (g + mu * (p - anchor)), g the support-loss gradient (the mu = 0 graph's),
    away from the anchor in every parameter (the head too, not zero)."""
    ex, graph = plain_adapt_step
    assert not any(i.name.startswith("anchor_") for i in graph.graph.input)
    rng = np.random.default_rng(11)
    support_x, support_y, _ = _task(5, 3, seed=4)
    feeds = model._support("adapt_step", support_x, support_y, 5)
    anchor = dict(model.params)
    params = {n: (a + rng.normal(0, 0.05, a.shape)).astype(np.float32) for n, a in anchor.items()}
    lrs = model._step_lrs(model.lrs, 0)
    names = ["loss"] + ["new_" + n for n in model.param_names]
    proximal = model.run("adapt_step", names, {**feeds, **params, **lrs,
                                               **{"anchor_" + n: a for n, a in anchor.items()}})
    import onnxruntime as ort

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = session.run(names, {**feeds, **params, **lrs})
    np.testing.assert_allclose(proximal[0], plain[0], rtol=0, atol=1e-6)  # the support loss alone
    for name, got, without in zip(model.param_names, proximal[1:], plain[1:]):
        pull = lrs["lr_" + name] * MU * (params[name] - anchor[name])
        np.testing.assert_allclose(got, without - pull, rtol=0, atol=1e-6, err_msg=name)
        assert np.abs(got - without).max() > 100 * TOLERANCE, name


@pytest.mark.parametrize("stem", ["adapt_step_s5", "head_step_s5", "head_then_adapt_step_s5"])
def test_proximal_graphs_are_plain_onnx_exact_in_the_reference_evaluator(model, stem):
    """Default-domain operators, the full checker, and onnx's ReferenceEvaluator agreeing with
    onnxruntime (as for the graphs without the term, test_device_safety)."""
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load_from_string(model.graph_bytes(stem))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    onnx.checker.check_model(proto, full_check=True)
    rng = np.random.default_rng(5)
    support_x, support_y, _ = _task(3, 1, seed=6)
    params = {n: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
              for n, v in model.params.items()}
    feeds = {**model._support(stem, support_x, support_y, 3), **params,
             **{"anchor_" + n: v for n, v in model.params.items()},
             **{"lr_" + n: v for n, v in model.lrs.items()},
             **{"next_lr_" + n: v for n, v in model.lrs.items()}}
    session = model.session(stem)
    inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    expected = session.run(outputs, inputs)
    with np.errstate(divide="ignore"):  # log(0) of the masked classes
        got = ReferenceEvaluator(proto).run(outputs, inputs)
    for name, a, b in zip(outputs, expected, got):
        assert np.isfinite(b).all(), f"{stem}: {name}"
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5, err_msg=f"{stem}: {name}")


def test_the_savedmodel_adapts_with_the_term(run, tensorflow_adaptation):
    support_x, support_y, query = _task(4, 1, seed=8)
    loaded = tf.saved_model.load(str(run[1] / "saved_model"))
    got = loaded.signatures["adapt_and_predict"](
        support_images=tf.constant(support_x), support_labels=tf.constant(support_y),
        query_images=tf.constant(query), steps=tf.constant(STEPS), inner_lr=tf.constant(-1.0))
    want = tensorflow_adaptation(run[0], "float64", support_x, support_y, query, 4, STEPS)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=1e-4)
