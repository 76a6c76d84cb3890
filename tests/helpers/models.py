"""Tiny models and data for tests: fast enough to train for a few steps in every test."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


def regression_dataset(num_samples: int = 64, num_features: int = 8, seed: int = 0) -> TensorDataset:
    """A random regression problem ``y = tanh(x @ w) + noise``, deterministic by seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, num_features, generator=generator)
    w = torch.randn(num_features, 1, generator=generator)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(num_samples, 1, generator=generator)
    return TensorDataset(x, y)


def tiny_net(num_features: int = 8, hidden: int = 16, seed: int = 0) -> nn.Sequential:
    """``Linear -> Tanh -> Linear`` with weights fixed by ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class TinyRegressor(L.LightningModule):
    """MSE regression with SGD (momentum 0.9); records the loss of every training step in ``losses``."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SequentialPipelineModule(L.LightningModule):
    """The pipeline side of a module whose ``net`` (an ``nn.Sequential`` the subclass builds) is its blocks in order:
    ``forward`` runs ``net``, ``pipeline_blocks()`` lists its children, ``pipeline_loss`` is the MSE."""

    net: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def pipeline_blocks(self) -> list[nn.Module]:
        return list(self.net)

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)
