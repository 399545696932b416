"""Hyperparameter search on the validation alphabets with KerasTuner.

``space`` (standard library only) resolves the searched space from ``config.SEARCH_SPACE`` and
the command line; ``search`` runs KerasTuner's oracles over short training runs; ``report``
writes the best configuration, the table of trials and the figure.
"""
