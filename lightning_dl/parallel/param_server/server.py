"""The bookkeeping of one parameter-server shard, without any transport: a queue of pushed gradients, the global
version, staleness and its correction, the stale-synchronous gate, per-worker counts and liveness. The RPC layer
(``rpc.py``) calls the ``submit``/``fetch``/``register``/``finish`` side from its threads; the training loop calls
``next_push``/``correct``/``applied`` from the main thread. ``lock`` guards the parameters while they change.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.futures import Future

from lightning_dl.parallel.param_server.staleness import POLICIES, compensate

OK, STOP = "ok", "stop"


@dataclass
class Push:
    """Gradients one worker computed at ``version`` of this shard's parameters (the oldest version among the
    gradients it accumulated), with the loss and sample count of the batches behind them."""

    worker: int
    version: int
    grads: list[torch.Tensor]
    loss: float = math.nan
    samples: int = 0
    fetch: bool = True
    """Whether the reply should carry the parameters after the update (Downpour's fetch, piggybacked)."""
    staleness: int = -1
    """Filled in by the server when it takes the push: its version then minus ``version``."""
    future: Future = field(default_factory=Future, repr=False)


@dataclass
class Reply:
    """What a worker gets back: ``ok`` (the update was applied) or ``stop`` (training is over, nothing applied),
    the server's version, and the parameters when asked for."""

    status: str
    version: int
    params: list[torch.Tensor] | None = None


@dataclass
class WorkerState:
    pushes_per_epoch: int = 0
    applied: int = 0
    """Pushes of this worker the server applied and acknowledged (its stale-synchronous clock)."""
    samples: int = 0
    registered: bool = False
    done: bool = False
    dead: bool = False
    snapshots: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    """Copies of the parameters this worker fetched, by version (kept for ``dc`` only)."""

    @property
    def active(self) -> bool:
        return not (self.done or self.dead)


class ParameterServer:
    """One shard of the parameters and the state of the workers that push to it.

    Example (the transport is left out; a worker pushes, the loop applies plain SGD)::

        >>> w = torch.zeros(2)
        >>> server = ParameterServer([w], num_workers=1)
        >>> server.start(version=0)
        >>> _ = server.register(0, pushes_per_epoch=1)
        >>> future = server.submit(Push(worker=0, version=0, grads=[torch.ones(2)]))
        >>> push = server.next_push(timeout=1.0)
        >>> grads, lr_factor = server.correct(push)
        >>> with server.lock:
        ...     _ = w.sub_(0.5 * lr_factor * grads[0])
        >>> server.applied(push)
        >>> future.wait().version, w.tolist()
        (1, [-0.5, -0.5])
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        num_workers: int,
        *,
        policy: str = "none",
        dc_lambda: float = 0.04,
        max_staleness: int | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"`staleness_policy` must be one of {POLICIES}, got {policy!r}.")
        if num_workers < 1:
            raise ValueError(f"`num_workers` must be >= 1, got {num_workers!r}.")
        if not dc_lambda >= 0:
            raise ValueError(f"`dc_lambda` (λ) must be >= 0, got {dc_lambda!r}.")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"`max_staleness` must be None or >= 0, got {max_staleness!r}.")
        self.params = list(params)
        self.policy = policy
        self.dc_lambda = dc_lambda
        self.max_staleness = max_staleness
        self.workers = [WorkerState() for _ in range(num_workers)]
        self.version = 0
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._pending: list[Push] = []
        self._ready = threading.Event()
        self._stopped = False
        self.staleness_counts: Counter[int] = Counter()
        self.applied_this_epoch = [0] * num_workers

    # ---- worker side (RPC threads) ----------------------------------------------------------------------------

    def register(self, worker: int, pushes_per_epoch: int) -> int:
        """A worker announces how many pushes one of its epochs makes; returns the number of workers."""
        with self._cond:
            state = self._worker(worker)
            state.pushes_per_epoch, state.registered = int(pushes_per_epoch), True
            self._cond.notify_all()
        return len(self.workers)

    def wait_registered(self, timeout: float) -> None:
        """Block until every worker that is still alive has registered."""
        with self._cond:
            done = self._cond.wait_for(lambda: all(s.registered or s.dead for s in self.workers), timeout)
        if not done:
            missing = [i for i, s in enumerate(self.workers) if not (s.registered or s.dead)]
            raise TimeoutError(f"Workers {missing} did not register with the parameter server within {timeout} s.")

    def fetch(self, worker: int, timeout: float) -> Reply:
        """The current parameters (copies) and version; waits until the server has started (restored)."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"The parameter server did not start within {timeout} s.")
        with self.lock:
            return Reply(OK, self.version, self._copy_for(worker))

    def submit(self, push: Push) -> Future:
        """Queue a push; its future resolves to a ``Reply`` once the update is applied (or training is over)."""
        with self._cond:
            state = self._worker(push.worker)
            if self._stopped or state.dead:
                push.future.set_result(Reply(STOP, self.version))
            else:
                self._pending.append(push)
                self._cond.notify_all()
        return push.future

    def finish(self, worker: int) -> None:
        """The worker will push no more (it ended its own loop or was told to stop)."""
        with self._cond:
            self._worker(worker).done = True
            self._cond.notify_all()

    def mark_dead(self, worker: int) -> None:
        """The worker's process is gone: drop its queued pushes (nobody would receive the acknowledgement)."""
        with self._cond:
            state = self._worker(worker)
            if state.done:
                return
            state.dead = True
            state.snapshots.clear()
            self._pending = [p for p in self._pending if p.worker != worker]
            self._cond.notify_all()

    # ---- training-loop side (main thread) ---------------------------------------------------------------------

    def start(self, version: int) -> None:
        """Open for fetches at ``version`` (the restored global step on resume)."""
        with self.lock:
            self.version = version
        self._ready.set()

    @property
    def active_workers(self) -> list[int]:
        return [i for i, s in enumerate(self.workers) if s.active]

    def expected_pushes(self) -> int:
        """Pushes in one epoch of the workers: what the active ones announced plus what the others made this epoch."""
        with self.lock:
            return sum(
                s.pushes_per_epoch if s.active else self.applied_this_epoch[i] for i, s in enumerate(self.workers)
            )

    def new_epoch(self) -> None:
        with self.lock:
            self.applied_this_epoch = [0] * len(self.workers)

    def next_push(self, timeout: float) -> Push | None:
        """The oldest queued push that the stale-synchronous gate lets through; None once no worker is active and
        nothing is queued. Raises ``TimeoutError`` when active workers push nothing for ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                push = self._eligible()
                if push is not None:
                    self._pending.remove(push)
                    push.staleness = self.version - push.version
                    return push
                if not self._pending and not self.active_workers:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"No worker pushed a gradient for {timeout} s (active workers: {self.active_workers})."
                    )
                self._cond.wait(min(left, 0.5))

    def correct(self, push: Push) -> tuple[list[torch.Tensor], float]:
        """The gradients to apply and the learning-rate factor, after the staleness policy."""
        stale = None
        if self.policy == "dc":
            stale = self.workers[push.worker].snapshots.get(push.version)
            if stale is None:
                raise RuntimeError(
                    f"No copy of version {push.version} fetched by worker {push.worker}; `dc` needs the parameters "
                    "the gradient was computed at."
                )
        with self.lock:
            return compensate(
                self.policy,
                push.grads,
                staleness=push.staleness,
                params_now=self.params,
                params_stale=stale,
                dc_lambda=self.dc_lambda,
            )

    def applied(self, push: Push) -> None:
        """Count the applied update and acknowledge it (with the new parameters when the worker asked)."""
        with self._cond:
            self.version += 1
            state = self.workers[push.worker]
            state.applied += 1
            state.samples += push.samples
            self.applied_this_epoch[push.worker] += 1
            self.staleness_counts[push.staleness] += 1
            if self.policy == "dc":  # the gradients after this one were computed at the latest fetched copy
                latest = max(state.snapshots, default=None)
                state.snapshots = {v: c for v, c in state.snapshots.items() if v == latest}
            params = self._copy_for(push.worker) if push.fetch else None
            self._cond.notify_all()
        push.future.set_result(Reply(OK, self.version, params))

    def stop(self) -> None:
        """Training is over: answer every queued and later push with ``stop``, applying nothing."""
        with self._cond:
            self._stopped = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for push in pending:
            push.future.set_result(Reply(STOP, self.version))

    def wait_workers_gone(self, timeout: float) -> bool:
        """Block until every worker is done or dead; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.active_workers, timeout)

    # ---- helpers -------------------------------------------------------------------------------------------

    def _worker(self, worker: int) -> WorkerState:
        if not 0 <= worker < len(self.workers):
            raise ValueError(f"`worker` must be in [0, {len(self.workers)}), got {worker!r}.")
        return self.workers[worker]

    def _copy_for(self, worker: int) -> list[torch.Tensor]:
        params = [p.detach().clone() for p in self.params]
        if self.policy == "dc":
            self.workers[worker].snapshots[self.version] = params
        return params

    def _eligible(self) -> Push | None:
        if self.max_staleness is None:
            return self._pending[0] if self._pending else None
        slowest = min((s.applied for s in self.workers if s.active), default=0)
        for push in self._pending:
            if self.workers[push.worker].applied - slowest <= self.max_staleness:
                return push
        return None
