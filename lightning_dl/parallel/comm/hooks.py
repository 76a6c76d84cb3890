"""DDP communication hooks: compressed all-reduce with error feedback (``int8``, ``sign``, ``powersgd``) and the
local-SGD hook that skips the all-reduce once local steps begin. Register with
``ddp_model.register_comm_hook(state, hook)``; the state keeps residuals by parameter name for checkpoints.
"""

import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_dl.parallel.comm.compressors import (
    check_compressor,
    compressible,
    initial_q,
    int8_decode,
    int8_encode,
    orthogonalize_,
    sign_decode,
    sign_encode,
)

# no `from __future__ import annotations`: DDP checks the hooks' annotations at runtime
Future = torch.futures.Future[torch.Tensor]


def _done(tensor: torch.Tensor) -> Future:
    future: Future = torch.futures.Future()
    future.set_result(tensor)
    return future


class CompressionState:
    """What a compressed hook keeps between steps: residuals (error feedback) and PowerSGD's warm-started ``Q`` by
    parameter name, the number of backward passes seen (``iter``; plain all-reduce while ``iter < start_iter``) and
    the bytes this rank put into collectives (``bytes_sent``).

    Example::

        >>> net = nn.Linear(4, 2)
        >>> state = CompressionState(net, "int8")
        >>> sorted(state.names.values()), state.iter
        (['bias', 'weight'], 0)
    """

    def __init__(
        self,
        module: nn.Module,
        compressor: str,
        *,
        rank: int = 4,
        start_iter: int = 0,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        check_compressor(compressor, rank, start_iter)
        self.compressor, self.rank, self.start_iter, self.seed = compressor, rank, start_iter, seed
        self.process_group = process_group
        self.names = {id(p): name for name, p in module.named_parameters()}
        self.residuals: dict[str, torch.Tensor] = {}
        self.qs: dict[str, torch.Tensor] = {}
        self.iter = 0
        self.bytes_sent = 0

    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def state_dict(self) -> dict[str, Any]:
        return {
            "iter": self.iter,
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
            "qs": {k: v.detach().cpu().clone() for k, v in self.qs.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.iter = int(state["iter"])
        self.residuals = {k: v.to(device) for k, v in state["residuals"].items()}
        self.qs = {k: v.to(device) for k, v in state["qs"].items()}


def _views(bucket: dist.GradBucket, state: CompressionState) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, gradient view into the bucket's flat buffer), in buffer order."""
    buffer, offset, views = bucket.buffer(), 0, []
    for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
        views.append((state.names[id(param)], buffer[offset : offset + grad.numel()].view_as(grad)))
        offset += grad.numel()
    return views


def _with_residual(state: CompressionState, name: str, grad: torch.Tensor) -> torch.Tensor:
    residual = state.residuals.get(name)
    return grad.float() if residual is None else grad.float() + residual


def _allreduce_mean(state: CompressionState, bucket: dist.GradBucket) -> Future:
    buffer = bucket.buffer()
    state.bytes_sent += buffer.numel() * buffer.element_size()
    buffer.div_(state.world_size())
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _active(state: CompressionState, bucket: dist.GradBucket) -> bool:
    """Whether this backward compresses (``iter >= start_iter``); counts the backward at its last bucket."""
    active = state.iter >= state.start_iter
    if bucket.is_last():
        state.iter += 1
    return active


def quantized_hook(state: CompressionState, bucket: dist.GradBucket) -> Future:
    """``int8`` or ``sign`` all-reduce with error feedback: every rank all-gathers the others' codes and scales in
    one byte tensor and averages the decoded values."""
    if not _active(state, bucket):
        return _allreduce_mean(state, bucket)
    encode = int8_encode if state.compressor == "int8" else sign_encode
    views = _views(bucket, state)
    codes_list, scales, layout = [], [], []
    for name, grad in views:
        corrected = _with_residual(state, name, grad)
        codes, scale = encode(corrected)
        sent = int8_decode(codes, scale) if state.compressor == "int8" else sign_decode(codes, scale, grad.numel())
        state.residuals[name] = corrected - sent.view_as(grad)
        codes_list.append(codes)
        scales.append(scale)
        layout.append(codes.numel())
    # scales first (float32, aligned at the start), then every tensor's codes: one byte tensor per rank
    head = 4 * len(scales)
    local = torch.cat([torch.cat(scales).view(torch.uint8), *codes_list])
    state.bytes_sent += local.numel()
    gathered = [torch.empty_like(local) for _ in range(state.world_size())]
    work = dist.all_gather(gathered, local, group=state.process_group, async_op=True)

    def decode(fut: Future) -> torch.Tensor:
        for _, grad in views:
            grad.zero_()
        for rank_bytes in gathered:
            rank_scales, offset = rank_bytes[:head].view(torch.float32), head
            for i, ((_, grad), code_len) in enumerate(zip(views, layout, strict=True)):
                codes = rank_bytes[offset : offset + code_len]
                offset += code_len
                scale = rank_scales[i : i + 1]
                if state.compressor == "int8":
                    value = int8_decode(codes, scale)
                else:
                    value = sign_decode(codes, scale, grad.numel())
                grad.add_(value.view_as(grad))
        return bucket.buffer().div_(len(gathered))

    return work.get_future().then(decode)


def powersgd_hook(state: CompressionState, bucket: dist.GradBucket) -> Future:
    """PowerSGD with error feedback and warm start: matrices worth compressing go as ``P`` then ``Q`` (two
    all-reduces), the others uncompressed with the first. Residual ``M − P̂·Q_localᵀ`` (Vogels et al. 2019).

    Both all-reduces run inside the hook, in bucket order: issuing the second from a future's callback lets ranks
    order collectives of different buckets differently, and gloo then hangs (seen with a multi-bucket model)."""
    if not _active(state, bucket):
        return _allreduce_mean(state, bucket)
    world = state.world_size()
    views = _views(bucket, state)
    matrices, ps, plain = [], [], []
    for name, grad in views:
        corrected = _with_residual(state, name, grad)
        if compressible(grad.shape, state.rank):
            m = corrected.view(grad.shape[0], -1)
            if name not in state.qs:
                state.qs[name] = initial_q(grad.shape, state.rank, state.seed + zlib.crc32(name.encode())).to(m.device)
            matrices.append((name, grad, m))
            ps.append(m @ state.qs[name])
        else:
            state.residuals.pop(name, None)
            plain.append((grad, corrected))
    first = torch.cat([p.reshape(-1) for p in ps] + [c.reshape(-1) for _, c in plain])
    state.bytes_sent += first.numel() * first.element_size()
    dist.all_reduce(first, group=state.process_group)
    first.div_(world)
    offset, p_hats = 0, []
    for p in ps:
        p_hats.append(orthogonalize_(first[offset : offset + p.numel()].view_as(p).clone()))
        offset += p.numel()
    for grad, _ in plain:
        grad.copy_(first[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    qs = []
    for (name, grad, m), p_hat in zip(matrices, p_hats, strict=True):
        q = m.T @ p_hat
        state.residuals[name] = (m - p_hat @ q.T).view_as(grad)
        qs.append(q)
    if qs:
        flat = torch.cat([q.reshape(-1) for q in qs])
        state.bytes_sent += flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=state.process_group)
        flat.div_(world)
        offset = 0
        for (name, grad, _), p_hat, q in zip(matrices, p_hats, qs, strict=True):
            q_mean = flat[offset : offset + q.numel()].view_as(q)
            offset += q.numel()
            state.qs[name] = q_mean.clone()
            grad.copy_((p_hat @ q_mean.T).view_as(grad))
    return _done(bucket.buffer())


class LocalState:
    """State of ``local_hook``: ``allreduce`` says whether this backward averages gradients (DDP) or keeps them
    local (local SGD); ``bytes_sent`` counts what it sent."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.allreduce = True
        self.bytes_sent = 0


def local_hook(state: LocalState, bucket: dist.GradBucket) -> Future:
    """Plain averaged all-reduce while ``state.allreduce``, else the local gradients unchanged (no communication)."""
    if not state.allreduce:
        return _done(bucket.buffer())
    buffer = bucket.buffer()
    state.bytes_sent += buffer.numel() * buffer.element_size()
    buffer.div_(dist.get_world_size(state.process_group))
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def hook_for(compressor: str) -> Callable[[Any, dist.GradBucket], Future]:
    """The DDP hook that runs ``compressor``."""
    return powersgd_hook if compressor == "powersgd" else quantized_hook
