"""The linear scaling rule reproduced on digits (Goyal et al. 2017): a baseline at batch 32 and learning rate η
against batch 256 with (i) no scaling, (ii) linear scaling (8η) without warmup, (iii) linear scaling with a gradual
warmup from η, for the same number of epochs. Writes a table and a PNG of validation accuracy against epoch.

    python examples/large_batch.py            # or: lightning-dl run large-batch
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
from _report import ValAccuracy, write  # examples/ is on sys.path when a recipe runs
from lightning.pytorch.callbacks import Callback

from lightning_dl.callbacks import BatchSizeScaling, LRSchedule
from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule


def run(name: str, batch_size: int, make_callbacks, args: argparse.Namespace) -> dict:
    """Train with each seed and average: validation accuracy per epoch, test accuracy, time."""
    seeds = [run_once(batch_size, make_callbacks(), args, seed) for seed in range(args.seeds)]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    val_acc = [mean(epoch) for epoch in zip(*(r["val_acc"] for r in seeds), strict=True)]
    return {
        "run": name,
        "batch_size": batch_size,
        "steps": seeds[0]["steps"],
        "final_lr": seeds[0]["final_lr"],
        "val_acc": val_acc,
        "final_val_acc": val_acc[-1],
        "test_acc": mean([r["test_acc"] for r in seeds]),
        "seconds": mean([r["seconds"] for r in seeds]),
        "per_seed": seeds,
    }


def run_once(batch_size: int, callbacks: list[Callback], args: argparse.Namespace, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    accuracy = ValAccuracy()
    module = ClassifierModule(hidden_sizes=[256, 256], dropout=0.0, optimizer="momentum", lr=args.lr, weight_decay=1e-4)
    data = DigitsDataModule(batch_size=batch_size, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[*callbacks, accuracy],
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    test_acc = trainer.test(module, datamodule=data, verbose=False)[0]["test_acc"]
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    return {
        "seed": seed,
        "final_lr": lrs[0],
        "steps": trainer.global_step,
        "val_acc": accuracy.values,
        "test_acc": test_acc,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="the same budget in epochs for every run")
    parser.add_argument("--lr", type=float, default=0.03, help="η, the baseline learning rate at batch 32")
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="runs per setting, averaged (model seeds 0..n-1)")
    parser.add_argument("--out", type=Path, default=Path("runs/large_batch"))
    args = parser.parse_args()
    for name in ("epochs", "warmup_epochs", "seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")

    reference, large = 32, 256
    k = large // reference
    steps_per_epoch = -(-1259 // large)  # the digits training split holds 1,259 samples
    if args.warmup_epochs > args.epochs:
        parser.error(f"--warmup-epochs must be <= --epochs ({args.epochs}), got {args.warmup_epochs}")
    warmup_steps = args.warmup_epochs * steps_per_epoch
    settings = [
        (f"baseline B={reference}, lr η", reference, lambda: []),
        (f"B={large}, lr η (no scaling)", large, lambda: []),
        (f"B={large}, lr {k}η, no warmup", large, lambda: [BatchSizeScaling(reference, rule="linear")]),
        (
            f"B={large}, lr {k}η, {args.warmup_epochs}-epoch warmup",
            large,
            lambda: [
                BatchSizeScaling(reference, rule="linear"),
                LRSchedule("constant", warmup_steps=warmup_steps, warmup_start_ratio=1 / k),
            ],
        ),
    ]
    runs = []
    for index, (name, batch_size, make_callbacks) in enumerate(settings, start=1):
        print(f"[{index}/{len(settings)}] {name}: {args.seeds} seed(s) x {args.epochs} epochs", flush=True)
        runs.append(run(name, batch_size, make_callbacks, args))
    report(runs, args)


def report(runs: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = runs[0]["final_val_acc"]
    header = ["run", "steps", "final val acc", "vs baseline", "test acc", "seconds per run"]
    rows = [
        [
            r["run"],
            r["steps"],
            f"{r['final_val_acc']:.4f}",
            f"{100 * (r['final_val_acc'] - baseline):+.1f} pt",
            f"{r['test_acc']:.4f}",
            f"{r['seconds']:.1f}",
        ]
        for r in runs
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for r in runs:
        ax.plot(range(1, len(r["val_acc"]) + 1), r["val_acc"], label=r["run"], lw=1.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"Linear scaling on digits (SGD momentum 0.9, η={args.lr}, mean of {args.seeds} seeds)")
    write(args.out, "large_batch", header, rows, {"args": vars(args) | {"out": str(args.out)}, "runs": runs}, fig)
    plt.close(fig)


if __name__ == "__main__":
    main()
