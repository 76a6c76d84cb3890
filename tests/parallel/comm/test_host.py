"""The shared-memory exchange of ``host.py``: sums in rank order and gathers every rank's message, exchange after
exchange with the ranks out of step; is refused on every rank when one rank cannot use it; and names a rank that
died or does not arrive."""

import mmap
import os
import random
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from lightning_dl.parallel.comm import CompressionState
from lightning_dl.parallel.comm import host as host_module
from lightning_dl.parallel.comm.host import LINE, HostExchange
from tests.helpers.distributed import run_distributed
from tests.helpers.models import tiny_net

EXCHANGES = 40


def _message(rank: int, n: int, i: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1000 * i + rank))


def _exchanges(rank: int, world_size: int) -> dict:
    exchange = HostExchange.build(None, capacity=4 * 300, timeout=30.0)
    assert exchange is not None
    pace = random.Random(rank)
    sums, gathered = [], []
    for i in range(EXCHANGES):
        time.sleep(pace.uniform(0, 0.004))  # out of step: a rank may be two exchanges ahead of a reader
        n = 1 + (37 * i) % 300
        if i % 2:
            x = _message(rank, n, i)
            exchange.all_reduce_(x)
            sums.append(x)
        else:
            codes = (_message(rank, n, i) * 50).to(torch.int8).view(torch.uint8)
            out = [torch.empty_like(codes) for _ in range(world_size)]
            exchange.all_gather(out, codes)
            gathered.append(out)
    # rank 0 creates and maps the segment before the others hear its name: never refused for a late file
    built = [HostExchange.build(None, capacity=64 * (1 + k % 3), timeout=30.0) for k in range(30)]
    left = sorted(p.name for p in host_module.SHM.glob(f"lightning_dl-{os.getpid()}-*"))  # names removed at once
    try:
        HostExchange.build(None, capacity=64 * (1 + rank), timeout=30.0)
        mismatch = ""
    except ValueError as err:
        mismatch = str(err)
    host_module.os.environ[host_module.ENV] = "off" if rank == 2 else "1"  # one rank's bad switch: every rank says so
    try:
        HostExchange.build(None, capacity=64, timeout=30.0)
        switch = ""
    except ValueError as err:
        switch = str(err)
    del host_module.os.environ[host_module.ENV]
    refused = {}
    for what in ("elsewhere", "disabled"):
        if rank == 1 and what == "elsewhere":  # one rank on another host: every rank is refused
            host_module.socket.gethostname = lambda: "another-host"  # type: ignore[attr-defined]
        if rank == 1 and what == "disabled":
            host_module.os.environ[host_module.ENV] = "0"
        refused[what] = HostExchange.build(None, capacity=64, timeout=30.0) is None
    dist.barrier()
    return {
        "sums": sums,
        "gathered": gathered,
        "refused": refused,
        "exchanges": exchange.exchanges,
        "built": sum(b is not None for b in built),
        "left": left,
        "mismatch": mismatch,
        "switch": switch,
    }


@pytest.mark.distributed
def test_sums_in_rank_order_and_gathers_over_many_exchanges_out_of_step() -> None:
    world = 3
    ranks = run_distributed(_exchanges, world, timeout=120)
    for r in ranks:
        assert r["exchanges"] == EXCHANGES
        assert r["refused"] == {"elsewhere": True, "disabled": True}
        assert r["built"] == 30 and r["left"] == []
        assert r["mismatch"] == "`capacity` must be the same on every rank, got [64, 128, 192]."
        assert (
            r["switch"]
            == "LIGHTNING_DL_HOST_EXCHANGE must be 0 (gloo) or 1 (shared memory), got ['1', '1', 'off'] by rank."
        )
        for k, i in enumerate(range(1, EXCHANGES, 2)):
            n = 1 + (37 * i) % 300
            expected = _message(0, n, i) + _message(1, n, i) + _message(2, n, i)  # in rank order
            assert torch.equal(r["sums"][k], expected)
        for k, i in enumerate(range(0, EXCHANGES, 2)):
            n = 1 + (37 * i) % 300
            for source in range(world):
                expected = (_message(source, n, i) * 50).to(torch.int8).view(torch.uint8)
                assert torch.equal(r["gathered"][k][source], expected)


def _alone(pids: list[int], timeout: float) -> HostExchange:
    """Rank 0 of a two-rank exchange whose rank 1 never writes (process ``pids[1]``)."""
    return HostExchange(mmap.mmap(-1, LINE * 2 + 2 * 2 * 64), 2, 0, 64, pids, timeout)


def test_a_dead_rank_is_named_within_seconds() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: its process id names nothing now
    exchange = _alone([0, child.pid], timeout=30.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"host exchange 1 \(collective on rank 0\): rank\(s\) \[1\] of 2 died"):
        exchange.all_reduce_(torch.ones(3))
    assert time.monotonic() - start < 5


def test_a_rank_that_does_not_arrive_is_named_after_the_timeout() -> None:
    exchange = _alone([os.getpid(), os.getpid()], timeout=0.5)  # alive, never arrives: hung
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] of 2 did not arrive within the collective timeout"):
        exchange.all_gather([torch.empty(2), torch.empty(2)], torch.ones(2))
    assert 0.5 <= time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="this host exchange failed in an earlier exchange"):
        exchange.all_reduce_(torch.ones(2))  # its sequence number is raised: a slot could be overwritten while read


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"`capacity` \(bytes of the largest message\) must be an integer >= 1, got 0"):
        HostExchange.build(None, capacity=0, timeout=1.0)
    with pytest.raises(ValueError, match=r"`timeout` must be > 0 seconds, got 0"):
        HostExchange.build(None, capacity=8, timeout=0)
    with pytest.raises(ValueError, match=r"`timeout` must be > 0 seconds, got -1"):
        CompressionState(tiny_net(seed=0), "sign", timeout=-1)
    exchange = _alone([0, 0], timeout=1.0)
    with pytest.raises(ValueError, match=r"a message of 68 bytes does not fit the exchange's 64 bytes"):
        exchange.all_reduce_(torch.ones(17))
    with pytest.raises(ValueError, match=r"`outputs` must hold one tensor per rank \(2\), got 1"):
        exchange.all_gather([torch.empty(2)], torch.ones(2))
