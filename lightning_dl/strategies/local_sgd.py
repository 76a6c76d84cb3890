"""Local SGD (post-local SGD, Lin et al. 2020): after ``warmup_steps`` optimizer steps of plain DDP, every rank steps
on its own gradients and the parameters are averaged every ``sync_every`` optimizer steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.parallel.comm import LocalState, average_, check_sync, local_hook
from lightning_dl.strategies._comm import CommDDPStrategy, load_module_and_optimizer_state, module_and_optimizer_state


class LocalSGDStrategy(CommDDPStrategy):
    """Data parallel that communicates parameters every ``sync_every`` optimizer steps instead of gradients at every
    step. The position in the sync period is ``trainer.global_step`` (restored on resume); checkpoints hold every
    rank's parameters and optimizer state, since they differ between syncs.

    Args:
        sync_every: optimizer steps between parameter averages (H >= 1); ``sync_every=1`` with SGD is DDP.
        warmup_steps: optimizer steps of plain DDP (gradient all-reduce) before local steps begin.
        timeout: collective timeout (seconds or ``timedelta``); a dead or hung rank fails the others after it.
        **ddp_kwargs: passed to ``DDPStrategy`` (``start_method``, ``process_group_backend``, DDP's arguments).

    Example::

        >>> LocalSGDStrategy(sync_every=4).sync_every
        4
    """

    strategy_name = "local_sgd"

    def __init__(self, *, sync_every: int = 8, warmup_steps: int = 0, **ddp_kwargs: Any) -> None:
        check_sync(sync_every, warmup_steps)
        super().__init__(**ddp_kwargs)
        self.sync_every = sync_every
        self.warmup_steps = warmup_steps
        self._local = LocalState()
        self._param_bytes = 0

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank put into collectives so far (gradient all-reduces in warmup, parameter averages)."""
        return self._local.bytes_sent + self._param_bytes

    def is_sync_step(self, steps_done: int) -> bool:
        """Whether the parameters are averaged after optimizer step number ``steps_done`` (1-based)."""
        return steps_done > self.warmup_steps and (steps_done - self.warmup_steps) % self.sync_every == 0

    @override
    def _comm_hook(self) -> tuple[Any, Any]:
        return self._local, local_hook

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Any = None,
        **kwargs: Any,
    ) -> Any:
        steps_before = self._module.trainer.global_step  # Lightning counts this step once it returns
        self._local.allreduce = steps_before < self.warmup_steps
        # local steps: the closure's forward and backward run under DDP's no_sync, so that DDP's reducer does no
        # work at all (with the hook alone it would still copy every gradient into its buckets and back)
        local = not self._local.allreduce and isinstance(self.model, DistributedDataParallel)
        with self.model.no_sync() if local else contextlib.nullcontext():  # type: ignore[union-attr, operator]
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.is_sync_step(steps_before + 1):
            self._synchronize()
        return output

    def _synchronize(self) -> None:
        params = [p for p in self._module.parameters()]
        with torch.no_grad():
            self._param_bytes += average_(params)

    @override
    def _rank_state(self) -> dict[str, Any]:
        return module_and_optimizer_state(self)

    @override
    def _load_rank_state(self, state: dict[str, Any]) -> None:
        load_module_and_optimizer_state(self, state)
