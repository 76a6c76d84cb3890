"""Tensor parallelism on the charlm TransformerLM, one thread per process: step time of tp2 (ours, plan="auto")
against one process and against Lightning's ModelParallelStrategy with the equivalent hand-written plan, bytes
all-reduced per step (counted) against Megatron's count, parameter/gradient/optimizer bytes and peak RSS per rank.

    python benchmarks/bench_tensor_parallel.py            # measured figures -> benchmarks/results/
    python benchmarks/bench_tensor_parallel.py --quick    # seconds, checks that it runs

Every configuration runs in processes started here (as torchrun would) and joined by Lightning.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.multiprocessing as mp
from _common import Bench, bench_parser
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_dl.data import SequenceDataModule
from lightning_dl.modules import LanguageModelModule
from lightning_dl.strategies import TensorParallelStrategy

_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


class CountCollectives(TorchDispatchMode):
    """Bytes entering each functional collective (DTensor's communication) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in _COLLECTIVES:
            self.bytes[name] = self.bytes.get(name, 0) + args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


class Measure(Callback):
    """Step times after ``warmup`` steps; collective bytes of the first step; memory at the end."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.comm = warmup, [], {}
        self._start = 0.0
        self._mode: CountCollectives | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self._mode = CountCollectives()
            self._mode.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.comm, self._mode = self._mode.bytes, None
        if trainer.global_step > self.warmup:
            self.times.append(elapsed)

    def summary(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        def local_bytes(tensors: Any) -> int:
            return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)

        optimizer = trainer.optimizers[0]
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        return {
            "step_s": self.times,
            "comm_bytes_first_step": self.comm,
            "param_bytes": local_bytes(module.parameters()),
            "grad_bytes": local_bytes(p.grad for p in module.parameters() if p.grad is not None),
            "optimizer_bytes": local_bytes(states),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


class HandPlanLM(LanguageModelModule):
    """The module Lightning's ModelParallelStrategy needs: the same plan written by hand in configure_model()."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["tensor_parallel"]
        plan = {}
        for i in range(len(self.model.blocks)):
            plan |= {f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel()}
            plan |= {f"blocks.{i}.mlp.fc1": ColwiseParallel(), f"blocks.{i}.mlp.fc2": RowwiseParallel()}
        parallelize_module(self.model, mesh, plan)


def _run(rank: int, config: dict[str, Any], port: int, out: str) -> None:
    world = config["world"]
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
        "NODE_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo",
    })  # fmt: skip
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    sizes = config["sizes"]
    module_cls = HandPlanLM if config["name"] == "lightning_hand_plan" else LanguageModelModule
    module = module_cls(vocab_size=16, block_size=2 * sizes["seq_len"] + 1, d_model=sizes["d_model"],
                        n_layers=sizes["n_layers"], n_heads=sizes["n_heads"], lr_schedule=None)  # fmt: skip
    data = SequenceDataModule(task="reverse", seq_len=sizes["seq_len"], vocab_size=16,
                              num_train=sizes["batch"] * (config["steps"] + 1), batch_size=sizes["batch"])  # fmt: skip
    strategy: Any = "auto"
    if config["name"] == "ours_auto":
        strategy = TensorParallelStrategy(tensor_parallel_size=world, data_parallel_size=1)
    elif config["name"] == "lightning_hand_plan":
        strategy = ModelParallelStrategy(tensor_parallel_size=world, data_parallel_size=1)
    measure = Measure(warmup=config["warmup"])
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=config["steps"],
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[measure])  # fmt: skip
    trainer.fit(module, data)
    Path(out, f"rank{rank}.json").write_text(json.dumps(measure.summary(trainer, module)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(config: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_run, args=(config, _free_port(), out), nprocs=config["world"], start_method="spawn")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(config["world"])]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of all configurations")
    args = parser.parse_args()
    bench = Bench("tensor_parallel", args)
    sizes = {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": 4, "seq_len": args.seq_len,
             "batch": args.batch}  # fmt: skip
    steps, warmup = (4, 1) if bench.quick else (args.steps, 3)
    if bench.quick:
        sizes |= {"d_model": 32, "seq_len": 4, "batch": 4}
    results: dict[str, dict[str, Any]] = {}
    # the configurations alternate, round after round, so that a change of load on a shared machine hits all of
    # them; each keeps the round with the lowest median
    for round_ in range(1 if bench.quick else args.rounds):
        for name, world in (("one_process", 1), ("ours_auto", 2), ("lightning_hand_plan", 2)):
            ranks = run_config({"name": name, "world": world, "sizes": sizes, "steps": steps, "warmup": warmup})
            step = [max(times) for times in zip(*(r["step_s"] for r in ranks), strict=True)]  # slowest rank
            median = statistics.median(step)
            print(f"round {round_}, {name:>20}: median step {1e3 * median:.1f} ms", flush=True)
            results.setdefault(name, {"rounds": []})["rounds"].append(median)
            if median <= min(results[name]["rounds"]):
                results[name] |= {"median_step_s": median, "step_s": step, "ranks": ranks}
    tokens = sizes["batch"] * (2 * sizes["seq_len"] + 1)
    megatron = 2 * sizes["n_layers"] * 2 * tokens * sizes["d_model"] * 4  # 2 pairs/layer, fwd + bwd, fp32
    counted = results["ours_auto"]["ranks"][0]["comm_bytes_first_step"]
    one, ours, hand = (results[k]["median_step_s"] for k in ("one_process", "ours_auto", "lightning_hand_plan"))
    ratios = {"tp2_over_one_process": ours / one, "ours_over_lightning_hand_plan": ours / hand}
    memory = {k: [{m: r[m] for m in ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_rss_mib")}
                  for r in v["ranks"]] for k, v in results.items()}  # fmt: skip
    print(f"tp2 / one process: {ratios['tp2_over_one_process']:.3f}   ours / Lightning hand plan: "
          f"{ratios['ours_over_lightning_hand_plan']:.3f}")  # fmt: skip
    print(f"all-reduced per step: counted {counted.get('all_reduce', 0)} B, Megatron count {megatron} B")
    for name, per_rank in memory.items():
        print(f"{name:>20}: " + "; ".join(f"params {m['param_bytes'] / 2**20:.2f} MiB, rss {m['peak_rss_mib']:.0f} MiB"
                                          for m in per_rank))  # fmt: skip
    bench.write_json({"sizes": sizes, "steps": steps, "warmup": warmup, "ratios": ratios,
                      "comm_bytes_counted": counted, "comm_bytes_megatron": megatron, "memory": memory,
                      "results": {k: {"median_step_s": v["median_step_s"], "step_s": v["step_s"],
                                      "round_medians_s": v["rounds"]} for k, v in results.items()}})  # fmt: skip
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(results)
    left.bar(names, [1e3 * results[n]["median_step_s"] for n in names], color=["gray", "tab:blue", "tab:orange"])
    left.set_ylabel("median step time (ms, slowest rank)")
    left.set_title(f"charlm d={sizes['d_model']}, {sizes['n_layers']} layers, 1 thread/process")
    labels = [f"{n}\nrank {i}" for n in names for i in range(len(memory[n]))]
    right.bar(labels, [m["param_bytes"] / 2**20 for n in names for m in memory[n]], label="parameters")
    right.set_ylabel("parameter MiB per rank")
    right.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    bench.save_figure(fig, "tensor_parallel.png")


if __name__ == "__main__":
    main()
