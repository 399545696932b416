"""Task families (issue #14) in the configuration and on the command line (config.json round
trip), every bad input refused as one line naming the family before any training step, and
families from a folder of class subfolders and from TFDS mixed with Omniglot."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmtl_tf.config import ExperimentConfig, parse_family, preset, with_families


def _write_folder(root, classes=6, images=5, side=20, mode="L", seed=0):
    """A folder of class subfolders: each class a random pattern, its images noisy copies."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        pattern = rng.random((side, side)) < 0.3
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(images):
            pixels = np.where(pattern ^ (rng.random((side, side)) < 0.05), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").convert(mode)
            image.save(root / f"class_{c}" / f"{i}.png")
    return root


def test_families_round_trip_through_config_json_and_the_command_line_syntax():
    config = with_families(preset("tiny"), [
        parse_family("name=chars,source=omniglot,ways=5,shots=1,weight=2"),
        parse_family("name=mine,source=folder:/data/my symbols,ways=3,shots=2,queries=4,"
                     "rotations=true,image_size=56,weight=0.5")])
    assert ExperimentConfig.from_dict(json.loads(config.to_json())) == config
    mine = config.data.families[1]
    assert (mine.source_parts, mine.ways, mine.shots, mine.queries, mine.rotations,
            mine.image_size) == (("folder", "/data/my symbols"), 3, 2, 4, True, 56)
    np.testing.assert_allclose(config.data.family_weights, [0.8, 0.2])
    assert preset("tiny").data.families == ()  # every preset stays single-family


@pytest.mark.parametrize("text,message", [
    ("name=chars,weight=-1", "family 'chars': weight=-1 must be a finite number >= 0"),
    ("name=chars,weight=NaN", "family 'chars': weight=nan must be a finite number >= 0"),
    ("name=chars,weight=Infinity", "family 'chars': weight=inf must be"),
    ("name=chars,source=tfds", "family 'chars': source='tfds' needs a tfds name"),
    ("name=chars,source=imagenet", "family 'chars': source='imagenet' is unknown"),
    ("name=chars,ways=1", "family 'chars': ways=1 must be an integer >= 2"),
    ("name=chars,source=folder:x,within_alphabet=true", "family 'chars': within_alphabet needs"),
    ("name=chars,shotz=3", "'shotz=3' is not KEY=VALUE"),
])
def test_a_bad_family_is_refused_naming_it(text, message):
    with pytest.raises(ValueError) as err:
        parse_family(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_all_zero_weights_and_a_head_too_narrow_are_refused():
    zero = [parse_family("name=a,weight=0"), parse_family("name=b,weight=0")]
    with pytest.raises(ValueError, match=r"family weights \[0, 0\] are all zero"):
        with_families(preset("tiny"), zero)
    with pytest.raises(ValueError, match="family 'a': ways=30 is more than the head's"):
        with_families(preset("tiny"), [parse_family("name=a,ways=30")])


def _train_main(tmp_path, capsys, *families, extra=()):
    """pipelines/train.py in process, as a user runs it: (exit status, stderr)."""
    import importlib.util

    from mmtl_tf import cli

    spec = importlib.util.spec_from_file_location("train_pipeline", "pipelines/train.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    argv = ["--preset", "tiny", "--workdir", str(tmp_path / "run"), "--steps", "2", *extra]
    for family in families:
        argv += ["--family", family]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(pipeline.main, argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["one_class", "unreadable", "mixed_modes", "too_many_ways",
                                  "too_many_shots", "unknown_tfds"])
def test_bad_sources_stop_the_pipeline_before_any_step_with_one_line(tmp_path, capsys, case):
    good = _write_folder(tmp_path / "good", classes=6, images=5)
    folder = tmp_path / "bad"
    family = f"name=mine,source=folder:{folder},ways=2,shots=1,queries=2"
    expected = {"one_class": "holds 1 class subfolder(s); a family needs at least 2",
                "unreadable": "is not a readable image",
                "mixed_modes": "mixes image modes",
                "too_many_ways": "ways=5 is larger than the 4 classes",
                "too_many_shots": "shots + queries = 4 + 2 = 6 is larger than the images",
                "unknown_tfds": "TFDS has no dataset named 'no_such_dataset_mmtl'"}[case]
    if case == "one_class":
        _write_folder(folder, classes=1)
    elif case == "unreadable":
        _write_folder(folder, classes=3)
        (folder / "class_1" / "notes.png").write_text("not an image")
    elif case == "mixed_modes":  # two grey classes and a colour one
        _write_folder(folder, classes=2)
        _write_folder(tmp_path / "colour", classes=1, mode="RGB")
        (tmp_path / "colour" / "class_0").rename(folder / "class_rgb")
    elif case == "too_many_ways":  # 6 classes: 4 train, 1 validation, 1 test
        family = f"name=mine,source=folder:{good},ways=5,shots=1,queries=2"
    elif case == "too_many_shots":
        family = f"name=mine,source=folder:{good},ways=2,shots=4,queries=2"
    else:
        family = "name=mine,source=tfds:no_such_dataset_mmtl,ways=2"
    status, err = _train_main(tmp_path, capsys, family)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: family 'mine' (source ") and expected in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # no training step ran


def test_set_may_name_switches_that_need_the_families_given_by_family(tmp_path, capsys):
    """--family is applied before --set, so meta.family_weighting meets its families: the
    run gets as far as the (deliberately one-class) folder."""
    _write_folder(tmp_path / "one", classes=1)
    status, err = _train_main(tmp_path, capsys, f"name=mine,source=folder:{tmp_path / 'one'}",
                              extra=["--set", "meta.family_weighting=recent_loss"])
    assert status == 2 and "family 'mine'" in err and "holds 1 class subfolder" in err, err


SMALL = dict(train={"steps": 2, "log_every": 1, "checkpoint_every": 2, "eval_every": 2,
                    "eval_episodes": 4, "meta_batch_size": 4})


def test_a_folder_of_class_subfolders_mixes_with_omniglot_in_a_training_run(tmp_path,
                                                                           omniglot_zips):
    from mmtl_tf.run_callbacks import read_history
    from mmtl_tf.training import episode_sampler, train

    folder = _write_folder(tmp_path / "symbols", classes=8, images=6, side=20)
    config = with_families(preset("tiny").replace(**SMALL), [
        parse_family("name=chars,source=omniglot:small1,ways=5,shots=1,queries=3"),
        parse_family(f"name=mine,source=folder:{folder},ways=3,shots=2,queries=2,weight=0.5")])
    batch = episode_sampler(config, "train").sample(tf.constant([0, 0], tf.int64), 4)
    assert batch.family.numpy().tolist() == [0, 0, 1, 1]
    assert batch.episodes.support_x.shape == (4, 6, 28, 28, 1)  # 20-pixel images at 28
    assert batch.episodes.query_x.shape == (4, 15, 28, 28, 1)
    metrics = train(config, tmp_path / "run", verbose=0)
    assert "family 'chars'" in metrics["scored_on"] and metrics["steps"] == 2
    rows = read_history(tmp_path / "run")
    assert len(rows) == 2
    for name in ("loss", "chars_loss", "chars_accuracy", "mine_loss", "mine_accuracy"):
        assert all(np.isfinite(row[name]) for row in rows), name


def test_a_tfds_dataset_mixes_with_omniglot(omniglot_zips):
    import tensorflow_datasets as tfds

    from mmtl_tf.data.families import FamilyMix
    from mmtl_tf.data.family_sources import family_sampler
    from mmtl_tf.training import build_learner

    chars = parse_family("name=chars,source=omniglot:small1,ways=5,shots=1,queries=3")
    digits = parse_family("name=digits,source=tfds:mnist,ways=4,shots=2,queries=2,"
                          "image_size=14,weight=3")
    config = with_families(preset("tiny").replace(**SMALL), [chars, digits])
    omniglot = family_sampler(chars, "train", 28)
    with tfds.testing.mock_data(num_examples=200):  # random 28x28 digits, 10 classes
        mnist = family_sampler(digits, "train", 28)
    assert mnist.classes.num_classes == 6 and mnist.image_shape == (28, 28, 1)  # 2 of 10 held out
    mix = FamilyMix([omniglot, mnist], config.data.family_weights)
    batch = mix.sample(tf.constant([1, 0], tf.int64), 4)
    np.testing.assert_allclose(batch.weight.numpy(), [0.125, 0.125, 0.375, 0.375])
    learner = build_learner(config)
    learner.compile(optimizer="adam")
    logs = learner.train_on_batch(batch, return_dict=True)
    for name in ("loss", "chars_loss", "digits_loss", "digits_accuracy"):
        assert np.isfinite(logs[name]), name
    np.testing.assert_allclose(logs["loss"], 0.25 * logs["chars_loss"] + 0.75 * logs["digits_loss"],
                               rtol=1e-5)


def test_a_single_family_task_shape_beside_families_is_refused_and_with_families_resets_it():
    config = with_families(preset("omniglot"), [parse_family("name=a,source=omniglot,ways=5")])
    assert (config.data.ways, config.data.shots, config.data.rotations, config.data.jitter) == \
        (5, 1, None, 0.0), "the flagship's 40-way jittered shape gives way to the families'"
    with pytest.raises(ValueError, match=r"^data\.ways=20 has no effect with task families "
                                         r"\(each family sets its own ways\); drop it or set "
                                         r"data\.ways=5$"):
        config.replace(data={"ways": 20})
    with pytest.raises(ValueError, match=r"^data\.rotations=True has no effect"):
        config.replace(data={"rotations": True})
