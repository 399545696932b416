"""Export a training run for devices:
python pipelines/export.py --workdir runs/omniglot-5w1s --out exported/omniglot-5w1s"""

import argparse
import json

from mmtl_tf.export.exporter import export


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True, help="a training run folder (pipelines/train.py)")
    parser.add_argument("--out", required=True, help="the export folder to write")
    parser.add_argument("--max-shots", type=int, default=5, help="largest K the device graphs accept")
    parser.add_argument("--model-card", help="a Markdown model card to ship as MODEL_CARD.md")
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"],
                        help="the run's state with the best validation accuracy, or its last")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    manifest = export(args.workdir, args.out, force=args.force, max_shots=args.max_shots,
                      model_card=args.model_card, checkpoint=args.checkpoint)
    print(json.dumps({"out": args.out, "files": manifest["files"]}, indent=2))


if __name__ == "__main__":
    main()
