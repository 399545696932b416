"""Run by test_distributed.py in fresh processes (device layout must be set before TF starts).

usage: distributed_worker.py compare OUT.json      two logical CPUs: mirrored vs single device,
                                                   for every algorithm
       distributed_worker.py worker OUT.json       one worker of MultiWorkerMirroredStrategy
                                                   (TF_CONFIG set by the caller)
"""

import json
import sys

import numpy as np
import tensorflow as tf

mode, out = sys.argv[1], sys.argv[2]
if mode == "compare":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from mmtl_tf.data.class_images import ClassImages  # noqa: E402
from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset  # noqa: E402
from mmtl_tf.meta.algorithms import ALGORITHMS, MetaConfig  # noqa: E402
from mmtl_tf.meta.learner import MetaLearner  # noqa: E402
from mmtl_tf.models.conv4 import conv4_encoder  # noqa: E402

rng = np.random.default_rng(0)
classes = ClassImages.from_labels(rng.random((40 * 12, 14, 14, 1), dtype=np.float32),
                                  np.repeat(np.arange(40), 12))
META_BATCH = 6


def build(strategy, algorithm="maml"):
    # A learned head: every algorithm, Reptile included, then moves every meta-parameter.
    config = MetaConfig(algorithm=algorithm, inner_lr=0.3, max_ways=5, head_init="learned")
    with strategy.scope():
        keras.utils.set_random_seed(3)
        learner = MetaLearner(conv4_encoder(14, filters=4), config)
        learner.compile(optimizer=keras.optimizers.SGD(0.5))
    return learner


def one_step(strategy, steps=1, algorithm="maml"):
    learner = build(strategy, algorithm)
    data = episode_dataset(EpisodeSampler(classes, 5, 2, 3), seed=9, meta_batch_size=META_BATCH)
    history = learner.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return learner, history.history


if mode == "compare":
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {"replicas": mirrored.num_replicas_in_sync}
    for algorithm in ALGORITHMS:
        single, _ = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), algorithm=algorithm)
        split, _ = one_step(mirrored, algorithm=algorithm)
        start = [v.numpy() for v in build(tf.distribute.get_strategy(), algorithm).meta_variables]
        result[algorithm] = {
            "max_abs_diff": max(float(np.abs(a.numpy() - b.numpy()).max())
                                for a, b in zip(single.meta_variables, split.meta_variables)),
            "max_abs_update": max(float(np.abs(a.numpy() - b).max())
                                  for a, b in zip(single.meta_variables, start))}
else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    learner, history = one_step(strategy, steps=3)
    result = {"replicas": strategy.num_replicas_in_sync, "loss": history["loss"],
              "checksum": float(sum(np.abs(v.numpy()).sum() for v in learner.meta_variables))}
with open(out, "w") as f:
    json.dump(result, f)
