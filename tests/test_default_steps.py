"""An export's default adaptation. The flagship's is 0 gradient steps, chosen on validation
alphabets (its inner step moves nothing at 1 shot and costs accuracy at 5): a task is classified
by the prototype head alone. The export carries the choice and the device applies it."""

import json

import numpy as np
import pytest

from mmtl_tf import checkpoints, ondevice
from mmtl_tf.config import preset
from mmtl_tf.export.exporter import export
from mmtl_tf.meta.algorithms import MetaConfig
from mmtl_tf.training import build_learner

WAYS = 4


def _run(folder, head_init: str):
    """A run folder of the tiny preset's freshly initialised learner (no data, no training)."""
    config = preset("tiny").replace(meta={"transductive": False, "max_ways": 5, "head_init": head_init})
    folder.mkdir()
    (folder / "config.json").write_text(config.to_json())
    checkpoints.save(build_learner(config), checkpoints.folder(folder) / checkpoints.BEST, {"step": 0})
    return folder


@pytest.fixture(scope="module")
def proto_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("default_steps")
    run = _run(root / "run", "proto")
    export(run, root / "export", max_shots=2, default_steps=0)
    return run, root / "export"


def test_the_export_carries_the_chosen_default_and_the_run_keeps_its_own(proto_export):
    run, folder = proto_export
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["default_steps"] == 0
    assert json.loads((folder / "config.json").read_text())["meta"]["eval_inner_steps"] == 0
    assert json.loads((run / "config.json").read_text())["meta"]["eval_inner_steps"] == 2
    assert ondevice.load(folder).default_steps == 0


def test_zero_steps_classify_each_one_shot_support_image_as_its_own_class(proto_export):
    """At 0 steps the head is the prototype head: logit_c(x) = 2 f(x).p_c - |p_c|^2, so a 1-shot
    support image (its own prototype; non-transductive queries use the support statistics, so
    its features are the same) scores highest on its class, by |f(x) - p_c|^2 over class c."""
    _, folder = proto_export
    model = ondevice.load(folder)
    rng = np.random.default_rng(11)
    images = rng.random((WAYS, 28, 28, 1)).astype(np.float32)  # 4 ways, 1 shot
    labels = ["w", "x", "y", "z"]
    personal = model.adapt(list(images), labels)
    assert personal.steps_run == 0 and len(personal.support_losses) == 1
    assert personal.status == "ok"
    logits = personal.logits(images)  # (4, 4)
    own = np.diag(logits)
    off = logits[~np.eye(WAYS, dtype=bool)].reshape(WAYS, WAYS - 1)
    assert (own[:, None] - off > 1e-3).all()
    assert [label for label, _ in personal.predict(images)] == labels
    # and it is what asking for 0 steps explicitly gives
    np.testing.assert_array_equal(model.adapt(list(images), labels, steps=0).logits(images), logits)


def test_a_zero_head_with_zero_steps_is_refused(tmp_path):
    with pytest.raises(ValueError, match="eval_inner_steps=0 with head_init='zero' predicts every "
                                         "class alike"):
        MetaConfig(head_init="zero", eval_inner_steps=0)
    run = _run(tmp_path / "run", "zero")
    with pytest.raises(ValueError, match="head_init='proto'"):
        export(run, tmp_path / "export", default_steps=0)
    assert not (tmp_path / "export").exists()
