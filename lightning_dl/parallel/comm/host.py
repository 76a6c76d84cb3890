"""Small exchanges between the ranks of one host through shared memory instead of gloo's TCP sockets.

A gloo collective hands the tensor to a worker thread, which writes it to a loopback socket, whose peer's device
thread wakes, reads it and wakes the peer's worker: several thread wake-ups per message. On a machine whose idle
cores sleep, each can take milliseconds (``benchmarks/bench_host_exchange.py`` measures both). Here every rank writes
its message into its own slot of a shared segment and raises its sequence number, then polls until every rank has
raised its own: nothing sleeps, and nothing is handed from one thread to another.

Used by the compressed hooks for their per-step messages (PowerSGD's ``P`` and ``Q``, the int8 and sign codes) when
every rank of the process group runs on this host, on x86-64 (whose stores become visible in program order, so a
sequence number seen means the message written before it is seen). The hooks use gloo otherwise, or when the
environment variable ``LIGHTNING_DL_HOST_EXCHANGE`` is ``0``. A rank that does not arrive fails the others after the
strategy's collective ``timeout``, naming it; a rank whose process has died is named within about a second.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ENV = "LIGHTNING_DL_HOST_EXCHANGE"
"""``0``: the compressed hooks' messages go through gloo even when every rank runs on this host; ``1`` (the
default): through shared memory where it can be used. Any other value is an error."""
SHM = Path("/dev/shm")
LINE = 64
"""Bytes of a cache line: each rank's sequence number gets one of its own."""
SPINS = 200
"""Polls of the sequence numbers before a waiting rank starts yielding its core (``sched_yield``) between polls."""
YIELD_S = 0.02
"""Seconds a waiting rank yields between polls before it sleeps between them instead (50 µs, doubling up to 1 ms):
a long wait (a peer busy with something else, more ranks than cores) then leaves the cores to the ranks that
work."""
LIVENESS_S = 1.0
"""Seconds between checks that the ranks still missing are alive."""


def check_timeout(timeout: float) -> None:
    """A wait bound must be a positive number of seconds."""
    if not timeout > 0:
        raise ValueError(f"`timeout` must be > 0 seconds, got {timeout!r}.")


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _pid_namespace() -> int:
    """The PID namespace this process lives in (process ids mean the same only within one)."""
    with contextlib.suppress(OSError):
        return os.stat("/proc/self/ns/pid").st_ino
    return 0


def _create(path: Path, size: int) -> mmap.mmap | None:
    """A new file of ``size`` bytes at ``path``, its memory reserved (``posix_fallocate``: a full ``/dev/shm`` says
    so now, not with SIGBUS at the first write), mapped; ``None`` where that fails (the file removed again)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    finally:
        os.close(fd)


def _open(path: Path, size: int) -> mmap.mmap | None:
    """The mapping of the file that rank 0 created, or ``None`` where that fails."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, size) if os.fstat(fd).st_size == size else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _usable() -> bool:
    """Whether this machine can carry the exchange: enabled, x86-64 (stores seen in program order) and /dev/shm."""
    machine = platform.machine().lower()
    return os.environ.get(ENV, "1") == "1" and machine in ("x86_64", "amd64") and SHM.is_dir()


class HostExchange:
    """All-reduce and all-gather of small CPU tensors among the ranks of ``process_group``, all on this host, through a
    shared-memory segment of two slots of ``capacity`` bytes per rank. Built collectively by ``build``, which returns
    ``None`` where the exchange cannot be used. Every rank must call the same exchanges in the same order, as with
    any collective. The segment is unmapped when the exchange is garbage collected; its name is removed from
    ``/dev/shm`` as soon as every rank has mapped it, or the set-up has failed. An exchange that failed (a rank
    died or did not arrive) refuses any further one.

    The slots alternate between consecutive exchanges: a rank writes the slot of exchange ``n + 2`` only after every
    rank has raised its sequence number to ``n + 1``, which each does only after reading exchange ``n``.

    Example (one process: a group of one)::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     dist.init_process_group("gloo", init_method=f"file://{tmp}/rv", rank=0, world_size=1)
        ...     exchange = HostExchange.build(None, capacity=64, timeout=30.0)
        ...     x = torch.tensor([1.0, 2.0])
        ...     _ = exchange.all_reduce_(x)
        ...     gathered = [torch.empty(2)]
        ...     exchange.all_gather(gathered, x)
        ...     dist.destroy_process_group()
        >>> x.tolist(), gathered[0].tolist()
        ([1.0, 2.0], [1.0, 2.0])
    """

    def __init__(self, segment: mmap.mmap, world: int, rank: int, capacity: int, pids: list[int], timeout: float):
        self.world, self.rank, self.capacity, self.pids, self.timeout = world, rank, capacity, pids, timeout
        self._segment = segment
        raw = np.frombuffer(segment, dtype=np.uint8)
        self._sequences = raw[: LINE * world].view(np.int64)[:: LINE // 8]
        self._slots = raw[LINE * world :].reshape(2, world, capacity)
        self.exchanges = 0
        """Exchanges this rank has completed (its sequence number)."""
        self.failed = False
        """Whether an exchange failed (a rank died or did not arrive); the exchange refuses any further one."""

    @classmethod
    def build(cls, process_group: dist.ProcessGroup | None, *, capacity: int, timeout: float) -> HostExchange | None:
        """Collective over ``process_group``: the exchange, or ``None`` on every rank when it cannot be used here (a
        rank on another host, not x86-64, no ``/dev/shm``, ``LIGHTNING_DL_HOST_EXCHANGE=0``, or a rank that could not
        map the segment). ``capacity``: bytes of the largest message, the same on every rank; ``timeout``: seconds a
        rank waits for the others in an exchange. Ranks must be in the same PID namespace too: a waiting rank
        checks that the processes it waits for still exist."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"`capacity` (bytes of the largest message) must be an integer >= 1, got {capacity!r}.")
        check_timeout(timeout)
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        capacity = -(-capacity // LINE) * LINE
        switch = os.environ.get(ENV, "1")
        here = (socket.gethostname(), _boot_id(), _pid_namespace(), _usable(), capacity, os.getpid(), switch)
        everyone: list[tuple[str, str, int, bool, int, int, str]] = [("", "", 0, False, 0, 0, "")] * world
        dist.all_gather_object(everyone, here, group=process_group)
        switches = [host[6] for host in everyone]
        if any(value not in ("0", "1") for value in switches):  # an error on every rank, not a hang on the others
            raise ValueError(f"{ENV} must be 0 (gloo) or 1 (shared memory), got {switches} by rank.")
        if len({host[4] for host in everyone}) > 1:
            raise ValueError(f"`capacity` must be the same on every rank, got {[host[4] for host in everyone]}.")
        if not all(host[:3] == here[:3] and host[3] for host in everyone):
            return None
        size = LINE * world + 2 * world * capacity
        path, segment = None, None
        if rank == 0:  # created, backed by memory and mapped before any other rank hears its name
            path = SHM / f"lightning_dl-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            segment = _create(path, size)
        try:
            name = [path.name if segment is not None and path is not None else ""]
            dist.broadcast_object_list(name, group=process_group, group_src=0)
            if rank != 0 and name[0]:
                segment = _open(SHM / name[0], size)
            mapped: list[bool] = [False] * world
            dist.all_gather_object(mapped, segment is not None, group=process_group)  # every rank mapped it, or not
        finally:
            if path is not None:  # the mappings keep the memory; nothing is left behind, whatever happens
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if not all(mapped):
            return None
        assert segment is not None
        return cls(segment, world, rank, capacity, [host[5] for host in everyone], timeout)

    def _publish(self, payload: np.ndarray) -> np.ndarray:
        """Write this rank's message into its slot of the next exchange, raise its sequence number, wait for every
        rank's; returns the exchange's slots (``world × capacity`` bytes)."""
        if self.failed:
            raise RuntimeError("this host exchange failed in an earlier exchange; build a new one to go on.")
        if payload.nbytes > self.capacity:
            raise ValueError(f"a message of {payload.nbytes} bytes does not fit the exchange's {self.capacity} bytes.")
        sequence = self.exchanges + 1
        slots = self._slots[sequence % 2]
        slots[self.rank, : payload.nbytes] = payload.view(np.uint8)
        self._sequences[self.rank] = sequence  # after the message: x86-64 makes stores visible in program order
        try:
            self._wait(sequence)
        except BaseException:
            self.failed = True  # its sequence number is raised: another exchange could overwrite a slot being read
            raise
        self.exchanges = sequence
        return slots

    def _wait(self, sequence: int) -> None:
        sequences = self._sequences
        for _ in range(SPINS):
            if sequences.min() >= sequence:
                return
        start = time.monotonic()
        checked, pause = start, 5e-5
        while sequences.min() < sequence:
            now = time.monotonic()
            if now - start < YIELD_S:
                os.sched_yield()
            else:
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
            if now - checked >= LIVENESS_S or now - start >= self.timeout:
                checked = now
                self._check(sequence, now - start)

    def _check(self, sequence: int, waited: float) -> None:
        missing = [r for r in range(self.world) if self._sequences[r] < sequence]
        dead = [r for r in missing if not _alive(self.pids[r])]
        if dead:
            raise RuntimeError(
                f"host exchange {sequence} (collective on rank {self.rank}): rank(s) {dead} of {self.world} died"
                f" (process {', '.join(str(self.pids[r]) for r in dead)} is gone)."
            )
        if missing and waited >= self.timeout:
            raise RuntimeError(
                f"host exchange {sequence} (collective on rank {self.rank}): rank(s) {missing} of {self.world} did"
                f" not arrive within the collective timeout of {self.timeout:g} s: hung."
            )

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor ←`` the sum over ranks, added in rank order (every rank gets the same bits); contiguous, CPU."""
        values = tensor.numpy()
        slots = self._publish(values)
        n = values.nbytes
        np.copyto(values, slots[0, :n].view(values.dtype))
        for r in range(1, self.world):
            values += slots[r, :n].view(values.dtype)
        return tensor

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        """``outputs[r] ←`` rank ``r``'s ``tensor`` (each contiguous, CPU, shaped like ``tensor``)."""
        if len(outputs) != self.world:
            raise ValueError(f"`outputs` must hold one tensor per rank ({self.world}), got {len(outputs)}.")
        values = tensor.numpy()
        slots = self._publish(values)
        n = values.nbytes
        for r, out in enumerate(outputs):
            np.copyto(out.numpy(), slots[r, :n].view(values.dtype).reshape(values.shape))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) still answers signal 0
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
