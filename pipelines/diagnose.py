"""What adaptation does at each step, per setting: support loss, query accuracy and loss, and
the size of each step on the encoder and the head, on fixed validation episodes (by default):
python pipelines/diagnose.py --workdir exported/omniglot --settings 5w1s 5w5s 20w1s 20w5s
python pipelines/diagnose.py --workdir runs/omniglot --steps 10 --json trace.json"""

import argparse
import json

from mmtl_tf import cli


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run or an export folder")
    parser.add_argument("--settings", nargs="+", default=["5w1s", "5w5s", "20w1s", "20w5s"],
                        help="settings written <N>w<K>s")
    parser.add_argument("--part", default="validation", choices=["validation", "test"],
                        help="validation alphabets (where choices are made) or test characters")
    parser.add_argument("--steps", type=int, default=5, help="adaptation steps traced")
    parser.add_argument("--episodes", type=int, default=200, help="fixed episodes per setting")
    parser.add_argument("--queries", type=int, default=5, help="queries per class")
    parser.add_argument("--seed", type=int, default=7, help="fixes the episodes")
    parser.add_argument("--json", help="also write the per-step means to this file")
    parser.add_argument("--verbose", action="store_true",
                        help="TensorFlow's start-up messages and full tracebacks")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.episodes < 1:
        raise ValueError(f"--steps {args.steps} and --episodes {args.episodes} must be >= 1")
    cli.quiet_tensorflow(args.verbose)
    from mmtl_tf.config import parse_setting
    from mmtl_tf.data.episode_files import draw_episodes
    from mmtl_tf.diagnosis import adaptation_trace, summarise
    from mmtl_tf.files import atomic_write
    from mmtl_tf.runs import load_model
    from mmtl_tf.training import episode_sampler

    settings = {s: parse_setting(s) for s in args.settings}
    model = load_model(args.workdir)
    if model.config.data.family != "omniglot":
        raise ValueError(f"{args.workdir} is a {model.config.data.family} run; diagnose.py "
                         "traces image classification")
    results = {}
    print(f"{args.workdir}: {args.part} episodes, seed {args.seed}, {args.episodes} per setting, "
          f"inner_lr {model.learner.config.inner_lr}, head {model.learner.config.head_init}")
    for name, (ways, shots) in settings.items():
        config = model.config.replace(data={"ways": ways, "shots": shots, "queries": args.queries})
        episodes = draw_episodes(episode_sampler(config, args.part), args.seed, args.episodes)
        summary = results[name] = summarise(adaptation_trace(model.learner, episodes, args.steps))
        print(f"\n{name}  step: support loss | query acc (95% CI) | query loss | "
              "encoder step (relative) | head step | head norm")
        for k in range(args.steps + 1):
            print(f"  {k:2d}: {summary['support_loss'][k]:8.4f} | "
                  f"{summary['query_accuracy'][k]:6.1%} ± {summary['query_accuracy_ci95'][k]:4.1%} | "
                  f"{summary['query_loss'][k]:7.4f} | {summary['encoder_step'][k]:.2e} | "
                  f"{summary['head_step'][k]:8.3f} | {summary['head_norm'][k]:8.3f}")
    if args.json:
        text = json.dumps({"model": args.workdir, "part": args.part, "seed": args.seed,
                           "episodes": args.episodes, "queries": args.queries,
                           "settings": results}, indent=2)
        atomic_write(args.json, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    cli.run(main)
