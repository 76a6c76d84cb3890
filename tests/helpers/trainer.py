"""Run a tiny fit on CPU and record what the optimizer saw at every step."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset


class StepRecorder(Callback):
    """Placed last among the callbacks: records each param group's lr/momentum and the gradients the optimizer is
    about to apply, at every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.momenta: list[list[float]] = []
        self.grads: list[list[torch.Tensor | None]] = []
        self.global_steps: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        groups = optimizer.param_groups
        self.lrs.append([g["lr"] for g in groups])
        self.momenta.append([g["betas"][0] if "betas" in g else g.get("momentum", 0.0) for g in groups])
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for g in groups for p in g["params"]])
        self.global_steps.append(trainer.global_step)


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary unless asked for."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # the callbacks log on logging steps only: every step here
    )
    return L.Trainer(**(defaults | kwargs))


def loader(dataset: Dataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
