"""Meta-train a preset: python pipelines/train.py --preset omniglot --workdir runs/omniglot
or a configuration file: python pipelines/train.py --config runs/tune/best_config.json --workdir runs/best

Rerunning the same command on the same --workdir resumes the run from its last checkpoint.
Several task families in one model: repeat --family (see README, "Several task families")."""

import json

from mmtl_tf import cli


def main(argv=None):
    from mmtl_tf.config import PRESETS

    parser = cli.ArgumentParser(description=__doc__)
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--preset", choices=sorted(PRESETS))
    start.add_argument("--config", metavar="PATH.json",
                       help="a configuration file instead of a preset (a run's config.json, "
                       "tune.py's best_config.json); --set and the other flags apply on top")
    parser.add_argument("--workdir", required=True,
                        help="run folder (config, checkpoints, history, TensorBoard, metrics)")
    parser.add_argument("--steps", type=int, help="meta-training steps (default: the preset's)")
    parser.add_argument("--algorithm", help="maml, fomaml, metasgd, mamlpp, anil, reptile, or "
                        "pretrain (the regression baseline: no inner loop in training)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a configuration field, e.g. --set train.meta_lr=5e-4 "
                        "--set meta.inner_steps=3 (repeatable; values are JSON or text)")
    parser.add_argument("--family", action="append", default=[], metavar="KEY=VALUE,...",
                        help="meta-train on a mixture of task families (repeatable; replaces the "
                        "preset's families), e.g. --family name=chars,source=omniglot,ways=5,"
                        "shots=1,weight=1 --family name=mine,source=folder:~/symbols,ways=3,"
                        "shots=2,queries=3,weight=0.5; keys: name, source (omniglot, "
                        "omniglot:<split>, tfds:<dataset>, folder:<path>), ways, shots, queries, "
                        "within_alphabet, rotations, image_size, weight")
    parser.add_argument("--family-mix", choices=["fixed", "proportional"],
                        help="fixed tasks per family with alpha weighting the loss (default), or "
                        "tasks drawn in proportion to alpha")
    parser.add_argument("--data-dir", help="TFDS data folder (default: TFDS's)")
    parser.add_argument("--source-dir", help="folder with the Omniglot zips")
    parser.add_argument("--jit-compile", action="store_true", help="XLA-compile the train step")
    parser.add_argument("--strategy", default="default", choices=["default", "mirrored", "multiworker"],
                        help="split the meta-batch across devices (multiworker reads TF_CONFIG)")
    parser.add_argument("--force", action="store_true",
                        help="start over in a --workdir that holds a run (its checkpoints go)")
    parser.add_argument("--verbose", action="store_true",
                        help="TensorFlow's start-up messages and full tracebacks")
    args = parser.parse_args(argv)
    cli.quiet_tensorflow(args.verbose)
    from mmtl_tf.config import (ExperimentConfig, apply_overrides, parse_family, preset,
                                with_families)
    from mmtl_tf.training import make_strategy, train

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.jit_compile:
        overrides.append("train.jit_compile=true")
    if args.algorithm:
        overrides.append(f"meta.algorithm={args.algorithm}")
    for key in ("data_dir", "source_dir"):
        if getattr(args, key):
            overrides.append(f"data.{key}={getattr(args, key)}")
    if args.family_mix:
        overrides.append(f"data.family_mix={args.family_mix}")
    config = ExperimentConfig.from_file(args.config) if args.config else preset(args.preset)
    if args.family:  # first: --set may name switches that need families (meta.family_weighting)
        config = with_families(config, [parse_family(text) for text in args.family])
    config = apply_overrides(config, overrides)
    metrics = train(config, args.workdir, overwrite=args.force, strategy=make_strategy(args.strategy))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    cli.run(main)
