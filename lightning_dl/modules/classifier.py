"""A LightningModule that trains any classification network with cross-entropy and logs loss and accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_dl.nn import MLP

OPTIMIZERS = ("adamw", "sgd")


class ClassifierModule(L.LightningModule):
    """Classify feature vectors with an :class:`~lightning_dl.nn.MLP` trained by AdamW or SGD with momentum.

    Logs ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc`` (accuracy by
    torchmetrics, accumulated over the epoch).

    Args:
        num_features: input features per sample (64 for the 8×8 digits).
        num_classes: number of classes.
        hidden_sizes: widths of the hidden layers.
        activation: activation of the hidden layers.
        dropout: dropout after each hidden activation.
        lr: learning rate.
        weight_decay: weight decay, applied to weights only (parameters with ``ndim >= 2``): decoupled for AdamW,
            L2 for SGD.
        optimizer: ``adamw`` or ``sgd`` (heavy-ball momentum).
        momentum: SGD's momentum.

    Example::

        >>> module = ClassifierModule(num_features=64, num_classes=10, hidden_sizes=[32])
        >>> module(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_features: int = 64,
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes!r}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must lie in [0, 1), got {momentum!r}.")
        self.save_hyperparameters()
        self.net = MLP(num_features, list(hidden_sizes), num_classes, activation=activation, dropout=dropout)
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.accuracy = nn.ModuleDict(
            {
                f"{stage}_acc": MulticlassAccuracy(num_classes=num_classes, average="micro")
                for stage in ("train", "val", "test")
            }
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = cast(MulticlassAccuracy, self.accuracy[f"{stage}_acc"])
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        return torch.optim.AdamW(groups, lr=self.lr)
