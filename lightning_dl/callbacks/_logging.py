"""One way for the callbacks to log a per-step value through the module."""

from __future__ import annotations

import lightning as L
import torch


def log_step(pl_module: L.LightningModule, name: str, value: float | torch.Tensor) -> None:
    """Log ``value`` under ``name`` at this optimizer step (not aggregated over the epoch)."""
    pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
