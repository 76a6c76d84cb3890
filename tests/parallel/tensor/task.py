"""A LightningModule over the tensor-parallel test models, its data, and the single-process reference that steps on
the same global batches."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests.parallel.tensor.models import batch, build, loss_fn

SAMPLES, PER_RANK_BATCH, LR, CLIP = 16, 4, 0.1, 0.5


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Task(L.LightningModule):
    """Trains one of ``tests.parallel.tensor.models`` with SGD (momentum 0.9); records every training loss."""

    def __init__(self, name: str, seed: int = 0) -> None:
        super().__init__()
        self.name = name
        self.net = build(name, seed)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, data: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = loss_fn(self.name)(self.net, data)
        self.losses.append(full(loss).item())
        return loss

    def validation_step(self, data: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.log("val_loss", full(loss_fn(self.name)(self.net, data)))

    def test_step(self, data: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.log("test_loss", full(loss_fn(self.name)(self.net, data)))

    def predict_step(self, data: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return full(self.net(data[0])) if self.name != "lightning_demo" else full(self.net(*data))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


class GradRecorder(Callback):
    """The whole gradient of every parameter as the optimizer is about to use it (a collective per DTensor)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.grads.append({n: full(p.grad).clone() for n, p in pl_module.named_parameters()})


def dataset(name: str) -> TensorDataset:
    x, y = batch(name, step=7, size=SAMPLES)
    return TensorDataset(x, y)


def loader(name: str) -> DataLoader:
    return DataLoader(dataset(name), batch_size=PER_RANK_BATCH, shuffle=False)


def global_batches(name: str, dp: int, epochs: int) -> list[tuple[torch.Tensor, ...]]:
    """Lightning gives the training loader ``DistributedSampler(shuffle=True, seed=0)`` over the dp ranks; step k's
    global batch is every replica's k-th batch together."""
    data, steps = dataset(name), []
    for epoch in range(epochs):
        per_rank = []
        for rank in range(dp):
            sampler = DistributedSampler(data, num_replicas=dp, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            per_rank.append(list(DataLoader(data, batch_size=PER_RANK_BATCH, sampler=sampler)))
        steps += [tuple(torch.cat(parts) for parts in zip(*step, strict=True)) for step in zip(*per_rank, strict=True)]
    return steps


def reference(name: str, batches: list[tuple[torch.Tensor, ...]], *, clip: float | None = CLIP) -> dict:
    """One process, plain torch: SGD with momentum on the given global batches, clipping by the global norm."""
    task = Task(name)
    optimizer = torch.optim.SGD(task.parameters(), lr=LR, momentum=0.9)
    losses, grads = [], []
    for data in batches:
        optimizer.zero_grad()
        loss = loss_fn(name)(task.net, data)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in task.named_parameters()})
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
        optimizer.step()
    return {"losses": losses, "grads": grads, "params": {k: v.clone() for k, v in task.state_dict().items()}}


def assert_matches(run: dict, ref: dict, *, dp: int = 1) -> None:
    """Losses (the mean over the dp replicas of their local losses), gradients and parameters, ≤ 1e-5 relative."""
    steps = len(ref["losses"])
    losses = torch.tensor(run["losses"]).reshape(dp, steps).mean(0) if dp > 1 else torch.tensor(run["losses"])
    torch.testing.assert_close(losses, torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
    assert len(run["grads"]) == steps
    for got, want in zip(run["grads"], ref["grads"], strict=True):
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in ref["params"].items():
        torch.testing.assert_close(run["params"][key], value, rtol=1e-5, atol=1e-6, msg=key)
