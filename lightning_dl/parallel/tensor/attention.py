"""Head-parallel ``nn.MultiheadAttention``: each rank holds ``num_heads / tp`` heads (their rows of the q, k and v
projections, the matching columns of the output projection) and one all-reduce joins the partial outputs.

torch's ``ColwiseParallel`` cannot split ``MultiheadAttention``: its fused ``in_proj_weight`` stacks q, k and v
(``[3E, E]``), so a contiguous split would hand rank 0 all of q and half of k. ``_StridedShard(0, split_factor=3)``
splits each of the three blocks instead, keeping the parameter's name and full layout for checkpoints.
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity; backward: all-reduce the gradient over the group (each rank saw part of the heads)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: all-reduce the partial outputs over the group; backward: identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_weight(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _additive_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """``MultiheadAttention``'s masks (bool: True = masked out; float: added) as one float mask for
    ``scaled_dot_product_attention``, broadcastable to ``(batch, heads, target, source)``."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # (batch * heads, L, S) is not supported on split heads
            raise ValueError("head-parallel MultiheadAttention takes a 2-D `attn_mask` (target, source).")
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def _head_parallel_forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, None]:
    """The local heads of ``MultiheadAttention.forward``; attention weights are not returned (None)."""
    group = cast(dist.ProcessGroup, self._tp_group)
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    seen: dict[int, torch.Tensor] = {}
    inputs = []
    for t in (query, key, value):
        if id(t) not in seen:
            seen[id(t)] = _CopyToGroup.apply(t, group)
        inputs.append(seen[id(t)])
    biases: tuple[torch.Tensor | None, ...] = (None, None, None)
    if self.in_proj_bias is not None:
        # the replicated bias: its gradient from this rank's heads only, summed over the group in backward
        whole = _CopyToGroup.apply(_local_weight(self.in_proj_bias), group).view(3, group.size(), -1)
        biases = tuple(whole[:, group.rank()].unbind(0))
    if self._qkv_same_embed_dim:
        weights = _local(self.in_proj_weight).chunk(3)  # type: ignore[union-attr]
    else:
        weights = tuple(_local(w) for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
    q, k, v = (
        F.linear(x, w, b).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        for x, w, b in zip(inputs, weights, biases, strict=True)
    )
    mask = _additive_mask(attn_mask, key_padding_mask, q.dtype)
    dropout = self.dropout if self.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None)
    y = F.linear(y.transpose(1, 2).flatten(-2), _local_weight(self.out_proj.weight))
    y = _ReduceFromGroup.apply(y, group)
    if self.out_proj.bias is not None:
        y = y + _local(self.out_proj.bias)
    if not self.batch_first:
        y = y.transpose(0, 1)
    return y, None


class HeadParallelAttention(ParallelStyle):
    """Split a ``nn.MultiheadAttention`` by heads over a 1-D mesh: q, k, v projections along their output rows (the
    heads), the output projection along its input columns (``Y = concat_r(heads_r) W_o``, W_o split along rows of its
    input), its bias replicated; one all-reduce forward, one backward."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.MultiheadAttention):
            raise ValueError(f"the 'heads' style splits an nn.MultiheadAttention, not {type(module).__name__}.")
        reason = check_mha(module, device_mesh.size())
        if reason:
            raise ValueError(f"cannot split this MultiheadAttention by heads: {reason}.")
        strided = [_StridedShard(0, split_factor=3)]
        placements: dict[str, list[Any]] = {
            "in_proj_weight": strided,
            "in_proj_bias": [Replicate()],  # whole on every rank (small); each uses its heads' rows
            "q_proj_weight": [Shard(0)],
            "k_proj_weight": [Shard(0)],
            "v_proj_weight": [Shard(0)],
        }
        for name, placement in placements.items():
            param = getattr(module, name, None)
            if param is not None:
                setattr(module, name, nn.Parameter(distribute_tensor(param.detach(), device_mesh, placement)))
        out = module.out_proj
        out.weight = nn.Parameter(distribute_tensor(out.weight.detach(), device_mesh, [Shard(1)]))
        if out.bias is not None:
            out.bias = nn.Parameter(distribute_tensor(out.bias.detach(), device_mesh, [Replicate()]))
        module._tp_group = device_mesh.get_group()  # type: ignore[assignment]
        module.forward = types.MethodType(_head_parallel_forward, module)  # type: ignore[method-assign]
        return module


def check_mha(module: nn.MultiheadAttention, tp: int) -> str:
    """Empty when ``module`` splits into ``tp`` head groups, else the reason it cannot."""
    if module.num_heads % tp:
        return f"num_heads={module.num_heads} is not divisible by tp={tp}"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not split by heads"
    return ""
