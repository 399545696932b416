"""What the pipelines share: TensorFlow imported without its start-up noise (unless
``--verbose``), and user errors as one line and a non-zero exit instead of a traceback.

Standard library only: a pipeline calls ``quiet_tensorflow`` before anything imports TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Errors a user's input or environment causes; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, OSError,
               FloatingPointError)


def quiet_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow with its start-up lines (absl, oneDNN, CPU features, GPUs) going
    nowhere; ``verbose`` keeps them. TensorFlow 2.21 writes them from C++ while being imported,
    before any log level applies, so the process's stderr is pointed away meanwhile."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel("ERROR")
    logging.getLogger("absl").setLevel(logging.ERROR)


def run(main, argv=None) -> None:
    """Calls ``main(argv)``; a user error is printed as ``error: <message>`` (exit status 2),
    an interrupted training run as its message (status 128 + the signal's number)."""
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except Exception as err:  # noqa: BLE001 -- re-raised unless it is the user's
        signum = getattr(err, "signum", None)  # training.TrainingInterrupted
        if verbose or not (signum or isinstance(err, USER_ERRORS)):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(message if signum else f"error: {message}", file=sys.stderr)
        sys.exit(128 + signum if signum else 2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown choice, a missing flag) are one line, exit
    status 2, like the user errors ``run`` prints."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")
