"""Callbacks for the asynchronous-strategy tests; they live in an importable module because the strategies start
their processes with ``spawn``, which pickles the Trainer and its callbacks by reference."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


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
            trainer.callback_metrics["audit/updates"] = trainer.strategy._steps.sum().clone()
