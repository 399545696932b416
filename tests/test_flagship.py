"""The flagship preset `omniglot`: it resolves to what its model card describes and runs end to
end (train with validation, both derivative orders, checkpoint, resume) on a tiny budget."""

import numpy as np
import pytest

from mmtl_tf.config import preset
from mmtl_tf.run_callbacks import read_history


def test_the_flagship_is_a_way_agnostic_proto_maml_of_20_way_tasks_validated_on_5w1s_too():
    config = preset("omniglot")
    assert (config.meta.head_init, config.meta.transductive) == ("proto", False)
    assert (config.data.ways, config.data.shots, config.data.rotations) == (20, 1, True)
    assert config.data.protocol == "background" and not (config.data.train_split or config.data.eval_split)
    assert 0 < config.meta.first_order_until < config.train.steps  # both orders are used
    assert config.train.lr_schedule == "cosine" and config.train.also_validate == ("5w1s",)


def test_rotated_classes_are_drawn_in_meta_training_only(omniglot_zips):
    from mmtl_tf.training import episode_sampler

    config = preset("omniglot")
    train_sampler = episode_sampler(config, "train")
    ids = train_sampler.sample(np.array([5, 6], np.int64), 8).class_ids.numpy()
    assert set(np.unique(ids % 4)) == {0, 1, 2, 3}, "rotated classes (id * 4 + quarter turns)"
    for part in ("validation", "test"):  # scored parts follow the protocol: never rotated
        assert not episode_sampler(config, part).rotations


def test_the_flagship_preset_trains_validates_and_resumes_on_a_tiny_budget(omniglot_zips, tmp_path):
    from mmtl_tf.training import train

    tiny = {"steps": 4, "meta_batch_size": 2, "warmup_steps": 1, "log_every": 2,
            "checkpoint_every": 2, "eval_every": 2, "eval_episodes": 4}
    config = preset("omniglot").replace(train=tiny, meta={"first_order_until": 2})
    first = train(config.replace(train={**tiny, "steps": 2}), tmp_path / "short", verbose=0)
    assert first["steps"] == 2
    metrics = train(config, tmp_path / "run", verbose=0)
    rows = read_history(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:  # validation of the training setting and of 5-way 1-shot at each period
        assert 0.0 <= row["val_5w1s_accuracy"] <= 1.0 and "val_accuracy" in row
        assert row["pre_accuracy"] > 1 / 20, "a prototype head starts above chance"
    assert metrics["settings"]["5w1s"] == rows[-1]["val_5w1s_accuracy"]
    assert metrics["ways"] == 20 and metrics["part"] == "validation"
    # the same configuration resumes (here: finds the run finished) instead of starting over
    assert train(config, tmp_path / "run", verbose=0)["steps"] == 4
    with pytest.raises(ValueError, match="holds a run of another configuration"):
        train(config.replace(meta={"inner_lr": 0.2}), tmp_path / "run", verbose=0)
