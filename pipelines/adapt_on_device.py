"""Personalise an exported model on this machine, without TensorFlow, and classify images:

  python pipelines/adapt_on_device.py --model exported/omniglot --support my_classes \\
      --query photos/ [more.png ...] [--steps K] [--save me.personal] [--json]

--support holds one subfolder of images per class (the folder name is the class name).
"""

import argparse
import json
import sys

from mmtl_tf import ondevice
from mmtl_tf.ondevice.personalize import personalize

USER_ERRORS = (ondevice.ImageError, ondevice.AdaptationError, ondevice.ExportError,
               ondevice.PersonalStateError)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export folder (pipelines/export.py)")
    parser.add_argument("--support", required=True, help="folder with one subfolder per class")
    parser.add_argument("--query", required=True, nargs="+", help="image files and/or folders")
    parser.add_argument("--steps", type=int, help="adaptation steps (default: the model's)")
    parser.add_argument("--lr", type=float, help="one inner learning rate (default: the model's)")
    parser.add_argument("--save", help="write the personal state to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = personalize(args.model, args.support, args.query, args.steps, args.lr, args.save)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{len(result['classes'])} classes, {result['steps']} steps, status: {result['status']}")
    width = max(len(k) for k in result["predictions"])
    for name, label in result["predictions"].items():
        print(f"{name:<{width}}  {label}  {result['probabilities'][name]:.3f}")
    if result.get("saved"):
        print(f"personal state saved to {result['saved']}")
    elif "not_saved" in result:
        print(f"personal state not saved: {result['not_saved']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
