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

from lightning_dl.parallel.comm.codecs import CODECS, as_numpy, loops
from lightning_dl.parallel.comm.compressors import EPS, check_compressor, initial_q, orthogonalize_
from lightning_dl.parallel.comm.host import HostExchange, check_timeout
from lightning_dl.parallel.comm.workspace import BucketWorkspace

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
    the bytes this rank put into collectives (``bytes_sent``). A CPU bucket's messages go through shared memory
    when every rank runs on this host (``host.py``: no thread wake-ups), through the process group otherwise;
    ``timeout`` bounds the wait for the other ranks there (seconds; the strategies pass their collective timeout).

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
        timeout: float = 1800.0,
    ) -> None:
        check_compressor(compressor, rank, start_iter)
        check_timeout(timeout)
        self.compressor, self.rank, self.start_iter, self.seed = compressor, rank, start_iter, seed
        self.process_group, self.timeout = process_group, timeout
        self.names = {id(p): name for name, p in module.named_parameters()}
        self._residuals: dict[str, torch.Tensor] = {}
        self.qs: dict[str, torch.Tensor] = {}
        self.workspaces: dict[tuple[str, ...], BucketWorkspace] = {}
        """Preallocated buffers by bucket layout (the names of the bucket's parameters); ``residuals`` views them."""
        self.iter = 0
        self.bytes_sent = 0

    @property
    def residuals(self) -> dict[str, torch.Tensor]:
        """Residuals by parameter name (views into the bucket workspaces, zero-copy), each written out first where
        the fused loops (PowerSGD, sign) still keep it in factors for the next step to take off."""
        for ws in self.workspaces.values():
            ws.settle()
        return self._residuals

    @residuals.setter
    def residuals(self, residuals: dict[str, torch.Tensor]) -> None:
        self._residuals = residuals

    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def state_dict(self) -> dict[str, Any]:
        return {
            "iter": self.iter,
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
            "qs": {k: v.detach().cpu().clone() for k, v in self.qs.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Replace the state with a saved one; the bucket workspaces are built again at the next step, adopting the
        loaded residuals (a tensor without one starts from zero, not from what this state held before)."""
        self.iter = int(state["iter"])
        self.workspaces = {}
        self.residuals = {k: v.to(device) for k, v in state["residuals"].items()}
        self.qs = {k: v.to(device) for k, v in state["qs"].items()}


def _workspace(state: CompressionState, bucket: dist.GradBucket) -> BucketWorkspace:
    """The preallocated buffers of this bucket's layout (built at its first compressed step, and again when DDP
    rebuilds its buckets), with ``state.residuals`` pointing into them. Building one is a collective on a CPU
    bucket of several ranks (its shared-memory exchange, ``host.py``): every rank builds it at the same step, so a
    rank must not drop its workspaces alone (``load_state_dict`` runs on every rank)."""
    names = tuple(state.names[id(p)] for p in bucket.parameters())
    ws = state.workspaces.get(names)
    if ws is None:
        for key in [k for k in state.workspaces if set(k) & set(names)]:  # an earlier layout of these tensors
            state.workspaces.pop(key).settle()
        shapes = [g.shape for g in bucket.gradients()]
        device = bucket.buffer().device
        fused = FUSED and device.type == "cpu"
        ws = BucketWorkspace(
            list(names), shapes, state.compressor, world=state.world_size(), rank=state.rank, device=device, fused=fused
        )
        if device.type == "cpu" and state.world_size() > 1:
            ws.exchange = HostExchange.build(state.process_group, capacity=ws.message_bytes, timeout=state.timeout)
        state.workspaces[names] = ws
    ws.adopt(state._residuals)
    return ws


def _all_reduce(state: CompressionState, ws: BucketWorkspace, tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over the ranks in place: through the bucket's shared memory where it has some, else gloo."""
    if ws.exchange is not None:
        ws.exchange.all_reduce_(tensor)
    else:
        dist.all_reduce(tensor, group=state.process_group)


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
    encode, finish = CODECS[state.compressor, ws.fused]
    encode(ws, out)
    state.bytes_sent += ws.message.numel()
    world, me = state.world_size(), dist.get_rank(state.process_group)
    if ws.exchange is not None:
        ws.exchange.all_gather(ws.received, ws.message)
        finish(ws, out, world, me)
        return _finished(bucket, out)
    work = dist.all_gather(ws.received, ws.message, group=state.process_group, async_op=True)

    def decode(fut: Future) -> torch.Tensor:
        finish(ws, out, world, me)
        if out is not bucket.buffer():
            bucket.buffer().copy_(out)
        return bucket.buffer()

    return work.get_future().then(decode)


def powersgd_hook(state: CompressionState, bucket: dist.GradBucket) -> Future:
    """PowerSGD with error feedback and warm start: matrices worth compressing go as ``P`` then ``Q`` (two
    all-reduces), the others uncompressed with the first. Residual ``M − P̂·Q_localᵀ`` (Vogels et al. 2019).
    Every product is written into preallocated buffers: ``P`` and ``Qᵀ`` into the two messages, the residual
    update in place, the result straight into the bucket buffer. Fused (CPU): three passes over each matrix where
    torch takes five: ``M = e + g`` with ``P = MQ``; ``Qᵀ = P̂ᵀM``; the result ``P̂Q̄ᵀ``. The residual is left in
    factors (``M``, ``P̂``, ``Q_local``) and taken off in the next step's first pass, which reads and writes ``M``
    anyway: one read and one write of every element fewer per step. ``CompressionState.residuals`` and checkpoints
    write it out first, with the same bits.

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
        p = ws.p(i)
        if ws.fused:  # the last step's residual taken off on the way (P̂ is still in p, Q_localᵀ in q_local)
            q_t, q_local_t = state.qs[name].T.contiguous(), ws.q_local[ws.q_span(i)].view(r, -1)
            pending, ws.pending[i] = ws.pending[i], False
            loops().add_project(as_numpy(m), as_numpy(g), as_numpy(q_t), as_numpy(p), as_numpy(q_local_t), pending)
        else:
            m.add_(g)  # M = g + e
            torch.mm(m, state.qs[name], out=p)
        matrices.append((i, name, g, m, p, ws.q_span(i)))
    state.bytes_sent += ws.first.numel() * ws.first.element_size()
    _all_reduce(state, ws, ws.first)
    ws.first.div_(world)
    for i in range(len(ws.names)):
        if not ws.compressed[i]:
            ws.view(out, i).copy_(ws.first[ws.plain_offsets[i] : ws.plain_offsets[i] + ws.numels[i]])
    if not matrices:
        return _finished(bucket, out)
    for _, _, _, m, p_hat, span in matrices:
        q_t = ws.second[span].view(r, -1)
        if ws.fused:
            loops().orthogonalize(as_numpy(p_hat), EPS)
            loops().project_back(as_numpy(p_hat), as_numpy(m), as_numpy(q_t))  # this rank's Qᵀ = P̂ᵀM
        else:
            orthogonalize_(p_hat)
            torch.mm(p_hat.T, m, out=q_t)  # this rank's Qᵀ = P̂ᵀM (on CPU 3x faster than MᵀP̂ into Q)
            m.addmm_(p_hat, q_t, alpha=-1.0)  # residual e = M − P̂Qᵀ
    if ws.fused:
        ws.q_local.copy_(ws.second)
    state.bytes_sent += ws.second.numel() * ws.second.element_size()
    _all_reduce(state, ws, ws.second)
    ws.second.div_(world)
    for i, name, grad, _, p_hat, span in matrices:
        q_mean_t = ws.second[span].view(r, -1)
        state.qs[name].copy_(q_mean_t.T)
        if ws.fused:  # the result P̂Q̄ᵀ; the residual M − P̂Q_localᵀ stays in factors for the next step's first pass
            loops().result(as_numpy(p_hat), as_numpy(q_mean_t), as_numpy(grad))
            ws.pending[i] = True
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
        encode, finish = CODECS[compressor, True]
        for _ in range(2):  # the second encode takes off the residual the first step left (sign)
            encode(ws, out)
            for received in ws.received:
                received.copy_(ws.message)
            finish(ws, out, world, 0)
        ws.settle()
        return
    kernels, rows, cols = loops(), 8, 70
    m, g = ws.residual_views[1].view(rows, cols), out[70:].view(rows, cols)
    p, q_t = ws.first[: rows * 4].view(rows, 4), ws.second[: cols * 4].view(4, cols)
    for pending in (False, True):
        kernels.add_project(as_numpy(m), as_numpy(g), as_numpy(q_t), as_numpy(p), as_numpy(q_t), pending)
    kernels.orthogonalize(as_numpy(p), EPS)
    kernels.project_back(as_numpy(p), as_numpy(m), as_numpy(q_t))
    kernels.result(as_numpy(p), as_numpy(q_t), as_numpy(g))
    kernels.settle(as_numpy(m), as_numpy(p), as_numpy(q_t))
