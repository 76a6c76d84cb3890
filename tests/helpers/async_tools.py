"""Callbacks for the asynchronous-strategy tests; they live in an importable module because the strategies start
their processes with ``spawn``, which pickles the Trainer and its callbacks by reference."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader


class KillRank(L.Callback):
    """Kills its own process with SIGKILL (as ``kill -9 <pid>`` would) on ``rank`` after ``after`` batches."""

    def __init__(self, rank: int, after: int) -> None:
        self.rank, self.after, self.seen = rank, after, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_rank != self.rank:
            return
        self.seen += 1
        if self.seen >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)


class ServerAudit(L.Callback):
    """On the rank-0 server, puts its counts in ``callback_metrics`` (they come back to the calling process)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        server = getattr(trainer.strategy, "_server", None)
        if trainer.global_rank != 0 or server is None:
            return
        trainer.callback_metrics["audit/version"] = torch.tensor(server.version)
        trainer.callback_metrics["audit/applied"] = torch.tensor(sum(w.applied for w in server.workers))
        trainer.callback_metrics["audit/dead"] = torch.tensor(sum(w.dead for w in server.workers))
        trainer.callback_metrics["audit/global_step"] = torch.tensor(trainer.global_step)


class HogwildAudit(L.Callback):
    """On rank 0, puts the global step and the updates made in this ``fit`` (all processes) in ``callback_metrics``."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            trainer.callback_metrics["audit/global_step"] = torch.tensor(trainer.global_step)
            trainer.callback_metrics["audit/updates"] = trainer.strategy._applied.clone()


class ProgressAudit(L.Callback):
    """On rank 0 at the end of ``fit``: its global step, epoch and batches seen, in ``callback_metrics``."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            trainer.callback_metrics["audit/global_step"] = torch.tensor(trainer.global_step)
            trainer.callback_metrics["audit/epoch"] = torch.tensor(trainer.current_epoch)
            batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
            trainer.callback_metrics["audit/batches"] = torch.tensor(batches)


class Boring(BoringModel):
    """Lightning's own ``BoringModel`` (one ``Linear(32, 2)``) with momentum, a step-wise LR schedule, a logged test
    loss and 16 training samples in batches of 2, so that a few spawned processes finish in seconds."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 16), batch_size=2)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("val_loss", self.step(batch))

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("test_loss", self.step(batch))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(fixed_data(), batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(fixed_data(), batch_size=8)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(fixed_data(), batch_size=8)


def fixed_data() -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
