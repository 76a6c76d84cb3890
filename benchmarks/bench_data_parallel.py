"""Data-parallel efficiency on 2 CPU ranks (gloo, one thread per rank) of an MLP 1024-2048-2048-10, batch 64 per
rank: E₂ = S₂ / (2·S₁) (samples/s of 2 ranks over twice those of one process) and bytes handed to collectives per
step, for raw torch DDP, Lightning's ``ddp``, ``local_sgd`` (H = 4, 16), ``diloco`` (H = 16), ``ddp_powersgd``
(rank 4), ``ddp_int8``, ``ddp_sign`` and ZeRO-1/2, with two independent processes as the ceiling and raw torch DDP
with torch's own ``powerSGD_hook`` (rank 4) as a reference for ``ddp_powersgd``. Every contender
runs in the same two processes; ``--rounds`` rounds go over all of them in turn (one process alone included) and
the median round is reported, so that load from elsewhere hits every contender alike. Prints ratios (ours / DDP)
and absolute figures; writes data_parallel.json and data_parallel.png.

    python benchmarks/bench_data_parallel.py [--steps 32] [--rounds 5] [--only ddp_sign,ddp_powersgd]
        [--torch-hooks] [--quick] [--out DIR]
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import Bench, bench_parser
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

GOALS = {"local_sgd H=16": 0.75, "diloco H=16": 0.75, "ddp_powersgd r=4": 0.65, "ddp_sign": 0.65}
# (label, strategy name or class path, keyword arguments); built inside each rank
CONTENDERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ddp", "ddp", {}),
    ("local_sgd H=4", "local_sgd", {"sync_every": 4}),
    ("local_sgd H=16", "local_sgd", {"sync_every": 16}),
    ("diloco H=16", "diloco", {"sync_every": 16}),
    ("ddp_powersgd r=4", "ddp_powersgd", {"rank": 4}),
    ("ddp_int8", "ddp_int8", {}),
    ("ddp_sign", "ddp_sign", {}),
    ("ddp_sign, DDP's buckets", "ddp_sign", {"bucket_cap_mb": None}),  # a first bucket of 1 MB, then 25 MiB
    ("deepspeed_zero1", "deepspeed_zero1", {}),
    ("deepspeed_zero2", "deepspeed_zero2", {}),
)
TORCH_ROWS = ("independent", "torch DDP", "torch powerSGD_hook r=4")
"""Raw torch rows: their E₂ is relative to one raw torch process."""
_COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce")


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class Classifier(L.LightningModule):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(sizes)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def stamp() -> tuple[float, float]:
    """Wall time and this process's CPU time (every thread: compute, gloo, hooks)."""
    return time.perf_counter(), time.process_time()


class StepClock(L.Callback):
    """Wall and CPU time at the end of every training batch."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(stamp())


def per_step(ends: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Wall and CPU seconds per step over the steps after ``warmup``. On a loaded machine the CPU seconds (what the
    process computed, in every thread) still compare contenders; the wall seconds also count waiting."""
    steps = len(ends) - warmup
    return (ends[-1][0] - ends[warmup - 1][0]) / steps, (ends[-1][1] - ends[warmup - 1][1]) / steps


def dataset(cfg: dict, ranks: int) -> TensorDataset:
    n = (cfg["warmup"] + cfg["steps"]) * cfg["batch"] * ranks
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, cfg["sizes"][0], generator=generator), torch.randint(0, 10, (n,)))


def torch_loop(model: nn.Module, cfg: dict, ranks: int, counter: dict | None = None) -> tuple[float, float]:
    """Wall and CPU seconds per step of a plain torch training loop (DDP when ``model`` is wrapped). With ``counter``
    (from ``count_collectives``), ``counter["timed_bytes"]`` becomes the bytes counted during the timed steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = dataset(cfg, 1).tensors
    ends = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        if counter is not None and step == cfg["warmup"]:
            counter["timed_bytes"] = -counter["bytes"]
        batch = slice(step * cfg["batch"], (step + 1) * cfg["batch"])
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        ends.append(stamp())
    if counter is not None:
        counter["timed_bytes"] += counter["bytes"]
    return per_step(ends, cfg["warmup"])


def torch_powersgd(cfg: dict, world: int) -> tuple[tuple[float, float], float]:
    """Raw torch DDP with torch's own ``powerSGD_hook`` (rank 4, error feedback, warm start; compressing from the
    third step on, within the warm-up): a reference for ``ddp_powersgd``. Returns (wall, CPU) seconds and bytes per
    step. One bucket for the whole model: torch's hook issues its second all-reduce from a future's callback, and
    with several buckets on gloo the ranks then order their collectives differently (seen here: gloo aborts with
    "Received data size doesn't match expected size")."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    model = nn.parallel.DistributedDataParallel(mlp(cfg["sizes"]), bucket_cap_mb=64)
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
    model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    with count_collectives() as counter:
        seconds = torch_loop(model, cfg, world, counter)
    return seconds, counter["timed_bytes"] / cfg["steps"]


@contextmanager
def count_collectives():
    """Count the bytes of the tensors handed to torch.distributed's Python collectives (DeepSpeed calls them)."""
    counter = {"bytes": 0}
    originals = {name: getattr(dist, name) for name in _COUNTED}

    def wrap(name: str) -> Any:
        second = name in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")  # (output, input)
        keys = ("input_tensor", "input", "tensor") if second else ("tensor",)

        def counted(*args: Any, **kwargs: Any) -> Any:
            source = args[1 if second else 0] if len(args) > (1 if second else 0) else None
            source = next((kwargs[k] for k in keys if k in kwargs), source)
            if isinstance(source, torch.Tensor):
                counter["bytes"] += source.numel() * source.element_size()
            return originals[name](*args, **kwargs)

        return counted

    for name in _COUNTED:
        setattr(dist, name, wrap(name))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def lightning_fit(strategy: Any, cfg: dict, devices: int) -> tuple[tuple[float, float], L.Trainer]:
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=cfg["warmup"] + cfg["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    loader = DataLoader(dataset(cfg, devices), batch_size=cfg["batch"], drop_last=True)
    trainer.fit(Classifier(cfg["sizes"]), loader)
    return per_step(clock.ends, cfg["warmup"]), trainer


def _rank(rank: int, world: int, tmp: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env | {"NODE_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_dl  # noqa: F401 - registers the strategy names

    if cfg["torch_hooks"]:
        import lightning_dl.parallel.comm.hooks as hooks

        hooks.FUSED = False
    numel = sum(p.numel() for p in mlp(cfg["sizes"]).parameters())
    results: dict[str, dict[str, list[float]]] = {}

    def record(label: str, seconds: tuple[float, float], sent: float) -> None:
        entry = results.setdefault(label, {"step_s": [], "cpu_s": [], "bytes_per_step": []})
        entry["step_s"].append(seconds[0])
        entry["cpu_s"].append(seconds[1])
        entry["bytes_per_step"].append(sent)

    for _ in range(cfg["rounds"]):  # rounds interleave the contenders, so load changes hit all of them alike
        dist.barrier()
        if rank == 0:  # one process alone (rank 1 waits in the barrier)
            record("one process torch", torch_loop(mlp(cfg["sizes"]), cfg, 1), 0.0)
            record("one process Lightning", lightning_fit("auto", cfg, 1)[0], 0.0)
        dist.barrier()
        record("independent", torch_loop(mlp(cfg["sizes"]), cfg, 1), 0.0)
        dist.barrier()
        model = nn.parallel.DistributedDataParallel(mlp(cfg["sizes"]))
        record("torch DDP", torch_loop(model, cfg, world), 4.0 * numel)
        dist.barrier()
        record("torch powerSGD_hook r=4", *torch_powersgd(cfg, world))
        for label, name, kwargs in cfg["contenders"]:
            dist.barrier()
            entry = StrategyRegistry[name]  # the registered class and arguments, with this contender's on top
            strategy = entry["strategy"](**(entry["init_params"] | kwargs))
            with count_collectives() as counter:
                seconds, trainer = lightning_fit(strategy, cfg, world)
            steps = trainer.global_step
            if hasattr(strategy, "bytes_sent"):
                sent = strategy.bytes_sent / steps
            elif name.startswith("deepspeed"):
                sent = counter["bytes"] / steps
            else:  # DDP all-reduces every gradient once per step
                sent = 4.0 * numel
            record(label, seconds, sent)
    torch.save(results, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()  # leave together: a rank that exits while its peer's gloo threads still talk to it can abort them
    dist.destroy_process_group()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=32, help="timed steps per contender and round (after warm-up)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all contenders; the median is reported")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated strategy names to run (with 'ddp' and the torch rows); default: every contender",
    )
    parser.add_argument(
        "--torch-hooks",
        action="store_true",
        help="run the compressed hooks' torch path instead of the fused CPU loops (for comparison)",
    )
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1:
        parser.error(f"--steps must be >= 2 and --rounds >= 1, got {args.steps} and {args.rounds}")
    only = {name for name in args.only.split(",") if name}
    known = {name for _, name, _ in CONTENDERS}
    if only - known:
        parser.error(f"--only names unknown strategies {sorted(only - known)}; valid: {sorted(known)}")
    contenders = tuple(c for c in CONTENDERS if not only or c[1] in only | {"ddp"})
    bench = Bench("data_parallel", args)
    quick = bench.quick
    cfg = {
        "sizes": (32, 64, 64, 10) if quick else (1024, 2048, 2048, 10),
        "batch": 8 if quick else 64,
        "warmup": 2 if quick else 4,
        "steps": 4 if quick else args.steps,
        "rounds": 1 if quick else args.rounds,
        "contenders": contenders,
        "torch_hooks": args.torch_hooks,
    }
    with tempfile.TemporaryDirectory(prefix="bench_data_parallel_") as tmp:
        mp.spawn(_rank, args=(2, tmp, cfg), nprocs=2, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
    # per round, the slower rank sets the pace; the median over rounds is reported
    paced = {label: [max(r) for r in zip(*(k[label]["step_s"] for k in ranks), strict=True)] for label in ranks[1]}
    one_torch = statistics.median(ranks[0]["one process torch"]["step_s"])
    one_lightning = statistics.median(ranks[0]["one process Lightning"]["step_s"])
    rows = {}
    for label, per_round in paced.items():
        step_s = statistics.median(per_round)
        single = one_torch if label in TORCH_ROWS else one_lightning
        rows[label] = {
            "step_ms": 1e3 * step_s,
            "step_ms_rounds": [1e3 * t for t in per_round],
            "samples_per_s": 2 * cfg["batch"] / step_s,
            "efficiency": single / step_s,  # S₂/(2·S₁) = (2b/T₂)/(2·b/T₁) = T₁/T₂, batch b per rank
            "bytes_per_step": statistics.median(ranks[0][label]["bytes_per_step"]),
            # process CPU per step (all threads), mean of the ranks that ran it, median over rounds
            "cpu_ms": 1e3
            * statistics.median(
                statistics.mean(r) for r in zip(*(k[label]["cpu_s"] for k in ranks if label in k), strict=True)
            ),
        }
    ddp = rows["ddp"]
    one_cpu = {k: 1e3 * statistics.median(ranks[0][f"one process {k}"]["cpu_s"]) for k in ("torch", "Lightning")}
    print(
        f"\none process: torch {1e3 * one_torch:.1f} ms/step ({one_cpu['torch']:.1f} CPU), "
        f"Lightning {1e3 * one_lightning:.1f} ms/step ({one_cpu['Lightning']:.1f} CPU)"
    )
    print(
        f"{'contender':<24} {'ms/step':>8} {'CPU ms':>7} {'samples/s':>10} {'E2':>6} {'MB/step':>8} {'speed/ddp':>9} "
        f"{'bytes/ddp':>9}"
    )
    for label, row in rows.items():
        goal = GOALS.get(label)
        verdict = (
            "" if goal is None or quick else (" goal met" if row["efficiency"] >= goal else f" goal {goal:.0%} missed")
        )
        print(
            f"{label:<24} {row['step_ms']:8.1f} {row['cpu_ms']:7.1f} {row['samples_per_s']:10.0f} "
            f"{row['efficiency']:6.1%} "
            f"{row['bytes_per_step'] / 1e6:8.3f} {row['samples_per_s'] / ddp['samples_per_s']:9.2f} "
            f"{row['bytes_per_step'] / ddp['bytes_per_step']:9.3f}{verdict}"
        )
    bench.write_json(
        {
            "config": {k: v for k, v in cfg.items() if k != "contenders"},
            "one_process_step_ms": {"torch": 1e3 * one_torch, "lightning": 1e3 * one_lightning},
            "one_process_cpu_ms": {"torch": one_cpu["torch"], "lightning": one_cpu["Lightning"]},
            "one_process_step_ms_rounds": {
                "torch": [1e3 * t for t in ranks[0]["one process torch"]["step_s"]],
                "lightning": [1e3 * t for t in ranks[0]["one process Lightning"]["step_s"]],
            },
            "rows": rows,
            "goals": GOALS,
            "definition": "E2 = S2 / (2 S1): samples/s of 2 ranks (batch b each) over twice one process's (batch b)",
            "cpu_ms": "process CPU time per step and rank (every thread: compute, gloo, hooks), mean of the ranks",
        }
    )
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = list(rows)
    axes[0].barh(labels, [rows[k]["efficiency"] for k in labels], color="tab:blue")
    for label, goal in GOALS.items():
        if label in labels:
            axes[0].plot([goal, goal], [labels.index(label) - 0.4, labels.index(label) + 0.4], color="tab:red")
    axes[0].set(xlabel="E₂ = S₂ / (2·S₁)  (red: goal)", xlim=(0, 1.1), title="data-parallel efficiency, 2 ranks")
    axes[0].invert_yaxis()
    axes[1].barh(labels, [rows[k]["bytes_per_step"] / 1e6 for k in labels], color="tab:orange")
    axes[1].set(xlabel="MB handed to collectives per step and rank", xscale="symlog", title="communication")
    axes[1].invert_yaxis()
    load = os.getloadavg()[0]
    figure.suptitle(f"MLP {'-'.join(map(str, cfg['sizes']))}, batch {cfg['batch']}/rank, gloo; load {load:.1f}")
    figure.tight_layout()
    bench.save_figure(figure, "data_parallel.png")


if __name__ == "__main__":
    main()
