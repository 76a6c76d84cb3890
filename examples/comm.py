"""Communication-efficient data parallel on digits with 2 processes: for ``ddp`` and each strategy (local SGD, DiLoCo,
PowerSGD, int8, sign, ZeRO-1/2/3), the training time to a target validation accuracy and the final validation
accuracy, averaged over seeds: the speed each buys and what it costs in accuracy. Writes a table, JSON and PNG.

    python examples/comm.py                  # or: lightning-dl run comm
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import write  # examples/ is on sys.path when a recipe runs

from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule

STRATEGIES = (
    "ddp",
    "local_sgd",
    "diloco",
    "ddp_powersgd",
    "ddp_int8",
    "ddp_sign",
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero3",
)
WORLD = 2


class Clock(L.Callback):
    """Training seconds (batches only, validation excluded) and the validation accuracy averaged over the ranks
    (each rank validates its half of the split with its own parameters) at every epoch end."""

    def __init__(self) -> None:
        self.train_seconds, self.curve = 0.0, []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.train_seconds += time.perf_counter() - self._start

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        accuracy = trainer.strategy.reduce(trainer.callback_metrics["val_acc"].detach().clone(), reduce_op="mean")
        self.curve.append((self.train_seconds, float(accuracy)))


def fit_once(strategy: str, seed: int, args: argparse.Namespace) -> dict:
    L.seed_everything(seed, verbose=False)
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    module = ClassifierModule(hidden_sizes=args.hidden, dropout=0.0, optimizer="momentum", lr=args.lr)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=args.batch_size, seed=0))
    hit = next((seconds for seconds, acc in clock.curve if acc >= args.target), float("nan"))
    return {"seed": seed, "curve": clock.curve, "seconds_to_target": hit, "train_seconds": clock.train_seconds}


def _rank(rank: int, tmp: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        | {"NODE_RANK": "0", "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD)}
    )
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300)
    )
    import lightning_dl  # noqa: F401 - registers the strategy names

    warm = argparse.Namespace(**(vars(args) | {"epochs": 1}))
    fit_once("ddp", 0, warm)  # discarded: the first fit in a process pays one-off start-up costs
    results = {}
    for strategy in args.strategies:
        if rank == 0:
            print(f"{strategy}: {args.seeds} seed(s) x {args.epochs} epochs", flush=True)
        results[strategy] = [fit_once(strategy, seed, args) for seed in range(args.seeds)]
    if rank == 0:
        torch.save(results, Path(tmp) / "results.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {STRATEGIES}")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="runs per strategy, averaged (seeds 0..n-1)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument(
        "--hidden",
        default="1024,1024",
        help="MLP hidden sizes: wide enough (1.1M parameters) that the all-reduce counts",
    )
    parser.add_argument("--target", type=float, default=0.9, help="validation accuracy to reach")
    parser.add_argument("--out", type=Path, default=Path("runs/comm"))
    args = parser.parse_args()
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        args.hidden = [int(h) for h in args.hidden.split(",")]
    except ValueError:
        parser.error(f"--hidden must be comma-separated integers, got {args.hidden!r}")
    if not args.hidden or min(args.hidden) < 1:
        parser.error(f"--hidden sizes must be >= 1, got {args.hidden}")
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        parser.error(f"--strategies must name some of {STRATEGIES}, got {unknown or 'none'}")
    for name in ("epochs", "seeds", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0 or not 0 < args.target <= 1:
        parser.error(f"--lr must be > 0 and --target in (0, 1], got {args.lr} and {args.target}")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lightning_dl_comm_") as tmp:
        mp.spawn(_rank, args=(tmp, args), nprocs=WORLD, join=True)
        results = torch.load(Path(tmp) / "results.pt", weights_only=False)
    report(results, args, load_start)


def report(results: dict, args: argparse.Namespace, load_start: tuple[float, float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(values: list[float]) -> float:
        finite = [v for v in values if v == v]
        return sum(finite) / len(finite) if finite else float("nan")

    summary = {}
    for strategy, seeds in results.items():
        summary[strategy] = {
            "seconds_to_target": mean([s["seconds_to_target"] for s in seeds]),
            "seeds_reaching_target": sum(s["seconds_to_target"] == s["seconds_to_target"] for s in seeds),
            "final_val_acc": mean([s["curve"][-1][1] for s in seeds]),
            "train_seconds": mean([s["train_seconds"] for s in seeds]),
        }
    base = summary.get("ddp")
    header = ["strategy", f"s to val acc {args.target}", "reached", "speed-up vs ddp", "final val acc", "vs ddp",
              "train s"]  # fmt: skip
    rows = []
    for strategy, row in summary.items():
        speed = base["seconds_to_target"] / row["seconds_to_target"] if base else float("nan")
        rows.append(
            [
                strategy,
                f"{row['seconds_to_target']:.2f}" if row["seeds_reaching_target"] else "not reached",
                f"{row['seeds_reaching_target']}/{args.seeds}",
                f"{speed:.2f}x" if speed == speed else "-",
                f"{row['final_val_acc']:.4f}",
                f"{row['final_val_acc'] - base['final_val_acc']:+.4f}" if base else "",
                f"{row['train_seconds']:.1f}",
            ]
        )
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for strategy, seeds in results.items():
        curve = seeds[0]["curve"]
        axis.plot([s for s, _ in curve], [a for _, a in curve], marker=".", label=strategy)
    axis.axhline(args.target, color="grey", linestyle=":")
    axis.set(xlabel="training seconds (seed 0)", ylabel="validation accuracy", title="digits, 2 processes")
    axis.legend(fontsize=8)
    figure.tight_layout()
    payload = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "runs": results,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
    }
    write(args.out, "comm", header, rows, payload, figure)


if __name__ == "__main__":
    main()
