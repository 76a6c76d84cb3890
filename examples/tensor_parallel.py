"""charlm (a causal Transformer reversing symbol strings) trained by tensor parallelism at tp2 with the automatic
plan, next to the same recipe in one process: the plan table, then the final losses side by side.

    python examples/tensor_parallel.py          # or: lightning-dl run tensor-parallel

Both runs read the same batches in the same order (a seeded shuffle, no distributed sampler: every
tensor-parallel rank must see the whole batch), so their losses agree to float rounding.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from _report import write
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Sampler

from lightning_dl.data import SequenceDataModule
from lightning_dl.modules import LanguageModelModule
from lightning_dl.parallel.tensor import explain_plan
from lightning_dl.plot import read_metrics
from lightning_dl.strategies import TensorParallelStrategy


class EpochShuffle(Sampler[int]):
    """A new permutation each epoch from ``seed + epoch``: the same order in every process and in every run."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size


def _run(args: argparse.Namespace, devices: int) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    data = SequenceDataModule(task="reverse", seq_len=8, vocab_size=16, num_train=args.num_train, batch_size=64)
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    train = DataLoader(dataset, batch_size=64, sampler=EpochShuffle(len(dataset)))
    module = LanguageModelModule(vocab_size=16, block_size=17, d_model=args.d_model, n_layers=2, n_heads=4, lr=3e-3)
    strategy: Any = "auto" if devices == 1 else TensorParallelStrategy(tensor_parallel_size=devices)
    logger = CSVLogger(args.out, name=f"devices{devices}", version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=args.epochs,
        use_distributed_sampler=False,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, train, data.val_dataloader())
    seconds = time.perf_counter() - start
    # after fit the calling process holds the whole trained model as plain tensors, whatever the strategy
    assert all(type(p.data) is torch.Tensor for p in module.parameters())
    losses = [value for _, value in read_metrics(Path(logger.log_dir) / "metrics.csv")["train_loss_step"]]
    return {"val_loss": float(trainer.callback_metrics["val_loss"]), "losses": losses, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="tensor-parallel degree")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/tensor_parallel"))
    args = parser.parse_args()
    if args.devices < 2 or args.epochs < 1 or args.num_train < 64 or args.d_model % 4:
        parser.error("--devices >= 2, --epochs >= 1, --num-train >= 64 and --d-model divisible by 4 (the heads)")
    print(f"The plan at tp={args.devices}, found without processes:")
    explain_plan(LanguageModelModule(vocab_size=16, block_size=17, d_model=args.d_model, n_layers=2), tp=args.devices)
    runs = {"one process": _run(args, 1), f"tp{args.devices}": _run(args, args.devices)}
    one, tp = runs["one process"], runs[f"tp{args.devices}"]
    rows: list[list[Any]] = [
        [name, f"{r['losses'][-1]:.6f}", f"{r['val_loss']:.6f}", f"{r['seconds']:.1f}"] for name, r in runs.items()
    ]
    worst = max(abs(a - b) for a, b in zip(one["losses"], tp["losses"], strict=True))
    rows.append(["max difference over steps", f"{worst:.2e}", f"{abs(one['val_loss'] - tp['val_loss']):.2e}", ""])
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        axis.plot(run["losses"], label=name, linestyle="-" if name == "one process" else "--")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.legend()
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    write(args.out, "tensor_parallel", ["run", "final train loss", "val loss", "seconds"], rows, payload, figure)


if __name__ == "__main__":
    main()
