"""The digits ConvNet with each normalization (none, batch, layer, rms, group, weight), same seed and budget:
training-loss and validation-accuracy curves and a table.

    python examples/norms.py                 # or: lightning-dl run norms
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import lightning as L
from _report import StepLoss, ValAccuracy, write  # examples/ is on sys.path when a recipe runs

from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule
from lightning_dl.nn import NORMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("runs/norms"))
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    results = {}
    for index, norm in enumerate(NORMS, start=1):
        print(f"[{index}/{len(NORMS)}] ConvNet with norm={norm!r}", flush=True)
        L.seed_everything(0, verbose=False)
        losses, accuracy = StepLoss(), ValAccuracy()
        module = ClassifierModule(
            model="convnet", norm=norm, init="he_normal", optimizer="momentum", lr=args.lr, weight_decay=1e-4
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            callbacks=[losses, accuracy],
        )
        data = DigitsDataModule(batch_size=32, seed=0)
        trainer.fit(module, datamodule=data)
        test = trainer.test(module, datamodule=data, verbose=False)[0]
        results[norm] = {
            "losses": losses.losses,
            "val_acc": accuracy.values,
            "test_acc": test["test_acc"],
            "final_loss": statistics.fmean(losses.losses[-20:]),
            "ms_per_step": 1e3 * statistics.median(losses.seconds),
        }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for norm, r in results.items():
        smooth = [statistics.fmean(r["losses"][max(0, i - 9) : i + 1]) for i in range(len(r["losses"]))]
        left.plot(smooth, label=norm, lw=1.4)
        right.plot(range(1, len(r["val_acc"]) + 1), r["val_acc"], marker="o", label=norm)
    left.set_yscale("log")
    left.set(xlabel="optimizer step", ylabel="training loss (mean of 10 steps)")
    right.set(xlabel="epoch", ylabel="validation accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"ConvNet on digits, SGD momentum 0.9 lr {args.lr}, He init, {args.epochs} epochs")
    header = ["norm", "final train loss (last 20 steps)", "final val acc", "test acc", "ms per step"]
    rows = [
        [n, f"{r['final_loss']:.4f}", f"{r['val_acc'][-1]:.4f}", f"{r['test_acc']:.4f}", f"{r['ms_per_step']:.2f}"]
        for n, r in results.items()
    ]
    write(args.out, "norms", header, rows, {"args": vars(args) | {"out": str(args.out)}, "results": results}, fig)
    plt.close(fig)


if __name__ == "__main__":
    main()
