"""The parameter server over ``torch.distributed.rpc`` (TensorPipe): the functions a worker calls on a server, the
worker-side client that pushes to and fetches from every shard, and the server's watch on its workers.

RPC runs pickled calls: the functions below execute on the server with whatever arguments arrive, so the
processes must only listen on a trusted network. ``init`` listens on the network interface that holds the address
it is given (127.0.0.1 unless told otherwise).

At the end the processes leave together when they all can (``graceful``: nobody closes a connection under a peer
that still reads it, so TensorPipe logs no error); the parameter server's rank 0 decides and the others ask it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import threading
import warnings
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
_LEAVE_LOCK = threading.Lock()
_LEAVE: dict[str, Any] = {"graceful": None, "waiting": []}  # rank 0's decision and the calls waiting for it
_IFNAME = "TP_SOCKET_IFNAME"  # TensorPipe listens on this interface (else on the one of the host name)
log = logging.getLogger(__name__)


class ServerUnreachableError(RuntimeError):
    """A parameter server did not answer: it died, or it is stuck beyond the timeout."""


def init(name: str, rank: int, world_size: int, *, store: str, address: str, timeout: float) -> None:
    """Join the RPC group of ``world_size`` processes: rendezvous at ``store`` (``host:port``, hosted by rank 0 or
    by torchrun's agent), listen on the network interface that holds ``address`` (TensorPipe over TCP)."""
    if _IFNAME not in os.environ:  # a user's own choice of interface stands
        os.environ[_IFNAME] = interface_of(address)
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{store}", rpc_timeout=timeout, _transports=["uv"], num_worker_threads=8
    )
    with _LEAVE_LOCK:
        _LEAVE.update(graceful=None, waiting=[])
    with warnings.catch_warnings():  # torch's own RPC set-up uses this deprecated path; nothing to change here
        warnings.filterwarnings("ignore", message="You are using a Backend .* as a ProcessGroup")
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)


def interface_of(address: str) -> str:
    """The name of this machine's network interface that holds ``address`` (a host name or IPv4 address).

    Example::

        >>> interface_of("127.0.0.1")
        'lo'
    """
    try:
        ip = socket.gethostbyname(address)
    except OSError as error:
        raise ValueError(f"`address={address!r}` does not resolve to an IPv4 address: {error}.") from error
    names = [name for _, name in socket.if_nameindex()]
    for name in names:
        if _ipv4_of(name) == ip:
            return name
    raise ValueError(
        f"`address={address!r}` ({ip}) is not an address of this machine; its interfaces are {names}. Give an "
        "address this machine listens on (its address on the network the other machines reach it by)."
    )


def _ipv4_of(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:  # SIOCGIFADDR: the interface's IPv4 address
            packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(packed[20:24])


def address_towards(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (what the peers of a multi-machine run reach it by).

    Example::

        >>> address_towards("127.0.0.1", 29500)
        '127.0.0.1'
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))  # a UDP connect sends nothing; it only picks the route
        return str(probe.getsockname()[0])


def shutdown(*, graceful: bool = False, timeout: float = 30.0) -> None:
    """Leave the RPC group. ``graceful``: wait until every process of the group calls this too (each must), so no
    connection closes under a live peer; otherwise leave at once (a dead peer must not block the exit)."""
    if graceful:
        try:
            rpc.shutdown(graceful=True, timeout=timeout)
        except RuntimeError as error:  # a peer is gone after all: the local part of the shutdown ran anyway
            log.warning("The RPC processes could not leave together (%s); left alone.", error)
        return
    with contextlib.suppress(RuntimeError):  # never initialised, or already shut down
        rpc.shutdown(graceful=False)


def decide_leave(graceful: bool) -> None:
    """On the parameter server's rank 0: how every process leaves (the first decision stands)."""
    with _LEAVE_LOCK:
        if _LEAVE["graceful"] is not None:
            return
        waiting, _LEAVE["waiting"], _LEAVE["graceful"] = _LEAVE["waiting"], [], graceful
    for future in waiting:
        future.set_result(graceful)


def decided_leave() -> bool:
    """Rank 0's decision (False when it made none)."""
    return bool(_LEAVE["graceful"])


@rpc.functions.async_execution
def _leave_mode() -> Future:
    future: Future = Future()
    with _LEAVE_LOCK:
        if _LEAVE["graceful"] is None:  # answered when rank 0 decides, without holding an RPC thread
            _LEAVE["waiting"].append(future)
            return future
    future.set_result(_LEAVE["graceful"])
    return future


def ask_leave(leader: str, timeout: float) -> bool:
    """Ask ``leader`` (rank 0) whether to leave gracefully; False when it cannot answer."""
    try:
        return bool(rpc.rpc_sync(leader, _leave_mode, timeout=timeout))
    except RuntimeError:
        return False


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
