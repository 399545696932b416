"""Score a training run or an export folder on the evaluation protocol and write the report
(evaluation.json, evaluation.md, curves.png, episode.png):
python pipelines/evaluate.py --workdir runs/omniglot                # the six-task table
python pipelines/evaluate.py --workdir exported/omniglot --out reports/omniglot
python pipelines/evaluate.py --workdir runs/omniglot --ways 20 --shots 1 --steps 10
A run trained on task families: one row per family, in its own setting, on its held-out classes.
A sinusoid model: mean squared error after 1 and 10 steps at K = 5, 10, 20 support points,
beside a baseline adapted the same way (evaluation.json, evaluation.md, curves.png, tasks.png):
python pipelines/evaluate.py --workdir exported/sinusoid --baseline exported/sinusoid-pretrained \
    --out reports/sinusoid"""

import argparse
import os
import shlex
import sys

from mmtl_tf import cli


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="a training run (pipelines/train.py) or an export folder (export.py)")
    parser.add_argument("--out", help="report folder (default <workdir>/evaluation/<part>; "
                        "required for an export folder)")
    parser.add_argument("--part", default="test", choices=["test", "validation"],
                        help="test characters (the final score) or the validation alphabets "
                        "(where steps, rates and checkpoints are chosen)")
    parser.add_argument("--ways", type=int, help="score this N only (default: the six-task table)")
    parser.add_argument("--shots", type=int, help="score this K only (default: the six-task table)")
    parser.add_argument("--within-alphabet", action="store_true",
                        help="with --ways/--shots: all classes of an episode from one alphabet")
    parser.add_argument("--queries", type=int, help="queries per class (default: 15 at 5 ways, "
                        "5 at 20 ways; the run's with --ways/--shots)")
    parser.add_argument("--episodes", type=int, default=600, help="fixed episodes per task")
    parser.add_argument("--seed", type=int, default=2024, help="fixes the episodes")
    parser.add_argument("--steps", type=int, help="adaptation steps of the table (default: the "
                        "model's eval_inner_steps)")
    parser.add_argument("--curve-steps", type=int, default=20,
                        help="the accuracy curve runs from 0 to this many steps")
    parser.add_argument("--export", help="an export folder of this run: also score it on the same "
                        "episodes through the device runtime (onnxruntime)")
    parser.add_argument("--baseline", help="sinusoid only: a run or export (preset "
                        "sinusoid-pretrained) scored beside the model on the same tasks")
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"],
                        help="a run's state with the best validation accuracy, or its last")
    parser.add_argument("--verbose", action="store_true",
                        help="TensorFlow's start-up messages and full tracebacks")
    args = parser.parse_args(argv)
    cli.quiet_tensorflow(args.verbose)
    from mmtl_tf.evaluation import Setting
    from mmtl_tf.runs import evaluate_run

    one = args.ways or args.shots or args.within_alphabet
    settings = [Setting(args.ways, args.shots, args.queries, args.within_alphabet)] if one else None
    command = shlex.join(["python", "pipelines/evaluate.py",
                          *(sys.argv[1:] if argv is None else argv)])
    report = evaluate_run(args.workdir, args.out, args.part, settings, args.queries,
                          args.episodes, args.seed, args.steps, args.curve_steps, args.export,
                          args.checkpoint, command, log=lambda line: print(line, flush=True),
                          baseline=args.baseline)
    print(f"\nwrote {', '.join(report['files'])} to {report['out']} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    # One TensorFlow thread per operation, episodes in parallel instead (one per core,
    # evaluation.accuracy_curve): on this project's 2-core machine with another job on one core,
    # 5-way 1-shot took 84 s against 100 s with the default pools, 20-way 1-shot 151 s against
    # 152 s (README, "Evaluating"). TensorFlow reads the variable once, when it creates its CPU
    # device, so it is set here, before the script imports TensorFlow, and nowhere else: main()
    # called in a running process (the tests) keeps that process's threads and raises nothing.
    # A value already in the environment wins.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    cli.run(main)
