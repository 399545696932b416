"""Speed and memory measurements behind pipelines/benchmark.py (JSON out, never timed tests).

Each measurement runs in its own process (see the pipeline) so that peak resident memory and
thread settings belong to that measurement alone.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import numpy as np


def pin_to_one_core() -> None:
    """One CPU core and one TensorFlow thread: call before TensorFlow runs anything."""
    import tensorflow as tf

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def episode_throughput(classes, ways: int, shots: int, queries: int, meta_batch_size: int = 32,
                       seconds: float = 5.0, seed: int = 0) -> dict:
    """Episodes per second drawn from ``classes`` through the tf.data pipeline."""
    from mmtl_tf.data.episodes import EpisodeSampler, episode_dataset

    sampler = EpisodeSampler(classes, ways, shots, queries)
    iterator = iter(episode_dataset(sampler, seed, meta_batch_size=meta_batch_size))
    for _ in range(3):  # warm-up: tracing and the first prefetches
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(iterator)
        count += int(batch.support_x.shape[0])
    elapsed = time.perf_counter() - start
    return {"ways": ways, "shots": shots, "queries": queries, "image_size": classes.image_shape[0],
            "meta_batch_size": meta_batch_size, "episodes_per_second": round(count / elapsed, 1)}


def meta_train_throughput(first_order: bool, meta_batch_size: int = 32, ways: int = 5,
                          shots: int = 1, queries: int = 15, inner_steps: int = 1,
                          inner_lr: float = 0.4, reps: int = 5, jit_compile: bool = False,
                          head_init: str = "learned", track_pre_adaptation: bool = False) -> dict:
    """Meta-train tasks per second of the MAML train step on random 28x28 data (speed only).

    The configuration is the peers': conv4 with stride-2 downsampling, batch statistics, a
    dense head, Adam outer step. ``trace_seconds`` is the first step including tracing.
    """
    import keras

    from mmtl_tf.data.episodes import Episode
    from mmtl_tf.meta.algorithms import MetaConfig
    from mmtl_tf.meta.learner import MetaLearner
    from mmtl_tf.models.conv4 import conv4_encoder

    keras.utils.set_random_seed(0)
    config = MetaConfig(inner_steps=inner_steps, inner_lr=inner_lr, first_order=first_order,
                        head_init=head_init, max_ways=max(ways, 2),
                        track_pre_adaptation=track_pre_adaptation)
    learner = MetaLearner(conv4_encoder(28), config)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    batch = _random_meta_batch(meta_batch_size, ways, shots, queries)
    start = time.perf_counter()
    learner.train_on_batch(batch)
    trace = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(reps):
        learner.train_on_batch(batch)
    per_step = (time.perf_counter() - start) / reps
    graph_nodes = _train_graph_size(learner, batch)
    small = Episode(*(f[:4] for f in batch))
    graph_nodes_4_tasks = _train_graph_size(learner, small)
    return {"first_order": first_order, "meta_batch_size": meta_batch_size, "ways": ways,
            "shots": shots, "queries": queries, "inner_steps": inner_steps,
            "jit_compile": jit_compile, "trace_seconds": round(trace, 2),
            "seconds_per_meta_step": round(per_step, 4),
            "tasks_per_second": round(meta_batch_size / per_step, 2),
            "train_graph_nodes": graph_nodes, "train_graph_nodes_4_tasks": graph_nodes_4_tasks,
            "peak_rss_mb": round(peak_rss_mb(), 1)}



def engine_fractions(meta_batch_size: int = 32, ways: int = 5, shots: int = 1, queries: int = 15,
                     inner_lr: float = 0.4, rounds: int = 5) -> dict:
    """The meta-step as a fraction of the per-task ceiling, all timed in this one process.

    Four steps on the same random meta-batch, timed in turn for ``rounds`` rounds (so a machine
    that slows down slows all four alike): MetaLearner's second- and first-order train steps
    (the peers' configuration: learned head, one inner step, Adam) and two plain gradients of
    the encoder and a dense head over the meta-batch's images with shared weights: the
    per-task ceiling (each task's ``ways * (shots + queries)`` images as one batch, tasks
    through ``tf.map_fn`` with each task's gradient taken inside the map, summed) and the
    batched one (all images in one batch). Fractions are medians of each round's ratio.
    """
    import keras
    import tensorflow as tf

    from mmtl_tf.meta.algorithms import MetaConfig
    from mmtl_tf.meta.learner import MetaLearner
    from mmtl_tf.models.conv4 import conv4_encoder

    batch = _random_meta_batch(meta_batch_size, ways, shots, queries)
    steps = {}
    for first_order in (False, True):
        keras.utils.set_random_seed(0)
        config = MetaConfig(inner_steps=1, inner_lr=inner_lr, first_order=first_order,
                            head_init="learned", max_ways=max(ways, 2), track_pre_adaptation=False)
        learner = MetaLearner(conv4_encoder(28), config)
        learner.compile(optimizer=keras.optimizers.Adam(1e-3))
        steps["first_order" if first_order else "second_order"] = (
            lambda learner=learner: learner.train_on_batch(batch))
    images = tf.concat([batch.support_x, batch.query_x], 1)  # (tasks, ways*(shots+queries), 28, 28, 1)
    labels = tf.concat([batch.support_y, batch.query_y], 1)
    steps.update(_ceiling_steps(images, labels, ways))
    for step in steps.values():  # tracing and a warm-up step
        step(), step()
    seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            tf.nest.map_structure(np.asarray, step())
            seconds[name].append(time.perf_counter() - start)
    result = {f"{name}_tasks_per_second": round(meta_batch_size / float(np.median(s)), 1)
              for name, s in seconds.items()}
    ceiling = np.array(seconds["per_task_ceiling"])
    for name in ("second_order", "first_order", "batched_ceiling"):
        result[f"{name}_fraction_of_per_task_ceiling"] = round(
            float(np.median(ceiling / np.array(seconds[name]))), 3)
    return {"meta_batch_size": meta_batch_size, "ways": ways, "shots": shots,
            "queries": queries, "inner_steps": 1, "rounds": rounds, **result}


def _random_meta_batch(meta_batch_size, ways, shots, queries):
    import tensorflow as tf

    from mmtl_tf.data.episodes import Episode

    rng = np.random.default_rng(0)
    labels = lambda per_class: np.tile(np.arange(ways, dtype=np.int32), (meta_batch_size, per_class))
    batch = Episode(rng.normal(size=(meta_batch_size, ways * shots, 28, 28, 1)).astype(np.float32),
                    labels(shots),
                    rng.normal(size=(meta_batch_size, ways * queries, 28, 28, 1)).astype(np.float32),
                    labels(queries), np.tile(np.arange(ways, dtype=np.int64), (meta_batch_size, 1)),
                    np.zeros((meta_batch_size, 0), np.float32))
    return Episode(*(tf.constant(f) for f in batch))


def _plain_gradient(ways: int):
    """(encoder, gradient): a Conv4 encoder with a dense ``ways``-way head (seed 0) and a
    function giving the plain cross-entropy gradient of all its parameters (shared weights,
    fused batch norm, stateless: no statistics written back) for images x and labels y."""
    import keras
    import tensorflow as tf

    from mmtl_tf.models.conv4 import conv4_encoder

    keras.utils.set_random_seed(0)
    encoder = conv4_encoder(28)
    head = keras.layers.Dense(ways)
    head.build((None, encoder.feature_dim))
    params = [tf.convert_to_tensor(v) for v in encoder.trainable_variables + head.trainable_variables]
    state = [v.value for v in encoder.non_trainable_variables]

    def gradient(x, y):
        with tf.GradientTape() as tape:
            tape.watch(params)
            features, _ = encoder.stateless_call(params[:-2], state, x, training=True)
            logits = tf.matmul(features, params[-2]) + params[-1]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, params)

    return encoder, gradient


def _ceiling_steps(images, labels, ways: int) -> dict:
    """Plain gradients (cross-entropy, shared weights, fused batch norm) of images (T, B, ...)
    with labels (T, B): per task through tf.map_fn, and all T * B images as one batch."""
    import tensorflow as tf

    encoder, gradient = _plain_gradient(ways)
    signature = [tf.TensorSpec(v.shape, v.dtype) for v in encoder.trainable_variables]
    signature += [tf.TensorSpec((encoder.feature_dim, ways)), tf.TensorSpec((ways,))]

    @tf.function
    def per_task():
        grads = tf.map_fn(lambda e: gradient(*e), (images, labels), parallel_iterations=2,
                          fn_output_signature=signature)
        return [tf.reduce_mean(g, 0) for g in grads]

    flat_images = tf.reshape(images, (-1, *images.shape[2:]))
    flat_labels = tf.reshape(labels, (-1,))
    batched = tf.function(lambda: gradient(flat_images, flat_labels))
    return {"per_task_ceiling": per_task, "batched_ceiling": batched}


def plain_step_ceiling(meta_batch_size: int = 32, ways: int = 5, shots: int = 1,
                       queries: int = 15, reps: int = 5) -> dict:
    """Tasks per second that no MAML step of this configuration can beat with these kernels.

    Second-order MAML must at least run every image of the meta-batch forward and back through
    the network. This times exactly that and nothing more: one plain gradient of a cross-entropy
    over all ``meta_batch_size * ways * (shots + queries)`` images at once, with shared weights,
    one batched op per layer and fused batch norm (no inner loop, no per-task weights).
    """
    import tensorflow as tf

    encoder, gradient = _plain_gradient(ways)
    count = meta_batch_size * ways * (shots + queries)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(count, 28, 28, 1)).astype(np.float32))  # (images, 28, 28, 1)
    y = tf.constant(np.arange(count) % ways)
    step = tf.function(lambda: gradient(x, y))

    step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    per_step = (time.perf_counter() - start) / reps
    flops = gradient_flops(encoder, ways)
    task_flops = flops["gradient_per_image"] * ways * (shots + queries)
    return {"images_per_step": count, "seconds_per_step": round(per_step, 4),
            "tasks_per_second_ceiling": round(meta_batch_size / per_step, 2),
            "forward_flops_per_image": flops["forward_per_image"],
            "gradient_flops_per_task": task_flops,
            "ceiling_gflops_per_second": round(task_flops * meta_batch_size / per_step / 1e9, 1),
            "dense_matmul_gflops_per_second": dense_matmul_gflops()}


def gradient_flops(encoder, ways: int) -> dict:
    """Floating-point operations of one image through a Conv4 encoder and a ``ways`` dense head,
    counted from the layer shapes (a multiply-add is 2; batch norm and ReLU are not counted).

    ``gradient_per_image`` is forward plus backward: each layer's kernel gradient costs what its
    forward does, and so does its input gradient, except the first layer's, which nobody needs.
    Every MAML step runs at least this for every support and query image, so it is a lower bound.
    """
    shape, layers = (None, encoder.image_size, encoder.image_size, encoder.channels), []
    for conv in encoder.convs:
        out = conv.compute_output_shape(shape)
        kh, kw, cin, cout = conv.kernel.shape
        layers.append(2 * out[1] * out[2] * cout * kh * kw * cin)
        shape = out
        if encoder.downsample == "maxpool":
            shape = (None, -(-out[1] // 2), -(-out[2] // 2), out[3])
    layers.append(2 * encoder.feature_dim * ways)
    forward = sum(layers)
    return {"forward_per_image": forward, "gradient_per_image": 3 * forward - layers[0]}


def dense_matmul_gflops(size: int = 4096, reps: int = 4) -> float:
    """What this machine's TensorFlow sustains on one large float32 matmul (all threads): a
    practical upper bound on the arithmetic rate of any network's kernels here."""
    import tensorflow as tf

    a = tf.random.normal((size, size), seed=1)
    b = tf.random.normal((size, size), seed=2)
    matmul = tf.function(tf.matmul)
    matmul(a, b).numpy()
    start = time.perf_counter()
    for _ in range(reps):
        result = matmul(a, b)
    result.numpy()
    return round(2 * size ** 3 * reps / (time.perf_counter() - start) / 1e9, 1)


def _train_graph_size(learner, batch) -> int:
    """Nodes of the traced train step (with function bodies): it must not grow with tasks."""
    import tensorflow as tf

    graph = tf.function(learner.train_step).get_concrete_function(batch).graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


def run_peer(python: str, script: str, first_order: bool, reps: int = 5) -> dict:
    """Runs a PyTorch peer script with its own interpreter and returns its JSON line."""
    env = dict(os.environ, FO=str(int(first_order)), REPS=str(reps))
    out = subprocess.run([python, script], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tensorflow_adapt_latency(folder, ways: int, shots: int, steps: int, repeats: int = 20,
                             queries: int = 1) -> dict:
    """The device's work through TensorFlow: the export's SavedModel ``adapt_and_predict``
    signature (same steps, unpadded support), median milliseconds on one thread."""
    import tensorflow as tf

    model = tf.saved_model.load(str(Path(folder) / "saved_model"))
    run = model.signatures["adapt_and_predict"]
    size = int(json.loads((Path(folder) / "manifest.json").read_text())["preprocessing"]["image_size"])
    rng = np.random.default_rng(0)
    support = tf.constant(rng.random((ways * shots, size, size, 1), dtype=np.float32))
    labels = tf.constant(np.repeat(np.arange(ways, dtype=np.int32), shots))
    query = tf.constant(rng.random((queries, size, size, 1), dtype=np.float32))
    args = dict(support_images=support, support_labels=labels, query_images=query,
                steps=tf.constant(steps), inner_lr=tf.constant(-1.0))
    run(**args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(**args)["logits"].numpy()
        times.append(1e3 * (time.perf_counter() - start))
    return {"benchmark": "tensorflow-adapt", "ways": ways, "shots": shots, "steps": steps,
            "queries": queries, "threads": 1, "repeats": repeats,
            "total_median_ms": round(float(np.median(times)), 3)}
