"""charlm (a causal Transformer reversing symbol strings) trained by pipeline parallelism over 2 stages, next to
the same recipe in one process: the schedule, the measured bubble against (p - 1)/(m + p - 1), the final losses side
by side, and a timeline PNG of one step.

    python examples/pipeline.py                          # or: lightning-dl run pipeline
    python examples/pipeline.py --schedule zbv_zero_bubble

Both runs read the same batches in the same order (a seeded shuffle, no distributed sampler: every stage reads the
whole batch); the model has no BatchNorm, so a batch's gradient is the mean of its micro-batches' and the two runs
agree to float rounding.
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
from lightning_dl.parallel.pipeline import SCHEDULES, bubble_theory
from lightning_dl.plot import plot_pipeline_timeline, read_metrics
from lightning_dl.strategies import PipelineStrategy

BATCH = 64


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


def _run(args: argparse.Namespace, pipeline: bool) -> tuple[dict[str, Any], Any]:
    L.seed_everything(0, verbose=False)
    data = SequenceDataModule(task="reverse", seq_len=8, vocab_size=16, num_train=args.num_train, batch_size=BATCH)
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    train = DataLoader(dataset, batch_size=BATCH, sampler=EpochShuffle(len(dataset)), drop_last=True)
    module = LanguageModelModule(vocab_size=16, block_size=17, d_model=args.d_model, n_layers=args.layers, lr=3e-3)
    strategy: Any = "auto"
    if pipeline:
        strategy = PipelineStrategy(schedule=args.schedule, n_microbatches=args.microbatches, record_timeline=True)
    logger = CSVLogger(args.out, name="pipeline" if pipeline else "one_process", version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if pipeline else 1,
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
    losses = [value for _, value in read_metrics(Path(logger.log_dir) / "metrics.csv")["train_loss_step"]]
    run = {"losses": losses, "val_loss": float(trainer.callback_metrics["val_loss"]), "seconds": seconds}
    return run, trainer.strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    args = parser.parse_args()
    if args.epochs < 1 or args.num_train < BATCH or args.d_model % 4 or BATCH % args.microbatches:
        parser.error(
            f"--epochs >= 1, --num-train >= {BATCH}, --d-model divisible by 4, --microbatches dividing {BATCH}"
        )
    one, _ = _run(args, pipeline=False)
    pipe, strategy = _run(args, pipeline=True)
    theory = bubble_theory(2, args.microbatches)
    png = args.out / "pipeline_timeline.png"
    _, measured, _ = plot_pipeline_timeline(
        strategy.timeline, png, n_microbatches=args.microbatches, title=f"{args.schedule}, 2 ranks"
    )
    print(f"schedule {args.schedule}: blocks per stage {strategy.stage_balance}, {args.microbatches} micro-batches")
    print(
        f"bubble of the last step: {measured:.1%} measured, {theory:.1%} = (p-1)/(m+p-1) for p=2, m={args.microbatches}"
    )
    runs = {"one process": one, f"pipeline ({args.schedule}, 2 stages)": pipe}
    rows: list[list[Any]] = [
        [name, f"{r['losses'][-1]:.6f}", f"{r['val_loss']:.6f}", f"{r['seconds']:.1f}"] for name, r in runs.items()
    ]
    worst = max(abs(a - b) for a, b in zip(one["losses"], pipe["losses"], strict=True))
    rows.append(["max difference over steps", f"{worst:.2e}", f"{abs(one['val_loss'] - pipe['val_loss']):.2e}", ""])
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        axis.plot(run["losses"], label=name, linestyle="-" if name == "one process" else "--")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.legend()
    payload = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "bubble": {"measured_last_step": measured, "theory": theory},
        "timeline_png": str(png),
    }
    write(args.out, "pipeline", ["run", "final train loss", "val loss", "seconds"], rows, payload, figure)
    print(f"timeline {png}")


if __name__ == "__main__":
    main()
