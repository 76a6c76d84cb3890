"""Models for the tensor-parallel tests, most written by others (torch, Lightning), with a loss and a batch maker."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.demos.transformer import Transformer
from torch import nn

from lightning_dl.nn import MLP, TransformerLM

VOCAB, LENGTH, WIDTH = 32, 8, 16


class SwiGLU(nn.Module):
    """LLaMA's feed-forward: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int = WIDTH, hidden: int = 32) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "torch_encoder":
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 32, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    if name == "lightning_demo":
        return Transformer(vocab_size=VOCAB, ninp=WIDTH, nhead=4, nhid=32, nlayers=1, dropout=0.0)
    if name in ("transformer_lm", "transformer_lm_tied"):
        model = TransformerLM(VOCAB, LENGTH, d_model=32, n_layers=2, n_heads=4)
        if name == "transformer_lm_tied":
            model.head[1].weight = model.embed.token.weight
        return model
    if name == "swiglu":
        return nn.Sequential(SwiGLU(), nn.Linear(WIDTH, 4))
    if name == "mlp":
        return MLP(WIDTH, [32, 16], 4, activation="gelu")
    raise ValueError(name)


MODELS = ("torch_encoder", "lightning_demo", "transformer_lm", "swiglu", "mlp", "transformer_lm_tied")


def batch(name: str, step: int, size: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    if name in ("lightning_demo", "transformer_lm", "transformer_lm_tied"):
        x = torch.randint(0, VOCAB, (size, LENGTH), generator=g)
        return x, torch.randint(0, VOCAB, (size, LENGTH), generator=g)
    x = (
        torch.randn(size, LENGTH, WIDTH, generator=g)
        if name == "torch_encoder"
        else torch.randn(size, WIDTH, generator=g)
    )
    return x, torch.randn(size, *x.shape[1:-1], WIDTH if name == "torch_encoder" else 4, generator=g)


def loss_fn(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    def loss(model: nn.Module, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = data
        if name == "lightning_demo":
            return F.nll_loss(model(x, y), y.flatten())
        if name.startswith("transformer_lm"):
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        return F.mse_loss(model(x), y)

    return loss
