"""The parameter server over ``torch.distributed.rpc`` (TensorPipe): the functions a worker calls on a server, the
worker-side client that pushes to and fetches from every shard, and the server's watch on its workers.

RPC runs pickled calls: the functions below execute on the server with whatever arguments arrive, so the
processes must only listen on a trusted network. ``init`` binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch.futures import Future

from lightning_dl.parallel.param_server.server import OK, ParameterServer, Push, Reply

# The RPC functions run in the server process and must find its shard: torch RPC pickles functions by reference,
# so the one shard a process serves is kept here (set by ``serve``, cleared by ``unserve``).
_SERVED: dict[str, Any] = {}
_SERVING = threading.Event()
_SERVE_WAIT = 300.0  # seconds a call that arrives before the shard is set up waits for it


class ServerUnreachableError(RuntimeError):
    """A parameter server did not answer: it died, or it is stuck beyond the timeout."""


def init(name: str, rank: int, world_size: int, *, address: str, port: int, timeout: float) -> None:
    """Join the RPC group of ``world_size`` processes (TensorPipe over TCP on ``address:port``)."""
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{address}:{port}", rpc_timeout=timeout, _transports=["uv"], num_worker_threads=8
    )
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)


def shutdown() -> None:
    """Leave the RPC group without waiting for the others (a dead peer must not block the exit)."""
    with contextlib.suppress(RuntimeError):  # never initialised, or already shut down
        rpc.shutdown(graceful=False)


def serve(server: ParameterServer, handlers: dict[str, Callable[..., Any]] | None = None) -> None:
    """Make this process answer the RPC calls for ``server``; ``handlers`` are extra named calls (``call``)."""
    _SERVED["server"] = server
    _SERVED["handlers"] = dict(handlers or {})
    _SERVING.set()


def unserve() -> None:
    _SERVING.clear()
    _SERVED.clear()


def _served() -> ParameterServer:
    if not _SERVING.wait(_SERVE_WAIT):  # a worker can be set up before its server
        raise RuntimeError(f"This process serves no parameter shard (none was set up within {_SERVE_WAIT} s).")
    return _SERVED["server"]


def _register(worker: int, pushes_per_epoch: int) -> int:
    return _served().register(worker, pushes_per_epoch)


def _fetch(worker: int, timeout: float) -> Reply:
    return _served().fetch(worker, timeout)


@rpc.functions.async_execution
def _push(worker: int, version: int, grads: list[torch.Tensor], loss: float, samples: int, fetch: bool) -> Future:
    push = Push(worker=worker, version=version, grads=grads, loss=loss, samples=samples, fetch=fetch)
    return _served().submit(push)


def _finish(worker: int) -> None:
    _served().finish(worker)


def _alive() -> bool:
    return True


def _call(handler: str, *args: Any) -> Any:
    _served()
    return _SERVED["handlers"][handler](*args)


def call(server: str, handler: str, *args: Any, timeout: float) -> Any:
    """Run the named extra handler on another server process and return its result."""
    try:
        return rpc.rpc_sync(server, _call, args=(handler, *args), timeout=timeout)
    except RuntimeError as error:
        raise ServerUnreachableError(f"The parameter server {server!r} did not answer {handler!r}: {error}") from error


class WorkerClient:
    """A worker's view of the sharded server: it pushes each shard its gradients and copies back each shard's
    parameters. ``shards[s]`` lists the indices (in ``params``) that server ``servers[s]`` owns."""

    def __init__(
        self,
        worker: int,
        params: Sequence[torch.Tensor],
        servers: Sequence[str],
        shards: Sequence[Sequence[int]],
        *,
        timeout: float,
    ) -> None:
        self.worker = worker
        self.params = list(params)
        self.servers = list(servers)
        self.shards = [list(s) for s in shards]
        self.timeout = timeout
        self.versions = [0] * len(self.servers)

    def register(self, pushes_per_epoch: int) -> None:
        self._wait(
            [
                rpc.rpc_async(s, _register, args=(self.worker, pushes_per_epoch), timeout=self.timeout)
                for s in self.servers
            ],
            "register",
        )

    def fetch(self) -> None:
        """Copy every shard's current parameters into ``params``."""
        futures = [
            rpc.rpc_async(s, _fetch, args=(self.worker, self.timeout), timeout=self.timeout) for s in self.servers
        ]
        for shard, reply in enumerate(self._wait(futures, "fetch")):
            self._load(shard, reply)

    def push(self, grads: Sequence[torch.Tensor], *, loss: float, samples: int, fetch: bool) -> str:
        """Push ``grads`` (one per parameter, in ``params`` order) computed at the last fetched versions; with
        ``fetch`` the parameters after the update come back in the same call. Returns ``ok`` or ``stop``."""
        futures = [
            rpc.rpc_async(
                server,
                _push,
                timeout=self.timeout,
                args=(self.worker, self.versions[s], [grads[i] for i in self.shards[s]], loss, samples, fetch),
            )
            for s, server in enumerate(self.servers)
        ]
        status = OK
        for shard, reply in enumerate(self._wait(futures, "push")):
            if reply.status != OK:
                status = reply.status
            elif reply.params is not None:
                self._load(shard, reply)
        return status

    def finish(self) -> None:
        """Tell every server this worker pushes no more; a server that is already gone is not an error here."""
        for server in self.servers:
            with contextlib.suppress(RuntimeError):
                rpc.rpc_sync(server, _finish, args=(self.worker,), timeout=self.timeout)

    def _load(self, shard: int, reply: Reply) -> None:
        assert reply.params is not None
        with torch.no_grad():
            for index, value in zip(self.shards[shard], reply.params, strict=True):
                self.params[index].copy_(value)
        self.versions[shard] = reply.version

    def _wait(self, futures: list[Future], what: str) -> list[Any]:
        results = []
        for server, future in zip(self.servers, futures, strict=True):
            try:
                results.append(future.wait())
            except RuntimeError as error:
                raise ServerUnreachableError(
                    f"Worker {self.worker}: the parameter server {server!r} did not answer {what!r} within "
                    f"{self.timeout} s ({error}). The server process has died or is stuck; this worker stops."
                ) from error
        return results


class WorkerWatch:
    """A server thread that pings every active worker each ``interval`` seconds and marks it dead when the ping
    fails (a dead process answers at once with a connection error; a hung one after ``timeout``)."""

    def __init__(
        self, server: ParameterServer, workers: Sequence[str], *, interval: float = 0.5, timeout: float = 10.0
    ) -> None:
        self.server = server
        self.workers = list(workers)
        self.interval = interval
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lightning_dl-worker-watch", daemon=True)

    def start(self) -> WorkerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + self.interval)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for index in self.server.active_workers:
                try:
                    rpc.rpc_sync(self.workers[index], _alive, timeout=self.timeout)
                except RuntimeError:
                    if not self._stop.is_set():
                        self.server.mark_dead(index)
