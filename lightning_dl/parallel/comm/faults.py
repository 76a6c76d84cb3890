"""Naming the rank that died: after a collective fails, every surviving rank writes a key to the process group's
store and waits ``grace`` seconds for the others' keys; ranks whose key never comes are reported dead. And leaving a
process group together, so that a finished rank does not take a peer down with it."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

import torch.distributed as dist


def missing_ranks(store: dist.Store, rank: int, world_size: int, *, grace: float = 5.0, tag: str = "0") -> list[int]:
    """Ranks that did not check in within ``grace`` seconds (this rank checks in first).

    Example::

        >>> store = dist.HashStore()
        >>> store.set("lightning_dl/alive/x/1", "1")
        >>> missing_ranks(store, 0, 3, grace=0.05, tag="x")
        [2]
    """
    prefix = f"lightning_dl/alive/{tag}/"
    store.set_timeout(timedelta(seconds=max(grace, 0.01)))  # bounds every store call, the first included
    store.set(prefix + str(rank), "1")
    deadline = time.monotonic() + grace
    missing = [r for r in range(world_size) if r != rank]
    while missing:
        missing = [r for r in missing if not store.check([prefix + str(r)])]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return missing


def dead_ranks_message(rank: int, world_size: int, *, grace: float = 5.0, tag: str = "0") -> str:
    """A sentence naming the ranks that did not answer after a failed collective, or why it cannot tell."""
    try:
        store = dist.distributed_c10d._get_default_store()  # the rendezvous store every rank already holds
        missing = missing_ranks(store, rank, world_size, grace=grace, tag=tag)
    except Exception as err:  # rank 0 hosts the TCP store: when it is gone, so is the store
        return f"rank {rank} cannot reach the rendezvous store ({type(err).__name__}): rank 0 is likely dead"
    if not missing:
        return f"every rank answered rank {rank} after the failed collective"
    return f"rank(s) {missing} of {world_size} did not answer rank {rank} within {grace:g} s: dead or hung"


LEAVE_TIMEOUT = timedelta(seconds=10)
"""How long a spawned rank that finished waits for the others before it leaves the process group."""


def leave_together(timeout: timedelta = LEAVE_TIMEOUT) -> None:
    """Wait (at most ``timeout``) for every rank, then destroy the process group: a rank that exits while a peer's
    gloo threads still talk to it can abort that peer at exit (SIGABRT, "terminate called without an active
    exception"). A peer that died only shortens the wait; its own error is what the run reports. Does nothing
    without a process group."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(RuntimeError):
        dist.monitored_barrier(timeout=timeout) if dist.get_backend() == "gloo" else dist.barrier()
    dist.destroy_process_group()
