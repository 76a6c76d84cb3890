"""What the asynchronous strategies share: processes that hold no common process group (collectives are local),
rank 0 alone validates, checkpoints and stops early, a worker's ``global_step`` follows a global count, and after
``fit`` the calling process holds rank 0's training state (loops, optimizer, schedulers, callbacks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

START_METHODS = ("spawn", "fork", "forkserver")


class AsyncBase(ParallelStrategy):
    """Processes launched by ``TolerantLauncher`` that never run a collective: ``barrier`` returns at once,
    ``reduce``/``broadcast``/``all_gather`` return the local value. ``in_process`` is True outside ``fit`` (test,
    validate and predict run in the calling process on the trained parameters)."""

    in_process = True

    def __init__(self, *, start_method: str = "spawn", **parallel_kwargs: Any) -> None:
        super().__init__(**parallel_kwargs)
        if start_method not in START_METHODS:
            raise ValueError(f"`start_method` must be one of {START_METHODS}, got {start_method!r}.")
        self.start_method = start_method
        self._num_nodes = 1
        self.external = False  # True when an outside launcher (torchrun, SLURM) started the processes
        self._final_optimizer_states: list[dict[str, Any]] | None = None  # set on rank 0 while its peers still run
        self._run_state: dict[str, Any] | None = None  # rank 0's state at the end of fit, in the calling process

    def _check_devices(self, name: str, least: int, why: str) -> None:
        if self.num_processes < least:
            raise ValueError(
                f"`strategy='{name}'` needs `devices` >= {least} ({why}), got devices={self.num_processes}."
            )

    def _launched_externally(self, name: str) -> bool:
        """Whether the environment already started the processes and gives the ranks (torchrun, SLURM); without
        one, every process runs on this machine, so more than one node is an error."""
        environment = self.cluster_environment
        if environment is not None and environment.creates_processes_externally:
            environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
            return True
        if self.num_nodes > 1:
            raise ValueError(
                f"`strategy='{name}'` with `num_nodes={self.num_nodes}` needs its processes started on each machine "
                "by torchrun or a cluster scheduler (SLURM); started by Lightning, they would all run on this one."
            )
        return False

    def _check_one_optimizer(self, name: str, what: str) -> None:
        module = self._module
        if not module.automatic_optimization or len(self.optimizers) != 1:
            raise ValueError(
                f"`strategy='{name}'` {what} with automatic optimization; the module has "
                f"automatic_optimization={module.automatic_optimization} and {len(self.optimizers)} optimizers."
            )

    @property
    def _module(self) -> L.LightningModule:
        assert self.lightning_module is not None
        return self.lightning_module

    @property
    def _trainer(self) -> L.Trainer:
        return self._module.trainer

    @property
    def num_processes(self) -> int:
        """Processes on this machine (``devices``)."""
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_ranks(self) -> int:
        """Processes of the run on all machines (``devices × num_nodes``)."""
        return self.num_processes * self.num_nodes

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[0 if self.in_process else self.local_rank]

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @property
    def is_distributed(self) -> bool:
        return not self.in_process

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.in_process:
            return
        assert self.cluster_environment is not None
        if not self.external:  # the launcher started one process per device here: rank = local rank
            self.cluster_environment.set_world_size(self.num_processes)
            self.cluster_environment.set_global_rank(self.cluster_environment.local_rank())
        rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]

    def run_state(self, trainer: L.Trainer) -> dict[str, Any]:
        """On rank 0 after ``fit``: what the calling process needs to save a checkpoint that resumes where the run
        ended (its loops' progress, optimizer and scheduler states, callback states)."""
        optimizers = self._final_optimizer_states
        if optimizers is None:
            optimizers = [self.optimizer_state(optimizer) for optimizer in self.optimizers]
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        return {
            "loops": trainer.fit_loop.state_dict(),
            "optimizer_states": optimizers,
            "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "callbacks": {c.state_key: c.state_dict() for c in callbacks},
        }

    def restore_run_state(self, trainer: L.Trainer, state: dict[str, Any]) -> None:
        """In the calling process after ``fit``: take rank 0's loops and callback states (``global_step``,
        ``current_epoch``, ``ModelCheckpoint``'s best paths, ...) and keep its optimizer and scheduler states for
        ``trainer.save_checkpoint``."""
        trainer.fit_loop.load_state_dict(state["loops"])
        trainer.fit_loop.restarting = False  # the run is over, not interrupted
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback.state_key in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][callback.state_key])
        self._run_state = state

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        # After fit the calling process has no optimizer of its own (rank 0 had it): save rank 0's final states
        if self.in_process and not self.optimizers and self._run_state is not None and "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = self._run_state["optimizer_states"]
            checkpoint["lr_schedulers"] = self._run_state["lr_schedulers"]
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def barrier(self, name: str | None = None) -> None:
        pass

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return tensor

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        return tensor

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def leave_evaluation_to_rank_zero(trainer: L.Trainer) -> None:
    """On a process other than the one that validates: no validation, no checkpoints, no early stopping (it stops
    when told to)."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    trainer.callbacks = [c for c in callbacks if not isinstance(c, Checkpoint | EarlyStopping)]  # type: ignore[attr-defined]
    trainer.limit_val_batches = 0
    trainer.num_sanity_val_steps = 0


def set_global_step(trainer: L.Trainer, count: int, *, after_step: bool) -> None:
    """Make ``trainer.global_step`` a global update count. Inside ``optimizer_step`` Lightning adds one when the
    step returns, so the count is set one lower there."""
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    progress.ready = count
    progress.completed = count - 1 if after_step else count


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
