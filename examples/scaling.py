"""The scaling report: one model and one global batch trained under a list of layouts (one process, dp2, tp2, pp2,
dp2 x pp2, dp2 x tp2, dp4), every layout of more than one process by ``HybridStrategy(layout=...)``, each measured
by the ``ScalingEfficiency`` callback: step time T_N, samples per second, E_N = T_1 / (N · T_N) (T_1 from one
process trained just before the layout, as a shared machine's load drifts; ``--no-pair-reference``: from the list's
one-process layout), peak RSS per rank, training time to a target validation loss and the validation loss against
training time. Also what the machine can give: its cores and the contention ceiling of two independent one-process
trainings run at once (no communication at all), so a strategy's loss can be told from the machine's. Writes a table
in the lecture's form ("configuration — time to reach the target"), JSON (with the load average before and after
each layout) and PNG.

    python examples/scaling.py                        # or: lightning-dl run scaling
    python examples/scaling.py --layouts "1;dp2;pp2"

Every process runs one torch thread. A layout is a ``ParallelLayout`` string; ``1`` is one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import write  # examples/ is on sys.path when a recipe runs
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dl.callbacks import ScalingEfficiency
from lightning_dl.callbacks.scaling_efficiency import efficiency
from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule
from lightning_dl.parallel.comm import leave_together
from lightning_dl.parallel.layout import ParallelLayout

LAYOUTS = ("1", "dp2", "tp2", "pp2", "dp2,pp2", "dp2,tp2", "dp4")
MICROBATCHES = 4


def parse_layout(text: str) -> ParallelLayout:
    """``"1"`` is one process; anything else is read by :meth:`ParallelLayout.parse`."""
    return ParallelLayout() if text.strip() == "1" else ParallelLayout.parse(text)


def layout_name(layout: ParallelLayout) -> str:
    parts = [f"{dim}{getattr(layout, dim)}" for dim in ("dp", "tp", "pp") if getattr(layout, dim) > 1]
    return " x ".join(parts) if parts else "1 process"


def strategy_for(layout: ParallelLayout) -> Any:
    """The strategy that trains ``layout``: ``HybridStrategy(layout=...)`` for every layout of more than one process
    (one engine: pipeline stages, TP on each stage, all-reduce over dp; 1F1B over ``MICROBATCHES`` micro-batches
    where pp > 1), Lightning's default for one process."""
    from lightning_dl.strategies import HybridStrategy

    if layout.world_size == 1:
        return "auto"
    return HybridStrategy(layout=layout, schedule="1f1b", n_microbatches=MICROBATCHES)


def describe(strategy: Any) -> str:
    """How a layout was trained, for the report: the strategy's class, its layout and, where a pipeline runs
    (pp > 1), its schedule."""
    if isinstance(strategy, str):
        return strategy
    layout = getattr(strategy, "parallel_layout", None)
    parts = [f"layout={str(layout)!r}"]
    if layout is not None and layout.pp > 1:
        parts += [f"schedule={strategy.schedule!r}", f"n_microbatches={strategy.n_microbatches}"]
    return f"{type(strategy).__name__}({', '.join(parts)})"


def _fit(layout: ParallelLayout, args: argparse.Namespace) -> dict[str, Any]:
    """Train the model under ``layout`` in this process (one rank of it); returns the callback's report."""
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=args.batch_size // layout.dp, seed=0)
    data.setup("fit")
    per_replica = args.batch_size // layout.dp
    dataset = data.train_dataloader().dataset
    # one process reads the order Lightning's DistributedSampler (seed 0) gives every other layout: the same global
    # batches in the same order everywhere, so the curves differ by speed only (and float rounding)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0) if layout.dp == 1 else None
    train = DataLoader(dataset, batch_size=per_replica, sampler=sampler, shuffle=sampler is None, drop_last=True)
    val = DataLoader(data.val_dataloader().dataset, batch_size=per_replica, drop_last=True)
    callback = ScalingEfficiency(warmup_steps=args.warmup_steps, target=args.target)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=layout.world_size,
        strategy=strategy_for(layout),
        max_epochs=args.epochs,
        val_check_interval=args.val_every,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    module = ClassifierModule(hidden_sizes=args.hidden, dropout=0.0, optimizer="adamw", lr=args.lr)
    trainer.fit(module, train, val)
    report = callback.report
    if report is None or report.global_batch_size != args.batch_size:
        raise RuntimeError(
            f"layout {layout}: the callback measured a global batch of "
            f"{None if report is None else report.global_batch_size}, the recipe asked for {args.batch_size}."
        )
    return report.as_dict() | {"strategy": describe(trainer.strategy if layout.world_size > 1 else "auto")}


def _rank(rank: int, tmp: str, text: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    layout = parse_layout(text)
    world = layout.world_size
    if world > 1:
        os.environ.update(
            {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": str(rank), "LOCAL_RANK": str(rank)}
            | {"NODE_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
        )
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=300)
        )
    report = _fit(layout, args)
    if rank == 0:
        Path(tmp, "report.json").write_text(json.dumps(report))
    leave_together(timedelta(seconds=30))  # a rank that left alone could abort a peer still talking to it


def _independent(index: int, tmp: str, args: argparse.Namespace) -> None:
    """One of several one-process trainings started at once, sharing nothing but the machine."""
    torch.set_num_threads(1)
    Path(tmp, f"independent{index}.json").write_text(json.dumps(_fit(ParallelLayout(), args)))


def _spawn(fn: Callable[..., None], nprocs: int, args: tuple, timeout: float) -> None:
    """``mp.spawn`` bounded by ``timeout`` seconds: processes still running then are killed and it raises."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    assert context is not None
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {nprocs} processes still ran after {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def run_layout(text: str, args: argparse.Namespace) -> dict[str, Any]:
    layout = parse_layout(text)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lightning_dl_scaling_") as tmp:
        _spawn(_rank, layout.world_size, (tmp, text, args), args.timeout)
        report = json.loads(Path(tmp, "report.json").read_text())
    return report | {
        "layout": str(layout),
        "name": layout_name(layout),
        "load_before": list(load),
        "load_after": list(os.getloadavg()),
    }


def contention(args: argparse.Namespace) -> dict[str, Any]:
    """One one-process training alone, then two independent ones at once, then one alone again, back to back (the
    machine's other load changes over minutes, and one run alone moved by a quarter between runs): the step time
    each gets when the machine runs both, against the mean of the two runs alone."""
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lightning_dl_scaling_") as tmp:

        def steps(nprocs: int) -> list[float]:
            _spawn(_independent, nprocs, (tmp, args), args.timeout)
            return [json.loads(Path(tmp, f"independent{i}.json").read_text())["step_seconds"] for i in range(nprocs)]

        first = steps(1)
        pair = steps(2)
        alone = first + steps(1)
    mean_alone = sum(alone) / len(alone)
    ceiling = efficiency(2 * mean_alone, sum(pair) / len(pair), 2)  # two steps' work, done in one step's time at best
    return {
        "alone_step_seconds": mean_alone,
        "alone_runs_step_seconds": alone,
        "step_seconds": pair,
        "ceiling_E2": ceiling,
        "load_before": list(load),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default=";".join(LAYOUTS), help=f"';'-separated layouts, default {LAYOUTS}")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch, the same for every layout")
    parser.add_argument("--hidden", default="2048,2048,2048", help="MLP hidden sizes")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--target", type=float, default=0.2, help="validation loss to reach")
    parser.add_argument("--val-every", type=int, default=5, help="validate every this many training batches")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of T_N")
    parser.add_argument("--skip-contention", action="store_true", help="do not measure two independent processes")
    parser.add_argument(
        "--pair-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train one process just before each layout of several and take E_N against that T_1 (a shared "
        "machine's load changes between layouts)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any one layout may take")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args()
    texts = [t.strip() for t in args.layouts.split(";") if t.strip()]
    try:
        args.hidden = [int(h) for h in args.hidden.split(",")]
        layouts = [parse_layout(t) for t in texts]
        for layout in layouts:
            strategy_for(layout)
    except ValueError as err:
        parser.error(f"--layouts / --hidden: {err}")
    if not layouts:
        parser.error("--layouts names no layout")
    for layout in layouts:
        if args.batch_size % (layout.dp * MICROBATCHES):
            parser.error(
                f"--batch-size {args.batch_size} must divide by dp × {MICROBATCHES} micro-batches for layout {layout}"
            )
    if args.epochs < 1 or args.val_every < 1 or args.warmup_steps < 0 or min(args.hidden) < 1:
        parser.error("--epochs >= 1, --val-every >= 1, --warmup-steps >= 0, --hidden sizes >= 1")
    load_start = os.getloadavg()
    results = []
    for text in texts:
        reference = None
        if args.pair_reference and parse_layout(text).world_size > 1:
            print(f"one process, just before layout {text}: training {args.epochs} epochs", flush=True)
            reference = run_layout("1", args)
        print(f"layout {text}: training {args.epochs} epochs", flush=True)
        results.append(run_layout(text, args))
        if reference is not None:
            keep = ("step_seconds", "step_seconds_median", "seconds_to_target", "load_before", "load_after")
            results[-1]["reference"] = {key: reference[key] for key in keep}
    machine = {"cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "threads_per_process": 1}
    if not args.skip_contention:
        print("two independent one-process trainings at once", flush=True)
        machine["two_independent"] = contention(args)
    report(results, machine, args, load_start)


def report(results: list[dict], machine: dict, args: argparse.Namespace, load_start: tuple[float, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = next((r for r in results if r["world_size"] == 1), None)
    first_t_1 = one["step_seconds"] if one else None
    for r in results:
        # E_N against the one-process run just before the layout where there is one (the machine's other load
        # changes over minutes), else against the one-process layout of the list
        t_1 = r["reference"]["step_seconds"] if "reference" in r else first_t_1
        r["t_1"] = t_1
        r["efficiency"] = efficiency(t_1, r["step_seconds"], r["world_size"]) if t_1 else None
        r["efficiency_first_t_1"] = efficiency(first_t_1, r["step_seconds"], r["world_size"]) if first_t_1 else None
    header = ["configuration", f"time to val loss {args.target} (s)", "N", "T_N (ms)", "T_1 (ms)", "E_N",
              "samples/s", "peak RSS per rank (MiB)", "final val loss"]  # fmt: skip
    rows = []
    for r in results:
        reached = r["seconds_to_target"]
        rows.append(
            [
                r["name"],
                f"{reached:.1f}" if reached is not None else "not reached",
                r["world_size"],
                f"{1000 * r['step_seconds']:.1f}",
                f"{1000 * r['t_1']:.1f}" if r["t_1"] else "-",
                f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-",
                f"{r['samples_per_second']:.0f}",
                ", ".join(f"{b / 2**20:.0f}" for b in r["peak_rss_bytes"]),
                f"{r['curve'][-1][2]:.3f}" if r["curve"] else "-",
            ]
        )
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        curves.plot([t for _, t, _ in r["curve"]], [v for _, _, v in r["curve"]], marker=".", label=r["name"])
    curves.axhline(args.target, color="grey", linestyle=":")
    curves.set(xlabel="training seconds", ylabel="validation loss", yscale="log", title="validation loss vs time")
    curves.legend(fontsize=8)
    names = [r["name"] for r in results]
    values = [r["efficiency"] if r["efficiency"] is not None else math.nan for r in results]
    bars.bar(names, values, color="tab:blue")
    ceiling = machine.get("two_independent", {}).get("ceiling_E2")
    if ceiling is not None:
        bars.axhline(ceiling, color="tab:red", linestyle="--", label=f"2 independent processes: {ceiling:.2f}")
        bars.legend(fontsize=8)
    paired = any("reference" in r for r in results)
    title = f"efficiency, {machine['usable_cpus']} cores" + (", T_1 just before each layout" if paired else "")
    bars.set(ylabel="E_N = T_1 / (N T_N)", title=title)
    bars.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    payload = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "layouts": results,
        "machine": machine,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
    }
    write(args.out, "scaling", header, rows, payload, figure)
    print(f"\nmachine: {machine['usable_cpus']} usable cores, load average {load_start[0]:.1f} at start")
    if ceiling is not None:
        alone, pair = machine["two_independent"]["alone_step_seconds"], machine["two_independent"]["step_seconds"]
        print(
            f"two independent processes: {1000 * alone:.1f} ms/step alone (mean of a run before and one after), "
            f"{', '.join(f'{1000 * s:.1f}' for s in pair)} ms/step at once: E_2 ceiling {ceiling:.2f}"
        )


if __name__ == "__main__":
    main()
