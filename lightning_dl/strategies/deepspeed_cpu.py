"""DeepSpeed ZeRO through Lightning's ``DeepSpeedStrategy``, usable on CPU with gloo as well as on GPUs: Lightning
refuses a non-CUDA accelerator, checks CUDA device indices and passes a CUDA device index to DeepSpeed; the three
overrides below skip those on CPU (DeepSpeed picks its CPU accelerator itself when no GPU is found)."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.strategies._comm import DEFAULT_TIMEOUT, DeadRankNaming, as_timeout


class DeepSpeedCPUStrategy(DeadRankNaming, DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that also runs on ``accelerator="cpu"`` (gloo); on CUDA it is Lightning's, unchanged.

    Args:
        stage: ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
        timeout: collective timeout (seconds or ``timedelta``, default 30 s); a dead rank is named in the error.
        **kwargs: passed to Lightning's ``DeepSpeedStrategy`` (``config``, offload options, ...).

    Example::

        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed announces its CPU accelerator on first use
        ...     strategy = DeepSpeedCPUStrategy(stage=2)
        >>> strategy.zero_stage_3, strategy.strategy_name
        (False, 'deepspeed_zero2')
    """

    def __init__(self, *, stage: int = 2, timeout: timedelta | float = DEFAULT_TIMEOUT, **kwargs: Any) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"`stage` (ZeRO stage) must be 1, 2 or 3, got {stage!r}.")
        super().__init__(stage=stage, timeout=as_timeout(timeout), **kwargs)
        self.strategy_name = f"deepspeed_zero{stage}"

    @property
    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    @override
    def setup_environment(self) -> None:
        if not self._on_cpu:
            super().setup_environment()
            return
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own refuses any accelerator but CUDA

    @override
    def setup_distributed(self) -> None:
        if not self._on_cpu:
            super().setup_distributed()
            return
        reset_seed()  # as Lightning's, without the check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _setup_model_and_optimizer(
        self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, Optimizer]:
        if not self._on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # DeepSpeed reads `device_rank` as a device index and treats a negative one as "not distributed"
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer


def optimizer_state_numel(strategy: DeepSpeedCPUStrategy) -> int:
    """Elements of optimizer state this rank holds (the tensors in the state of the optimizer ZeRO wraps)."""
    optimizer = strategy.deepspeed_engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(t.numel() for state in inner.state.values() for t in state.values() if isinstance(t, torch.Tensor))
