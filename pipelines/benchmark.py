"""Speed and memory of mmtl_tf, printed as JSON.

  python pipelines/benchmark.py --data                 # episodes/s, one core
  python pipelines/benchmark.py --engine               # meta-train tasks/s, trace s, peak RSS,
                                                       # the plain-gradient ceilings (per task
                                                       # and batched) and each meta-step as a
                                                       # fraction of the per-task ceiling
  python pipelines/benchmark.py --engine --peers-python ~/peer-venv/bin/python   # + PyTorch peers
  python pipelines/benchmark.py --device exported/omniglot-5w1s   # adapt + predict latency

Every measurement runs in a fresh process; --out also writes the JSON to a file. The fractions
are timed in one process, the four steps in turn, so the machine's drift hits them alike. The
processes import mmtl_tf from this tree (not an installed copy).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"
sys.path.insert(0, str(ROOT))  # measure this tree's mmtl_tf, not whichever is installed


def measure(kind: str, args) -> dict:
    """One measurement in this process (called in a child process by main)."""
    from mmtl_tf import benchmarking as b

    if kind.startswith("device") or kind.startswith("tf-adapt"):
        return _device(kind, args)
    if kind.startswith("data"):
        b.pin_to_one_core()
        from mmtl_tf.data.omniglot import load_omniglot_classes
        from mmtl_tf.preprocessing import Preprocessing

        classes = load_omniglot_classes("train", Preprocessing(28), data_dir=args.data_dir)
        ways, shots, queries = {"data-5w1s": (5, 1, 15), "data-20w5s": (20, 5, 15)}[kind]
        return {"benchmark": "episodes", "cores": 1, "split": "omniglot background",
                **b.episode_throughput(classes, ways, shots, queries)}
    if kind == "engine-fractions":
        return {"benchmark": "fractions-of-per-task-ceiling", "cores": "all",
                **b.engine_fractions(meta_batch_size=args.meta_batch_size, rounds=args.reps)}
    if kind == "engine-ceiling":
        return {"benchmark": "plain-gradient-ceiling", "cores": "all",
                **b.plain_step_ceiling(meta_batch_size=args.meta_batch_size, reps=args.reps)}
    first_order = kind == "engine-fo"
    result = b.meta_train_throughput(first_order, meta_batch_size=args.meta_batch_size,
                                     jit_compile=args.jit_compile, reps=args.reps)
    return {"benchmark": "meta-train", "cores": "all", **result}


def _device(kind, args):
    """5-way 1-shot and 20-way 5-shot adaptation + prediction latency on one core."""
    from mmtl_tf import benchmarking as b

    ways, shots = {"5w1s": (5, 1), "20w1s": (20, 1), "20w5s": (20, 5)}[kind.split("-")[-1]]
    if kind.startswith("device"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from mmtl_tf.ondevice.bench import device_latency

        return device_latency(args.device, ways, shots, steps=args.steps)
    b.pin_to_one_core()
    steps = args.steps or json.loads((Path(args.device) / "manifest.json").read_text())["default_steps"]
    return b.tensorflow_adapt_latency(args.device, ways, shots, steps)


def child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--meta-batch-size", str(args.meta_batch_size),
           "--reps", str(args.reps)] + (["--jit-compile"] if args.jit_compile else []) + (
           ["--data-dir", args.data_dir] if args.data_dir else []) + (
           ["--device", args.device] if args.device else []) + (
           ["--steps", str(args.steps)] if args.steps else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="store_true", help="episode pipeline throughput")
    parser.add_argument("--engine", action="store_true", help="meta-training throughput")
    parser.add_argument("--device", help="an export folder: on-device adapt + predict latency, "
                        "one core, onnxruntime and TensorFlow")
    parser.add_argument("--steps", type=int, help="adaptation steps for --device (default: manifest)")
    parser.add_argument("--peers-python", help="a Python with PyTorch to run ../shared/peers")
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    if not (args.data or args.engine or args.device):
        parser.error("choose at least one of --data, --engine, --device")
    results = []
    if args.data:
        results += [child("data-5w1s", args), child("data-20w5s", args)]
    if args.device:
        results += [child(f"{kind}-{size}", args) for size in ("5w1s", "20w1s", "20w5s")
                    for kind in ("device", "tf-adapt")]
    if args.engine:
        results += [child("engine-so", args), child("engine-fo", args), child("engine-ceiling", args),
                    child("engine-fractions", args)]
        if args.peers_python:
            results += _peers(args, results)
    text = json.dumps({"results": results}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _peers(args, ours):
    from mmtl_tf.benchmarking import run_peer

    rows = []
    for first_order in (False, True):
        peers = [run_peer(args.peers_python, str(PEERS / script), first_order, args.reps)
                 for script in ("maml_torch_loop.py", "maml_torch_vmap.py")]
        best = max(p["tasks_per_second"] for p in peers)
        mine = next(r["tasks_per_second"] for r in ours
                    if r.get("benchmark") == "meta-train" and r["first_order"] == first_order)
        plain = next(r for r in ours if r.get("benchmark") == "plain-gradient-ceiling")
        ceiling = plain["tasks_per_second_ceiling"]
        fractions = next(r for r in ours if r.get("benchmark") == "fractions-of-per-task-ceiling")
        per_task = fractions["per_task_ceiling_tasks_per_second"]
        rows.append({"benchmark": "peers", "first_order": first_order, "peers": peers,
                     "best_peer_tasks_per_second": best, "mmtl_tf_tasks_per_second": mine,
                     "ratio_to_best_peer": round(mine / best, 2),
                     "five_times_best_peer": round(5 * best, 2),
                     "plain_gradient_ceiling": ceiling,
                     "ceiling_ratio_to_best_peer": round(ceiling / best, 2),
                     "per_task_ceiling": per_task,
                     "per_task_ceiling_ratio_to_best_peer": round(per_task / best, 2),
                     # the arithmetic rate 5x would take even at the plain gradient's count
                     "gflops_per_second_for_five_times": round(
                         5 * best * plain["gradient_flops_per_task"] / 1e9, 1),
                     "dense_matmul_gflops_per_second": plain["dense_matmul_gflops_per_second"]})
    return rows


if __name__ == "__main__":
    main()
