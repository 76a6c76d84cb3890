"""``HybridStrategy`` under ``torchrun`` across two "machines": two ``torchrun --nnodes=2 --nproc-per-node=2``
invocations on 127.0.0.1, data parallel across the nodes and tensor parallel within each (layout dp2 × tp2). Each
rank reports where it sits in the mesh; the checkpoint written after three SGD steps equals one process trained on
the same global batches. Also the worker script: ``python -m tests.strategies.test_hybrid_torchrun --out DIR``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests.helpers.distributed import free_port, stop_process, torchrun_node

LAYOUT = "dp2,tp2"
STEPS, BATCH, LR = 3, 4, 0.1  # BATCH per replica: global batches of 8


class TorchrunNet(L.LightningModule):
    """Two Linear pairs (what tp shards) and a head, as pipeline blocks with an MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        pair = lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))  # noqa: E731
        self.blocks = nn.Sequential(pair(), pair(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def pipeline_blocks(self) -> nn.Sequential:
        return self.blocks

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.pipeline_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2 * BATCH * STEPS, 8, generator=generator)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).tanh())


def main() -> None:
    """One rank of the run, started by torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT...)."""
    from lightning_dl.strategies import HybridStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    strategy = HybridStrategy(layout=LAYOUT, n_microbatches=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=per_node,
        num_nodes=int(os.environ["WORLD_SIZE"]) // per_node,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning puts a DistributedSampler over the dp ranks (shuffled, seed 0): the test rebuilds that order
    module = TorchrunNet()
    trainer.fit(module, DataLoader(dataset(), batch_size=BATCH))
    trainer.save_checkpoint(args.out / "final.ckpt")
    rank = trainer.global_rank
    place = {"rank": rank, "node": int(os.environ["GROUP_RANK"]), "local_rank": int(os.environ["LOCAL_RANK"])}
    place["coordinates"] = strategy.parallel_layout.coordinates(rank)
    weight = dict(module.named_parameters())["blocks.0.0.weight"]  # Linear(8, 16), sharded column-wise over tp
    place["local_shape"] = list(weight.to_local().shape if hasattr(weight, "to_local") else weight.shape)
    (args.out / f"rank{rank}.json").write_text(json.dumps(place))


def _reference() -> dict[str, torch.Tensor]:
    """One process on the same global batches: step k reads both replicas' k-th batches, in the order Lightning's
    DistributedSampler (always shuffled for training, seed 0) gives the two dp ranks; plain SGD."""
    data = dataset()
    replicas = [
        list(DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, 2, r, shuffle=True, seed=0)))
        for r in range(2)
    ]
    module = TorchrunNet()
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    for (x0, y0), (x1, y1) in zip(*replicas, strict=True):
        optimizer.zero_grad()
        module.pipeline_loss(module(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        optimizer.step()
    return module.state_dict()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_torchrun_nodes_train_dp_across_nodes_and_tp_within(tmp_path):
    port = free_port()
    env = {"GLOO_SOCKET_IFNAME": "lo"}
    nodes = [torchrun_node(n, port, tmp_path, module="tests.strategies.test_hybrid_torchrun", env=env) for n in (0, 1)]
    deadline = time.monotonic() + 240
    try:
        for process in nodes:
            process.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in nodes:
            stop_process(process)
    logs = "\n".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert [p.returncode for p in nodes] == [0, 0], f"torchrun output:\n{logs[-6000:]}"
    places = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for place in places:  # node n holds ranks 2n, 2n + 1: replica n, its two tp shards
        assert place["rank"] == 2 * place["node"] + place["local_rank"]
        assert place["coordinates"] == {"pp": 0, "dp": place["node"], "tp": place["local_rank"]}
        assert place["local_shape"] == [8, 8]  # each tp rank holds half of the first Linear's 16 outputs
    trained = torch.load(tmp_path / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    reference = _reference()
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":
    main()
