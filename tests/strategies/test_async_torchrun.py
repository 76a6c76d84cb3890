"""``async_sgd`` under an external launcher: two ``torchrun`` invocations on the loopback interface stand for two
machines (node 0: the server and a worker; node 1: two workers). A worker on node 1 is killed after its first
push; torchrun's agent there then stops its sibling too, and the server finishes the step budget with the worker
that is left."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(node: int, port: int, out: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node-rank={node}",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "tests.helpers.async_tools",
        f"--out={out}",
        f"--max-steps={STEPS}",
        "--kill-rank=3",
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = (out / f"node{node}.log").open("w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_two_torchrun_nodes_finish_the_budget_after_a_worker_is_killed(tmp_path):
    port = _free_port()
    nodes = [_torchrun(node, port, tmp_path) for node in (0, 1)]
    result = tmp_path / "rank0.json"
    deadline = time.monotonic() + 240
    try:
        while not result.exists() and time.monotonic() < deadline and nodes[0].poll() in (None, 0):
            time.sleep(0.5)
        # torchrun's agent on node 0 waits at its exit barrier for node 1's agent, which left when its worker died
        logs = "\n".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
        assert result.exists(), f"rank 0 wrote no result; torchrun output:\n{logs[-6000:]}"
        nodes[1].wait(60)
    finally:
        for process in nodes:
            _stop(process)
    audit = json.loads(result.read_text())
    assert audit["world_size"] == 4 and audit["num_workers"] == 3
    assert audit["version"] == STEPS == audit["global_step"] == sum(audit["applied"])  # every push acknowledged
    assert audit["dead"][2] and audit["applied"][2] == 1  # rank 3 died after its first push...
    assert audit["applied"][0] + audit["applied"][1] == STEPS - 1  # ...the others, all but 2 pushes after its death
    assert nodes[1].returncode != 0  # node 1's agent reports its dead worker
