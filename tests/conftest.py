"""Fixtures shared by several test modules."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest


class TrainedExport(typing.NamedTuple):
    workdir: Path  # the training run (config.json, checkpoint)
    folder: Path  # its export for devices (manifest.json, *.onnx, params.npz)


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory) -> TrainedExport:
    """The tiny preset meta-trained long enough to beat chance clearly, then exported.

    150 meta-steps at meta_lr 4e-3 reach ~55% on held-out 5-way 1-shot Omniglot evaluation
    characters (60 steps stay near 35%, chance is 20%); support-statistics batch norm
    (transductive=False) like the shipped presets. About a minute on two loaded cores.
    """
    from mmtl_tf.config import preset
    from mmtl_tf.data import sources
    from mmtl_tf.export.exporter import export
    from mmtl_tf.training import train

    if not (sources.shared_data_dir() / "images_background_small1.zip").is_file():
        pytest.skip("the shared Omniglot zips are not present")
    root = tmp_path_factory.mktemp("trained_export")
    config = preset("tiny").replace(train={"steps": 150, "meta_lr": 4e-3, "log_every": 50},
                                    meta={"transductive": False})
    train(config, root / "run")
    export(root / "run", root / "export")
    return TrainedExport(root / "run", root / "export")
