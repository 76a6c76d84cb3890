"""What the communication-efficient DDP strategies share: a DDP communication hook registered on CPU too (Lightning
registers hooks on CUDA only), per-rank state gathered into checkpoints (residuals and local parameters differ by
rank), a bounded collective timeout and an error that names a dead rank."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_dl.parallel.comm import dead_ranks_message

DEFAULT_TIMEOUT = timedelta(seconds=30)
"""Collective timeout: a rank that hangs makes the others fail after this long (Lightning's default is 30 min)."""
DEAD_RANK_GRACE = 5.0
"""Seconds the survivors of a failed collective wait for each other before naming the ranks that did not answer."""
CHECKPOINT_KEY = "lightning_dl_comm"
_COLLECTIVE_ERROR = re.compile(r"gloo|nccl|connection (closed|reset)|timed? ?out|peer|collective", re.IGNORECASE)


class DeadRankNaming(Strategy):
    """What every strategy of ``lightning_dl.strategies.data_parallel.STRATEGIES`` shares with the others: its rows
    of that table are its registered names, and after a failed collective its error names the ranks that did not
    answer. Listed first among the bases (``class S(DeadRankNaming, DDPStrategy)``)."""

    strategy_name: str
    """The registered name, for messages."""

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        name_dead_ranks(self, exception)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register the rows of ``lightning_dl.strategies.data_parallel.STRATEGIES`` that build this class."""
        from lightning_dl.strategies.data_parallel import STRATEGIES

        for name, strategy_cls, kwargs, description in STRATEGIES:
            if strategy_cls is cls:
                strategy_registry.register(name, cls, description=description, override=True, **kwargs)


class CommDDPStrategy(DeadRankNaming, DDPStrategy):
    """``DDPStrategy`` with a communication hook, per-rank checkpoint state and a dead-rank diagnosis. Subclasses
    give ``_comm_hook``, ``_rank_state``/``_load_rank_state`` and ``_shared_state``/``_load_shared_state``."""

    def __init__(self, *, timeout: timedelta | float = DEFAULT_TIMEOUT, **ddp_kwargs: Any) -> None:
        super().__init__(timeout=as_timeout(timeout), **ddp_kwargs)

    @property
    def _module(self) -> L.LightningModule:
        assert self.lightning_module is not None
        return self.lightning_module

    def _comm_hook(self) -> tuple[Any, Any] | None:
        """(state, hook) to register on the DDP model, or None for DDP's all-reduce."""
        return None

    def _rank_state(self) -> dict[str, Any]:
        return {}

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        pass

    def _shared_state(self) -> dict[str, Any]:
        return {}

    def _load_shared_state(self, state: dict[str, Any]) -> None:
        pass

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        hook = self._comm_hook()
        if hook is not None:
            assert isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
            self.model.register_comm_hook(*hook)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank calls this (Lightning's ``Trainer.save_checkpoint``): each rank's state is gathered into the
        checkpoint that rank 0 writes."""
        ranks: list[Any] = [None] * self.world_size
        rank_state = self._rank_state()
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.all_gather_object(ranks, rank_state)
        else:
            ranks = [rank_state]
        checkpoint[CHECKPOINT_KEY] = {
            "strategy": type(self).__name__,
            "world_size": self.world_size,
            "ranks": ranks,
            "shared": self._shared_state(),
        }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        self._load_shared_state(saved["shared"])
        if saved["world_size"] != self.world_size:
            rank_zero_warn(
                f"The checkpoint holds per-rank state of {saved['world_size']} ranks, this run has {self.world_size}:"
                " every rank starts from rank 0's parameters and optimizer state, residuals start at zero."
            )
            return
        self._load_rank_state(saved["ranks"][self.global_rank])


def name_dead_ranks(strategy: Any, exception: BaseException) -> None:
    """After a failed collective, add to the exception's message which ranks did not answer (and the timeout)."""
    if not (isinstance(exception, RuntimeError) and _COLLECTIVE_ERROR.search(str(exception))):
        return
    if not (dist.is_available() and dist.is_initialized()) or strategy.world_size < 2:
        return
    diagnosis = dead_ranks_message(strategy.global_rank, strategy.world_size, grace=DEAD_RANK_GRACE)
    timeout = strategy._timeout.total_seconds() if strategy._timeout is not None else float("nan")
    note = (
        f"\n[{strategy.strategy_name}] a collective failed on rank {strategy.global_rank}: {diagnosis}. "
        f"Collective timeout: {timeout:g} s (strategy argument `timeout`)."
    )
    exception.args = (f"{exception.args[0] if exception.args else ''}{note}", *exception.args[1:])


def as_timeout(timeout: timedelta | float) -> timedelta:
    """Seconds or a ``timedelta``, which must be positive."""
    if isinstance(timeout, int | float):
        timeout = timedelta(seconds=timeout)
    if timeout.total_seconds() <= 0:
        raise ValueError(f"`timeout` must be > 0 seconds, got {timeout.total_seconds()!r}.")
    return timeout


def module_and_optimizer_state(strategy: Strategy) -> dict[str, Any]:
    """A rank's module parameters and optimizer states (they differ between ranks between syncs)."""
    module = strategy.lightning_module
    assert module is not None
    return {
        "module": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "optimizers": [strategy.optimizer_state(optimizer) for optimizer in strategy.optimizers],
    }


def load_module_and_optimizer_state(strategy: Strategy, state: dict[str, Any]) -> None:
    module = strategy.lightning_module
    assert module is not None
    module.load_state_dict(state["module"])
    for optimizer, optimizer_state in zip(strategy.optimizers, state["optimizers"], strict=True):
        optimizer.load_state_dict(optimizer_state)
