"""``async_sgd`` under an external launcher: two ``torchrun`` invocations on the loopback interface stand for two
machines (node 0: the server and a worker; node 1: two workers). A worker on node 1 is killed after its first
push; torchrun's agent there then stops its sibling too, and the server finishes the step budget with the worker
that is left."""

import json
import time

import pytest

from tests.helpers.distributed import free_port, stop_process, torchrun_node

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 60


def test_two_torchrun_nodes_finish_the_budget_after_a_worker_is_killed(tmp_path):
    port = free_port()
    args = [f"--max-steps={STEPS}", "--kill-rank=3"]
    nodes = [torchrun_node(n, port, tmp_path, module="tests.helpers.async_tools", args=args) for n in (0, 1)]
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
            stop_process(process)
    audit = json.loads(result.read_text())
    assert audit["world_size"] == 4 and audit["num_workers"] == 3
    assert audit["version"] == STEPS == audit["global_step"] == sum(audit["applied"])  # every push acknowledged
    assert audit["dead"][2] and audit["applied"][2] == 1  # rank 3 died after its first push...
    assert audit["applied"][0] + audit["applied"][1] == STEPS - 1  # ...the others, all but 2 pushes after its death
    assert nodes[1].returncode != 0  # node 1's agent reports its dead worker
