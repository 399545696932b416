"""Data: the Omniglot TFDS builder, class splits, episode sampling and task families."""
