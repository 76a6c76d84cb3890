"""Preallocated buffers of one DDP gradient bucket for the compressed hooks: the residuals of its tensors in one flat
float32 buffer (``CompressionState.residuals`` holds views into it, by parameter name), the message a rank sends,
the messages it receives and the scratch that the torch path needs. Allocated once per bucket layout, so that a step
makes no large allocation (every new multi-megabyte tensor costs page faults on first touch)."""

from __future__ import annotations

import numpy as np
import torch

from lightning_dl.parallel.comm.compressors import compressible
from lightning_dl.parallel.comm.host import HostExchange

CHUNK = 1 << 17
"""Elements per chunk of the sign hook's passes (about 0.5 MB of float32 per buffer: several fit in a core's L2)."""


class BucketWorkspace:
    """Buffers of one bucket, laid out like DDP's flat bucket buffer (tensor ``i`` at ``offsets[i]``).

    Args:
        names: the parameter names of the bucket, in buffer order.
        shapes: their gradient shapes.
        compressor: ``"int8"``, ``"sign"`` or ``"powersgd"``.
        world: ranks in the process group (one receive buffer each).
        rank: PowerSGD's approximation rank.
        device: where the buffers live (the bucket's device).
        fused: whether the hooks run this bucket through the fused CPU loops of ``kernels.py`` (they need no scratch
            of gradient size); otherwise through torch operations, which any device runs.

    Example::

        >>> ws = BucketWorkspace(["w", "b"], [torch.Size([3, 4]), torch.Size([3])], "sign", world=2)
        >>> ws.offsets, ws.code_offsets, ws.message.numel()  # 4 bytes of scale per tensor, then 2 + 1 code bytes
        ([0, 12], [8, 10], 11)
    """

    def __init__(
        self,
        names: list[str],
        shapes: list[torch.Size],
        compressor: str,
        *,
        world: int,
        rank: int = 4,
        device: torch.device | None = None,
        fused: bool = False,
    ) -> None:
        self.names, self.shapes, self.compressor, self.fused, self.rank = names, shapes, compressor, fused, rank
        self.exchange: HostExchange | None = None
        """Shared memory that carries this bucket's messages when every rank runs on this host (``host.py``);
        ``None``: gloo (or the device's backend) carries them."""
        self.numels = [s.numel() for s in shapes]
        self.offsets = [sum(self.numels[:i]) for i in range(len(shapes))]
        total = sum(self.numels)
        self.residual = torch.zeros(total, device=device)
        """Residuals (error feedback) of every tensor of the bucket, flat, in buffer order; where ``pending``, the
        corrected gradient whose residual is still in factors (``settle`` makes it the residual)."""
        self.residual_views = [self.view(self.residual, i).view(s) for i, s in enumerate(shapes)]
        self.pending = [False] * len(shapes)
        """Fused loops: tensor ``i``'s residual is still ``residual`` less what this rank sent, kept in factors
        (PowerSGD: ``P̂`` in ``first``, ``Q_localᵀ`` in ``q_local``; sign: ``s`` and σ in ``message``); the next step's
        first pass takes it off on the way, or ``settle`` writes it out. int8 and the torch path leave none."""
        if compressor == "powersgd":
            self.compressed = [compressible(s, rank) for s in shapes]
            self.message = torch.empty(0, dtype=torch.uint8)
            # first all-reduce: P of each compressed matrix, then the plain tensors; second: Q of each matrix
            pairs = list(zip(shapes, self.compressed, strict=True))
            p_sizes = [s[0] * rank if c else 0 for s, c in pairs]
            q_sizes = [s.numel() // s[0] * rank if c else 0 for s, c in pairs]
            plain = [0 if c else s.numel() for s, c in pairs]
            self.p_offsets = _starts(p_sizes)
            self.plain_offsets = [sum(p_sizes) + o for o in _starts(plain)]
            self.q_offsets = _starts(q_sizes)
            self.first = torch.empty(sum(p_sizes) + sum(plain), device=device)
            self.second = torch.empty(sum(q_sizes), device=device)
            if fused:  # this rank's Qᵀ, kept while the second all-reduce averages it and until the next step
                self.q_local = torch.zeros_like(self.second)  # finite: the first pass multiplies it by zeros
            return
        self.compressed = [True] * len(shapes)
        code_sizes = self.numels if compressor == "int8" else [-(-n // 8) for n in self.numels]
        head = 4 * len(shapes)  # float32 scales first, aligned at the start of the message
        self.code_offsets = [head + o for o in _starts(code_sizes)]
        self.code_sizes = code_sizes
        self.message = torch.zeros(head + sum(code_sizes), dtype=torch.uint8, device=device)
        self.scales = self.message[:head].view(torch.float32)
        length = self.message.numel()
        self.received_all = torch.empty(world, -(-length // 4) * 4, dtype=torch.uint8, device=device)
        """Every rank's message after the all-gather, one row each, rows aligned to 4 bytes for the float32 scales
        (``received`` lists the messages)."""
        self.received = [row[:length] for row in self.received_all]
        if fused:
            return
        if compressor == "int8":
            self.scratch = torch.empty(total, device=device)
            """Another rank's decoded message, before it is added."""
            return
        packed = sum(code_sizes)
        # tensor i's signs as 0/1 bytes at 8 * (its code offset), zero padding up to a multiple of 8
        self.bits = torch.zeros(8 * packed, dtype=torch.bool, device=device)
        self.words = torch.empty(packed, dtype=torch.int64, device=device)
        # the sign hook works in chunks of CHUNK elements that stay in cache: unit signs, a decoded message
        self.units = torch.empty(min(CHUNK, max(self.numels, default=0)), device=device)
        self.decoded = torch.empty_like(self.units)
        self.index = torch.empty(max(code_sizes, default=0), dtype=torch.int32, device=device)

    def p(self, i: int) -> torch.Tensor:
        """PowerSGD: matrix ``i``'s ``P`` (then ``P̂``) in ``first``, ``rows × rank``."""
        rows = self.shapes[i][0]
        return self.first[self.p_offsets[i] : self.p_offsets[i] + rows * self.rank].view(rows, self.rank)

    def q_span(self, i: int) -> slice:
        """PowerSGD: where matrix ``i``'s ``Qᵀ`` (``rank × cols``) lies in ``second`` and ``q_local``."""
        return slice(self.q_offsets[i], self.q_offsets[i] + self.numels[i] // self.shapes[i][0] * self.rank)

    def settle(self) -> None:
        """Write out every residual still in factors (``pending``), with the bits the next step would have given it:
        before anything reads the residuals."""
        if not any(self.pending):
            return
        from lightning_dl.parallel.comm import kernels

        for i, pending in enumerate(self.pending):
            if not pending:
                continue
            if self.compressor == "sign":
                scale = np.float32(float(self.scales[i]))  # this rank's own s and σ, in its message
                kernels.sign_settle(self.view(self.residual, i).numpy(), self.codes(self.message, i).numpy(), scale)
            else:
                q_local_t = self.q_local[self.q_span(i)].view(self.rank, -1)
                m = self.residual_views[i].view(self.shapes[i][0], -1)
                kernels.settle(m.numpy(), self.p(i).numpy(), q_local_t.numpy())
            self.pending[i] = False

    @property
    def message_bytes(self) -> int:
        """Bytes of the largest message a step of this bucket sends (an exchange's capacity)."""
        if self.compressor == "powersgd":
            return max(self.first.nbytes, self.second.nbytes, 1)
        return max(self.message.nbytes, 1)

    def view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Tensor ``i``'s part of a flat bucket-shaped ``buffer``, flat."""
        return buffer[self.offsets[i] : self.offsets[i] + self.numels[i]]

    def codes(self, message: torch.Tensor, i: int) -> torch.Tensor:
        """Tensor ``i``'s code bytes in ``message`` (this rank's or a received one)."""
        start = self.code_offsets[i]
        return message[start : start + self.code_sizes[i]]

    def received_codes(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s code bytes in every rank's message, one row per rank."""
        start = self.code_offsets[i]
        return self.received_all[:, start : start + self.code_sizes[i]]

    def received_scales(self) -> torch.Tensor:
        """Every rank's float32 scales, one row per tensor, one column per rank."""
        head = 4 * len(self.names)
        return torch.stack([r[:head].view(torch.float32) for r in self.received], dim=1)

    def sign_bits(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s 0/1 sign bytes (without the padding)."""
        start = 8 * (self.code_offsets[i] - self.code_offsets[0])
        return self.bits[start : start + self.numels[i]]

    def adopt(self, residuals: dict[str, torch.Tensor]) -> None:
        """Make ``residuals[name]`` a view into this workspace for every compressed tensor, keeping the values an
        entry already holds (a loaded checkpoint, or the residual of an earlier bucket layout)."""
        for i, name in enumerate(self.names):
            if not self.compressed[i]:
                continue
            view = self.residual_views[i]
            old = residuals.get(name)
            if old is view:
                continue
            if old is not None:
                view.copy_(old.reshape(self.shapes[i]))
                self.pending[i] = False  # the residual is the one adopted
            residuals[name] = view


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]
