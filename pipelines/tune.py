"""Search a preset's hyperparameters on its validation alphabets (KerasTuner):

  python pipelines/tune.py --preset omniglot --workdir runs/tune-omniglot --trials 20 --steps-per-trial 300

Each trial meta-trains the preset, shortened to --steps-per-trial meta-steps, with the trial's
values, and is scored on fixed episodes of the held-out validation alphabets in the preset's
setting; the evaluation characters are never read. The space is config.SEARCH_SPACE; --set
fixes a field, --space narrows or adds one:
  --space meta.inner_lr=0.05:0.5:log   --space meta.head_init=zero,proto   --space data.shots=1
Writes best_config.json (for train.py --config), trials.md, trials.csv and scores.png to
--workdir. Rerunning the same command continues the search."""

import argparse

from mmtl_tf import cli


def main(argv=None):
    from mmtl_tf.config import PRESETS

    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--workdir", required=True, help="the search's folder (resumable)")
    parser.add_argument("--trials", type=int, default=20, help="trials in all (default 20)")
    parser.add_argument("--steps-per-trial", type=int, default=200,
                        help="meta-steps of a trial (Hyperband: of its largest budget; default 200)")
    parser.add_argument("--algorithm", default="bayesian", choices=["hyperband", "bayesian", "random"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="fix a configuration field (it leaves the space), e.g. --set "
                        "meta.head_init=proto (repeatable)")
    parser.add_argument("--space", action="append", default=[], metavar="NAME=SPEC",
                        help="narrow or add a searched field: LOW:HIGH[:log|linear], A,B,C or a "
                        "single VALUE (fixed) (repeatable)")
    parser.add_argument("--seed", type=int, default=1, help="the search algorithm's seed (>= 1)")
    parser.add_argument("--data-dir", help="TFDS data folder (default: TFDS's)")
    parser.add_argument("--source-dir", help="folder with the Omniglot zips")
    parser.add_argument("--force", action="store_true",
                        help="start over in a --workdir that holds a search (its trials go)")
    parser.add_argument("--verbose", action="store_true",
                        help="TensorFlow's start-up messages and full tracebacks")
    args = parser.parse_args(argv)
    from mmtl_tf.config import apply_overrides, preset
    from mmtl_tf.tuning import space

    base = preset(args.preset)
    for item in args.set:
        space.check_name(item.partition("=")[0].strip(), base, "--set")
    overrides = list(args.set) + [f"data.{key}={getattr(args, key)}"
                                  for key in ("data_dir", "source_dir") if getattr(args, key)]
    if args.seed < 1:
        raise ValueError(f"--seed {args.seed}: must be >= 1 (KerasTuner draws a random seed for 0)")
    base, searched = space.resolve(apply_overrides(base, overrides),
                                   [item.partition("=")[0].strip() for item in args.set], args.space)
    cli.quiet_tensorflow(args.verbose)
    from mmtl_tf.tuning.search import search

    summary = search(base, searched, args.workdir, args.algorithm, args.trials,
                     args.steps_per_trial, args.seed, overwrite=args.force,
                     log=lambda line: print(line, flush=True))
    if summary is None:  # a distributed worker
        return
    best, files = summary["best"], ", ".join(summary["files"])
    if best is None:
        raise ValueError(f"no trial of the search completed ({summary['trials']} failed, reasons "
                         f"in {args.workdir}/trials.md); wrote {files}")
    chosen = ", ".join(f"{n}={best[n]:.4g}" if isinstance(best[n], float) else f"{n}={best[n]}"
                       for n in sorted(searched))
    print(f"best: trial {best['trial']}, validation accuracy {100 * best['val_accuracy']:.1f}% ± "
          f"{100 * best['ci95']:.1f} with {chosen}\nwrote {files} to {args.workdir}")


if __name__ == "__main__":
    cli.run(main)
