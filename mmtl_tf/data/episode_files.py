"""Fixed episode sets: drawn once from a seed, kept as image indices (kilobytes), read back
bit-identically.

A file holds, per episode, the rows of the sampler's image table in episode order, their labels
and the classes (``EpisodeIndices``), with the seed, the episode shape and a SHA-256 of the
images they gave. Reading it back gathers the same rows; if the images differ (another dataset
version or preprocessing), the file is refused rather than scoring other tasks under its name.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from mmtl_tf.data.episodes import Episode, EpisodeIndices, episode_dataset
from mmtl_tf.files import atomic_write

BLOCK = 64  # episodes drawn per sampler call: episode i is a function of (seed, i // BLOCK)


def draw_episodes(sampler, seed: int, num_episodes: int) -> Episode:
    """``num_episodes`` episodes as numpy arrays with a leading episode axis."""
    _check_count(num_episodes)
    block = min(num_episodes, BLOCK)
    parts = [tuple(t.numpy() for t in e)
             for e in episode_dataset(sampler, seed, meta_batch_size=block, num_episodes=num_episodes)]
    return Episode(*(np.concatenate(f)[:num_episodes] for f in zip(*parts)))


def draw_indices(sampler, seed: int, num_episodes: int) -> EpisodeIndices:
    """The indices of the episodes ``draw_episodes(sampler, seed, num_episodes)`` gives (numpy)."""
    _check_count(num_episodes)
    block = min(num_episodes, BLOCK)
    parts = [sampler.sample_indices(tf.constant([seed, i], tf.int64), block)
             for i in range(-(-num_episodes // block))]
    return EpisodeIndices(*(np.concatenate([p[f] for p in parts])[:num_episodes]
                            for f in range(len(EpisodeIndices._fields))))


def gather_episodes(sampler, indices: EpisodeIndices) -> Episode:
    """The episodes (numpy) that ``indices`` describe, gathered a block at a time."""
    parts = [sampler.gather(EpisodeIndices(*(f[start:start + BLOCK] for f in indices)))
             for start in range(0, len(indices.support), BLOCK)]
    return Episode(*(np.concatenate([p[f].numpy() for p in parts])
                     for f in range(len(Episode._fields))))


def images_sha256(episodes: Episode) -> str:
    """SHA-256 of the episodes' images, labels and class ids (dtypes and shapes included)."""
    digest = hashlib.sha256()
    for field in (episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y,
                  episodes.class_ids):
        array = np.ascontiguousarray(field)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def fixed_episodes(path, sampler, seed: int, num_episodes: int) -> Episode:
    """The episodes kept in ``path``; drawn from ``seed`` and written there the first time.

    Raises ValueError when the file describes other episodes (another seed, count or shape) or
    when its rows no longer give the images they gave when it was written.
    """
    path = Path(path)
    expected = {"seed": int(seed), "episodes": int(num_episodes), "ways": sampler.ways,
                "shots": sampler.shots, "queries": sampler.queries,
                "within_group": sampler.within_group, "rotations": sampler.rotations}
    if not path.is_file():
        indices = draw_indices(sampler, seed, num_episodes)
        episodes = gather_episodes(sampler, indices)
        save_indices(path, indices, {**expected, "images_sha256": images_sha256(episodes)})
        return episodes
    indices, stored = load_indices(path)
    differ = sorted(k for k in expected if stored.get(k) != expected[k])
    if differ:
        raise ValueError(f"{path} holds other episodes ({', '.join(f'{k}={stored.get(k)}' for k in differ)} "
                         f"instead of {', '.join(f'{k}={expected[k]}' for k in differ)}); "
                         "delete it or write the report to another folder")
    episodes = gather_episodes(sampler, indices)
    if images_sha256(episodes) != stored.get("images_sha256"):
        raise ValueError(f"the images of the fixed episodes in {path} have changed since it was "
                         "written (another dataset version or preprocessing): scores would not "
                         "be comparable; restore that data, or delete the file to draw new episodes")
    return episodes


def save_indices(path, indices: EpisodeIndices, metadata: dict | None = None) -> Path:
    """Writes episode indices (leading episode axis) and JSON metadata atomically to ``path``,
    each array in the smallest unsigned integer type that holds it."""
    arrays = {name: _smallest(value) for name, value in indices._asdict().items()}
    arrays["metadata"] = np.frombuffer(json.dumps(metadata or {}, sort_keys=True).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_indices(path) -> tuple[EpisodeIndices, dict]:
    """Reads what ``save_indices`` wrote: (EpisodeIndices, int64 rows and ids, int32 labels;
    metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no episode file at {path}; write one with save_indices()")
    with np.load(path, allow_pickle=False) as data:
        missing = [n for n in EpisodeIndices._fields if n not in data.files]
        if missing:
            raise ValueError(f"{path} is not an episode index file: it lacks {missing}; delete "
                             "it to draw the episodes again")
        labels = ("support_y", "query_y")
        indices = EpisodeIndices(*(data[n].astype(np.int32 if n in labels else np.int64)
                                   for n in EpisodeIndices._fields))
        metadata = json.loads(bytes(data["metadata"]).decode()) if "metadata" in data.files else {}
    return indices, metadata


def _smallest(values) -> np.ndarray:
    values = np.asarray(values)
    if values.size and values.min() < 0:
        raise ValueError("episode indices are never negative")
    top = int(values.max()) if values.size else 0
    return values.astype(next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                              if top <= np.iinfo(t).max))


def _check_count(num_episodes: int) -> None:
    if num_episodes < 1:
        raise ValueError(f"num_episodes={num_episodes} must be >= 1")
