"""Asynchronous SGD on digits: one parameter server and two workers (3 processes), then the staleness the
server saw and the test accuracy of its parameters. ``--strategy hogwild`` runs the same budget with Hogwild.

    python examples/async_sgd.py             # or: lightning-dl run async
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _report import write
from lightning.pytorch.loggers import CSVLogger

from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule
from lightning_dl.parallel.param_server import POLICIES
from lightning_dl.plot import read_metrics
from lightning_dl.strategies import AsyncSGDStrategy, HogwildStrategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=("async_sgd", "hogwild"), default="async_sgd")
    parser.add_argument("--devices", type=int, default=3, help="processes: servers + workers (async_sgd)")
    parser.add_argument("--num-servers", type=int, default=1)
    parser.add_argument("--policy", choices=POLICIES, default="none", help="staleness correction")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("runs/async"))
    args = parser.parse_args()
    if args.epochs < 1 or not args.lr > 0:
        parser.error(f"--epochs must be >= 1 and --lr > 0, got {args.epochs} and {args.lr}")
    try:
        strategy = (
            AsyncSGDStrategy(num_servers=args.num_servers, staleness_policy=args.policy)
            if args.strategy == "async_sgd"
            else HogwildStrategy()
        )
        L.seed_everything(0)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=args.devices,
            strategy=strategy,
            max_epochs=args.epochs,
            log_every_n_steps=5,
            logger=CSVLogger(args.out, name=args.strategy),
            enable_checkpointing=False,
        )
    except ValueError as error:
        parser.error(str(error))
    model = ClassifierModule(optimizer="sgd", lr=args.lr)
    data = DigitsDataModule(batch_size=32)
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    metrics = read_metrics(Path(trainer.logger.log_dir) / "metrics.csv")  # rank 0 (the server) wrote it
    test = trainer.test(model, data, verbose=False)[0]
    staleness = [v for _, v in metrics.get("async/staleness_mean", [])]
    worst = max((v for _, v in metrics.get("async/staleness_max", [])), default=0.0)
    rate = [v for _, v in metrics.get("async/updates_per_s", metrics.get("hogwild/updates_per_s", []))]
    mean_staleness = sum(staleness) / len(staleness) if staleness else 0.0
    rows = [
        [
            args.strategy,
            args.devices,
            f"{mean_staleness:.2f}",
            f"{worst:.0f}",
            f"{sum(rate) / max(len(rate), 1):.0f}",
            f"{test['test_acc']:.4f}",
            f"{seconds:.1f}",
        ]
    ]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = metrics.get("async/worker_loss") or metrics.get("train_loss_step") or metrics.get("train_loss", [])
    axes[0].plot([s for s, _ in loss], [v for _, v in loss])
    axes[0].set(xlabel="global update", ylabel="training loss (pushing worker)", title=args.strategy)
    if staleness:
        axes[1].plot([s for s, _ in metrics["async/staleness_mean"]], staleness, label="mean")
        axes[1].plot(*zip(*metrics["async/staleness_max"], strict=True), label="max")
        axes[1].legend()
    axes[1].set(xlabel="global update", ylabel="staleness τ (updates)")
    figure.tight_layout()
    write(
        args.out,
        args.strategy,
        ["strategy", "processes", "mean staleness", "max staleness", "updates/s", "test accuracy", "fit seconds"],
        rows,
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "test": test,
            "mean_staleness": mean_staleness,
            "max_staleness": worst,
            "fit_seconds": seconds,
        },
        figure,
    )


if __name__ == "__main__":
    main()
