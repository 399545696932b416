"""Evaluate a training run on fixed test episodes:
python pipelines/evaluate.py --workdir runs/omniglot-5w1s [--ways 5 --shots 1 --episodes 600]
      [--export exported/omniglot-5w1s]   # also score the export through the device runtime"""

import argparse
import json

from mmtl_tf.runs import evaluate_run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--ways", type=int, help="N (default: the run's)")
    parser.add_argument("--shots", type=int, help="K (default: the run's)")
    parser.add_argument("--queries", type=int, help="queries per class (default: the run's)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=2024, help="fixes the test episodes")
    parser.add_argument("--part", default="test", choices=["test", "validation"],
                        help="test characters (the final score) or the validation alphabets "
                        "(where steps, rates and checkpoints are chosen)")
    parser.add_argument("--steps", type=int, help="inner steps (default: the run's eval_inner_steps)")
    parser.add_argument("--export", help="an export folder of this run: also score it on the same "
                        "episodes through the device runtime (onnxruntime)")
    args = parser.parse_args(argv)
    report = evaluate_run(args.workdir, args.ways, args.shots, args.queries, args.episodes,
                          args.seed, args.steps, args.export, args.part)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
