"""One way for the callbacks to log a per-step value through the module."""

from __future__ import annotations

import lightning as L
import torch


def should_log(trainer: L.Trainer) -> bool:
    """True on the optimizer steps whose metrics Lightning writes to the logger (every ``log_every_n_steps``).
    ``self.log`` costs about a millisecond a call, so values that would never be written are not logged."""
    every = getattr(trainer, "log_every_n_steps", 50)  # set by Lightning at runtime
    return every > 0 and (trainer.global_step + 1) % every == 0


def log_step(pl_module: L.LightningModule, name: str, value: float | torch.Tensor) -> None:
    """Log ``value`` under ``name`` at this optimizer step (not aggregated over the epoch), on logging steps."""
    if should_log(pl_module.trainer):
        pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
