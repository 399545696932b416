"""Export a training run for devices:
python pipelines/export.py --workdir runs/omniglot-5w1s --out exported/omniglot-5w1s
or again from an export's own model.keras (same weights), when its run folder is gone:
python pipelines/export.py --from-export exported/omniglot-5w1s --out exported/omniglot-5w1s \
    --model-card exported/omniglot-5w1s/MODEL_CARD.md --force"""

import argparse
import json
import tempfile

from mmtl_tf import cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run folder (pipelines/train.py)")
    source.add_argument("--from-export",
                        help="an export folder whose model.keras to export again")
    parser.add_argument("--out", required=True, help="the export folder to write")
    parser.add_argument("--max-shots", type=int, default=5, help="largest K the device graphs accept")
    parser.add_argument("--model-card", help="a Markdown model card to ship as MODEL_CARD.md")
    parser.add_argument("--attach", action="append", default=[], metavar="FILE",
                        help="a file to ship in the export under its own name, hashed like the "
                        "others (an evaluation report, a plot); repeatable")
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"],
                        help="the run's state with the best validation accuracy, or its last")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--verbose", action="store_true",
                        help="TensorFlow's start-up messages and full tracebacks")
    args = parser.parse_args(argv)
    cli.quiet_tensorflow(args.verbose)
    from mmtl_tf.export.exporter import export, rebuild_run

    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or rebuild_run(args.from_export, f"{scratch}/run")
        checkpoint = args.checkpoint if args.workdir else "best"  # a rebuilt run has one state
        manifest = export(workdir, args.out, force=args.force, max_shots=args.max_shots,
                          model_card=args.model_card, checkpoint=checkpoint,
                          attachments=args.attach)
    print(json.dumps({"out": args.out, "files": manifest["files"]}, indent=2))


if __name__ == "__main__":
    cli.run(main)
