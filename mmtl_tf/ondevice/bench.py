"""Device latency: how long a phone-class core takes to personalise and to predict.

``device_latency`` is what ``pipelines/benchmark.py --device <export folder>`` reports.
"""

from __future__ import annotations

import time

import numpy as np

from mmtl_tf.ondevice.runtime import load


def device_latency(folder, ways: int, shots: int, steps: int | None = None, repeats: int = 20,
                   queries: int = 1, threads: int = 1) -> dict:
    """Median wall time of ``adapt`` (``steps`` SGD steps, default the manifest's) on a
    ``ways``-way ``shots``-shot support set, then ``predict_proba`` on ``queries`` images, on
    ``threads`` onnxruntime threads (1: ``intra_op_num_threads = 1``).

    Images are random preprocessed arrays (latency does not depend on content); decoding files
    is not timed. The first call (session creation, warm-up) is reported apart and excluded.
    Returns a dict of plain numbers; times in milliseconds except ``load_s``/``first_call_s``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    start = time.perf_counter()
    model = load(folder, threads=threads)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    size = model.prep.image_size
    support = rng.random((ways * shots, size, size, 1), dtype=np.float32)  # (N*K, S, S, 1)
    labels = np.repeat(np.arange(ways), shots)
    query = rng.random((queries, size, size, 1), dtype=np.float32)
    steps = model.default_steps if steps is None else steps

    start = time.perf_counter()
    model.adapt(support, labels, steps).predict_proba(query)
    first_call_s = time.perf_counter() - start
    adapt_ms, predict_ms = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        personal = model.adapt(support, labels, steps)
        t1 = time.perf_counter()
        personal.predict_proba(query)
        t2 = time.perf_counter()
        adapt_ms.append(1e3 * (t1 - t0))
        predict_ms.append(1e3 * (t2 - t1))
    total = np.add(adapt_ms, predict_ms)
    return {"benchmark": "device", "model": model.manifest.get("name"), "ways": ways,
            "shots": shots, "steps": steps, "queries": queries, "image_size": size,
            "threads": threads, "repeats": repeats,
            "support_graph": model.graph("adapt_step", ways * shots),
            "load_s": round(load_s, 4), "first_call_s": round(first_call_s, 4),
            "adapt_median_ms": round(float(np.median(adapt_ms)), 3),
            "predict_median_ms": round(float(np.median(predict_ms)), 3),
            "total_median_ms": round(float(np.median(total)), 3),
            "total_max_ms": round(float(np.max(total)), 3)}
