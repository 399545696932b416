"""Backbones: pure Keras feature encoders."""
