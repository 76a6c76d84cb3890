"""What the comparison recipes share: a markdown table, a JSON file and the run's environment."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class StepLoss(Callback):
    """Training loss of every optimizer step, and wall time per step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class ValAccuracy(Callback):
    """Validation accuracy (``val_acc``) at the end of every epoch, sanity check excluded."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val_acc"]))


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }


def write(out: Path, name: str, header: list[str], rows: list[list[Any]], payload: dict, figure: Any) -> None:
    """Write ``name``.md (table), ``name``.json and ``name``.png under ``out`` and print the table and paths."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    table = "\n".join(lines)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(payload | {"environment": environment()}, indent=2))
    figure.savefig(out / f"{name}.png", dpi=120)
    print()
    print(table)
    print(f"\ntable  {out / f'{name}.md'}\nplot   {out / f'{name}.png'}\nJSON   {out / f'{name}.json'}")
