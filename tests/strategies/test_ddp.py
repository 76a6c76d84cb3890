"""Lightning's own ``ddp`` on 2 gloo ranks equals one process stepping on the same global batches.

Each rank of the harness runs ``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` unchanged, as torchrun
would start it: Lightning finds the process group the harness initialised and joins it.
"""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests.helpers.distributed import run_distributed
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net

pytestmark = pytest.mark.distributed

PER_RANK_BATCH = 4
WORLD_SIZE = 2
STEPS = 6
LR = 0.1


class RecordGradients(Callback):
    """Keeps a copy of every gradient as the optimizer is about to use it (after DDP's all-reduce)."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])


def _fit_ddp(rank: int, world_size: int) -> dict:
    module = TinyRegressor(tiny_net(seed=0), lr=LR)
    recorder = RecordGradients()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        max_steps=STEPS,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning replaces the sampler of a training loader by DistributedSampler(shuffle=True, seed=0)
    loader = DataLoader(regression_dataset(), batch_size=PER_RANK_BATCH, shuffle=False)
    trainer.fit(module, loader)
    return {
        "world_size": trainer.world_size,
        "global_rank": trainer.global_rank,
        "strategy": type(trainer.strategy).__name__,
        "losses": module.losses,
        "grads": recorder.grads,
        "params": [p.detach().clone() for p in module.parameters()],
    }


def global_batches(dataset: TensorDataset, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches of the DDP run: Lightning gives the training loader a
    ``DistributedSampler(shuffle=True, seed=0)``; step k's global batch is every rank's k-th batch together."""
    per_rank = []
    for rank in range(WORLD_SIZE):
        sampler = DistributedSampler(dataset, num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=0)
        per_rank.append(list(DataLoader(dataset, batch_size=PER_RANK_BATCH, sampler=sampler))[:steps])
    return [tuple(torch.cat(parts) for parts in zip(*step, strict=True)) for step in zip(*per_rank, strict=True)]


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """One process, plain torch, stepping on the given batches."""
    net = tiny_net(seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    losses, grads = [], []
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.detach().clone() for p in net.parameters()])
        optimizer.step()
    return {"losses": losses, "grads": grads, "params": [p.detach().clone() for p in net.parameters()]}


def test_ddp_two_ranks_equal_single_process_on_global_batches() -> None:
    ranks = run_distributed(_fit_ddp, WORLD_SIZE, timeout=180)
    reference = _reference(global_batches(regression_dataset(), STEPS))
    initial = [p.detach().clone() for p in tiny_net(seed=0).parameters()]

    assert [r["strategy"] for r in ranks] == ["DDPStrategy"] * WORLD_SIZE
    assert [(r["global_rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert len(ranks[0]["losses"]) == len(ranks[0]["grads"]) == STEPS

    # both ranks end with identical parameters that moved away from the initial ones
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)
    assert any(not torch.equal(p, q) for p, q in zip(ranks[0]["params"], initial, strict=True))

    # each rank saw its half of the global batch: the mean of the two local losses is the global loss
    global_losses = torch.tensor([ranks[0]["losses"], ranks[1]["losses"]]).mean(dim=0)
    torch.testing.assert_close(global_losses, torch.tensor(reference["losses"]))
    for step in range(STEPS):
        for g_ddp, g_ref in zip(ranks[0]["grads"][step], reference["grads"][step], strict=True):
            torch.testing.assert_close(g_ddp, g_ref)
    for p_ddp, p_ref in zip(ranks[0]["params"], reference["params"], strict=True):
        torch.testing.assert_close(p_ddp, p_ref)


def test_reference_differs_from_other_batches() -> None:
    """Guards the comparison above: the same steps on sequential batches give other parameters."""
    batches = global_batches(regression_dataset(), STEPS)
    sequential = list(DataLoader(regression_dataset(), batch_size=PER_RANK_BATCH * WORLD_SIZE))[:STEPS]
    assert [len(x) for x, _ in batches] == [PER_RANK_BATCH * WORLD_SIZE] * STEPS
    ours, other = _reference(batches)["params"], _reference(sequential)["params"]
    assert not all(torch.allclose(p, q) for p, q in zip(ours, other, strict=True))
