"""Run a function in N gloo processes joined on 127.0.0.1, with a bounded wait so that a hang fails the test; and
start ``torchrun`` nodes on 127.0.0.1 as separate process groups that a test can stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_dl.parallel.comm import leave_together

DEFAULT_TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parents[2]  # the repository: torchrun's workers import `tests.*` from here


def loopback_env(rank: int, world_size: int) -> dict[str, str]:
    """Environment of one rank as torchrun would set it, bound to 127.0.0.1 (read by Lightning's environments)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",  # not used for rendezvous (the group is initialised through a file) but required
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "NODE_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GLOO_SOCKET_IFNAME": "lo",
    }


PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "lightning_dl", "lightning_dl.strategies", __name__]
"""Imported once per test session by the fork server that starts every rank of ``run_distributed``: a rank forks
from it with these modules loaded instead of importing them anew in a spawned interpreter (measured on 2 cores:
6.1 s for 2 spawned ranks of a trivial function, 11.3 s for 4, 28.3 s for 8; forked from the server 0.1 s for 4
and 0.3 s for 8, after 4.1 s to start the server once). The server never runs a test, so every rank starts from
the same freshly imported state, as a spawned one would."""


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    tmp: str,
    args: tuple,
    timeout: float,
    parent: tuple[dict[str, str], str, list[str]],
) -> None:
    environ, cwd, path = parent  # a forked rank starts with the fork server's; take the calling process's
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    sys.path[:] = path
    os.environ.update(loopback_env(rank, world_size))
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(tmp) / f"result_{rank}.pt")
    except BaseException:
        (Path(tmp) / f"error_{rank}.txt").write_text(f"{time.time()}\n{traceback.format_exc()}")
        raise
    else:
        leave_together()  # a rank that left alone could abort a peer still talking to it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failure_report(tmp: Path, world_size: int) -> str:
    """Every failed rank's traceback, the earliest failure first (the others are usually its consequence)."""
    time.sleep(0.5)  # let ranks that fail because of the first failure write their tracebacks
    failures = []
    for rank in range(world_size):
        path = tmp / f"error_{rank}.txt"
        if path.exists():
            stamp, _, trace = path.read_text().partition("\n")
            failures.append((float(stamp), rank, trace))
    return "\n".join(
        f"-- rank {rank} failed{' first' if i == 0 else ''}:\n{trace}"
        for i, (_, rank, trace) in enumerate(sorted(failures))
    )


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes that share a gloo process group
    (``file://`` rendezvous in a temporary directory, sockets on the loopback interface). The processes are forked
    from a fork server with ``PRELOAD`` imported, and take the calling process's environment variables, working
    directory and ``sys.path``.

    Returns the per-rank return values (which must be picklable with ``torch.save``), ordered by rank. A rank that
    raises fails the call with a ``RuntimeError`` holding every failed rank's traceback, the first failure first;
    ranks still running after ``timeout`` seconds are killed and a ``TimeoutError`` is raised, so a deadlock fails
    the test instead of hanging CI. ``fn`` must be importable (defined at module level).
    """
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size!r}.")
    with tempfile.TemporaryDirectory(prefix="lightning_dl_dist_") as tmp:
        mp.set_forkserver_preload(PRELOAD)  # read when the server starts: at the first call of a test session
        parent = (dict(os.environ), os.getcwd(), list(sys.path))
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, tmp, args, timeout, parent),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        assert context is not None
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    raise TimeoutError(f"ranks {alive} of {world_size} were still running after {timeout:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            raise RuntimeError(_failure_report(Path(tmp), world_size) or str(err)) from err
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        return [torch.load(Path(tmp) / f"result_{rank}.pt", weights_only=False) for rank in range(world_size)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one holds right now (for a rendezvous that binds it next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_node(
    node: int,
    port: int,
    out: Path,
    *,
    module: str,
    args: Sequence[str] = (),
    nnodes: int = 2,
    nproc_per_node: int = 2,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start node ``node`` of ``nnodes`` as ``python -m torch.distributed.run`` would on a machine of its own, its
    rendezvous on 127.0.0.1:``port``: ``nproc_per_node`` workers, each ``python -m <module> --out=<out> <args>``.

    The workers run in the repository (``PYTHONPATH``) with one OpenMP thread; ``env`` adds or overrides variables.
    torchrun's output goes to ``out/node{node}.log``. The node runs in a session of its own: :func:`stop_process`
    ends it with all its workers.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node-rank={node}",
        f"--nproc-per-node={nproc_per_node}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        module,
        f"--out={out}",
        *args,
    ]
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | dict(env or {})
    with (out / f"node{node}.log").open("w") as log:  # the child holds its own copy of the file
        return subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """End ``process`` and its whole process group if it still runs (as :func:`torchrun_node` starts it): SIGTERM,
    then SIGKILL after ``timeout`` seconds; waits at most ``timeout`` seconds more."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
