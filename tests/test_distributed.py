"""tf.distribute: the meta-batch split across replicas gives the single-device meta-gradient."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmtl_tf.meta.algorithms import ALGORITHMS

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_every_algorithms_mirrored_update_equals_the_single_device_one(tmp_path):
    """Each replica's gradient is summed across replicas: a step that forgot to divide by
    their number (Reptile's pseudo-gradient did) moves twice as far with two."""
    out = tmp_path / "compare.json"
    subprocess.run([sys.executable, str(WORKER), "compare", str(out)], check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result.pop("replicas") == 2
    assert sorted(result) == sorted(ALGORITHMS)
    for algorithm, compared in result.items():
        assert compared["max_abs_update"] > 1e-3, f"{algorithm}: the step moved the weights"
        assert compared["max_abs_diff"] < 1e-5, (algorithm, compared)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_loopback_train_in_lockstep(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster,
                                                     "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "worker",
                                       str(tmp_path / f"worker{index}.json")], env=env))
    for p in procs:
        assert p.wait(timeout=600) == 0
    first, second = (json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2))
    assert first["replicas"] == second["replicas"] == 2
    assert abs(first["checksum"] - second["checksum"]) < 1e-4, "workers hold the same weights"
    assert len(first["loss"]) == 1 and first["loss"][0] > 0
