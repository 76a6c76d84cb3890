"""The multi-process harness itself: results come back by rank, errors and hangs fail fast."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _all_reduce_rank(rank: int, world_size: int) -> tuple[int, int, float]:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), dist.get_world_size(), value.item()


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank one failed on purpose")
    dist.barrier()


def _sleep_forever(rank: int, world_size: int) -> None:
    time.sleep(3600)


def test_ranks_share_a_gloo_group() -> None:
    results = run_distributed(_all_reduce_rank, 3)
    assert results == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_an_error_in_one_rank_fails_the_call() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)^-- rank 1 failed first:.*rank one failed on purpose"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def test_a_hang_fails_within_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 were still running"):
        run_distributed(_sleep_forever, 2, timeout=5)
    assert time.monotonic() - start < 30


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="`world_size` must be >= 1, got 0"):
        run_distributed(_all_reduce_rank, 0)
