"""Callbacks and a model for the asynchronous-strategy tests; they live in an importable module because the
strategies start their processes with ``spawn``, which pickles the Trainer and its callbacks by reference.
``python -m tests.helpers.async_tools`` runs the fits that the tests start as separate commands (under torchrun,
or to read a run's stderr)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader


class KillRank(L.Callback):
    """Kills its own process with SIGKILL (as ``kill -9 <pid>`` would) on ``rank`` after ``after`` batches, first
    creating the file ``mark`` when given (so that others can wait for the death)."""

    def __init__(self, rank: int, after: int, mark: str | None = None) -> None:
        self.rank, self.after, self.seen, self.mark = rank, after, 0, mark

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_rank != self.rank:
            return
        self.seen += 1
        if self.seen >= self.after:
            if self.mark is not None:
                Path(self.mark).touch()
            os.kill(os.getpid(), signal.SIGKILL)


class WaitFor(L.Callback):
    """On ``ranks``, from their second batch on, waits (at most ``timeout`` s) until the file ``mark`` exists."""

    def __init__(self, mark: str, ranks: tuple[int, ...], timeout: float = 120.0) -> None:
        self.mark, self.ranks, self.timeout = mark, ranks, timeout

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        deadline = time.monotonic() + self.timeout
        while trainer.global_rank in self.ranks and idx > 0 and not os.path.exists(self.mark):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.mark} did not appear within {self.timeout} s.")
            time.sleep(0.05)


class AwaitDeath(L.Callback):
    """On the rank-0 server, once the file ``mark`` exists (``KillRank`` writes it just before the kill), waits at
    most ``timeout`` s until its worker watch has marked a worker dead, so that the rest of the run provably goes on
    without it (on a fast machine the survivors could otherwise finish the budget before the watch's next ping)."""

    def __init__(self, mark: str, timeout: float = 30.0) -> None:
        self.mark, self.timeout = mark, timeout

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        server = getattr(trainer.strategy, "_server", None)
        if trainer.global_rank != 0 or server is None or not os.path.exists(self.mark):
            return
        deadline = time.monotonic() + self.timeout
        while not any(w.dead for w in server.workers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server's watch marked no worker dead within {self.timeout} s of the kill")
            time.sleep(0.05)


class ServerAudit(L.Callback):
    """On the rank-0 server, puts its counts in ``callback_metrics`` (they come back to the calling process)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        server = getattr(trainer.strategy, "_server", None)
        if trainer.global_rank != 0 or server is None:
            return
        self.server = server  # its final counts, once the strategy has seen every worker leave, after fit
        trainer.callback_metrics["audit/version"] = torch.tensor(server.version)
        trainer.callback_metrics["audit/applied"] = torch.tensor(sum(w.applied for w in server.workers))
        trainer.callback_metrics["audit/dead"] = torch.tensor(sum(w.dead for w in server.workers))
        trainer.callback_metrics["audit/global_step"] = torch.tensor(trainer.global_step)
        trainer.callback_metrics["audit/worker_applied"] = torch.tensor([w.applied for w in server.workers])


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


def _main() -> None:
    parser = argparse.ArgumentParser(description="Fits for the async tests, run as their own commands.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--kill-rank", type=int, default=None, help="torchrun: kill this rank after its first batch")
    args = parser.parse_args()
    # the classes from their importable module, not from __main__, so spawned processes find them
    import lightning_dl  # noqa: F401
    from lightning_dl.strategies import AsyncSGDStrategy
    from tests.helpers import async_tools

    if args.kill_rank is None:  # a clean run started by the strategy: 2 servers, 1 worker; then test
        strategy, devices, callbacks = AsyncSGDStrategy(num_servers=2, timeout=60), {"devices": 3}, []
        logger: Any = CSVLogger(args.out, name="clean")
    else:  # two nodes of torchrun: the server and three workers, one of which dies
        strategy, devices = AsyncSGDStrategy(timeout=30), {"devices": 2, "num_nodes": 2}
        mark = str(args.out / f"rank{args.kill_rank}.killed")
        others = tuple(r for r in range(1, 4) if r != args.kill_rank)  # workers wait for the death: it is mid-run
        callbacks: list[Any] = [async_tools.KillRank(args.kill_rank, 1, mark), async_tools.WaitFor(mark, others)]
        callbacks.append(async_tools.ServerAudit())
        logger = False
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **devices,
    )
    model = async_tools.Boring()
    trainer.fit(model)
    if args.kill_rank is None:
        trainer.test(model, verbose=False)
    elif trainer.global_rank == 0:
        server = callbacks[-1].server
        audit = {"version": server.version, "dead": [w.dead for w in server.workers]}
        audit |= {"applied": [w.applied for w in server.workers], "global_step": trainer.global_step}
        audit |= {"world_size": trainer.world_size, "num_workers": strategy.num_workers}
        (args.out / "rank0.json").write_text(json.dumps(audit))


if __name__ == "__main__":
    _main()
