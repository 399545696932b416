"""Meta-train a preset: python pipelines/train.py --preset omniglot-5w1s --workdir runs/5w1s"""

import argparse
import json

from mmtl_tf.config import PRESETS, preset
from mmtl_tf.training import make_strategy, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--workdir", required=True, help="run folder (config, checkpoint, metrics)")
    parser.add_argument("--steps", type=int, help="meta-training steps (default: the preset's)")
    parser.add_argument("--algorithm", help="maml, fomaml, metasgd, mamlpp, anil or reptile")
    parser.add_argument("--data-dir", help="TFDS data folder (default: TFDS's)")
    parser.add_argument("--source-dir", help="folder with the Omniglot zips")
    parser.add_argument("--jit-compile", action="store_true", help="XLA-compile the train step")
    parser.add_argument("--strategy", default="default", choices=["default", "mirrored", "multiworker"],
                        help="split the meta-batch across devices (multiworker reads TF_CONFIG)")
    parser.add_argument("--force", action="store_true", help="overwrite a run folder's checkpoint")
    args = parser.parse_args(argv)
    config = preset(args.preset)
    changes = {"data": {}, "train": {}, "meta": {}}
    if args.steps is not None:
        changes["train"]["steps"] = args.steps
    if args.jit_compile:
        changes["train"]["jit_compile"] = True
    if args.algorithm:
        changes["meta"]["algorithm"] = args.algorithm
    for key in ("data_dir", "source_dir"):
        if getattr(args, key):
            changes["data"][key] = getattr(args, key)
    metrics = train(config.replace(**changes), args.workdir, overwrite=args.force,
                    strategy=make_strategy(args.strategy))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
