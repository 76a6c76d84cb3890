"""A causal, pre-norm Transformer language model whose blocks form an ordered list (pipeline stages) and whose
projections are Linear pairs with stable names (tensor parallelism shards the first column-wise, the second
row-wise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dl.nn.init import init_weights

TRANSFORMER_NORMS = ("layer", "rms")


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layer" else nn.RMSNorm(dim)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``qkv`` (d → 3d, the column-parallel half) and ``proj`` (d → d, the
    row-parallel half). The rows of ``qkv`` are head-major (head 0's q, k, v, then head 1's, ...) and the head count
    is read from the width, so a column split by tensor parallelism hands each rank whole heads."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, length, heads, 3, head_dim): heads = 3d / (3 · head_dim), fewer on a tensor-parallel rank
        q, k, v = self.qkv(x).unflatten(-1, (-1, 3, self.head_dim)).transpose(1, 2).unbind(dim=3)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).flatten(-2))


class FeedForward(nn.Module):
    """``fc1`` (d → 4d, column-parallel), GELU, ``fc2`` (4d → d, row-parallel)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, d_model: int, n_heads: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = _norm(norm, d_model), CausalSelfAttention(d_model, n_heads, dropout)
        self.norm2, self.mlp = _norm(norm, d_model), FeedForward(d_model, 4 * d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class Embedding(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(block_size, d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.position.num_embeddings:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds `block_size` {self.position.num_embeddings}.")
        return self.token(idx) + self.position(torch.arange(idx.shape[1], device=idx.device))


class TransformerLM(nn.Module):
    """``embed -> blocks[0..n) -> head`` (final norm and the vocabulary projection), returning logits.

    Example::

        >>> model = TransformerLM(vocab_size=16, block_size=8, d_model=32, n_layers=2, n_heads=4)
        >>> model(torch.zeros(3, 8, dtype=torch.long)).shape
        torch.Size([3, 8, 16])
        >>> [type(m).__name__ for m in model.pipeline_blocks()]
        ['Embedding', 'Block', 'Block', 'Sequential']
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        *,
        norm: str = "layer",
        init: str = "default",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value!r}.")
        if d_model % n_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `n_heads` ({n_heads}).")
        if norm not in TRANSFORMER_NORMS:
            raise ValueError(f"`norm` must be one of {TRANSFORMER_NORMS} for TransformerLM, got {norm!r}.")
        self.block_size = block_size
        self.embed = Embedding(vocab_size, block_size, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, norm, dropout) for _ in range(n_layers)))
        self.head = nn.Sequential(_norm(norm, d_model), nn.Linear(d_model, vocab_size))
        init_weights(self, init)

    def pipeline_blocks(self) -> list[nn.Module]:
        """The network as an ordered list of modules whose composition is ``forward``."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(idx)))
