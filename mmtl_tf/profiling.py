"""Where a step's time goes, by TensorFlow op type, from TensorFlow's profiler (JSON out).

``tf.profiler.experimental`` writes an XSpace (``*.xplane.pb``) whose host plane has one line per
thread; on the executor threads every kernel run is an event named ``"<node>:<kernel>"`` with the
kernel as display name. Op time here is the sum of those events' self times (an event nested in
another on the same line counts once) over all executor threads, so with two inter-op threads
busy it can reach twice the wall time. Kernels run through oneDNN keep their op's name without
the ``_Mkl``/``_MklNative`` prefix (``_MklNativeFusedConv2D`` is reported as ``FusedConv2D``).
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import numpy as np

_ONEDNN_PREFIXES = ("_MklNative", "_Mkl")

# Coarse families for the summary; any op type not listed is "other".
OP_GROUPS = {
    "convolution forward": ("Conv2D", "FusedConv2D", "DepthwiseConv2dNative"),
    "convolution filter gradient": ("Conv2DBackpropFilter", "Conv2DBackpropFilterWithBias"),
    "convolution input gradient": ("Conv2DBackpropInput",),
    "batch norm": ("FusedBatchNormV3", "FusedBatchNormEx", "FusedBatchNormGradV3"),
    "element-wise": ("Mul", "Sub", "Tile", "AddV2", "AddN", "Neg", "SquaredDifference", "ReluGrad",
                     "Relu", "Square", "RealDiv", "Sqrt", "Rsqrt", "Maximum", "Minimum", "Select",
                     "SelectV2", "Cast", "BroadcastTo", "Exp", "Log", "Pow", "DivNoNan",
                     "ZerosLike", "OnesLike", "Fill", "Equal", "NotEqual", "Greater", "Reciprocal"),
    "matmul": ("MatMul", "FusedMatMul", "BatchMatMulV2", "BatchMatMulV3"),
    "reductions and softmax": ("Sum", "Mean", "Max", "Prod", "ArgMax", "All", "Any", "LogSoftmax",
                               "Softmax", "SparseSoftmaxCrossEntropyWithLogits"),
    "variables and optimizer": ("ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp",
                                "AssignSubVariableOp", "ResourceApplyAdam", "VarHandleOp"),
    "loop (map_fn, while)": ("TensorListFromTensor", "TensorListGetItem", "TensorListSetItem",
                             "TensorListStack", "TensorListReserve", "TensorListElementShape",
                             "Enter", "Exit", "Merge", "Switch", "NextIteration", "LoopCond",
                             "While", "StatelessWhile", "Less", "LogicalAnd"),
}
_GROUP_OF = {op: group for group, ops in OP_GROUPS.items() for op in ops}


def op_type(kernel: str) -> str:
    """The TensorFlow op type of a profiled kernel: oneDNN's prefix dropped."""
    for prefix in _ONEDNN_PREFIXES:
        if kernel.startswith(prefix):
            return kernel[len(prefix):]
    return kernel


def op_group(op: str) -> str:
    """The coarse family of an op type (see ``OP_GROUPS``), "other" if unlisted."""
    return _GROUP_OF.get(op, "other")


def read_op_times(logdir) -> tuple[dict, dict, int]:
    """(picoseconds by op type, calls by op type, executor threads) from every XSpace under
    ``logdir``: self times of the op events, summed over threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    picoseconds, calls, threads = collections.Counter(), collections.Counter(), 0
    for path in sorted(Path(logdir).rglob("*.xplane.pb")):
        space = xplane_pb2.XSpace()
        space.ParseFromString(path.read_bytes())
        for plane in space.planes:
            metadata = plane.event_metadata
            for line in plane.lines:
                ops = [(e.offset_ps, e.duration_ps, op_type(metadata[e.metadata_id].display_name))
                       for e in line.events if _is_op(metadata[e.metadata_id])]
                threads += bool(ops)
                for op, self_ps in _self_times(ops):
                    picoseconds[op] += self_ps
                    calls[op] += 1
    return dict(picoseconds), dict(calls), threads


def _is_op(metadata) -> bool:
    return bool(metadata.display_name) and metadata.name.endswith(":" + metadata.display_name)


def _self_times(events):
    """(op, self picoseconds) of (offset, duration, op) events on one thread: an event's time
    minus that of the events nested directly inside it."""
    out, stack = [], []  # stack: [end, index into out] of the enclosing events
    for offset, duration, op in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= offset:
            stack.pop()
        if stack:
            out[stack[-1][1]][1] -= duration
        out.append([op, duration])
        stack.append([offset + duration, len(out) - 1])
    return out


def profile_op_times(step, steps: int = 1) -> dict:
    """Runs ``step`` (a callable; its outputs are fetched to numpy) ``steps`` times under
    TensorFlow's profiler and returns per-step milliseconds: wall, op time (all executor
    threads) and op time and calls by op type, largest first. Warm ``step`` up first: tracing
    would be profiled too."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(steps):
            tf.nest.map_structure(np.asarray, step())
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        picoseconds, calls, threads = read_op_times(logdir)
    ms = {op: ps / 1e9 / steps for op, ps in sorted(picoseconds.items(), key=lambda kv: -kv[1])}
    return {"wall_ms_per_step": 1e3 * wall / steps, "op_ms_per_step": sum(ms.values()),
            "executor_threads": threads, "op_ms_by_type": ms,
            "calls_per_step_by_type": {op: calls[op] / steps for op in ms}}


def engine_profile(meta_batch_size: int = 32, ways: int = 5, shots: int = 1, queries: int = 15,
                   inner_lr: float = 0.4, rounds: int = 3,
                   names=("per_task_ceiling", "first_order", "second_order")) -> dict:
    """Op time by type of the per-task ceiling and the MAML meta-steps (``engine_steps``'s
    configuration), and each meta-step's excess over the ceiling by op type and by family.

    Each step is warmed up, then profiled one step at a time for ``rounds`` rounds, the steps in
    turn (so a machine that slows down slows them alike); figures are per-step means in ms.
    """
    from mmtl_tf.benchmarking import engine_steps

    steps = engine_steps(meta_batch_size, ways, shots, queries, inner_lr)
    steps = {name: steps[name] for name in names}
    for step in steps.values():  # tracing and a warm-up step
        step(), step()
    runs = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            runs[name].append(profile_op_times(step))
    profiles = {name: _summary(_mean_profile(r)) for name, r in runs.items()}
    ceiling = profiles.get("per_task_ceiling")
    for name, profile in profiles.items():
        if ceiling is not None and profile is not ceiling:
            profile["excess_over_ceiling_ms_by_type"] = _excess(
                profile["op_ms_by_type"], ceiling["op_ms_by_type"])
            profile["excess_over_ceiling_ms_by_group"] = _excess(
                profile["op_ms_by_group"], ceiling["op_ms_by_group"])
    return {"meta_batch_size": meta_batch_size, "ways": ways, "shots": shots, "queries": queries,
            "inner_steps": 1, "rounds": rounds, "steps": profiles}


def _mean_profile(profiles: list) -> dict:
    ops = {op for p in profiles for op in p["op_ms_by_type"]}
    mean = lambda key, op: float(np.mean([p[key].get(op, 0.0) for p in profiles]))
    return {"wall_ms_per_step": float(np.mean([p["wall_ms_per_step"] for p in profiles])),
            "executor_threads": max(p["executor_threads"] for p in profiles),
            "op_ms_by_type": {op: mean("op_ms_by_type", op) for op in ops},
            "calls_per_step_by_type": {op: mean("calls_per_step_by_type", op) for op in ops}}


def _summary(profile: dict) -> dict:
    """Rounded, sorted, with the op total and the op time by family."""
    by_type = dict(sorted(profile["op_ms_by_type"].items(), key=lambda kv: -kv[1]))
    by_group = collections.Counter()
    for op, ms in by_type.items():
        by_group[op_group(op)] += ms
    total = sum(by_type.values())
    return {"wall_ms_per_step": round(profile["wall_ms_per_step"], 1),
            "op_ms_per_step": round(total, 1),
            "executor_threads": profile["executor_threads"],
            # op time over the threads' wall time: how busy the executor threads were
            "busy_fraction": round(total / (profile["executor_threads"] * profile["wall_ms_per_step"]), 3),
            "op_ms_by_group": {g: round(ms, 1) for g, ms in by_group.most_common()},
            "op_ms_by_type": {op: round(ms, 2) for op, ms in by_type.items()},
            "calls_per_step_by_type": {op: round(profile["calls_per_step_by_type"][op], 1)
                                       for op in by_type}}


def _excess(step: dict, ceiling: dict) -> dict:
    """step - ceiling for every key of either, largest excess first (negative: the step spends
    less there than the ceiling)."""
    keys = set(step) | set(ceiling)
    excess = {k: round(step.get(k, 0.0) - ceiling.get(k, 0.0), 1) for k in keys}
    return dict(sorted(excess.items(), key=lambda kv: -kv[1]))
