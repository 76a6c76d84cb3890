"""One way for the callbacks to log a per-step value through the module."""

from __future__ import annotations

import lightning as L
import torch

from lightning_dl._log_steps import writes_logs


def should_log(trainer: L.Trainer) -> bool:
    """True in ``on_before_optimizer_step`` when Lightning will write this step's logs."""
    return writes_logs(trainer, trainer.global_step + 1)


def log_step(pl_module: L.LightningModule, name: str, value: float | torch.Tensor) -> None:
    """Log ``value`` under ``name`` at this optimizer step (not aggregated over the epoch), on logging steps."""
    if should_log(pl_module.trainer):
        pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
