"""The parameter server's bookkeeping without RPC: replay equality, the staleness policies against their formulas,
the stale-synchronous gate, dead workers, and the shard layout."""

import random
import threading

import pytest
import torch
from torch.testing import assert_close

from lightning_dl.parallel.param_server.layout import assign_shards, shard_indices
from lightning_dl.parallel.param_server.server import OK, STOP, ParameterServer, Push

LR, LAMBDA = 0.1, 0.5


def _serve(policy: str, pushes: list[tuple[int, int, torch.Tensor]]):
    """Apply ``pushes`` (worker, version, gradient) in order with SGD through the server; returns the final
    parameters and the (staleness, stale copy) the server used for each push."""
    w = torch.linspace(-1, 1, 5)
    server = ParameterServer([w], num_workers=3, policy=policy, dc_lambda=LAMBDA)
    server.start(version=0)
    copies = {}
    for worker in range(3):
        copies[(worker, 0)] = server.fetch(worker, timeout=1).params[0]
    optimizer = torch.optim.SGD([w], lr=LR)
    used = []
    for worker, version, grad in pushes:
        server.submit(Push(worker=worker, version=version, grads=[grad], fetch=True))
        push = server.next_push(timeout=1)
        grads, factor = server.correct(push)
        used.append((push.staleness, copies[(worker, version)]))
        w.grad = grads[0]
        optimizer.param_groups[0]["lr"] = LR * factor
        with server.lock:
            optimizer.step()
        server.applied(push)
        reply = push.future.wait()
        copies[(worker, reply.version)] = reply.params[0]
    return w, used, server


def _script(seed: int = 0, steps: int = 12):
    """Three workers pushing in a random order, each at the version of its last reply (fetch_every=1)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    last = [0, 0, 0]
    pushes = []
    for version in range(1, steps + 1):
        worker = rng.randrange(3)
        pushes.append((worker, last[worker], torch.randn(5, generator=gen)))
        last[worker] = version
    return pushes


@pytest.mark.parametrize("policy", ["none", "inverse", "dc"])
def test_server_equals_sequential_replay_of_its_formula(policy):
    pushes = _script()
    w, used, server = _serve(policy, pushes)
    # literal transcription of the update rules, replayed in the recorded order
    theta = torch.linspace(-1, 1, 5)
    for (_, _, g), (staleness, stale) in zip(pushes, used, strict=True):
        if policy == "none":
            theta = theta - LR * g
        elif policy == "inverse":
            theta = theta - LR / max(staleness, 1) * g
        else:
            theta = theta - LR * (g + LAMBDA * g * g * (theta - stale))
    assert_close(w, theta)
    assert server.version == len(pushes) == sum(s.applied for s in server.workers)
    assert sum(server.staleness_counts.values()) == len(pushes)
    assert max(server.staleness_counts) > 1  # the script does produce stale pushes


def test_staleness_is_server_version_minus_push_version():
    _, used, _ = _serve(
        "none", [(0, 0, torch.ones(5)), (1, 0, torch.ones(5)), (2, 0, torch.ones(5)), (0, 1, torch.ones(5))]
    )
    assert [s for s, _ in used] == [0, 1, 2, 2]


def test_stale_synchronous_gate_holds_a_worker_that_is_ahead():
    server = ParameterServer([torch.zeros(1)], num_workers=2, max_staleness=1)
    server.start(version=0)
    for worker in (0, 1):
        server.register(worker, pushes_per_epoch=10)

    def apply(push):
        server.correct(push)
        server.applied(push)

    # worker 0 pushes twice: its second push is one ahead of worker 1 (allowed), its third would be two (held)
    for _ in range(2):
        server.submit(Push(worker=0, version=server.version, grads=[torch.ones(1)]))
        apply(server.next_push(timeout=1))
    server.submit(Push(worker=0, version=server.version, grads=[torch.ones(1)]))
    with pytest.raises(TimeoutError, match="No worker pushed"):
        server.next_push(timeout=0.3)
    server.submit(Push(worker=1, version=0, grads=[torch.ones(1)]))
    assert server.next_push(timeout=1).worker == 1


def test_dead_worker_drops_its_queue_and_releases_the_gate():
    server = ParameterServer([torch.zeros(1)], num_workers=2, max_staleness=0)
    server.start(version=0)
    server.submit(Push(worker=0, version=0, grads=[torch.ones(1)]))
    push = server.next_push(timeout=1)
    server.correct(push)
    server.applied(push)
    held = server.submit(Push(worker=0, version=1, grads=[torch.ones(1)]))
    doomed = server.submit(Push(worker=1, version=0, grads=[torch.ones(1)]))
    server.mark_dead(1)
    assert server.next_push(timeout=1).worker == 0  # the gate no longer waits for worker 1
    assert not doomed.done() and not held.done()
    assert server.submit(Push(worker=1, version=0, grads=[torch.ones(1)])).wait().status == STOP


def test_stop_answers_queued_pushes_without_applying():
    server = ParameterServer([torch.zeros(1)], num_workers=1)
    server.start(version=3)
    future = server.submit(Push(worker=0, version=3, grads=[torch.ones(1)]))
    server.stop()
    assert future.wait().status == STOP and future.wait().version == 3
    assert server.workers[0].applied == 0 and server.version == 3


def test_next_push_ends_when_every_worker_is_done():
    server = ParameterServer([torch.zeros(1)], num_workers=2)
    server.start(version=0)
    threading.Timer(0.1, server.finish, args=(0,)).start()
    threading.Timer(0.2, server.finish, args=(1,)).start()
    assert server.next_push(timeout=5) is None


def test_fetch_waits_for_start_and_reply_ok():
    server = ParameterServer([torch.arange(3.0)], num_workers=1)
    with pytest.raises(TimeoutError, match="did not start"):
        server.fetch(0, timeout=0.05)
    server.start(version=7)
    reply = server.fetch(0, timeout=1)
    assert reply.status == OK and reply.version == 7 and reply.params[0].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy="adam"), "staleness_policy"),
        (dict(num_workers=0), "num_workers"),
        (dict(max_staleness=-1), "max_staleness"),
    ],
)
def test_server_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParameterServer([torch.zeros(1)], **({"num_workers": 1} | kwargs))


def test_shards_balance_whole_tensors():
    shards = assign_shards([1000, 10, 990, 20, 5], num_servers=2)
    owners = shard_indices(shards, 2)
    loads = [sum([1000, 10, 990, 20, 5][i] for i in owner) for owner in owners]
    assert sorted(i for owner in owners for i in owner) == [0, 1, 2, 3, 4]
    assert abs(loads[0] - loads[1]) <= 25
    with pytest.raises(ValueError, match="num_servers=6"):
        assign_shards([1, 2, 3], num_servers=6)
