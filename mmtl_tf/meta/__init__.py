"""The meta-learning engine: one inner loop, the MetaLearner Keras model, the algorithms."""
