"""Hogwild (Niu et al. 2011) as a Lightning strategy: ``Trainer(strategy="hogwild")``. The ``devices`` processes
share the module's parameters through shared memory and each steps them with its own optimizer on its own shard
of the training data, without locks on the parameters. ``trainer.global_step`` counts the steps of all processes
together (each step takes a number from one shared counter), so ``max_steps`` and LR schedules follow the global
count exactly; rank 0 validates, logs and checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl._log_steps import writes_logs
from lightning_dl.strategies._base import (
    AsyncBase,
    leave_evaluation_to_rank_zero,
    set_global_step,
)
from lightning_dl.strategies._launcher import TolerantLauncher


class HogwildStrategy(AsyncBase):
    """Lock-free shared-memory SGD across ``devices`` processes on one machine.

    Args:
        start_method: how the processes are started (``spawn``, ``fork`` or ``forkserver``).
        grace: seconds the other processes get to stop after rank 0 ends or dies.

    Example::

        >>> import lightning as L
        >>> import lightning_dl  # registers "hogwild"
        >>> trainer = L.Trainer(strategy="hogwild", accelerator="cpu", devices=3, max_steps=100)
        >>> type(trainer.strategy).__name__
        'HogwildStrategy'
    """

    strategy_name = "hogwild"

    def __init__(
        self,
        *,
        start_method: str = "spawn",
        grace: float = 60.0,
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
        if not grace > 0:
            raise ValueError(f"`grace` must be > 0 seconds, got {grace!r}.")
        self.grace = grace
        self._base = 0  # global step restored from a checkpoint; the shared counter adds to it
        self._count: torch.Tensor | None = None  # steps taken in this fit by all processes, in shared memory
        self._applied: torch.Tensor | None = None  # of those, the updates written into the parameters
        self._lock: Any = None  # makes taking a number from ``_count`` atomic (fetch-and-add)
        self._stop: torch.Tensor | None = None  # rank 0 sets it when training ends
        self._ready: torch.Tensor | None = None  # one slot per process, set when it is about to train
        self._window = (0, 0.0)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.lightning_module is not None and self._trainer.training:
            return {"num_replicas": self.num_processes, "rank": self.global_rank}
        return {"num_replicas": 1, "rank": 0}  # rank 0 validates on the whole validation set

    @override
    def _configure_launcher(self) -> None:
        environment = self.cluster_environment
        external = environment is not None and environment.creates_processes_externally
        if self.num_nodes > 1 or external:
            where = (
                f"{type(environment).__name__} (torchrun or a cluster scheduler) already started the processes"
                if external
                else f"`num_nodes={self.num_nodes}` asks for several machines"
            )
            raise ValueError(
                "`strategy='hogwild'` runs on one machine: its processes share the parameters in memory, so it starts "
                f"them itself. Here {where}; run the script as one plain process with `devices=N` and `num_nodes=1`, "
                "or use `strategy='async_sgd'` across machines."
            )
        self._check_devices("hogwild", 2, "processes sharing the parameters")
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._applied = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._lock = mp.get_context(self.start_method).Lock()
        self._stop = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._ready = torch.zeros(self.num_processes, dtype=torch.int64).share_memory_()
        self._launcher = _SharingLauncher(self, self.start_method, essential=1, share_memory=True, grace=self.grace)

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        if self.in_process or trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_one_optimizer("hogwild", "steps one optimizer per process")
        for param in self._module.parameters():
            if not param.is_shared():
                raise RuntimeError("Hogwild needs the parameters in shared memory; the launcher did not share them.")
        if self.global_rank != 0:
            leave_evaluation_to_rank_zero(trainer)

    @override
    def on_train_start(self) -> None:
        assert self._count is not None and self._ready is not None
        # start together, so no process trains alone while others still load: rank 0 marks itself ready last, once
        # every other process is, and the others start only then (rank 0, which saves and hands back the run, is
        # at the start line before anyone takes a step)
        if self.global_rank != 0:
            self._ready[self.global_rank] = 1
        deadline = time.monotonic() + self.grace
        while int(self._ready.sum()) < self.num_processes:
            if self.global_rank == 0 and int(self._ready[1:].sum()) == self.num_processes - 1:
                self._ready[0] = 1
                break
            if time.monotonic() > deadline:
                missing = (self._ready == 0).nonzero().flatten().tolist()
                raise TimeoutError(f"Hogwild ranks {missing} did not start training within {self.grace} s.")
            time.sleep(0.001)
        self._base = self._trainer.global_step  # every process restored the same count on resume
        start = self._base + int(self._count)
        max_steps = self._trainer.max_steps
        if 0 <= max_steps <= start:  # the others spent the whole budget while this process was still starting
            start = max_steps  # (the counter also holds the numbers taken past the budget)
            self._wait_applied(max_steps - self._base)
        self._window = (start, time.monotonic())
        set_global_step(self._trainer, start, after_step=False)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self.in_process:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        assert self._stop is not None
        trainer = self._trainer
        step = self._base + self._take_number() + 1  # this update's place in the global count
        if 0 <= trainer.max_steps < step:  # another process took the last step of the budget: apply nothing
            out = closure()  # Lightning expects the closure to have run
            set_global_step(trainer, trainer.max_steps, after_step=True)
            trainer.should_stop = True
            self._wait_applied(trainer.max_steps - self._base)
            return out
        out = super().optimizer_step(optimizer, closure, model, **kwargs)  # the update lands in shared memory
        self._add_applied()
        set_global_step(trainer, step, after_step=True)
        if step == trainer.max_steps:
            self._wait_applied(step - self._base)
        if self._stop.item():
            trainer.should_stop = True
        if self.global_rank == 0 and writes_logs(trainer, step):
            done, since = self._window
            now = time.monotonic()
            self._module.log("hogwild/updates_per_s", (step - done) / max(now - since, 1e-9), batch_size=1)
            self._window = (step, now)
        return out

    def _take_number(self) -> int:
        """Fetch-and-add on the shared step counter: the number of steps all processes took before this one."""
        assert self._count is not None
        with self._lock:
            taken = int(self._count)
            self._count += 1
        return taken

    def _add_applied(self) -> None:
        assert self._applied is not None
        with self._lock:
            self._applied += 1

    def _wait_applied(self, updates: int) -> None:
        """On rank 0, once the step budget is spent: wait until the steps other processes took within it are in
        the parameters, so what rank 0 saves and hands back holds all ``max_steps`` updates."""
        assert self._applied is not None
        deadline = time.monotonic() + self.grace
        while self.global_rank == 0 and int(self._applied) < updates and time.monotonic() < deadline:
            time.sleep(0.001)

    @override
    def on_train_end(self) -> None:
        if self.global_rank == 0 and self._stop is not None:
            self._stop.fill_(1)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.on_train_end()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "hogwild",
            cls,
            description="Hogwild: lock-free SGD on parameters shared in memory by several processes",
            override=True,
        )


class _SharingLauncher(TolerantLauncher):
    """Puts the module's parameters in shared memory before the processes start, so every process steps the same
    storage. On resume from a checkpoint each process loads the same values into that storage."""

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        for arg in args:
            if isinstance(arg, torch.nn.Module):
                arg.share_memory()
        return super().launch(function, *args, trainer=trainer, **kwargs)
