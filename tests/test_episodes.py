"""Episode invariants, determinism, rotation classes, splits and fixed episode files."""

import math

import numpy as np
import pytest
import tensorflow as tf

from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.episode_files import (draw_episodes, draw_indices, fixed_episodes,
                                        load_indices)
from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset
from mmtl_tf.data.sinusoid import SinusoidSampler

NUM_CLASSES, GROUP_SIZE = 37, 6


def _coded_classes(images_per_class=(20,), side=8):
    """Each image carries its class id in pixel (0, 0) and its index within the class in (0, 1)."""
    counts = [images_per_class[c % len(images_per_class)] for c in range(NUM_CLASSES)]
    labels = np.repeat(np.arange(NUM_CLASSES) * 10 + 3, counts)  # class ids are not positions
    images = np.zeros((len(labels), side, side, 1), np.float32)
    images[:, 0, 0, 0] = labels
    images[:, 0, 1, 0] = np.concatenate([np.arange(n) for n in counts])
    groups = {int(c): (c // 10) // GROUP_SIZE for c in np.unique(labels)}
    return ClassImages.from_labels(images, labels, groups, tuple("abcdefg"))


@pytest.mark.parametrize("ways,shots,queries", [(5, 3, 7), (3, 2, 4), (7, 1, 2), (4, 5, 11)])
def test_episode_invariants(ways, shots, queries):
    classes = _coded_classes()
    sampler = EpisodeSampler(classes, ways, shots, queries)
    batch = next(iter(episode_dataset(sampler, seed=11, meta_batch_size=6)))
    assert batch.support_x.shape == (6, ways * shots, 8, 8, 1)
    assert batch.query_x.shape == (6, ways * queries, 8, 8, 1)
    for e in range(6):
        class_ids = batch.class_ids[e].numpy()
        assert len(set(class_ids)) == ways, "an episode's classes are distinct"
        seen = {}
        for x, y, count in ((batch.support_x[e], batch.support_y[e], shots),
                            (batch.query_x[e], batch.query_y[e], queries)):
            y = y.numpy()
            assert np.array_equal(np.bincount(y, minlength=ways), [count] * ways)
            true_class = x.numpy()[:, 0, 0, 0].astype(int)
            # label i is the dataset class class_ids[i]: labels and images stay paired
            assert np.array_equal(true_class, class_ids[y])
            for c, index in zip(true_class, x.numpy()[:, 0, 1, 0].astype(int)):
                assert (c, index) not in seen, "support and query share no image, none repeats"
                seen[(c, index)] = True
        assert len(seen) == ways * (shots + queries)


def test_labels_are_shuffled_and_assigned_in_random_order():
    sampler = EpisodeSampler(_coded_classes(), 5, 3, 7)
    batch = next(iter(episode_dataset(sampler, seed=2, meta_batch_size=16)))
    support_y = batch.support_y.numpy()
    assert any(not np.array_equal(row, np.sort(row)) for row in support_y), "rows are shuffled"
    ids = batch.class_ids.numpy()
    assert any(not np.array_equal(row, np.sort(row)) for row in ids), "label order is random"


def test_same_seed_same_stream_other_seed_other_stream():
    sampler = EpisodeSampler(_coded_classes(), 5, 3, 7)
    take = lambda seed: [e for e in episode_dataset(sampler, seed, meta_batch_size=4).take(3)]
    first, again, other = take(5), take(5), take(6)
    for a, b in zip(first, again):
        for fa, fb in zip(a, b):
            np.testing.assert_array_equal(fa.numpy(), fb.numpy())
    assert not np.array_equal(first[0].class_ids.numpy(), other[0].class_ids.numpy())


def test_single_episodes_match_the_batched_stream_shapes():
    sampler = EpisodeSampler(_coded_classes(), 5, 3, 7)
    episodes = list(episode_dataset(sampler, seed=1, num_episodes=70))
    assert len(episodes) == 70
    assert episodes[0].support_x.shape == (15, 8, 8, 1) and episodes[0].class_ids.shape == (5,)


def test_within_group_episodes_use_one_alphabet():
    classes = _coded_classes()
    sampler = EpisodeSampler(classes, 5, 3, 7, within_group=True)
    batch = next(iter(episode_dataset(sampler, seed=3, meta_batch_size=12)))
    group_of = dict(zip(classes.class_ids, classes.groups))
    groups_seen = set()
    for row in batch.class_ids.numpy():
        groups = {group_of[c] for c in row}
        assert len(groups) == 1
        groups_seen |= groups
    assert len(groups_seen) > 1


def test_rotation_classes_rotate_images_counter_clockwise():
    rng = np.random.default_rng(0)
    images = rng.random((NUM_CLASSES * 20, 8, 8, 1)).astype(np.float32)
    labels = np.repeat(np.arange(NUM_CLASSES), 20)
    classes = ClassImages.from_labels(images, labels)
    sampler = EpisodeSampler(classes, 6, 2, 3, rotations=True)
    batch = next(iter(episode_dataset(sampler, seed=4, meta_batch_size=8)))
    turns_seen = set()
    for e in range(8):
        ids = batch.class_ids[e].numpy()
        for x, y in zip(batch.support_x[e].numpy(), batch.support_y[e].numpy()):
            base, turns = divmod(int(ids[y]), 4)
            turns_seen.add(turns)
            originals = images[base * 20:(base + 1) * 20]
            rotated = np.rot90(originals, turns, axes=(1, 2))
            assert np.any(np.all(rotated == x[None], axis=(1, 2, 3))), "image is a rotated original"
    assert turns_seen == {0, 1, 2, 3}


def test_bad_episode_shapes_name_the_value_and_the_fix():
    classes = _coded_classes(images_per_class=(20, 9))
    with pytest.raises(ValueError, match=r"ways=38 is larger than the 37 classes.*ways <= 37"):
        EpisodeSampler(classes, 38, 1, 1)
    with pytest.raises(ValueError, match=r"shots \+ queries = 4 \+ 6 = 10.*smallest has 9"):
        EpisodeSampler(classes, 5, 4, 6)
    with pytest.raises(ValueError, match=r"ways=7 is larger than the largest alphabet \(6 classes\)"):
        EpisodeSampler(_coded_classes(), 7, 1, 1, within_group=True)
    no_groups = ClassImages.from_labels(np.zeros((40, 4, 4, 1), np.float32), np.repeat(np.arange(8), 5))
    with pytest.raises(ValueError, match="within_group=False"):
        EpisodeSampler(no_groups, 3, 1, 1, within_group=True)
    with pytest.raises(ValueError, match="shots=0"):
        EpisodeSampler(no_groups, 3, 0, 1)


def test_uneven_class_sizes_never_draw_a_missing_image():
    classes = _coded_classes(images_per_class=(20, 9, 13))
    batch = next(iter(episode_dataset(EpisodeSampler(classes, 8, 4, 5), seed=9, meta_batch_size=32)))
    count_of = dict(zip(classes.class_ids, classes.counts))
    for x in (batch.support_x.numpy(), batch.query_x.numpy()):
        cls, index = x[..., 0, 0, 0].astype(int), x[..., 0, 1, 0].astype(int)
        assert np.all(index < np.vectorize(count_of.get)(cls))


@pytest.mark.parametrize("rotations", [False, True])
def test_fixed_episodes_are_kept_as_indices_and_read_back_bit_identically(tmp_path, rotations):
    sampler = EpisodeSampler(_coded_classes(), 5, 3, 7, rotations=rotations)
    drawn = draw_episodes(sampler, seed=21, num_episodes=75)  # two blocks, the second partial
    path = tmp_path / "eval" / "episodes.npz"
    first = fixed_episodes(path, sampler, seed=21, num_episodes=75)
    again = fixed_episodes(path, sampler, seed=21, num_episodes=75)  # read from the file
    for a, b, c in zip(drawn, first, again):
        assert a.dtype == b.dtype == c.dtype and a.tobytes() == b.tobytes() == c.tobytes()
    indices, metadata = load_indices(path)
    assert metadata["seed"] == 21 and metadata["episodes"] == 75 and metadata["rotations"] is rotations
    assert all(np.array_equal(a, b) for a, b in zip(indices, draw_indices(sampler, 21, 75)))
    images = 75 * 5 * (3 + 7)
    assert path.stat().st_size < 3 * images + 1_000, "a row (uint16) and a label (uint8) per image"
    assert path.stat().st_size * 50 < sum(a.nbytes for a in drawn)
    assert not list(tmp_path.glob("eval/.*")), "no temporary file is left behind"


def test_a_fixed_episode_file_is_refused_when_its_images_or_shape_changed(tmp_path):
    path = tmp_path / "episodes.npz"
    fixed_episodes(path, EpisodeSampler(_coded_classes(), 5, 3, 7), seed=4, num_episodes=10)
    changed = _coded_classes()
    changed.images[:, 3, 3, 0] += 0.5  # another preprocessing of the same classes
    with pytest.raises(ValueError, match="have changed since it was written"):
        fixed_episodes(path, EpisodeSampler(changed, 5, 3, 7), seed=4, num_episodes=10)
    with pytest.raises(ValueError, match="shots=3 instead of shots=2"):
        fixed_episodes(path, EpisodeSampler(_coded_classes(), 5, 2, 7), seed=4, num_episodes=10)


def test_sinusoid_episodes_follow_the_maml_paper_family():
    sampler = SinusoidSampler(shots=10, queries=13)
    e = sampler.sample(tf.constant([7, 0], tf.int64), 50)
    assert e.support_x.shape == (50, 10, 1) and e.query_y.shape == (50, 13, 1)
    amplitude, phase = e.task_params.numpy().T
    assert np.all((amplitude >= 0.1) & (amplitude <= 5.0)) and np.all((phase >= 0) & (phase <= math.pi))
    for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
        x, y = x.numpy()[..., 0], y.numpy()[..., 0]
        assert np.all(np.abs(x) <= 5.0)
        np.testing.assert_allclose(y, amplitude[:, None] * np.sin(x - phase[:, None]), atol=1e-5)
    again = sampler.sample(tf.constant([7, 0], tf.int64), 50)
    np.testing.assert_array_equal(e.task_params.numpy(), again.task_params.numpy())
    with pytest.raises(ValueError, match="shots=0"):
        SinusoidSampler(shots=0)


def test_episodes_from_any_tfds_classification_dataset(tmp_path):
    import tensorflow_datasets as tfds

    from mmtl_tf.data.omniglot import load_class_images
    from mmtl_tf.preprocessing import Preprocessing

    with tfds.testing.mock_data(num_examples=230, policy=tfds.testing.MockPolicy.USE_CODE):
        classes = load_class_images("mnist", "train", Preprocessing(12, ink_as_one=False),
                                    data_dir=tmp_path)
    sampler = EpisodeSampler(classes, 3, 2, 4)
    batch = next(iter(episode_dataset(sampler, seed=13, meta_batch_size=5)))
    assert batch.support_x.shape == (5, 6, 12, 12, 1) and batch.query_x.shape == (5, 12, 12, 12, 1)
    for e in range(5):
        assert set(batch.class_ids[e].numpy()) <= set(classes.class_ids.tolist())
        assert len(set(batch.class_ids[e].numpy())) == 3
        assert np.array_equal(np.bincount(batch.query_y[e].numpy(), minlength=3), [4, 4, 4])
