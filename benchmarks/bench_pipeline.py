"""Pipeline parallelism on 2 processes, one thread each: for every torch 2.13 schedule, the speedup over one
process of PipelineStrategy (ours, a Lightning Trainer) next to raw torch.distributed.pipelining with the same
schedule in the same run, against the bubble bound 2m/(m+1); the measured bubble from the timeline; parameter bytes
and peak RSS per rank against one process.

    python benchmarks/bench_pipeline.py            # 8 x (Linear(1024)+Tanh), batch 1024, m=4 -> benchmarks/results/
    python benchmarks/bench_pipeline.py --quick    # seconds, checks that it runs

The model: 8 blocks of Linear(d, d) + Tanh, MSE against a random target, SGD. Processes are started here (as
torchrun would) on gloo over 127.0.0.1; Lightning joins the process group they hold. A step's time is a cycle on
rank 0: from one step's start to the next one's, with both ranks at the start line (raw: a barrier; ours: the
strategy's per-step loss all-reduce), so the slower rank's whole step is counted for both contenders.
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import Bench, bench_parser
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.utils.data import DataLoader

from lightning_dl.parallel.pipeline import SCHEDULES, bubble_fraction, bubble_theory
from lightning_dl.plot import plot_pipeline_timeline
from lightning_dl.strategies.pipeline import PipelineStrategy

WORLD = 2


def make_blocks(dim: int, n_blocks: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(n_blocks)]


def make_batches(cfg: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], cfg["dim"], generator=generator)
    y = torch.randn(cfg["batch"], cfg["dim"], generator=generator)
    return [(x, y)] * (cfg["warmup"] + cfg["steps"])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class BenchNet(L.LightningModule):
    def __init__(self, dim: int, n_blocks: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*make_blocks(dim, n_blocks))

    def pipeline_blocks(self) -> list[nn.Module]:
        return list(self.net)

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # one process; the pipeline runs its own
        return self.pipeline_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    """Cycle times: from one batch's start to the next one's (the last: to its end), so that the time a rank waits
    for its peer, and Lightning's own work between batches, are counted."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, b: Any, i: int) -> None:
        self.end = time.perf_counter()

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.end], strict=True)]


def _one_process(cfg: dict) -> dict:
    model = nn.Sequential(*make_blocks(cfg["dim"], cfg["blocks"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for x, y in make_batches(cfg):
        start = time.perf_counter()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"step_s": statistics.median(times[cfg["warmup"] :]), "param_bytes": params, "peak_rss_mib": peak_rss_mib()}


def _raw(rank: int, cfg: dict, name: str) -> float:
    """torch.distributed.pipelining as its documentation uses it: stages of equal blocks, dynamic shapes."""
    spec = SCHEDULES[name]
    blocks = make_blocks(cfg["dim"], cfg["blocks"])
    per_rank = spec.default_stages_per_rank
    n_stages = WORLD * per_rank
    size = cfg["blocks"] // n_stages
    loop = [rank + k * WORLD for k in range(per_rank)]
    ids = sorted({rank, 2 * WORLD - 1 - rank}) if spec.placement == "v" else loop
    stages = [
        PipelineStage(nn.Sequential(*blocks[s * size : (s + 1) * size]), s, n_stages, torch.device("cpu")) for s in ids
    ]
    schedule = spec.cls(stages if spec.multi else stages[0], cfg["m"], loss_fn=F.mse_loss)
    params = [p for stage in stages for p in stage.submod.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    marks = []  # each step starts when both ranks are there: a cycle counts the slower rank's whole step
    for x, y in make_batches(cfg):
        dist.barrier()
        marks.append(time.perf_counter())
        schedule.step(*((x,) if 0 in ids else ()), target=y if n_stages - 1 in ids else None)
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    marks.append(time.perf_counter())
    times = [b - a for a, b in itertools.pairwise(marks)]
    return statistics.median(times[cfg["warmup"] :])


def _ours(cfg: dict, name: str) -> tuple[float, PipelineStrategy, L.LightningModule]:
    """PipelineStrategy in a Lightning Trainer: the median step time (batch start to batch end, Lightning's loop
    included), the strategy (its timeline) and the module."""
    timer = StepTimer()
    module = BenchNet(cfg["dim"], cfg["blocks"])
    strategy = PipelineStrategy(schedule=name, n_microbatches=cfg["m"], record_timeline=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=cfg["warmup"] + cfg["steps"],
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, DataLoader(make_batches(cfg), batch_size=None))
    return statistics.median(timer.times[cfg["warmup"] :]), strategy, module


def _both(rank: int, cfg: dict) -> dict:
    """``rounds`` rounds over the schedules; in each, one process (rank 0 alone), raw torch and ours run back to back
    in the same processes (their order alternating between rounds), so that all three meet the same machine load.
    The medians over rounds are reported, and the ratio ours/raw is the median of the per-round ratios."""
    names = ["1f1b", *(s for s in cfg["schedules"] if s != "1f1b")]  # 1f1b first: its memory is reported
    rounds: list[dict[str, dict[str, float]]] = []
    out: dict[str, Any] = {"bubble": {}}
    for index in range(cfg["rounds"]):
        this: dict[str, dict[str, float]] = {"one": {}, "raw": {}, "ours": {}}
        for name in names:
            if rank == 0:
                this["one"][name] = _one_process(cfg)["step_s"]
            dist.barrier()
            for contender in ("raw", "ours") if index % 2 == 0 else ("ours", "raw"):
                if contender == "raw":
                    this["raw"][name] = _raw(rank, cfg, name)
                    continue
                this["ours"][name], strategy, module = _ours(cfg, name)
                if index == 0:  # the bubble and the memory from the first round's runs
                    events = [e for e in strategy.gather_timeline() if e.step >= cfg["warmup"]]
                    out["bubble"][name] = bubble_fraction(events)
                    if name == "1f1b":
                        out["timeline"] = events
                        out["param_bytes"] = sum(p.numel() * p.element_size() for p in module.parameters())
                        out["peak_rss_mib"] = peak_rss_mib()
        rounds.append(this)
    out["rounds"] = rounds
    timed = ("one", "raw", "ours") if rank == 0 else ("raw", "ours")  # one process runs on rank 0 only
    for key in timed:
        out[key] = {n: statistics.median(r[key][n] for r in rounds) for n in names}
    out["ours_over_raw"] = {n: statistics.median(r["raw"][n] / r["ours"][n] for r in rounds) for n in names}
    return out


def _worker(rank: int, cfg: dict, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": str(rank), "LOCAL_RANK": str(rank),
         "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD), "NODE_RANK": "0"}
    )  # fmt: skip
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=600)
    )
    try:
        result = _both(rank, cfg)
        torch.save(result, Path(tmp) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(cfg: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(cfg, tmp), nprocs=WORLD, join=True)
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(WORLD)]


def _one_process_worker(_: int, cfg: dict, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.save(_one_process(cfg), Path(tmp) / "single.pt")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warmup steps)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all schedules; medians are reported")
    args = parser.parse_args()
    bench = Bench("pipeline", args)
    cfg = {"dim": 1024, "blocks": 8, "batch": 1024, "m": 4, "warmup": 2, "steps": args.steps, "rounds": args.rounds}
    cfg["schedules"] = list(SCHEDULES)
    if bench.quick:  # one schedule of each placement
        cfg.update(dim=32, batch=16, warmup=1, steps=2, rounds=2, schedules=["1f1b", "zbv_zero_bubble"])
    with tempfile.TemporaryDirectory() as tmp:  # its own process, for its own peak RSS
        mp.spawn(_one_process_worker, args=(cfg, tmp), nprocs=1, join=True)
        single = torch.load(Path(tmp) / "single.pt", weights_only=False)
    ours_ranks = run(cfg)
    ours = ours_ranks[0]
    raw, baseline = ours["raw"], ours["one"]
    bound = 2 * cfg["m"] / (cfg["m"] + 1)
    rows = {}
    print(
        f"bubble bound on 2 stages: {bound:.2f}x; medians of {cfg['rounds']} rounds, each timing one process, raw "
        "torch and ours back to back per schedule; ours/raw is the median of the per-round ratios"
    )
    print(f"{'schedule':<24}{'1 proc ms':>10}{'raw torch':>11}{'ours':>9}{'ours/raw':>10}{'of bound':>10}{'bubble':>9}")
    for name in cfg["schedules"]:
        raw_speedup = baseline[name] / raw[name]
        ours_speedup = baseline[name] / ours["ours"][name]
        ratio = ours["ours_over_raw"][name]
        rows[name] = {
            "one_process_step_s": baseline[name],
            "raw_step_s": raw[name],
            "ours_step_s": ours["ours"][name],
            "raw_speedup": raw_speedup,
            "ours_speedup": ours_speedup,
            "ours_over_raw": ratio,
            "rounds": {k: [r[k][name] for r in ours["rounds"]] for k in ("one", "raw", "ours")},
            "ours_fraction_of_bound": ours_speedup / bound,
            "measured_bubble": ours["bubble"][name],
        }
        print(
            f"{name:<24}{baseline[name] * 1e3:>10.0f}{raw_speedup:>10.2f}x{ours_speedup:>8.2f}x"
            f"{ratio:>10.2f}{ours_speedup / bound:>10.0%}{ours['bubble'][name]:>9.1%}"
        )
    memory = {
        "one_process": {"param_bytes": single["param_bytes"], "peak_rss_mib": single["peak_rss_mib"]},
        "pipeline_ranks": [{"param_bytes": r["param_bytes"], "peak_rss_mib": r["peak_rss_mib"]} for r in ours_ranks],
    }
    print(f"parameter bytes: one process {single['param_bytes']}, per rank {[r['param_bytes'] for r in ours_ranks]}")
    print(f"peak RSS MiB: one process {single['peak_rss_mib']:.0f}, per rank "
          f"{[round(r['peak_rss_mib']) for r in ours_ranks]}")  # fmt: skip
    bench.write_json(
        {
            "config": cfg,
            "one_process_step_s_separate_process": single["step_s"],
            "bubble_bound_speedup": bound,
            "bubble_theory": bubble_theory(WORLD, cfg["m"]),
            "schedules": rows,
            "memory": memory,
        }
    )
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    names = cfg["schedules"]
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs], [rows[n]["raw_speedup"] for n in names], 0.4, label="raw torch.distributed.pipelining"
    )
    ax.bar([x + 0.2 for x in xs], [rows[n]["ours_speedup"] for n in names], 0.4, label="PipelineStrategy (Lightning)")
    ax.axhline(bound, color="k", linestyle="--", label=f"bubble bound 2m/(m+1) = {bound:.2f}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylabel("speedup over one process")
    load = os.getloadavg()[0]
    ax.set_title(f"2 stages, m={cfg['m']}, d={cfg['dim']}, batch {cfg['batch']}; load average {load:.1f}")
    ax.legend(fontsize=8)
    bench.save_figure(fig, "pipeline.png")
    path, measured, theory = plot_pipeline_timeline(
        ours["timeline"], bench.out / "pipeline_timeline.png", n_microbatches=cfg["m"], title="1F1B, 2 ranks"
    )
    print(f"wrote {path} (bubble {measured:.1%} measured, {theory:.1%} theory)")


if __name__ == "__main__":
    main()
