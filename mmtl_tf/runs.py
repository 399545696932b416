"""A training run folder scored on fixed episodes: what pipelines/evaluate.py calls.

It sits above ``training`` (which rebuilds the learner of a run) and ``evaluation`` (which
scores episodes), so neither of those reaches up to the other.
"""

from __future__ import annotations

from pathlib import Path

from mmtl_tf.data.episode_files import draw_episodes, load_episodes, save_episodes
from mmtl_tf.evaluation import evaluate_episodes, evaluate_export
from mmtl_tf.training import episode_sampler, load_learner, protocol_of, scored_on, write_json


def evaluate_run(workdir, ways: int | None = None, shots: int | None = None,
                 queries: int | None = None, episodes: int = 600, seed: int = 2024,
                 steps: int | None = None, export=None, part: str = "test") -> dict:
    """Evaluates a training run on fixed episodes of one part of its protocol: "test" (the
    final score) or "validation" (the held-out training alphabets, where choices are made).

    The episodes are drawn once per (part, ways, shots, queries, seed) and kept in
    ``<workdir>/episodes/`` so that every later evaluation scores exactly the same tasks.
    ``export``: an export folder of the run, also scored on those episodes by the device
    runtime (reported under "device").
    """
    learner, config = load_learner(workdir)
    d = config.data
    ways, shots, queries = ways or d.ways, shots or d.shots, queries or d.queries
    config = config.replace(data={"ways": ways, "shots": shots, "queries": queries})
    if config.data.family == "omniglot" and ways > learner.config.max_ways:
        raise ValueError(f"ways={ways} exceeds the model's max_ways={learner.config.max_ways}")
    tag = f"{ways}w{shots}s{queries}q_seed{seed}_n{episodes}"
    path = Path(workdir) / "episodes" / f"{part}_{tag}.npz"
    if path.is_file():
        fixed, _ = load_episodes(path)
    else:
        fixed = draw_episodes(episode_sampler(config, part), seed, episodes)
        save_episodes(path, fixed, {"part": part, "ways": ways, "shots": shots,
                                    "queries": queries, "seed": seed})
    report = {"protocol": protocol_of(config), "part": part, "scored_on": scored_on(config, part),
              "ways": ways, "shots": shots, "queries": queries, "seed": seed,
              **evaluate_episodes(learner, fixed, steps)}
    if export is not None:
        report["device"] = evaluate_export(export, fixed, report["inner_steps"])
        tag += "_device"
    write_json(Path(workdir) / f"eval_{part}_{tag}.json", report)
    return report

