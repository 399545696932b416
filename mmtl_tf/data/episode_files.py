"""Fixed episode sets: drawn once from a seed, written to a file, read back bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmtl_tf.data.episodes import Episode, episode_dataset
from mmtl_tf.files import atomic_write


def draw_episodes(sampler, seed: int, num_episodes: int) -> Episode:
    """``num_episodes`` episodes as numpy arrays with a leading episode axis."""
    if num_episodes < 1:
        raise ValueError(f"num_episodes={num_episodes} must be >= 1")
    block = min(num_episodes, 64)
    parts = [tuple(t.numpy() for t in e)
             for e in episode_dataset(sampler, seed, meta_batch_size=block, num_episodes=num_episodes)]
    return Episode(*(np.concatenate(f)[:num_episodes] for f in zip(*parts)))


def save_episodes(path, episodes: Episode, metadata: dict | None = None) -> Path:
    """Writes episodes (numpy, leading episode axis) and JSON metadata atomically to ``path``."""
    arrays = {name: np.asarray(value) for name, value in episodes._asdict().items()}
    arrays["metadata"] = np.frombuffer(json.dumps(metadata or {}, sort_keys=True).encode(), np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_episodes(path) -> tuple[Episode, dict]:
    """Reads what ``save_episodes`` wrote: (Episode of numpy arrays, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no episode file at {path}; write one with save_episodes()")
    with np.load(path, allow_pickle=False) as data:
        missing = [n for n in Episode._fields if n not in data.files]
        if missing:
            raise ValueError(f"{path} is not an episode file: it lacks {missing}")
        episodes = Episode(*(data[n] for n in Episode._fields))
        metadata = json.loads(bytes(data["metadata"]).decode()) if "metadata" in data.files else {}
    return episodes, metadata
