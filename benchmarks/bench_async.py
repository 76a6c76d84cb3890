"""Time to a target training loss on digits for synchronous DDP (``ddp_spawn``), ``async_sgd`` and ``hogwild`` with
the same number of worker processes, without and with one worker slowed 3x (a sleep of twice its measured step
time after each of its batches); then the parameter server's updates per second as workers go from 1 to 3.
Prints ratios (ours / DDP) and absolute figures; writes async.json, async_loss.png (smoothed loss against wall time
per contender) and async_staleness.png (staleness histogram) to ``--out`` (default benchmarks/results).

    python benchmarks/bench_async.py [--workers 2] [--target 0.5] [--quick] [--out DIR]

``--quick`` runs the straggler case only, with two workers, a few batches each, and leaves out the server's
throughput (the same ``run`` as the ``async_sgd`` contender, one process start fewer): it checks the script, not the
timings (the target is then seldom reached: its times are NaN).
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.distributed as dist
from _common import Bench, bench_parser  # benchmarks/ is on sys.path when a benchmark runs
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule
from lightning_dl.strategies import AsyncSGDStrategy

GOALS = {"straggler": 0.6, "no straggler": 1.3}  # async_sgd time to target / DDP's


class Straggler(L.Callback):
    """Slows one rank: after each of its batches it sleeps ``factor - 1`` times the time the batch took."""

    def __init__(self, rank: int | None, factor: float = 3.0) -> None:
        self.rank, self.factor, self.start = rank, factor, 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank:
            time.sleep((self.factor - 1) * (time.perf_counter() - self.start))


class LossClock(L.Callback):
    """On rank 0: the smoothed training loss (EMA, β = 0.9) against wall time since training started, the time it
    first fell below ``target``, and the server's staleness counts; all returned through ``callback_metrics``."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0, self.ema, self.curve, self.hit = time.perf_counter(), None, [], float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0 or outputs is None:
            return
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        now = time.perf_counter() - self.t0
        self.curve.append((now, self.ema))
        if self.ema < self.target and self.hit != self.hit:
            self.hit = now

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        seconds = time.perf_counter() - self.t0
        trainer.callback_metrics["bench/curve"] = torch.tensor(self.curve)
        trainer.callback_metrics["bench/hit"] = torch.tensor(self.hit)
        trainer.callback_metrics["bench/seconds"] = torch.tensor(seconds)
        trainer.callback_metrics["bench/updates_per_s"] = torch.tensor(trainer.global_step / seconds)
        server = getattr(trainer.strategy, "_server", None)
        if server is not None:
            counts = server.staleness_counts
            trainer.callback_metrics["bench/staleness"] = torch.tensor(
                [counts.get(t, 0) for t in range(max(counts, default=0) + 1)]
            )


class _TogetherDDP(DDPStrategy):
    """Lightning's ``ddp_spawn`` whose processes leave the process group together: with a straggler, the faster rank
    otherwise exits first and its closed sockets can abort the slower rank's gloo threads at exit (SIGABRT,
    "terminate called without an active exception"), after the run itself has finished."""

    @override
    def teardown(self) -> None:
        super().teardown()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def run(
    strategy, devices: int, *, straggler: int | None, target: float, epochs: int, lr: float, batches: int | None = None
) -> dict:
    """One fit on digits; ``batches`` caps the training batches per epoch of each process (all when None)."""
    L.seed_everything(0)
    clock = LossClock(target)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        limit_train_batches=batches,
        num_sanity_val_steps=0,
        callbacks=[clock, Straggler(straggler)],
    )
    trainer.fit(ClassifierModule(optimizer="sgd", lr=lr), DigitsDataModule(batch_size=32))
    m = trainer.callback_metrics
    return {
        "time_to_target_s": float(m["bench/hit"]),
        "fit_s": float(m["bench/seconds"]),
        "updates_per_s": float(m["bench/updates_per_s"]),
        "curve": m["bench/curve"].tolist(),
        "staleness_counts": m["bench/staleness"].tolist() if "bench/staleness" in m else None,
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2, help="worker processes of every contender")
    parser.add_argument("--target", type=float, default=0.5, help="smoothed training loss to reach")
    parser.add_argument("--epochs", type=int, default=8, help="budget; the target is reached well before")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    if args.workers < 1 or args.epochs < 1:
        parser.error(f"--workers and --epochs must be >= 1, got {args.workers} and {args.epochs}")
    if not (args.target > 0 and args.lr > 0):
        parser.error(f"--target and --lr must be > 0, got {args.target} and {args.lr}")
    bench = Bench("async", args)
    batches = None
    if bench.quick:
        args.workers, args.epochs, batches = 2, 1, 4  # hogwild needs 2 processes
    w = args.workers
    contenders = {
        "ddp": (lambda: _TogetherDDP(start_method="spawn"), w, w - 1),
        "async_sgd": (AsyncSGDStrategy, w + 1, w),  # rank 0 is the server; ranks 1..w the workers
        "hogwild": (lambda: "hogwild", w, w - 1),
    }
    results: dict = {}
    for case in ("straggler",) if bench.quick else ("no straggler", "straggler"):
        results[case] = {}
        for name, (strategy, devices, slow_rank) in contenders.items():
            r = run(
                strategy(),
                devices,
                straggler=slow_rank if case == "straggler" else None,
                target=args.target,
                epochs=args.epochs,
                lr=args.lr,
                batches=batches,
            )
            results[case][name] = r
            print(
                f"{case:>13} {name:>9}: target at {r['time_to_target_s']:6.2f} s, fit {r['fit_s']:6.2f} s, "
                f"{r['updates_per_s']:7.1f} updates/s",
                flush=True,
            )
    throughput = {}
    for workers in () if bench.quick else (1, 2, 3):
        r = run(
            AsyncSGDStrategy(), workers + 1, straggler=None, target=args.target, epochs=2, lr=args.lr, batches=batches
        )
        throughput[workers] = r["updates_per_s"]
        print(f"server with {workers} worker(s): {r['updates_per_s']:.1f} updates/s", flush=True)
    ratios = {}
    print()
    for case in results:
        ddp = results[case]["ddp"]["time_to_target_s"]
        for name in ("async_sgd", "hogwild"):
            ratio = results[case][name]["time_to_target_s"] / ddp
            ratios[f"{name} / ddp, {case}"] = ratio
            goal = GOALS[case] if name == "async_sgd" and not bench.quick else None
            verdict = "" if goal is None else f"  (goal <= {goal}: {'met' if ratio <= goal else 'NOT met'})"
            print(f"{case:>13}: {name} / ddp time to target = {ratio:.3f}{verdict}")
    payload = {
        "results": results,
        "ratios": ratios,
        "server_updates_per_s": throughput,
        "goals": GOALS,
    }
    print()
    bench.write_json(payload)
    loss, staleness = plot(payload, target=args.target)
    bench.save_figure(loss, "async_loss.png")
    bench.save_figure(staleness, "async_staleness.png")


def plot(payload: dict, *, target: float) -> tuple:
    """The loss-against-time figure and the staleness histogram."""
    import matplotlib.pyplot as plt

    cases = list(payload["results"])
    figure, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4), sharey=True, squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        for name, r in payload["results"][case].items():
            curve = r["curve"]
            ax.plot([t for t, _ in curve], [v for _, v in curve], label=name)
        ax.axhline(target, color="grey", linestyle=":")
        ax.set(xlabel="wall time (s)", title=case, yscale="log")
        ax.legend()
    axes[0, 0].set_ylabel("training loss (EMA, rank 0)")
    figure.tight_layout()
    histogram, ax = plt.subplots(figsize=(6, 3.5))
    for case in payload["results"]:
        counts = payload["results"][case]["async_sgd"]["staleness_counts"] or []
        ax.bar([t + (0.2 if case == "straggler" else -0.2) for t in range(len(counts))], counts, width=0.4, label=case)
    ax.set(xlabel="staleness τ (updates)", ylabel="pushes", title="async_sgd staleness")
    ax.legend()
    histogram.tight_layout()
    return figure, histogram


if __name__ == "__main__":
    main()
