"""A LightningModule that trains :class:`~lightning_dl.nn.TransformerLM` on next-token prediction."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_dl.data import IGNORE_INDEX
from lightning_dl.modules._base import OptimConfig, StagedModule, check_optimizer, check_schedule
from lightning_dl.nn import TransformerLM


class LanguageModelModule(StagedModule):
    """Next-token cross-entropy (positions whose target is ``IGNORE_INDEX`` are skipped) with a causal Transformer.

    Logs ``<stage>_loss``, ``<stage>_token_acc`` (scored positions predicted right) and ``<stage>_seq_acc``
    (sequences whose every scored position is right) for train, val and test.

    Args:
        vocab_size, block_size, d_model, n_layers, n_heads, dropout: the :class:`~lightning_dl.nn.TransformerLM`.
        norm: ``layer`` or ``rms``.
        init: an :func:`~lightning_dl.nn.init_weights` scheme.
        optimizer, lr, weight_decay, optimizer_kwargs, lr_schedule, schedule_kwargs: as for
            :class:`ClassifierModule`.

    Example::

        >>> module = LanguageModelModule(vocab_size=16, block_size=9, d_model=32, n_layers=1, n_heads=2)
        >>> module(torch.zeros(2, 9, dtype=torch.long)).shape
        torch.Size([2, 9, 16])
        >>> [type(b).__name__ for b in module.pipeline_blocks()]
        ['Embedding', 'Block', 'Sequential']
    """

    def __init__(
        self,
        vocab_size: int = 16,
        block_size: int = 17,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.0,
        norm: str = "layer",
        init: str = "default",
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_schedule: str | None = None,
        schedule_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_optimizer(optimizer, weight_decay, lr)
        check_schedule(lr_schedule, schedule_kwargs)
        self.save_hyperparameters()
        self.optim_config = OptimConfig(optimizer, lr, weight_decay, optimizer_kwargs, lr_schedule, schedule_kwargs)
        self.model = TransformerLM(
            vocab_size, block_size, d_model, n_layers, n_heads, norm=norm, init=init, dropout=dropout
        )

    @override
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def pipeline_blocks(self) -> list[nn.Module]:
        """Embedding, each Transformer block, then the head (final norm and vocabulary projection)."""
        return self.model.pipeline_blocks()

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of a micro-batch over its scored positions. The pipeline averages micro-batch
        losses, which is the batch's loss when every sequence scores as many positions (the sequence tasks here)."""
        return F.cross_entropy(output.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        scored = targets != IGNORE_INDEX
        right = (logits.argmax(dim=-1) == targets) | ~scored
        token_acc = (right & scored).sum() / scored.sum().clamp(min=1)
        seq_acc = right.all(dim=1).float().mean()
        on_step = stage == "train"
        size = len(inputs)
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=size)
        self.log(f"{stage}_token_acc", token_acc, on_step=False, on_epoch=True, batch_size=size)
        self.log(f"{stage}_seq_acc", seq_acc, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=size)
        return loss
