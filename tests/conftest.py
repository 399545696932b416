"""Fixtures shared by several test modules.

A test that needs the Omniglot zips asks for ``omniglot_zips``: when a zip is missing the test
FAILS, naming the file and how to provide it, so CI cannot pass without its inputs. Nothing in
this suite skips for missing data.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

OMNIGLOT_STEMS = ("images_background", "images_evaluation", "images_background_small1",
                  "images_background_small2")


@pytest.fixture(scope="session")
def omniglot_zips() -> dict[str, Path]:
    """stem -> path of each official Omniglot zip, found where the package looks
    ($MMTL_OMNIGLOT_DIR, else the shared folder; the tests never download). A missing zip fails
    the test that asked (never a skip), naming every missing file and how to provide it."""
    from mmtl_tf.data import sources

    found, missing = {}, []
    for stem in OMNIGLOT_STEMS:
        try:
            found[stem] = sources.locate_zip(stem)
        except sources.OmniglotSourceError as err:
            missing.append(f"{stem}.zip: {err}")
    if missing:
        pytest.fail(f"missing test input: {len(missing)} of the official Omniglot zips "
                    f"({', '.join(s + '.zip' for s in OMNIGLOT_STEMS)}) cannot be found. Set "
                    f"{sources.ENV_VAR}=<folder holding them> or put them in "
                    f"{sources.shared_data_dir()}.\n" + "\n".join(missing), pytrace=False)
    return found


class TrainedExport(typing.NamedTuple):
    workdir: Path  # the training run (config.json, checkpoint)
    folder: Path  # its export for devices (manifest.json, *.onnx, params.npz)


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory, omniglot_zips) -> TrainedExport:
    """The tiny preset meta-trained long enough to beat chance clearly, then exported.

    150 meta-steps at meta_lr 4e-3 reach ~55% on held-out 5-way 1-shot Omniglot characters
    (60 steps stay near 35%, chance is 20%); support-statistics batch norm
    (transductive=False) like the shipped presets. About a minute on two loaded cores.
    """
    from mmtl_tf.config import preset
    from mmtl_tf.export.exporter import export
    from mmtl_tf.training import train

    root = tmp_path_factory.mktemp("trained_export")
    config = preset("tiny").replace(train={"steps": 150, "meta_lr": 4e-3, "log_every": 50,
                                           "checkpoint_every": 50, "eval_every": 50},
                                    meta={"transductive": False})
    train(config, root / "run")
    export(root / "run", root / "export")
    return TrainedExport(root / "run", root / "export")


UNTRAINED_MAX_WAYS, UNTRAINED_MAX_SHOTS = 5, 2  # kept small: the export is quicker


@pytest.fixture(scope="session")
def untrained_export(tmp_path_factory) -> TrainedExport:
    """A run folder of the tiny preset's freshly initialised learner, and its export: no data,
    no training. 5-way at most and 2 shots (support buckets of 5 and 10 rows) keep the export
    at about half the time of the trained one's 20-way 5-shot."""
    from mmtl_tf.config import preset
    from mmtl_tf.export.exporter import export
    from mmtl_tf import checkpoints
    from mmtl_tf.training import build_learner

    root = tmp_path_factory.mktemp("untrained_export")
    config = preset("tiny").replace(meta={"transductive": False, "max_ways": UNTRAINED_MAX_WAYS})
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(config.to_json())
    checkpoints.save(build_learner(config), checkpoints.folder(root / "run") / checkpoints.BEST,
                     {"step": 0})
    export(root / "run", root / "export", max_shots=UNTRAINED_MAX_SHOTS)
    return TrainedExport(root / "run", root / "export")


@pytest.fixture
def float64():
    """Builds the next models in float64 (exact comparisons, finite differences), then restores
    both floatx and the global dtype policy (Keras caches the policy on first use)."""
    import keras

    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def _tensorflow_adaptation(workdir, dtype, support_x, support_y, query, ways, steps,
                           head_only=False):
    """The TF inner loop of the training run in ``workdir``, the encoder built in ``dtype``:
    query logits (Q, N), support losses (steps + 1,) and the adapted params (head N wide).
    ``head_only`` adapts the head alone (the device's ``adapt(head_only=True)``)."""
    import dataclasses

    import keras
    import tensorflow as tf

    from mmtl_tf.meta import inner_loop as il
    from mmtl_tf.training import load_learner

    keras.mixed_precision.set_global_policy(dtype)  # load_learner builds with the global policy
    try:
        learner, _ = load_learner(workdir)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert learner.encoder.convs[0].kernel.dtype == dtype
    loop = learner.loop
    if head_only:
        encoder = len(learner.meta_params) - 2
        loop = dataclasses.replace(loop, adapt_mask=(False,) * encoder + (True, True))
    meta = [tf.convert_to_tensor(p) for p in learner.meta_params]
    cast = lambda a: tf.constant(a, dtype)  # noqa: E731
    adapted = il.adapt(loop, meta, cast(support_x), support_y, ways, steps,
                       learner.learning_rates(ways), first_order=True)
    logits = il.query_logits(loop, adapted.params, cast(support_x), cast(query))
    return {"logits": logits.numpy(), "support_losses": adapted.support_losses.numpy(),
            "params": [p.numpy() for p in adapted.params]}


@pytest.fixture(scope="session")
def tensorflow_adaptation():
    """``_tensorflow_adaptation``: the reference the device's adaptation is compared with."""
    return _tensorflow_adaptation
