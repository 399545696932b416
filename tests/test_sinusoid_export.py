"""The sinusoid family end to end: a regression run keeps its lowest-error state, its export's
ONNX graphs adapt as TensorFlow does, the report's table honours K and the steps, and the
shipped exported/sinusoid's model card shows what pipelines/evaluate.py prints for it."""

import dataclasses
import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf import sinusoid_report as sr
from mmtl_tf.evaluation import mean_and_ci95

REPO = Path(__file__).resolve().parents[1]
SHIPPED, BASELINE = REPO / "exported" / "sinusoid", REPO / "exported" / "sinusoid-pretrained"
PREFIX = 64  # tasks recomputed against the shipped report: its first block of tasks


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A few steps of the sinusoid preset and of its baseline, validated every 2 steps."""
    from mmtl_tf.config import preset
    from mmtl_tf.training import train

    root = tmp_path_factory.mktemp("sinusoid")
    runs = {}
    for name in ("sinusoid", "sinusoid-pretrained"):
        config = preset(name).replace(train={"steps": 6, "meta_batch_size": 5, "log_every": 2,
                                             "checkpoint_every": 2, "eval_every": 2,
                                             "eval_episodes": 8})
        train(config, root / name, verbose=0)
        runs[name] = root / name
    return runs


def test_a_regression_run_keeps_the_state_with_the_lowest_validation_error(tiny_runs):
    from mmtl_tf.run_callbacks import read_history

    for folder in tiny_runs.values():
        metrics = json.loads((folder / "metrics.json").read_text())
        validated = {r["step"]: r["val_loss"] for r in read_history(folder) if "val_loss" in r}
        assert sorted(validated) == [2, 4, 6]
        best = min(validated, key=validated.get)
        assert metrics["best_step"] == best and metrics["best_loss"] == validated[best]
        assert "accuracy" not in metrics and metrics["part"] == "validation"


def _onnx_adapt(folder, support_x, support_y, query_x, steps):
    """What a device with onnxruntime does: chain adapt_step from params.npz, then predict.
    Returns (support losses before each step, query outputs)."""
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    names, rows = manifest["parameters"], manifest["max_support"]
    with np.load(folder / "params.npz") as stored:
        params = {n: stored[n] for n in names}
        rates = {"lr_" + n: stored["lr_" + n] for n in names}
    step = ort.InferenceSession(str(folder / "adapt_step.onnx"))
    predict = ort.InferenceSession(str(folder / "predict.onnx"))
    padded = {"support_x": np.zeros((rows, 1), np.float32),
              "support_y": np.zeros((rows, 1), np.float32),
              "sample_mask": np.zeros(rows, np.float32)}
    k = len(support_x)
    padded["support_x"][:k], padded["support_y"][:k], padded["sample_mask"][:k] = (
        support_x, support_y, 1.0)
    # a proximal export's anchor: the parameters the task starts from
    anchor = {"anchor_" + n: v for n, v in params.items()} if manifest.get("proximal") else {}
    losses = []
    for _ in range(steps):
        loss, *new = step.run(None, {**padded, **params, **rates, **anchor})
        losses.append(float(loss))
        params = dict(zip(names, new))
    return losses, predict.run(None, {"x": query_x, **params})[0]


def test_the_regression_export_adapts_in_onnxruntime_as_in_tensorflow(tiny_runs, tmp_path):
    from mmtl_tf.export.exporter import export
    from mmtl_tf.files import sha256
    from mmtl_tf.meta import inner_loop as il
    from mmtl_tf.runs import load_model

    note = tmp_path / "notes.md"
    note.write_text("attached\n")
    folder = tmp_path / "export"
    manifest = export(tiny_runs["sinusoid"], folder, attachments=[note])
    assert manifest["task"] == "regression" and manifest["files"]["notes.md"] == sha256(note)
    shipped = {"predict.onnx", "adapt_step.onnx", "params.npz", "model.keras"}
    assert shipped <= set(manifest["files"])
    learner = load_model(folder).learner
    theta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    steps = 7
    for k, queries in ((5, 1), (20, 100)):  # two support sizes, two query batch sizes
        task = sr.draw_tasks(k, queries, seed=31, count=1)
        losses, outputs = _onnx_adapt(folder, task.support_x[0], task.support_y[0],
                                      task.query_x[0], steps)
        adapted = il.adapt(learner.loop, theta, task.support_x[0], task.support_y[0], 1, steps,
                           learner.learning_rates(1), True)
        expected = learner.loop.logits(adapted.params, task.query_x[0]).numpy()
        assert outputs.shape == (queries, 1)
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(losses, adapted.support_losses.numpy()[:steps], rtol=1e-5)


def test_a_proximal_regression_export_adapts_with_the_term_as_tensorflow(tmp_path):
    """A fresh sinusoid learner with mu = 0.6 (no training needed): 7 steps of adapt_step fed
    the anchors agree with TensorFlow's inner loop, and land away from the steps without it."""
    from mmtl_tf import checkpoints
    from mmtl_tf.config import preset
    from mmtl_tf.export.exporter import export
    from mmtl_tf.meta import inner_loop as il
    from mmtl_tf.training import build_learner

    config = preset("sinusoid").replace(meta={"proximal": 0.6})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(config.to_json())
    learner = build_learner(config)
    checkpoints.save(learner, checkpoints.folder(tmp_path / "run") / checkpoints.BEST, {"step": 0})
    manifest = export(tmp_path / "run", tmp_path / "export")
    assert manifest["proximal"] == 0.6
    inputs = [i["name"] for i in manifest["graphs"]["adapt_step"]["inputs"]]
    assert inputs[-len(manifest["parameters"]):] == ["anchor_" + n for n in manifest["parameters"]]
    theta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    task, steps = sr.draw_tasks(10, 20, seed=7, count=1), 7
    losses, outputs = _onnx_adapt(tmp_path / "export", task.support_x[0], task.support_y[0],
                                  task.query_x[0], steps)
    for loop in (learner.loop, dataclasses.replace(learner.loop, proximal=0.0)):
        adapted = il.adapt(loop, theta, task.support_x[0], task.support_y[0], 1, steps,
                           learner.learning_rates(1), True)
        expected = loop.logits(adapted.params, task.query_x[0]).numpy()
        if loop.proximal:
            np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(losses, adapted.support_losses.numpy()[:steps], rtol=1e-5)
        else:
            assert np.abs(outputs - expected).max() > 1e-3


def test_the_device_runtime_and_the_exporter_refuse_in_one_line(tiny_runs, tmp_path):
    from mmtl_tf import ondevice
    from mmtl_tf.export.exporter import export
    from mmtl_tf.ondevice.export_folder import ExportError

    with pytest.raises(ExportError, match="regression export") as err:
        ondevice.load(SHIPPED)
    assert "\n" not in str(err.value)
    clash = tmp_path / "manifest.json"
    clash.write_text("{}")
    with pytest.raises(ValueError, match="may not be named manifest.json"):
        export(tiny_runs["sinusoid"], tmp_path / "export", attachments=[clash])
    assert not (tmp_path / "export").exists()


def _sgd_query_mse(params, task, t, steps, rate):
    """Query MSE after 1..steps plain SGD steps of a ReLU MLP on task t's support points,
    written apart from InnerLoop: dense layers, then the head."""
    def forward(p, x):
        h = x
        for w, b in zip(p[0:-2:2], p[1:-2:2]):
            h = tf.nn.relu(h @ w + b)
        return h @ p[-2] + p[-1]

    params, errors = [tf.constant(p) for p in params], []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = tf.reduce_mean(tf.square(forward(params, task.support_x[t]) - task.support_y[t]))
        params = [p - rate * g for p, g in zip(params, tape.gradient(loss, params))]
        errors.append(float(tf.reduce_mean(tf.square(forward(params, task.query_x[t]) -
                                                     task.query_y[t]))))
    return errors


def test_the_table_honours_k_and_the_steps_for_the_model_and_its_baseline(tiny_runs, tmp_path):
    from mmtl_tf.runs import load_model

    models = {n: load_model(f).learner for n, f in tiny_runs.items()}
    report = sr.evaluate(sr.Scored(models["sinusoid"], "maml", "a"),
                         sr.Scored(models["sinusoid-pretrained"], "pretrained", "b"), tmp_path,
                         "protocol", "test", "test tasks", shots=(3, 7), queries=11, tasks=5,
                         seed=8, steps=4, curve_steps=0)
    assert report["table_steps"] == [1, 4] and [r["shots"] for r in report["settings"]] == [3, 7]
    for row in report["settings"]:
        tasks = sr.draw_tasks(row["shots"], 11, 8, 5)
        assert tasks.support_x.shape == (5, row["shots"], 1)
        for role, name in (("model", "sinusoid"), ("baseline", "sinusoid-pretrained")):
            learner = models[name]
            for t in range(5):
                errors = _sgd_query_mse([p.numpy() for p in learner.meta_params], tasks, t, 4,
                                        learner.config.inner_lr)
                got = [row[role]["per_task"][i][t] for i in range(2)]
                np.testing.assert_allclose(got, [errors[0], errors[3]], rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(sr.FILES)


def test_a_baseline_adapting_at_another_rate_is_refused_in_one_line(tiny_runs, tmp_path):
    from mmtl_tf.runs import load_model

    model = load_model(tiny_runs["sinusoid"]).learner
    other = load_model(tiny_runs["sinusoid-pretrained"]).learner
    other.config = dataclasses.replace(other.config, inner_lr=0.02)
    with pytest.raises(ValueError, match="adapts at inner_lr=0.02, the model at 0.01") as err:
        sr.evaluate(sr.Scored(model, "maml", "a"), sr.Scored(other, "pretrained", "b"), tmp_path,
                    "protocol", "test", "test tasks", tasks=2)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


def test_tasks_are_a_pure_function_of_seed_and_index_and_the_same_sinusoids_at_every_k():
    many, few = sr.draw_tasks(10, 4, 3, 70), sr.draw_tasks(10, 4, 3, 5)
    for a, b in zip(many, few):
        np.testing.assert_array_equal(a[:5], b)
    other_k = sr.draw_tasks(20, 4, 3, 70)
    np.testing.assert_array_equal(other_k.task_params, many.task_params)
    assert not np.array_equal(sr.draw_tasks(10, 4, 4, 5).task_params, few.task_params)


def _table_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| K (support points)"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_model_card_table_is_what_evaluate_prints_for_the_shipped_export(tmp_path, capsys):
    shipped = json.loads((SHIPPED / "evaluation.json").read_text())
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    # the card's table is the shipped report's, whose cells are its 600 tasks' statistics
    assert _table_lines(card) == _table_lines(sr.table(shipped))
    assert _table_lines(card) == _table_lines((SHIPPED / "evaluation.md").read_text())
    assert (shipped["tasks"], shipped["seed"], shipped["table_steps"]) == (600, 2024, [1, 10])
    for row in shipped["settings"]:
        for role in ("model", "baseline"):
            for i, values in enumerate(row[role]["per_task"]):
                assert len(values) == 600  # float32 results, stored in their shortest form
                np.testing.assert_allclose(mean_and_ci95(np.float32(values)),
                                           (row[role]["mse"][i], row[role]["mse_ci95"][i]),
                                           rtol=1e-12)
    assert ("python pipelines/evaluate.py --workdir exported/sinusoid --baseline "
            "exported/sinusoid-pretrained") in card
    # the same command on the first PREFIX tasks: the same per-task errors, the same table
    main = runpy.run_path(str(REPO / "pipelines" / "evaluate.py"))["main"]
    main(["--workdir", str(SHIPPED), "--baseline", str(BASELINE), "--out", str(tmp_path),
          "--episodes", str(PREFIX), "--curve-steps", "10"])
    printed = capsys.readouterr().out
    again = json.loads((tmp_path / "evaluation.json").read_text())
    prefix = json.loads(json.dumps(shipped))
    for row, fresh in zip(prefix["settings"], again["settings"]):
        row["tasks"] = PREFIX
        for role in ("model", "baseline"):
            for i, values in enumerate(row[role]["per_task"]):
                np.testing.assert_allclose(fresh[role]["per_task"][i], values[:PREFIX],
                                           rtol=1e-5)
                row[role]["mse"][i], row[role]["mse_ci95"][i] = mean_and_ci95(
                    np.float32(values[:PREFIX]))
    assert _table_lines(printed) == _table_lines(sr.table(prefix))
    assert re.search(r"K=5: sinusoid \d\.\d{3} ± \d\.\d{3} after 1 step", printed)


def test_the_shipped_sinusoid_exports_are_small_complete_and_verified():
    from mmtl_tf.files import sha256

    for folder in (SHIPPED, BASELINE):
        manifest = json.loads((folder / "manifest.json").read_text())
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert files - set(manifest["files"]) == {"manifest.json", "manifest.json.sha256"}
        for name, digest in manifest["files"].items():
            assert sha256(folder / name) == digest, name
        assert "MODEL_CARD.md" in files and manifest["task"] == "regression"
        assert sum((folder / f).stat().st_size for f in files) < 1_000_000
    assert {"evaluation.json", "evaluation.md", "curves.png", "tasks.png"} <= set(
        json.loads((SHIPPED / "manifest.json").read_text())["files"])
    total = sum(p.stat().st_size for p in (REPO / "exported").rglob("*") if p.is_file())
    assert total < 20_000_000, total
