"""A LightningModule that trains a classification network with cross-entropy and logs loss and accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_dl.modules._base import OptimConfig, StagedModule, check_optimizer, check_schedule
from lightning_dl.nn import MLP, ConvNet

MODELS = ("mlp", "convnet")


class ClassifierModule(StagedModule):
    """Classify feature vectors with an :class:`~lightning_dl.nn.MLP` or a :class:`~lightning_dl.nn.ConvNet`, the
    optimizer, norm and initialisation picked by name.

    Logs ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc`` (accuracy by
    torchmetrics, accumulated over the epoch).

    Args:
        num_features: input features per sample (64 for the 8×8 digits).
        num_classes: number of classes.
        model: ``mlp`` or ``convnet`` (the latter for 8×8 images given as 64 features).
        hidden_sizes: widths of the MLP's hidden layers.
        activation: activation of the MLP's hidden layers.
        dropout: dropout after each hidden activation of the MLP.
        norm: ``none``, ``batch``, ``layer``, ``rms``, ``group`` or ``weight``.
        init: ``default``, ``xavier_normal``, ``xavier_uniform``, ``he_normal``, ``he_uniform``, ``normal``,
            ``orthogonal``.
        optimizer: any name of :func:`lightning_dl.optim.build_optimizer` (``adamw``, ``momentum``, ``lamb``, ...).
        lr: learning rate.
        weight_decay: applied to weights only (parameters with ``ndim >= 2``), for optimizers that have it.
        optimizer_kwargs: further keyword arguments of the optimizer (``{"momentum": 0.8}``, ``{"betas": ...}``).
        lr_schedule: an :mod:`lightning_dl.schedules` shape applied per step through a ``LambdaLR``, or None.
        schedule_kwargs: the schedule's parameters, warmup included (``{"warmup_steps": 100}``).

    Under ``strategy="pipeline"`` the layers are the pipeline blocks, ``pipeline_loss`` the cross-entropy and
    ``pipeline_metrics`` the accuracy; the strategy logs the same names.

    Example::

        >>> module = ClassifierModule(num_features=64, num_classes=10, hidden_sizes=[32], optimizer="lamb")
        >>> module(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
        >>> len(module.pipeline_blocks())  # flatten, Linear, ReLU, Dropout, Linear
        5
    """

    def __init__(
        self,
        num_features: int = 64,
        num_classes: int = 10,
        model: str = "mlp",
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.1,
        norm: str = "none",
        init: str = "default",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_schedule: str | None = None,
        schedule_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes!r}.")
        if model not in MODELS:
            raise ValueError(f"`model` must be one of {MODELS}, got {model!r}.")
        check_optimizer(optimizer, weight_decay, lr)
        check_schedule(lr_schedule, schedule_kwargs)
        self.save_hyperparameters()
        self.optim_config = OptimConfig(optimizer, lr, weight_decay, optimizer_kwargs, lr_schedule, schedule_kwargs)
        if model == "mlp":
            self.net: nn.Module = MLP(
                num_features,
                list(hidden_sizes),
                num_classes,
                activation=activation,
                dropout=dropout,
                norm=norm,
                init=init,
            )
        else:
            if num_features != 64:
                raise ValueError(f"`model='convnet'` takes 8×8 images (num_features=64), got {num_features}.")
            self.net = ConvNet(num_classes, norm=norm, init=init)
        self.accuracy = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(num_classes=num_classes, average="micro") for s in ("train", "val", "test")}
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def pipeline_blocks(self) -> list[nn.Module]:
        """The network as ordered blocks for ``strategy="pipeline"``: a flatten (the MLP and the ConvNet flatten
        their input first), then each layer; their composition is ``forward``."""
        return [nn.Flatten(), *cast(nn.Sequential, self.net)]

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of a micro-batch (the last stage's logits against its labels)."""
        return F.cross_entropy(output, target)

    def pipeline_metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Accuracy of a micro-batch, logged by the pipeline strategy as ``train_acc``/``val_acc``/``test_acc``."""
        return {"acc": (output.argmax(dim=-1) == target).float().mean()}

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
