"""What the modules share: an optimizer by name over parameter groups with no weight decay on biases and norm
parameters, an optional LR schedule by shape, logging of an optimizer's own statistics, and the train/val/test
steps around one ``_shared_step``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch.optim.lr_scheduler import LambdaLR
from typing_extensions import override

from lightning_dl import schedules
from lightning_dl._log_steps import writes_logs
from lightning_dl.optim import OPTIMIZERS, AdaptiveSGD, build_optimizer

_WARMUP_DEFAULTS: dict[str, Any] = {"warmup_steps": 0, "warmup_type": "linear", "warmup_start_ratio": 0.0}


def check_optimizer(name: str, weight_decay: float, lr: float) -> None:
    """Validate before any Trainer exists: the name, and weight decay only where the optimizer has it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}.")
    if lr <= 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
    if weight_decay and not _takes_weight_decay(name):
        raise ValueError(f"optimizer {name!r} has no weight decay: set `weight_decay=0`.")


def _takes_weight_decay(name: str) -> bool:
    return "weight_decay" in inspect.signature(OPTIMIZERS[name][0]).parameters


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and schedule choices of a module, as its constructor took them."""

    name: str
    lr: float
    weight_decay: float
    optimizer_kwargs: dict[str, Any] | None
    lr_schedule: str | None
    schedule_kwargs: dict[str, Any] | None


def configure(module: L.LightningModule, config: OptimConfig) -> Any:
    """The optimizer (weights with ``ndim >= 2`` decay, the rest do not) and, with ``lr_schedule``, a per-step
    ``LambdaLR`` following :func:`lightning_dl.schedules.lr_factor` over ``trainer.estimated_stepping_batches``."""
    name, lr, weight_decay = config.name, config.lr, config.weight_decay
    optimizer_kwargs, lr_schedule, schedule_kwargs = config.optimizer_kwargs, config.lr_schedule, config.schedule_kwargs
    params = [p for p in module.parameters() if p.requires_grad]
    if _takes_weight_decay(name):
        groups: list[dict[str, Any]] = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": params}]
    optimizer = build_optimizer(name, groups, lr=lr, **(optimizer_kwargs or {}))
    if lr_schedule is None:
        return optimizer
    kwargs = dict(schedule_kwargs or {})
    warmup = {k: kwargs.pop(k) for k in ("warmup_steps", "warmup_type", "warmup_start_ratio") if k in kwargs}
    total = int(module.trainer.estimated_stepping_batches)
    schedules.validate_schedule(
        lr_schedule,
        total_steps=total,
        **(_WARMUP_DEFAULTS | warmup),
        **kwargs,
    )
    scheduler = LambdaLR(
        optimizer, lambda step: schedules.lr_factor(lr_schedule, step, total_steps=total, **warmup, **kwargs)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def log_optimizer_statistics(module: L.LightningModule) -> None:
    """Log an optimizer's own statistics (``adaptive_sgd``: mean B* and mean η) on Lightning's logging steps."""
    trainer = module.trainer
    if not writes_logs(trainer, trainer.global_step):  # after the step: global_step already counts it
        return
    for optimizer in trainer.optimizers:
        if isinstance(optimizer, AdaptiveSGD):
            for key, value in optimizer.statistics().items():
                module.log(f"adaptive_sgd/{key}", value, on_step=True, on_epoch=False, batch_size=1)


def check_schedule(lr_schedule: str | None, schedule_kwargs: dict[str, Any] | None) -> None:
    """Validate a schedule's shape and parameters before the Trainer gives the total."""
    if lr_schedule is None:
        return
    kwargs = _WARMUP_DEFAULTS | dict(schedule_kwargs or {})
    schedules.validate_schedule(lr_schedule, total_steps=None, **kwargs)


class StagedModule(L.LightningModule):
    """Train, validation and test steps that call ``_shared_step(batch, stage)``; the optimizer from
    ``self.optim_config``; an optimizer's own statistics logged after each training batch."""

    optim_config: OptimConfig

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        log_optimizer_statistics(self)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return configure(self, self.optim_config)
