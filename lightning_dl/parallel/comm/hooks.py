"""DDP communication hooks: compressed all-reduce with error feedback (``int8``, ``sign``, ``powersgd``) and the
local-SGD hook that skips the all-reduce once local steps begin. Register with
``ddp_model.register_comm_hook(state, hook)``; the state keeps residuals by parameter name for checkpoints.
"""

import zlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lightning_dl.parallel.comm.compressors import (
    check_compressor,
    initial_q,
    int8_decode_,
    int8_quantize_,
    int8_scale,
    orthogonalize_,
    pack_bits_,
    sign_bits_,
    sign_decode_,
)
from lightning_dl.parallel.comm.workspace import CHUNK, BucketWorkspace

# no `from __future__ import annotations`: DDP checks the hooks' annotations at runtime
Future = torch.futures.Future[torch.Tensor]

FUSED = True
"""Run CPU buckets through the fused loops of ``kernels.py`` (the torch path otherwise: other devices, and tests)."""


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
        self.workspaces: dict[tuple[str, ...], BucketWorkspace] = {}
        """Preallocated buffers by bucket layout (the names of the bucket's parameters); ``residuals`` views them."""
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


def _workspace(state: CompressionState, bucket: dist.GradBucket) -> BucketWorkspace:
    """The preallocated buffers of this bucket's layout (built at its first compressed step, and again when DDP
    rebuilds its buckets), with ``state.residuals`` pointing into them."""
    names = tuple(state.names[id(p)] for p in bucket.parameters())
    ws = state.workspaces.get(names)
    if ws is None:
        for key in [k for k in state.workspaces if set(k) & set(names)]:  # an earlier layout of these tensors
            del state.workspaces[key]
        shapes = [g.shape for g in bucket.gradients()]
        device = bucket.buffer().device
        fused = FUSED and device.type == "cpu"
        ws = BucketWorkspace(
            list(names), shapes, state.compressor, world=state.world_size(), rank=state.rank, device=device, fused=fused
        )
        state.workspaces[names] = ws
    ws.adopt(state.residuals)
    return ws


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


def _float_buffer(bucket: dist.GradBucket) -> torch.Tensor:
    buffer = bucket.buffer()
    return buffer if buffer.dtype == torch.float32 else buffer.float()


def quantized_hook(state: CompressionState, bucket: dist.GradBucket) -> Future:
    """``int8`` or ``sign`` all-reduce with error feedback: every rank all-gathers the others' codes and scales in
    one byte tensor and averages the decoded values.

    In place, in the bucket's preallocated buffers (the residual buffer holds ``c = g + e``, then the new ``e``).
    The ranks' decoded messages are summed, then divided by the world size, with the same numbers in the same order
    on every rank (with two ranks, ``a + b == b + a``), so that every rank gets the same bits."""
    if not _active(state, bucket):
        return _allreduce_mean(state, bucket)
    ws = _workspace(state, bucket)
    out = _float_buffer(bucket)
    encode, finish = _CODECS[state.compressor, ws.fused]
    encode(ws, out)
    state.bytes_sent += ws.message.numel()
    world, me = state.world_size(), dist.get_rank(state.process_group)
    work = dist.all_gather(ws.received, ws.message, group=state.process_group, async_op=True)

    def decode(fut: Future) -> torch.Tensor:
        finish(ws, out, world, me)
        if out is not bucket.buffer():
            bucket.buffer().copy_(out)
        return bucket.buffer()

    return work.get_future().then(decode)


def _int8_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``c = g + e`` in the residual buffer, this rank's codes and scales into the message, its decoded message
    ``q·s`` over the gradient in ``out`` (no longer needed), then ``e ← c − q·s`` (exact: Sterbenz)."""
    ws.residual.add_(out)
    for i in range(len(ws.names)):
        c = ws.view(ws.residual, i)
        ws.scales[i] = int8_scale(c)
        int8_quantize_(c, ws.scales[i], ws.codes(ws.message, i), ws.view(out, i))
    ws.residual.sub_(out)


def _int8_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """The mean of the ranks' decoded messages into ``out`` (which holds this rank's own ``q·s``)."""
    heads = [r[: 4 * len(ws.names)].view(torch.float32) for r in ws.received]
    for i in range(len(ws.names)):
        target, scratch = ws.view(out, i), ws.view(ws.scratch, i)
        if world == 2:
            target.add_(int8_decode_(ws.codes(ws.received[1 - me], i), heads[1 - me][i], scratch))
            continue
        for r in range(world):
            int8_decode_(ws.codes(ws.received[r], i), heads[r][i], target if r == 0 else scratch)
            if r:
                target.add_(scratch)
    out.div_(world)


def _units(bits: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The unit signs σ = 2·bit − 1 (exactly ±1) of 0/1 ``bits``, in ``buffer``."""
    units = buffer[: bits.numel()]
    units.copy_(bits.view(torch.uint8))
    return units.mul_(2.0).sub_(1.0)


def _sign_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``c = g + e`` in the residual buffer, the signs ``c >= 0`` packed into the message and ``s = c·σ / n``
    (= ‖c‖₁ / n) into its scales, in chunks that stay in cache while ``c`` is read once."""
    for i, n in enumerate(ws.numels):
        c_all, g_all, bits_all, total = ws.view(ws.residual, i), ws.view(out, i), ws.sign_bits(i), 0.0
        for lo in range(0, n, CHUNK):
            c, bits = c_all[lo : lo + CHUNK], bits_all[lo : lo + CHUNK]
            c.add_(g_all[lo : lo + CHUNK])
            sign_bits_(c, bits)
            total += float(torch.dot(c, _units(bits, ws.units)))
        ws.scales[i] = total / n if n else 0.0
    pack_bits_(ws.bits, ws.words, ws.message[ws.code_offsets[0] :])


def _sign_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """Per chunk: ``e ← c − s·σ`` (exact: ``s·σ`` is ``±s``), and the mean of the ranks' ``s_r·σ_r`` into ``out``;
    with two ranks ``(s_o/2)·σ_o + (s/2)·σ`` (halving is exact), in one pass over ``out``."""
    heads = [r[: 4 * len(ws.names)].view(torch.float32) for r in ws.received]
    for i, n in enumerate(ws.numels):
        c_all, bits_all, out_all, s = ws.view(ws.residual, i), ws.sign_bits(i), ws.view(out, i), float(ws.scales[i])
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            units, decoded, codes = (
                _units(bits_all[lo:hi], ws.units),
                ws.decoded[: hi - lo],
                slice(lo // 8, -(-hi // 8)),
            )
            c_all[lo:hi].sub_(units, alpha=s)
            if world == 2:
                sign_decode_(ws.codes(ws.received[1 - me], i)[codes], heads[1 - me][i] / 2, decoded, ws.index)
                torch.add(decoded, units, alpha=s / 2, out=out_all[lo:hi])
                continue
            for r in range(world):
                term = out_all[lo:hi] if r == 0 else decoded
                sign_decode_(ws.codes(ws.received[r], i)[codes], heads[r][i], term, ws.index)
                if r:
                    out_all[lo:hi].add_(term)
    if world != 2:
        out.div_(world)


def _fused_int8_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``_int8_encode`` with the codes and ``e`` in one fused pass per tensor; ``out`` is left to
    ``_fused_int8_finish``."""
    ws.residual.add_(out)
    for i in range(len(ws.names)):
        c = ws.view(ws.residual, i)
        ws.scales[i] = int8_scale(c)
        _kernels().int8_quantize(_np(c), np.float32(float(ws.scales[i])), _np(ws.codes(ws.message, i).view(torch.int8)))


def _fused_int8_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """The mean of every rank's ``q·s`` (this rank's own from its message too) into ``out``: one pass."""
    scales = _np(ws.received_scales())
    for i in range(len(ws.names)):
        codes, mean = _np(ws.received_codes(i).view(torch.int8)), _np(ws.view(out, i))
        if world == 2:
            _kernels().int8_finish_pair(codes[0], codes[1], scales[i, 0], scales[i, 1], mean)
        else:
            _kernels().int8_finish(codes, scales[i], mean)


def _fused_sign_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``_sign_encode`` in one fused pass per tensor (``c``, its packed signs and ``‖c‖₁``)."""
    for i, n in enumerate(ws.numels):
        total = _kernels().sign_encode(_np(ws.view(ws.residual, i)), _np(ws.view(out, i)), _np(ws.codes(ws.message, i)))
        ws.scales[i] = total / n if n else 0.0


def _fused_sign_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """``_sign_finish`` in one fused pass per tensor (``e`` and the mean): with two ranks, whole 64-bit words of
    signs at a time, then the last ``n mod 64`` elements."""
    scales = _np(ws.received_scales())
    for i, n in enumerate(ws.numels):
        c, codes, mean = _np(ws.view(ws.residual, i)), _np(ws.received_codes(i)), _np(ws.view(out, i))
        bulk = n // 64 * 64 if world == 2 else 0
        if bulk:
            words = codes[:, : bulk // 8].view(np.uint64)
            s_me, s_other = scales[i, me], scales[i, 1 - me]
            _kernels().sign_finish_pair(c[:bulk], words[me], words[1 - me], s_me, s_other, mean[:bulk])
        _kernels().sign_finish(c[bulk:], codes[:, bulk // 8 :], scales[i], me, mean[bulk:], _kernels().SIGNS)


_CODECS = {  # (compressor, fused): (encode, finish)
    ("int8", False): (_int8_encode, _int8_finish),
    ("sign", False): (_sign_encode, _sign_finish),
    ("int8", True): (_fused_int8_encode, _fused_int8_finish),
    ("sign", True): (_fused_sign_encode, _fused_sign_finish),
}


def _kernels() -> ModuleType:
    """``kernels.py``, imported on first use: numba takes about 0.3 s to import, which a process without a compressed
    CPU bucket need not pay."""
    from lightning_dl.parallel.comm import kernels

    return kernels


def _np(tensor: torch.Tensor) -> np.ndarray:
    """The NumPy view of a CPU tensor (shared memory), for the fused loops."""
    return tensor.detach().numpy()


def powersgd_hook(state: CompressionState, bucket: dist.GradBucket) -> Future:
    """PowerSGD with error feedback and warm start: matrices worth compressing go as ``P`` then ``Q`` (two
    all-reduces), the others uncompressed with the first. Residual ``M − P̂·Q_localᵀ`` (Vogels et al. 2019).
    Every product is written into preallocated buffers: ``P`` and ``Qᵀ`` into the two messages, the residual
    update in place, the result straight into the bucket buffer. Fused (CPU): three passes over each matrix
    (``M = g + e`` with ``P = MQ``; ``Qᵀ = P̂ᵀM``; the residual with the result ``P̂Q̄ᵀ``) where torch takes five.

    Both all-reduces run inside the hook, in bucket order: issuing the second from a future's callback lets ranks
    order collectives of different buckets differently, and gloo then hangs (seen with a multi-bucket model)."""
    if not _active(state, bucket):
        return _allreduce_mean(state, bucket)
    world, r = state.world_size(), state.rank
    ws = _workspace(state, bucket)
    out = _float_buffer(bucket)
    matrices = []
    for i, name in enumerate(ws.names):
        grad = ws.view(out, i)
        if not ws.compressed[i]:
            ws.first[ws.plain_offsets[i] : ws.plain_offsets[i] + grad.numel()].copy_(grad)
            continue
        rows = ws.shapes[i][0]
        m, g = ws.residual_views[i].view(rows, -1), grad.view(rows, -1)
        if name not in state.qs:
            state.qs[name] = initial_q(ws.shapes[i], r, state.seed + zlib.crc32(name.encode())).to(m.device)
        p = ws.first[ws.p_offsets[i] : ws.p_offsets[i] + rows * r].view(rows, r)
        if ws.fused:
            _kernels().add_project(_np(m), _np(g), _np(state.qs[name].T.contiguous()), _np(p))
        else:
            m.add_(g)  # M = g + e
            torch.mm(m, state.qs[name], out=p)
        matrices.append((name, g, m, p, slice(ws.q_offsets[i], ws.q_offsets[i] + m.shape[1] * r)))
    state.bytes_sent += ws.first.numel() * ws.first.element_size()
    dist.all_reduce(ws.first, group=state.process_group)
    ws.first.div_(world)
    for i in range(len(ws.names)):
        if not ws.compressed[i]:
            ws.view(out, i).copy_(ws.first[ws.plain_offsets[i] : ws.plain_offsets[i] + ws.numels[i]])
    if not matrices:
        return _finished(bucket, out)
    for _, _, m, p_hat, span in matrices:
        orthogonalize_(p_hat)
        q_t = ws.second[span].view(r, -1)
        if ws.fused:
            _kernels().project_back(_np(p_hat), _np(m), _np(q_t))  # this rank's Qᵀ = P̂ᵀM
        else:
            torch.mm(p_hat.T, m, out=q_t)  # this rank's Qᵀ = P̂ᵀM (on CPU 3x faster than MᵀP̂ into Q)
            m.addmm_(p_hat, q_t, alpha=-1.0)  # residual e = M − P̂Qᵀ
    if ws.fused:
        ws.q_local.copy_(ws.second)
    state.bytes_sent += ws.second.numel() * ws.second.element_size()
    dist.all_reduce(ws.second, group=state.process_group)
    ws.second.div_(world)
    for name, grad, m, p_hat, span in matrices:
        q_mean_t = ws.second[span].view(r, -1)
        state.qs[name].copy_(q_mean_t.T)
        if ws.fused:  # residual e = M − P̂Q_localᵀ and the result P̂Q̄ᵀ in one pass
            q_local_t = ws.q_local[span].view(r, -1)
            _kernels().residual_and_result(_np(m), _np(p_hat), _np(q_local_t), _np(q_mean_t), _np(grad))
        else:
            torch.mm(p_hat, q_mean_t, out=grad)
    return _finished(bucket, out)


def _finished(bucket: dist.GradBucket, out: torch.Tensor) -> Future:
    if out is not bucket.buffer():
        bucket.buffer().copy_(out)
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


def compile_fused(compressor: str, world: int) -> None:
    """Compile, or load from numba's on-disk cache, every fused loop that a CPU bucket of ``compressor`` calls with
    ``world`` ranks, on tiny buffers shaped like the hooks' own (64-bit words of signs at aligned and unaligned
    offsets included), so that the first training step does not pay for it: compiling takes seconds the first time
    on a machine, loading from the cache a fraction of one. Does nothing while ``FUSED`` is off.

    Example::

        >>> compile_fused("sign", 2)
    """
    check_compressor(compressor, 4, 0)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"`world` (the number of ranks) must be an integer >= 1, got {world!r}.")
    if not FUSED:
        return
    shapes = [torch.Size([70]), torch.Size([8, 70])]  # codes of 9 bytes: the second tensor's start unaligned
    ws = BucketWorkspace(["a", "b"], shapes, compressor, world=world, rank=4, fused=True)
    out = torch.ones(sum(s.numel() for s in shapes))
    if compressor != "powersgd":
        encode, finish = _CODECS[compressor, True]
        encode(ws, out)
        for received in ws.received:
            received.copy_(ws.message)
        finish(ws, out, world, 0)
        return
    kernels, rows, cols = _kernels(), 8, 70
    m, g = ws.residual_views[1].view(rows, cols), out[70:].view(rows, cols)
    p, q_t = ws.first[: rows * 4].view(rows, 4), ws.second[: cols * 4].view(4, cols)
    kernels.add_project(_np(m), _np(g), _np(torch.ones(cols, 4).T.contiguous()), _np(p))
    kernels.project_back(_np(p), _np(m), _np(q_t))
    kernels.residual_and_result(_np(m), _np(p), _np(q_t), _np(q_t), _np(g))
