"""Asynchronous SGD with a parameter server (Downpour SGD) as a Lightning strategy: ``Trainer(strategy="async_sgd")``.

Of the ``devices`` processes, ranks ``0 .. num_servers-1`` are parameter servers and the rest are workers.
A worker runs the user's LightningModule (``training_step``, backward) on its own shard of the training data and
pushes the gradients over RPC; a server applies each push as it arrives with the optimizer that the module's
``configure_optimizers`` returned, so one Lightning step on a server is one global update. Rank 0 is the server
that validates, logs and checkpoints; its ``trainer.global_step`` counts global updates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl._log_steps import writes_logs
from lightning_dl.parallel.param_server import rpc
from lightning_dl.parallel.param_server.layout import assign_shards, shard_indices
from lightning_dl.parallel.param_server.server import STOP, ParameterServer, Push
from lightning_dl.parallel.param_server.staleness import POLICIES
from lightning_dl.strategies._base import (
    AsyncBase,
    check_int,
    leave_evaluation_to_rank_zero,
    set_global_step,
)
from lightning_dl.strategies._launcher import TolerantLauncher


class AsyncSGDStrategy(AsyncBase):
    """Downpour SGD: workers push gradients to sharded parameter servers that apply them without waiting.

    Args:
        num_servers: processes that hold the parameters, each owning whole tensors (balanced by size).
        fetch_every: a worker copies the parameters from the servers every this many of its steps (n_fetch).
        push_every: a worker pushes the mean gradient of this many of its steps (n_push); it also pushes what it
            holds at the end of each of its epochs.
        staleness_policy: ``none`` (apply as is), ``inverse`` (learning rate divided by the staleness τ) or ``dc``
            (delay compensation ``g + λ·g⊙g⊙(θ_now − θ_stale)``).
        dc_lambda: λ of ``dc``.
        max_staleness: when set, a worker may be at most this many applied pushes ahead of the slowest live
            worker; a push further ahead waits (stale-synchronous parallel). ``None``: no bound.
        address: the address the RPC processes listen on. RPC executes pickled calls: use a trusted network only.
        timeout: seconds any wait may last (an RPC answer, a worker's push seen by the server) before it is an
            error, so a dead server ends the run instead of hanging it.
        start_method: how the processes are started (``spawn``, ``fork`` or ``forkserver``).

    Example::

        >>> import lightning as L
        >>> import lightning_dl  # registers "async_sgd"
        >>> trainer = L.Trainer(strategy="async_sgd", accelerator="cpu", devices=3, max_steps=100)
        >>> type(trainer.strategy).__name__, trainer.strategy.num_workers
        ('AsyncSGDStrategy', 2)
    """

    strategy_name = "async_sgd"

    def __init__(
        self,
        *,
        num_servers: int = 1,
        fetch_every: int = 1,
        push_every: int = 1,
        staleness_policy: str = "none",
        dc_lambda: float = 0.04,
        max_staleness: int | None = None,
        address: str = "127.0.0.1",
        timeout: float = 120.0,
        start_method: str = "spawn",
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        super().__init__(
            start_method=start_method,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        check_int("num_servers", num_servers, 1)
        check_int("fetch_every", fetch_every, 1)
        check_int("push_every", push_every, 1)
        if staleness_policy not in POLICIES:
            raise ValueError(f"`staleness_policy` must be one of {POLICIES}, got {staleness_policy!r}.")
        if not dc_lambda >= 0:
            raise ValueError(f"`dc_lambda` (λ) must be >= 0, got {dc_lambda!r}.")
        if max_staleness is not None:
            check_int("max_staleness", max_staleness, 0)
        if not timeout > 0:
            raise ValueError(f"`timeout` must be > 0 seconds, got {timeout!r}.")
        if not isinstance(address, str) or not address:
            raise ValueError(f"`address` must be a host name or IP address to listen on, got {address!r}.")
        self.num_servers = num_servers
        self.fetch_every = fetch_every
        self.push_every = push_every
        self.staleness_policy = staleness_policy
        self.dc_lambda = dc_lambda
        self.max_staleness = max_staleness
        self.address = address
        self.timeout = timeout
        self._server: ParameterServer | None = None
        self._watch: rpc.WorkerWatch | None = None
        self._client: rpc.WorkerClient | None = None
        self._push: Push | None = None
        self._correction: tuple[list[torch.Tensor], float] | None = None
        self._owned: list[torch.Tensor] = []
        self._owners: list[list[int]] = []  # parameter indices each server owns
        self._params: list[torch.Tensor] = []
        self._released = False
        self._stats = _Window()
        self._acc: _Accumulator | None = None

    # ---- roles ------------------------------------------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        return self.num_processes - self.num_servers

    @property
    def is_server(self) -> bool:
        return not self.in_process and self.global_rank < self.num_servers

    @property
    def is_worker(self) -> bool:
        return not self.in_process and self.global_rank >= self.num_servers

    @property
    def worker_index(self) -> int:
        return self.global_rank - self.num_servers

    @property
    def _names(self) -> tuple[list[str], list[str]]:
        return [f"server{s}" for s in range(self.num_servers)], [f"worker{w}" for w in range(self.num_workers)]

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        trainer = self._trainer if self.lightning_module is not None else None
        if self.is_worker and trainer is not None and trainer.training:
            return {"num_replicas": self.num_workers, "rank": self.worker_index}
        return {"num_replicas": 1, "rank": 0}  # servers: the training data is the pushes; validation sees it all

    @override
    def _configure_launcher(self) -> None:
        devices = self.num_processes
        self._check_devices("async_sgd", 2, "a parameter server and a worker")
        if self.num_servers >= devices:
            raise ValueError(
                f"`num_servers={self.num_servers}` must be less than `devices={devices}`: the ranks after the servers "
                "are the workers, and at least one is needed."
            )
        self._launcher = TolerantLauncher(self, self.start_method, essential=self.num_servers, grace=self.timeout)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.in_process:
            return
        assert self.cluster_environment is not None
        servers, workers = self._names
        name = servers[self.global_rank] if self.is_server else workers[self.worker_index]
        rpc.init(
            name,
            self.global_rank,
            self.num_processes,
            address=self.address,
            port=self.cluster_environment.main_port,
            timeout=self.timeout,
        )

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        if self.in_process or trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_one_optimizer("async_sgd", "applies one optimizer on the servers")
        self._params = [p for p in self._module.parameters() if p.requires_grad]
        shards = assign_shards([p.numel() for p in self._params], self.num_servers)
        self._owners = owners = shard_indices(shards, self.num_servers)
        servers, workers = self._names
        if self.is_server:
            self._owned = [self._params[i] for i in owners[self.global_rank]]
            self._server = ParameterServer(
                self._owned,
                self.num_workers,
                policy=self.staleness_policy,
                dc_lambda=self.dc_lambda,
                max_staleness=self.max_staleness,
            )
            rpc.serve(
                self._server,
                {"params": self._shard_params, "optimizer": self._shard_optimizer, "release": self._release},
            )
            self._watch = rpc.WorkerWatch(self._server, workers, timeout=min(self.timeout, 10.0)).start()
            trainer.accumulate_grad_batches = 1  # one push is one update; workers accumulate on their side
        else:
            self._client = rpc.WorkerClient(self.worker_index, self._params, servers, owners, timeout=self.timeout)
            self._acc = _Accumulator(self._params, copy=self.push_every > 1)
        if self.global_rank != 0:  # rank 0 validates, checkpoints and stops early
            leave_evaluation_to_rank_zero(trainer)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self._trainer if self.lightning_module is not None else None
        if self._client is not None and trainer is not None and trainer.training:
            self._client.register(self._pushes_per_epoch(trainer, dataloader))
        if self._server is not None and trainer is not None and trainer.training:
            return _PushStream(self._server, self.timeout)
        return dataloader

    # ---- training ---------------------------------------------------------------------------------------------

    @override
    def on_train_start(self) -> None:
        trainer = self._trainer
        if self._server is not None:
            self._server.start(trainer.global_step)
            self._stats.reset(trainer.global_step, self._server)
        if self._client is not None:
            self._client.fetch()
            set_global_step(trainer, self._client.versions[0], after_step=False)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._server is not None:
            self._push = self._server.next_push(self.timeout)
            if self._push is None:  # every worker finished or died
                self._trainer.should_stop = True
                raise StopIteration
            self._correction = self._server.correct(self._push)
        elif self._acc is not None:
            try:
                self._acc.samples += extract_batch_size(batch)
            except Exception:  # a batch whose size Lightning cannot infer still trains; throughput counts batches
                self._acc.samples += 1

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._server is None:
            return super().training_step(*args, **kwargs)
        assert self._push is not None
        self._stats.add(self._push)
        trainer = self._trainer
        if writes_logs(trainer, trainer.global_step + 1):
            for name, value in self._stats.flush(trainer.global_step + 1, self._server).items():
                self._module.log(
                    name, value, on_step=True, on_epoch=False, batch_size=1, prog_bar=name == "async/worker_loss"
                )
        return torch.tensor(self._push.loss)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        if self._server is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        assert self._correction is not None and self.lightning_module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        for param in self._params:
            param.grad = None
        for param, grad in zip(self._owned, self._correction[0], strict=True):
            param.grad = grad
        return self.precision_plugin.post_backward(closure_loss, self.lightning_module)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self._server is not None:
            return self._apply(optimizer, closure, model, **kwargs)
        if self._client is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        loss = closure()  # training_step and backward on this worker; clipping and hooks run on the server
        assert self._acc is not None
        trainer = self._trainer
        self._acc.add(loss)
        step = self._acc.steps_total
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        fetch = step % self.fetch_every == 0
        if self._acc.steps == self.push_every or last:
            grads, loss_mean, samples = self._acc.take()
            status = self._client.push(grads, loss=loss_mean, samples=samples, fetch=fetch)
            if status == STOP:
                trainer.should_stop = True
        elif fetch:
            self._client.fetch()
        set_global_step(trainer, self._client.versions[0], after_step=True)
        return loss

    def _apply(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any, **kwargs: Any) -> Any:
        assert self._server is not None and self._push is not None
        assert self._correction is not None
        with self._server.lock, _scaled_lr(optimizer, self._correction[1]):
            out = self.precision_plugin.optimizer_step(optimizer, model=self._module, closure=closure, **kwargs)
        self._server.applied(self._push)
        self._push, self._correction = None, None
        return out

    @override
    def on_train_end(self) -> None:
        if self._server is not None:
            self._server.stop()
            if not self._server.wait_workers_gone(self.timeout):
                raise TimeoutError(f"Workers {self._server.active_workers} did not finish within {self.timeout} s.")
            if self.global_rank == 0:
                self._gather_params()  # the whole model and optimizer state, while the other servers still answer
                self._final_optimizer_states = [self.optimizer_state(o) for o in self.optimizers]
                for s in range(1, self.num_servers):
                    rpc.call(f"server{s}", "release", timeout=self.timeout)
                if not any(s.applied for s in self._server.workers):
                    raise RuntimeError("No worker's gradient reached the parameter server: every worker died.")
            else:
                self._wait_release()
        if self._client is not None:
            self._client.finish()

    @override
    def on_validation_start(self) -> None:
        if self.is_server and self._trainer.state.fn == TrainerFn.FITTING:
            self._gather_params()

    @override
    def on_exception(self, exception: BaseException) -> None:
        if self._client is not None:
            self._client.finish()
        if self._server is not None:
            self._server.stop()

    @override
    def teardown(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if not self.in_process:
            rpc.unserve()
            rpc.shutdown()
        self._server, self._client, self._watch, self._acc = None, None, None, None
        super().teardown()

    # ---- checkpoints: the full model and every shard's optimizer state -----------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.is_server:
            self._gather_params()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()
        if self.is_server and self.num_servers > 1:
            for s in range(1, self.num_servers):
                state["state"].update(rpc.call(f"server{s}", "optimizer", timeout=self.timeout))
        return state

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self.is_server and self.num_servers > 1:  # keep only the state of the tensors this shard owns
            owned = {id(p) for p in self._owned}
            for optimizer in self.optimizers:
                for param in list(optimizer.state):
                    if id(param) not in owned:
                        del optimizer.state[param]

    # ---- helpers --------------------------------------------------------------------------------------------

    def _pushes_per_epoch(self, trainer: L.Trainer, dataloader: Any) -> int:
        batches = len(dataloader)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None:
            batches = int(batches * limit)
        steps = math.ceil(batches / trainer.accumulate_grad_batches)
        return math.ceil(steps / self.push_every)

    def _shard_params(self) -> list[torch.Tensor]:
        assert self._server is not None
        with self._server.lock:
            return [p.detach().clone() for p in self._owned]

    def _shard_optimizer(self) -> dict[int, Any]:
        """This shard's entries of the optimizer state, keyed like ``state_dict()`` (position over all groups)."""
        owned = {id(p) for p in self._owned}
        positions = {
            i for i, p in enumerate(p for g in self.optimizers[0].param_groups for p in g["params"]) if id(p) in owned
        }
        return {i: s for i, s in self.optimizers[0].state_dict()["state"].items() if i in positions}

    def _release(self) -> None:
        self._released = True

    def _wait_release(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._released:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Server rank {self.global_rank}: rank 0 did not release it within {self.timeout} s."
                )
            time.sleep(0.05)

    def _gather_params(self) -> None:
        """Copy the other shards' current parameters into this process's module (rank 0 validates all of them)."""
        if self.num_servers == 1 or self.global_rank != 0:
            return
        with torch.no_grad():
            for s in range(1, self.num_servers):
                values = rpc.call(f"server{s}", "params", timeout=self.timeout)
                for index, value in zip(self._owners[s], values, strict=True):
                    self._params[index].copy_(value)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "async_sgd",
            cls,
            description="Asynchronous SGD with parameter servers (Downpour), staleness corrections",
            override=True,  # importing lightning_dl twice (spawned processes) registers again
        )


class _PushStream:
    """The server's training 'data': one ticket per expected push of an epoch; the push itself is taken in
    ``on_train_batch_start`` (Lightning fetches a batch ahead, and a ticket never blocks)."""

    def __init__(self, server: ParameterServer, timeout: float) -> None:
        self.server = server
        self.timeout = timeout

    def __len__(self) -> int:
        self.server.wait_registered(self.timeout)
        return max(self.server.expected_pushes(), 1)

    def __iter__(self) -> Iterator[int]:
        self.server.new_epoch()
        issued = 0
        while issued < self.server.expected_pushes() and self.server.active_workers:
            yield issued
            issued += 1


class _Accumulator:
    """A worker's gradients summed over the steps since its last push."""

    def __init__(self, params: list[torch.Tensor], *, copy: bool) -> None:
        self.params = params
        self.copy = copy  # False when every step pushes at once: the gradients are sent before they change
        self.sums: list[torch.Tensor] | None = None
        self.steps = 0
        self.steps_total = 0
        self.loss = 0.0
        self.samples = 0

    def add(self, loss: Any) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.sums is None:
            self.sums = [g.detach().clone() if self.copy else g.detach() for g in grads]
        else:
            torch._foreach_add_(self.sums, [g.detach() for g in grads])
        self.steps += 1
        self.steps_total += 1
        self.loss += float(loss) if loss is not None else math.nan

    def take(self) -> tuple[list[torch.Tensor], float, int]:
        assert self.sums is not None
        grads = self.sums
        if self.steps > 1:
            torch._foreach_div_(grads, self.steps)
        out = (grads, self.loss / self.steps, self.samples)
        self.sums, self.steps, self.loss, self.samples = None, 0, 0.0, 0
        return out


class _Window:
    """What the server logs, over the updates since its last log: worker loss, staleness, throughput."""

    def reset(self, step: int, server: ParameterServer) -> None:
        self.step, self.time = step, time.monotonic()
        self.samples = [w.samples for w in server.workers]
        self.staleness: list[int] = []
        self.loss = math.nan

    def add(self, push: Push) -> None:
        self.staleness.append(push.staleness)
        self.loss = push.loss

    def flush(self, step: int, server: ParameterServer) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.time, 1e-9)
        out = {
            "async/worker_loss": self.loss,
            "async/staleness_mean": sum(self.staleness) / max(len(self.staleness), 1),
            "async/staleness_max": float(max(self.staleness, default=0)),
            "async/updates_per_s": (step - self.step) / elapsed,
        }
        for index, worker in enumerate(server.workers):
            out[f"async/worker{index}_samples_per_s"] = (worker.samples - self.samples[index]) / elapsed
        self.reset(step, server)
        return out


@contextmanager
def _scaled_lr(optimizer: Optimizer, factor: float) -> Iterator[None]:
    """Multiply every group's learning rate by ``factor`` for one step (``inverse``: α/τ)."""
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr
