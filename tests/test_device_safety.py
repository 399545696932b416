"""The device runtime and the user's data (review issue #11, items 11-15): verified bytes, the
manifest's own hash, owner-only states that are checked when read, graphs exact in any ONNX
runtime, adaptation that never hands back a worse step unsaid, and the folder swap.

Uses the shipped export and the Omniglot evaluation characters; both must be present (a missing
input fails these tests, it does not skip them).
"""

from __future__ import annotations

import ast
import collections
import hashlib
import io
import json
import os
import shutil
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from mmtl_tf import best_step, files
from mmtl_tf import ondevice
from mmtl_tf.data import sources
from mmtl_tf.ondevice import images as image_io
from mmtl_tf.ondevice import support as support_set
from mmtl_tf.ondevice.personalize import personalize

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "exported" / "omniglot"


@pytest.fixture(scope="module")
def shipped():
    return ondevice.load(SHIPPED)


@pytest.fixture
def export_copy(tmp_path):
    return Path(shutil.copytree(SHIPPED, tmp_path / "export"))


def synthetic_support(ways: int, shots: int, seed: int):
    """Preprocessed images (ways*shots, 28, 28, 1): class c draws a vertical and a horizontal
    bar placed by c (distinct for up to 36 classes), plus noise; and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(ways), shots)
    x = rng.normal(0, 0.05, (ways * shots, 28, 28, 1)).astype(np.float32)
    for i, c in enumerate(labels):
        x[i, :, 3 + 4 * (c % 6):5 + 4 * (c % 6)] += 1.0
        x[i, 3 + 4 * (c // 6 % 6):5 + 4 * (c // 6 % 6), :] += 1.0
    return np.clip(x, 0, 1), labels.tolist()


def evaluation_characters(ways: int, seed: int):
    """One drawing of each of ``ways`` random evaluation characters, as PIL images."""
    # Found where the package looks ($MMTL_OMNIGLOT_DIR, then the shared folder); a missing zip
    # raises OmniglotSourceError naming it and the fix: a failure, never a skip.
    with zipfile.ZipFile(sources.locate_zip("images_evaluation")) as archive:
        grouped = collections.defaultdict(list)
        for name in sorted(n for n in archive.namelist() if n.endswith(".png")):
            grouped[name.rsplit("/", 1)[0]].append(name)
        characters = sorted(grouped)
        chosen = np.random.default_rng(seed).choice(len(characters), ways, replace=False)
        return [Image.open(io.BytesIO(archive.read(grouped[characters[c]][0]))) for c in chosen]


def write_support_folder(root: Path, x, labels) -> Path:
    for i, (image, label) in enumerate(zip(x, labels)):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(((1 - image[..., 0]) * 255).astype(np.uint8)).save(
            root / f"class{label}" / f"{i}.png")
    return root


# ----- 11: bytes verified once; the manifest is hashed too ------------------------------------
def test_files_changed_after_loading_are_never_used(export_copy, shipped, tmp_path):
    """A graph or parameter file swapped between load and use must change nothing: sessions,
    parameters and the saved state come from the bytes that were verified."""
    model = ondevice.load(export_copy)
    predict = onnx.load_from_string(shipped.graph_bytes("predict"))
    negated = onnx.helper.make_node("Neg", ["logits_negated"], ["logits"])
    for node in predict.graph.node:  # a valid graph that answers differently
        node.output[:] = ["logits_negated" if o == "logits" else o for o in node.output]
    predict.graph.node.append(negated)
    (export_copy / "predict.onnx").write_bytes(predict.SerializeToString())
    for graph in export_copy.glob("*step*.onnx"):
        graph.write_bytes(b"swapped")
    (export_copy / "params.npz").write_bytes(b"swapped")

    x, labels = synthetic_support(5, 1, seed=3)
    personal, reference = model.adapt(x, labels), shipped.adapt(x, labels)
    for name in model.param_names:
        np.testing.assert_array_equal(personal.params[name], reference.params[name], err_msg=name)
    np.testing.assert_array_equal(personal.logits(x), reference.logits(x))
    assert personal.personalized_onnx() == reference.personalized_onnx()
    with zipfile.ZipFile(personal.save(tmp_path / "me.personal")) as archive:
        assert archive.read("personalized.onnx") == reference.personalized_onnx()
    with pytest.raises(ondevice.ExportError, match=r"\.onnx does not match its SHA-256"):
        ondevice.load(export_copy)  # and loading again refuses the swapped files


def test_an_edited_manifest_is_refused(export_copy):
    path = export_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["preprocessing"]["ink_as_one"] = False  # a silent behaviour change
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ondevice.ExportError,
                       match=r"manifest.json does not match its SHA-256 in manifest.json.sha256"):
        ondevice.load(export_copy)
    (export_copy / "manifest.json.sha256").unlink()
    with pytest.raises(ondevice.ExportError,
                       match=r"has no valid manifest.json.sha256 .*re-export"):
        ondevice.load(export_copy)


def test_the_manifest_hash_is_sha256sum_of_the_manifest_bytes(tmp_path):
    from mmtl_tf.export.exporter import write_manifest

    write_manifest(tmp_path, {"format_version": 1, "name": "x"})
    data = (tmp_path / "manifest.json").read_bytes()
    expected = f"{hashlib.sha256(data).hexdigest()}  manifest.json\n"
    assert (tmp_path / "manifest.json.sha256").read_text() == expected  # `sha256sum -c` reads it
    shipped = (SHIPPED / "manifest.json").read_bytes()
    assert (SHIPPED / "manifest.json.sha256").read_text() == \
        f"{hashlib.sha256(shipped).hexdigest()}  manifest.json\n"


# ----- 12: the personal state is the user's data ------------------------------------------------
@pytest.fixture(scope="module")
def state_bytes(shipped, tmp_path_factory):
    x, labels = synthetic_support(5, 1, seed=7)
    path = shipped.adapt(x, labels).save(tmp_path_factory.mktemp("state") / "me.personal")
    return path.read_bytes()


def test_saved_states_are_owner_only_even_over_a_world_readable_file(shipped, tmp_path):
    x, labels = synthetic_support(4, 2, seed=1)
    personal = shipped.adapt(x, labels)
    path, onnx_path = tmp_path / "me.personal", tmp_path / "me.onnx"
    for old in (path, onnx_path):
        old.write_bytes(b"old")
        old.chmod(0o666)
    previous = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        personal.save(path)
        personal.write_personalized_onnx(onnx_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(onnx_path.stat().st_mode) == 0o600
    assert ondevice.load_personal(SHIPPED, path).class_names == personal.class_names


def test_personalize_never_replaces_a_saved_state_with_a_stopped_one(tmp_path):
    x, labels = synthetic_support(5, 1, seed=2)
    support = write_support_folder(tmp_path / "support", x, labels)
    query = next((support / "class0").iterdir())
    state = tmp_path / "me.personal"
    good = personalize(SHIPPED, support, [query], steps=1, save=state)
    assert good["status"] == "ok" and good["saved"] == str(state)
    before = state.read_bytes()
    with pytest.warns(ondevice.AdaptationWarning, match="non-finite"):
        stopped = personalize(SHIPPED, support, [query], steps=1, lr=3e38, save=state)
    assert stopped["status"].startswith("stopped:") and stopped["saved"] is None
    assert "left as it was" in stopped["not_saved"]
    assert state.read_bytes() == before


def rewrite_state(data: bytes, path: Path, change) -> Path:
    """Writes the state ``data`` to ``path`` after ``change(members)`` edits its members."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    change(members)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in members.items():
            archive.writestr(name, value)
    return path


def _drop_key(members):
    state = json.loads(members["personal.json"])
    del state["class_names"]
    members["personal.json"] = json.dumps(state)


def _nan_array(members):
    buffer = io.BytesIO()
    array = np.lib.format.read_array(io.BytesIO(members["arrays/head_b.npy"]))
    array[3] = np.nan
    np.lib.format.write_array(buffer, array)
    members["arrays/head_b.npy"] = buffer.getvalue()


def _huge_member(members):
    members["arrays/head_b.npy"] = bytes(64 << 20)  # 64 MiB of zeros, 64 KiB deflated


def _huge_json(members):
    members["personal.json"] = members["personal.json"] + b" " * (2 << 20)


def _extra_member(members):
    members["arrays/../../notes.txt"] = b"hello"


@pytest.mark.parametrize("change, message", [
    (_drop_key, r"personal.json lacks the key\(s\) class_names"),
    (_nan_array, r"parameter head_b holds non-finite values"),
    (_huge_member, r"arrays/head_b.npy is 67108864 bytes, more than the \d+ a state of this"),
    (_huge_json, r"personal.json is \d+ bytes, more than the 1048576"),
    (_extra_member, r"holds 'arrays/../../notes.txt', which no personal state of this model has"),
])
def test_a_damaged_state_is_refused_with_the_runtime_error(state_bytes, tmp_path, change, message):
    path = rewrite_state(state_bytes, tmp_path / "bad.personal", change)
    with pytest.raises(ondevice.PersonalStateError, match=message):
        ondevice.load_personal(SHIPPED, path)


def test_an_unchanged_rewritten_state_still_loads(state_bytes, tmp_path):
    """The refusals above come from the one change each makes, not from the rewriting."""
    path = rewrite_state(state_bytes, tmp_path / "same.personal", lambda members: None)
    assert ondevice.load_personal(SHIPPED, path).ways == 5


# ----- 13: the adaptation graphs are exact in any conforming ONNX runtime ----------------------
# the shipped (prototype-head) export has no head_then_adapt_step: a zero-head export's is checked
@pytest.mark.parametrize("export, stem", [("shipped", "head_step_s5"), ("shipped", "adapt_step_s5"),
                                          ("zero_head", "head_then_adapt_step_s5")])
def test_adaptation_graphs_agree_in_the_onnx_reference_evaluator(request, export, stem):
    """onnx's ReferenceEvaluator computes LogSoftmax as log(softmax(x)): a masked class (logit
    -1e9) has log-probability -inf there. 3 classes of max_ways and 4 rows of 5: masked classes."""
    shipped = (request.getfixturevalue("shipped") if export == "shipped"
               else ondevice.load(request.getfixturevalue("untrained_export").folder))
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(5)
    x, _ = synthetic_support(4, 1, seed=5)
    feeds = {**support_set.padded(x, np.array([0, 1, 2, 0], np.int32), 5, 3, shipped.max_ways),
             **shipped.params, **{"lr_" + n: v for n, v in shipped.lrs.items()},
             **{"next_lr_" + n: v for n, v in shipped.lrs.items()}}
    feeds["head_w"] = rng.normal(0, 0.1, feeds["head_w"].shape).astype(np.float32)  # not zero
    session = shipped.session(stem)
    inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    expected = session.run(outputs, inputs)
    with np.errstate(divide="ignore"):  # log(0) of the masked classes is the point
        reference = ReferenceEvaluator(onnx.load_from_string(shipped.graph_bytes(stem)))
        got = reference.run(outputs, inputs)
    for name, a, b in zip(outputs, expected, got):
        assert np.isfinite(b).all(), f"{stem}: {name} is not finite in the reference evaluator"
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5, err_msg=f"{stem}: {name}")


def test_the_support_loss_keeps_the_value_and_gradient_of_the_one_hot_form():
    import tensorflow as tf

    from mmtl_tf.meta.inner_loop import InnerLoop

    rng = np.random.default_rng(11)
    labels = tf.constant([0, 1, 2, 2, 1, 0, 1])
    for dtype in (tf.float32, tf.float64):
        logits = tf.where(tf.constant([True] * 3 + [False] * 2), tf.constant(
            rng.normal(0, 3, (7, 5)), dtype), tf.constant(-1e9, dtype))  # 2 classes masked
        for mask in (None, tf.constant([1, 1, 1, 1, 1, 0, 0], dtype)):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(logits)
                loss = InnerLoop(encoder=None).loss(logits, labels, mask)
                per_row = -tf.reduce_sum(tf.one_hot(labels, 5, dtype=dtype) *
                                         tf.nn.log_softmax(logits), -1)
                old = (tf.reduce_mean(per_row) if mask is None else
                       tf.reduce_sum(mask * per_row) / tf.reduce_sum(mask))
            assert loss.numpy() == old.numpy()
            np.testing.assert_array_equal(tape.gradient(loss, logits), tape.gradient(old, logits))


def test_a_run_rebuilt_from_the_shipped_export_gives_its_params_byte_for_byte(tmp_path):
    """How the shipped export was re-exported without its training run (--from-export)."""
    from mmtl_tf.export.exporter import rebuild_run, write_params
    from mmtl_tf.export.signatures import ExportSpec, Exportable
    from mmtl_tf.training import load_learner

    learner, config = load_learner(rebuild_run(SHIPPED, tmp_path / "run"))
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    spec = ExportSpec(config.data.image_size, 1, learner.config.max_ways, manifest["max_shots"],
                      learner.config.transductive, learner.config.learned_inner_lr)
    write_params(tmp_path / "params.npz", Exportable(learner, spec))
    assert (tmp_path / "params.npz").read_bytes() == (SHIPPED / "params.npz").read_bytes()
    copy = Path(shutil.copytree(SHIPPED, tmp_path / "copy"))
    (copy / "model.keras").write_bytes(b"another model")
    with pytest.raises(ValueError, match=r"model.keras does not match its SHA-256"):
        rebuild_run(copy, tmp_path / "run2")


# ----- 14: adaptation keeps its best step and says so -------------------------------------------
def test_best_step_rule():
    assert best_step.kept_step([3.0, 0.62, 0.32, 2.07]) == 2
    assert best_step.kept_step([3.0, 0.62, 0.32, 2.07], keep_best=False) == 3
    assert best_step.kept_step([1.6, 0.0, 0.0, 0.0]) == 3  # equal losses: the later step
    assert best_step.kept_step([1.6, 0.5, float("nan")]) == 1
    assert best_step.kept_step([1.6, 0.1, 0.5, float("inf")], keep_best=False) == 2
    assert best_step.kept_step([float("nan")]) == -1
    assert best_step.status([3.0, 0.62, 0.32], 2) == "ok"
    rose = best_step.status([3.0, 0.62, 0.32, 2.07], 2)
    assert rose.startswith("kept_best_step: the support loss rose after step 2")
    assert "3, 0.62, 0.32, 2.07" in rose and "kept the parameters after step 2" in rose
    assert best_step.status([1.6, float("nan")], 0).startswith("stopped: the support loss became")


@pytest.fixture(scope="module")
def diverging_task(shipped):
    """5 classes of 4 unrelated evaluation characters each (20 drawings): 3 steps at the shipped
    rate raise the support loss from 0.24 to 1.24, 2.14 and 0.70 (the default of 0 steps never
    meets this; a user asking for steps may)."""
    return image_io.to_batch(evaluation_characters(20, seed=0), shipped.prep), [i // 4 for i in range(20)]


DIVERGING_STEPS, DIVERGING_WAYS = 3, 5


def test_device_adaptation_keeps_the_best_step_and_says_so(shipped, diverging_task):
    x, labels = diverging_task
    with pytest.warns(ondevice.AdaptationWarning, match="kept_best_step"):
        personal = shipped.adapt(x, labels, steps=DIVERGING_STEPS)
    losses = personal.support_losses
    assert len(losses) == DIVERGING_STEPS + 1 and losses[-1] > 2 * min(losses)
    kept = int(np.argmin(losses))
    assert personal.steps_run == kept < DIVERGING_STEPS
    assert personal.status.startswith(f"kept_best_step: the support loss rose after step {kept}")
    assert f"{losses[-1]:.4g}" in personal.status
    shorter = shipped.adapt(x, labels, steps=kept)  # the same weights, reached directly
    assert shorter.status == "ok"
    for name in shipped.param_names:
        np.testing.assert_array_equal(personal.params[name], shorter.params[name], err_msg=name)
    for name in shipped.bn_names:
        np.testing.assert_array_equal(personal.bn_stats[name], shorter.bn_stats[name], err_msg=name)
    assert personal.support_loss(x, np.asarray(labels)) == pytest.approx(min(losses), abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fixed-step protocol neither keeps nor warns
        last = shipped.adapt(x, labels, steps=DIVERGING_STEPS, keep_best=False)
    assert last.status == "ok" and last.steps_run == DIVERGING_STEPS
    assert last.support_loss(x, np.asarray(labels)) == pytest.approx(losses[-1], abs=1e-5)


def test_tensorflow_adapt_keeps_the_same_step_as_the_device(shipped, diverging_task):
    import keras
    import tensorflow as tf

    import mmtl_tf.models.conv4  # noqa: F401  (registers Conv4 for loading)
    from mmtl_tf.meta import inner_loop as il
    from mmtl_tf.meta.learner import MetaLearner

    x, labels = diverging_task
    learner = keras.saving.load_model(SHIPPED / "model.keras")
    assert isinstance(learner, MetaLearner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        device = shipped.adapt(x, labels, steps=DIVERGING_STEPS)
        params = learner.adapt(x, np.asarray(labels, np.int32), steps=DIVERGING_STEPS)
    assert [w.category for w in caught] == [ondevice.AdaptationWarning] * 2
    assert params.steps_run == device.steps_run < len(params.support_losses) - 1
    assert params.status.split(" (")[0] == device.status.split(" (")[0]  # same sentence, step
    # steps that raise the loss tenfold amplify float32 differences between the two runtimes:
    # 0.02% at step 1, 0.5% at step 2 here
    np.testing.assert_allclose(params.support_losses, device.support_losses, rtol=1e-2, atol=1e-3)
    meta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    direct = il.adapt(learner.loop, meta, tf.constant(x), tf.constant(labels, tf.int32),
                      DIVERGING_WAYS, params.steps_run, learner.learning_rates(DIVERGING_WAYS),
                      True).params
    for got, want in zip(params, direct):
        np.testing.assert_array_equal(np.asarray(got), want.numpy())
    np.testing.assert_allclose(params[-2], device.params["head_w"][:, :DIVERGING_WAYS], rtol=5e-4,
                               atol=1e-4)  # prototype rows of norm ~1.6: float32 of two runtimes


# ----- 15: installing the device runtime never asks a public index for "mmtl_tf" -----------------
def test_the_device_install_is_documented_from_a_local_path():
    import tomllib

    readme, pyproject = (REPO / "README.md").read_text(), (REPO / "pyproject.toml").read_text()
    for name, text in (("README.md", readme), ("pyproject.toml", pyproject)):
        assert "install mmtl_tf" not in text, f"{name} installs mmtl_tf by name from an index"
    section = readme.split("## On a device", 1)[1].split("\n## ", 1)[0]
    command = next(line for line in section.splitlines() if line.startswith("pip install"))
    assert command.startswith("pip install --no-deps . && pip install ")
    device = tomllib.loads(pyproject)["project"]["optional-dependencies"]["device"]
    for requirement in device:  # the README's command installs the extra's packages
        assert f'"{requirement.split(">")[0]}>=' in command, requirement
    packages = command.split("pip install ")[-1]
    assert f"pip install --no-deps . && pip install {packages}" in pyproject  # the same command


# ----- smaller: the export folder swap, the import graph -----------------------------------------
def old_and_new_folders(root: Path):
    """``root/export`` holding manifest.json "old", and a finished ``root/.export.new`` ("new")."""
    target, new = root / "export", root / ".export.new"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
    return target, new


def test_replacing_a_folder_never_leaves_the_target_missing(tmp_path, monkeypatch):
    target, new = old_and_new_folders(tmp_path)
    seen = []
    rename = os.rename

    def watched(*args, **kwargs):
        rename(*args, **kwargs)
        seen.append((target / "manifest.json").is_file())

    monkeypatch.setattr(files.os, "rename", watched)
    files.replace_folder(new, target)
    assert all(seen), "a moment without a complete folder at the target"
    assert (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_without_an_atomic_exchange_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target, new = old_and_new_folders(tmp_path)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    rename = os.rename

    def fail_into_target(source, destination, *args, **kwargs):
        if Path(source) == new:
            raise OSError("simulated failure")
        rename(source, destination, *args, **kwargs)

    monkeypatch.setattr(files.os, "rename", fail_into_target)
    with pytest.raises(OSError, match="simulated failure"):
        files.replace_folder(new, target)
    assert (target / "manifest.json").read_text() == "old"
    monkeypatch.setattr(files.os, "rename", rename)
    files.replace_folder(new, target)  # and the fallback itself works
    assert (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_the_device_modules_import_each_other_one_way():
    package = REPO / "mmtl_tf" / "ondevice"
    imports = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        imports[path.stem] = {n.split(".")[2] for n in names
                              if n.startswith("mmtl_tf.ondevice.") and n.split(".")[2] != path.stem}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, seen + (m,)))
                   for m in imports.get(start, ()))

    cycles = sorted(m for m in imports if m != "__init__" and reaches(m, m))
    assert not cycles, f"import cycles through {cycles}: {imports}"
