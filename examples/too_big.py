"""A model too big for one process's memory, trained anyway by splitting it into pipeline stages: each process's
address space is capped (``RLIMIT_AS``, set by this recipe in every process it starts); one process fails with an
out-of-memory error while it builds the model and its Adam state, then the same model trains a few steps under a pp
layout (``PipelineStrategy``; the blocks are built on the meta device in ``configure_model()`` and each rank
materialises its own stages only), each rank's peak memory printed beside the cap.

    python examples/too_big.py                  # or: lightning-dl run too-big
    python examples/too_big.py --pp 4 --cap-gib 2.5

What one process must hold is four copies of the parameters (weights, gradients, Adam's two moments) on top of what
a bare Python + torch + Lightning process takes; a rank of pp stages holds a 1/pp share of those four copies.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

GIB = 2**30


def memory() -> dict[str, int]:
    """This process's peak address space (``VmPeak``, what ``RLIMIT_AS`` caps) and peak resident set (``VmHWM``)
    so far, in bytes (Linux ``/proc/self/status``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {
        "peak_address_space": int(fields["VmPeak"].split()[0]) * 1024,
        "peak_rss": int(fields["VmHWM"].split()[0]) * 1024,
    }


class WideMLP(L.LightningModule):
    """``layers`` blocks of ``Linear(width, width) + Tanh``, then a 10-class head, built in ``configure_model()``
    (on the meta device under a pipeline strategy); Adam. ``phase`` says what the process is doing, so that an
    out-of-memory error can be placed."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.blocks: nn.Sequential | None = None
        self.phase = "starting"

    def configure_model(self) -> None:
        if self.blocks is not None:
            return
        self.phase = "building the model (its parameters)"
        body = [nn.Sequential(nn.Linear(self.width, self.width), nn.Tanh()) for _ in range(self.layers)]
        self.blocks = nn.Sequential(*body, nn.Linear(self.width, 10))

    def pipeline_blocks(self) -> list[nn.Module]:
        assert self.blocks is not None
        return list(self.blocks)

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.blocks is not None
        x, y = batch
        return F.cross_entropy(self.blocks(x), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.phase = "forward and backward (activations and gradients)"

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.phase = "the first optimizer step (Adam's two moments per parameter)"

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.phase = "training"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def parameter_bytes(width: int, layers: int) -> int:
    """Bytes of the model's float32 parameters."""
    return 4 * (layers * (width * width + width) + width * 10 + 10)


def _data(args: argparse.Namespace) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4 * args.batch_size, args.width, generator=generator)
    y = (x[:, :10] * 3).argmax(dim=1)  # a learnable labelling
    return DataLoader(TensorDataset(x, y), batch_size=args.batch_size, drop_last=True)


def _trainer(args: argparse.Namespace, devices: int, strategy: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )


def _cap(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if args.cap_gib > 0:
        cap = int(args.cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _one_process(index: int, tmp: str, args: argparse.Namespace) -> None:
    """The whole model in one process under the cap: record where it fails, or that it did not."""
    _cap(args)
    module = WideMLP(args.width, args.layers)
    result: dict[str, Any] = {"fitted": False}
    try:
        _trainer(args, 1, "auto").fit(module, _data(args))
        result["fitted"] = True
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "alloc" not in str(err):
            raise
        result["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
        result["phase"] = module.phase
    result["memory"] = memory()
    Path(tmp, "one.json").write_text(json.dumps(result))


def _pipeline_rank(rank: int, tmp: str, args: argparse.Namespace) -> None:
    """One rank of the pp layout, started by this recipe (Lightning sees an external launcher)."""
    from lightning_dl.strategies import PipelineStrategy

    world = args.pp
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        | {"NODE_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    )
    _cap(args)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    module = WideMLP(args.width, args.layers)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any) -> None:
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    strategy = PipelineStrategy(schedule="1f1b", n_microbatches=args.microbatches)
    trainer = _trainer(args, world, strategy)
    trainer.callbacks.append(Losses())
    trainer.fit(module, _data(args))
    params = [p for p in module.parameters() if not p.is_meta]
    optimizer = trainer.optimizers[0]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    result = {
        "rank": rank,
        "blocks": [i for i, b in enumerate(module.pipeline_blocks()) if any(not p.is_meta for p in b.parameters())],
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "adam_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "losses": losses,
        "memory": memory(),
    }
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096, help="width of every hidden Linear")
    parser.add_argument("--layers", type=int, default=10, help="hidden blocks (Linear + Tanh)")
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages, one process each")
    parser.add_argument("--cap-gib", type=float, default=3.2, help="RLIMIT_AS of every process, GiB (0: no cap)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the pp run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--skip-one-process", action="store_true", help="run the pp layout only")
    parser.add_argument("--out", type=Path, default=Path("runs/too_big"))
    args = parser.parse_args()
    if args.width < 16 or args.layers < args.pp or args.pp < 2 or args.steps < 1 or args.cap_gib < 0:
        parser.error("--width >= 16, --pp >= 2, --layers >= --pp, --steps >= 1, --cap-gib >= 0")
    if args.batch_size % args.microbatches or args.microbatches < args.pp:
        parser.error(f"--microbatches must divide --batch-size and be >= --pp (1F1B), got {args.microbatches}")
    size = parameter_bytes(args.width, args.layers)
    cap = args.cap_gib * GIB
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) + head, {size / 4 / 1e6:.0f}M parameters")
    print(f"  weights {_gib(size)}; with gradients and Adam's two moments {_gib(4 * size)} in one process")
    print(f"cap: RLIMIT_AS = {_gib(cap) if cap else 'none'} per process\n")
    load_start = os.getloadavg()
    payload: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "parameter_bytes": size}
    with tempfile.TemporaryDirectory(prefix="lightning_dl_too_big_") as tmp:
        if not args.skip_one_process:
            mp.spawn(_one_process, args=(tmp, args), nprocs=1, join=True)
            one = json.loads(Path(tmp, "one.json").read_text())
            payload["one_process"] = one
            mem = one["memory"]
            if one["fitted"]:
                print(f"one process: trained within the cap (peak address space {_gib(mem['peak_address_space'])})")
            else:
                print(f"one process: FAILED during {one['phase']}:\n  {one['error']}")
            print(f"  peak address space {_gib(mem['peak_address_space'])}, peak RSS {_gib(mem['peak_rss'])}\n")
        mp.spawn(_pipeline_rank, args=(tmp, args), nprocs=args.pp, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.pp)]
    payload |= {"pipeline": ranks, "load_average_start": list(load_start), "load_average_end": list(os.getloadavg())}
    payload |= {"cpu_count": os.cpu_count(), "torch": torch.__version__, "lightning": L.__version__}
    print(f"pp{args.pp} (1F1B, {args.microbatches} micro-batches), {args.steps} steps:")
    header = f"{'rank':>4}  {'blocks':<14}{'weights':>10}{'Adam state':>12}{'peak addr':>11}{'peak RSS':>10}{'cap':>10}"
    print(header)
    for r in ranks:
        mem, blocks = r["memory"], f"{r['blocks'][0]}-{r['blocks'][-1]}"
        print(
            f"{r['rank']:>4}  {blocks:<14}{_gib(r['parameter_bytes']):>10}{_gib(r['adam_state_bytes']):>12}"
            f"{_gib(mem['peak_address_space']):>11}{_gib(mem['peak_rss']):>10}{_gib(cap) if cap else 'none':>10}"
        )
    print("losses per step:", ", ".join(f"{loss:.4f}" for loss in ranks[-1]["losses"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "too_big.json").write_text(json.dumps(payload, indent=2))
    print(f"\nJSON   {args.out / 'too_big.json'}")


if __name__ == "__main__":
    main()
