"""Asynchronous SGD with a parameter server (Downpour SGD) as a Lightning strategy: ``Trainer(strategy="async_sgd")``.

Of the processes (``devices × num_nodes``), ranks ``0 .. num_servers-1`` are parameter servers
(``_async_server.py``) and the rest are workers (``_async_worker.py``). A worker runs the user's LightningModule
(``training_step``, backward) on its own shard of the training data and pushes the gradients over RPC; a server
applies each push as it arrives with the optimizer that the module's ``configure_optimizers`` returned, so one
Lightning step on a server is one global update. Rank 0 is the server that validates, logs and checkpoints; its
``trainer.global_step`` counts global updates. The strategy starts the processes on one machine, or takes the
ranks an outside launcher gives (torchrun, SLURM) and then runs across machines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.parallel.param_server import rpc
from lightning_dl.parallel.param_server.layout import assign_shards, shard_indices
from lightning_dl.parallel.param_server.server import ParameterServer
from lightning_dl.parallel.param_server.staleness import POLICIES
from lightning_dl.strategies._async_server import ServerSide
from lightning_dl.strategies._async_worker import WorkerSide
from lightning_dl.strategies._base import AsyncBase, check_int, leave_evaluation_to_rank_zero
from lightning_dl.strategies._launcher import ExternalLauncher, TolerantLauncher


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
        address: the address this process's RPC agent listens on (the interface that holds it). ``None``: 127.0.0.1
            when the strategy starts the processes; under torchrun or SLURM, this machine's address on the route to
            ``MASTER_ADDR``. RPC executes pickled calls: use a trusted network only.
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
        address: str | None = None,
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
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(f"`address` must be a host name or IP address to listen on, got {address!r}.")
        self.num_servers = num_servers
        self.fetch_every = fetch_every
        self.push_every = push_every
        self.staleness_policy = staleness_policy
        self.dc_lambda = dc_lambda
        self.max_staleness = max_staleness
        self.address = address
        self.timeout = timeout
        self._serving: ServerSide | None = None
        self._working: WorkerSide | None = None

    # ---- roles ------------------------------------------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        return self.num_ranks - self.num_servers

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
    def _server(self) -> ParameterServer | None:
        """This process's parameter-server shard during ``fit`` (None on a worker and outside ``fit``)."""
        return self._serving.server if self._serving is not None else None

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
        self.external = self._launched_externally("async_sgd")
        ranks = self.num_ranks
        if ranks < 2:
            raise ValueError(
                f"`strategy='async_sgd'` needs `devices` × `num_nodes` >= 2 (a parameter server and a worker), "
                f"got devices={self.num_processes} and num_nodes={self.num_nodes}."
            )
        if self.num_servers >= ranks:
            raise ValueError(
                f"`num_servers={self.num_servers}` must be less than the {ranks} processes (devices="
                f"{self.num_processes} × num_nodes={self.num_nodes}): the ranks after the servers are the workers, "
                "and at least one is needed."
            )
        if self.external:
            self._launcher = ExternalLauncher(self)
        else:
            if self.address is not None:
                rpc.interface_of(self.address)  # an address this machine does not have fails here, not in a process
            self._launcher = TolerantLauncher(self, self.start_method, essential=self.num_servers, grace=self.timeout)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.in_process:
            return
        environment = self.cluster_environment
        assert environment is not None
        servers, workers = self._names
        name = servers[self.global_rank] if self.is_server else workers[self.worker_index]
        if self.external:  # rendezvous where the launcher said; listen where the other machines reach this one
            store = f"{environment.main_address}:{environment.main_port}"
            address = self.address or rpc.address_towards(environment.main_address, environment.main_port)
        else:
            address = self.address or "127.0.0.1"
            store = f"{address}:{environment.main_port}"
        rpc.init(name, self.global_rank, self.num_ranks, store=store, address=address, timeout=self.timeout)

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        if self.in_process or trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_one_optimizer("async_sgd", "applies one optimizer on the servers")
        params: list[torch.Tensor] = [p for p in self._module.parameters() if p.requires_grad]
        owners = shard_indices(assign_shards([p.numel() for p in params], self.num_servers), self.num_servers)
        servers, workers = self._names
        if self.is_server:
            self._serving = ServerSide(self, params, owners, workers)
            trainer.accumulate_grad_batches = 1  # one push is one update; workers accumulate on their side
        else:
            self._working = WorkerSide(
                self.worker_index,
                params,
                servers,
                owners,
                fetch_every=self.fetch_every,
                push_every=self.push_every,
                timeout=self.timeout,
            )
        if self.global_rank != 0:  # rank 0 validates, checkpoints and stops early
            leave_evaluation_to_rank_zero(trainer)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self._trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training:
            return dataloader
        if self._working is not None:
            self._working.register(trainer, dataloader)
        if self._serving is not None:
            return self._serving.dataloader()
        return dataloader

    # ---- training ---------------------------------------------------------------------------------------------

    @override
    def on_train_start(self) -> None:
        if self._serving is not None:
            self._serving.on_train_start(self._trainer)
        if self._working is not None:
            self._working.on_train_start(self._trainer)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._serving is not None:
            self._serving.take_push(self._trainer)
        elif self._working is not None:
            self._working.count_samples(batch)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._serving is None:
            return super().training_step(*args, **kwargs)
        return self._serving.training_step(self._trainer, self._module)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        if self._serving is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self._module)
        self._serving.set_gradients()
        return self.precision_plugin.post_backward(closure_loss, self._module)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self._serving is not None:
            step = self.precision_plugin.optimizer_step
            return self._serving.apply(
                lambda: step(optimizer, model=self._module, closure=closure, **kwargs), optimizer
            )
        if self._working is not None:
            return self._working.optimizer_step(self._trainer, closure)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    @override
    def on_train_end(self) -> None:
        if self._serving is not None:
            self._serving.on_train_end()
        if self._working is not None:
            self._working.finish()

    @override
    def on_validation_start(self) -> None:
        if self._serving is not None and self._trainer.state.fn == TrainerFn.FITTING:
            self._serving.gather_params()

    @override
    def on_exception(self, exception: BaseException) -> None:
        if self._working is not None:
            self._working.finish()
        if self._serving is not None:
            self._serving.server.stop()
            if self.global_rank == 0:
                rpc.decide_leave(False)  # nobody waits for a graceful exit that may not come

    @override
    def teardown(self) -> None:
        if not self.in_process:
            # leave together when every process can (no TensorPipe error lines), else each on its own
            graceful = False
            if self._serving is not None:
                self._serving.close()
                graceful = self._serving.leave_together()
            elif self._working is not None:
                graceful = rpc.ask_leave("server0", self.timeout)
            rpc.unserve()
            rpc.shutdown(graceful=graceful, timeout=self.timeout)
        self._serving, self._working = None, None
        super().teardown()

    # ---- checkpoints: the full model and every shard's optimizer state -----------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._serving is not None:
            self._serving.gather_params()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()
        if self._serving is not None and self.global_rank == 0:
            state["state"].update(self._serving.other_optimizer_states())
        return state

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self._serving is not None and self.num_servers > 1:  # keep only the state of the tensors this shard owns
            self._serving.keep_own_optimizer_state(self.optimizers)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "async_sgd",
            cls,
            description="Asynchronous SGD with parameter servers (Downpour), staleness corrections",
            override=True,  # importing lightning_dl twice (spawned processes) registers again
        )
