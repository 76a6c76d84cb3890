"""DDP with compressed gradient all-reduce and error feedback: PowerSGD, per-tensor scaled int8 or 1-bit sign
(``lightning_dl.parallel.comm``), every rank's residuals saved in checkpoints."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_dl.parallel.comm import (
    CompressionState,
    check_compressor,
    check_dense_gradients,
    compile_fused,
    hook_for,
)
from lightning_dl.strategies._comm import CommDDPStrategy


class CompressedDDPStrategy(CommDDPStrategy):
    """DDP whose gradient buckets go through a compressor with error feedback: the part of ``gradient + residual``
    a step could not send becomes the next residual.

    Args:
        compressor: ``"powersgd"`` (rank-``rank`` P·Qᵀ, warm-started), ``"int8"`` (per-tensor scale ``max|g|/127``)
            or ``"sign"`` (1 bit per element, scale ``‖g‖₁/n``).
        rank: PowerSGD's approximation rank (>= 1).
        start_iter: backward passes of plain all-reduce before compressing (>= 0).
        timeout: collective timeout (seconds or ``timedelta``).
        **ddp_kwargs: passed to ``DDPStrategy``. ``gradient_as_bucket_view`` defaults to True here: the hook writes
            the averaged gradient into DDP's bucket buffer, and the parameters' gradients are views of it (DDP does
            not copy the buffer back into separate gradient tensors after every step). ``bucket_cap_mb`` defaults
            to 25: buckets of 25 MiB, the first one too. DDP's own default caps the first bucket at 1 MB so that
            communication starts early in the backward; for a compressor that first bucket is a rendezvous and a
            round of encoding and decoding of its own, for a few percent of the gradient (measured on 2 CPU ranks,
            bench_data_parallel: 79.6 against 66.6 ms per step for ``ddp_sign``, 94.9 against 76.7 for
            ``ddp_powersgd``). ``bucket_cap_mb=None`` restores DDP's default.

    Example::

        >>> CompressedDDPStrategy(compressor="powersgd", rank=2).strategy_name
        'ddp_powersgd'
    """

    def __init__(self, *, compressor: str = "int8", rank: int = 4, start_iter: int = 0, **ddp_kwargs: Any) -> None:
        check_compressor(compressor, rank, start_iter)
        super().__init__(**({"gradient_as_bucket_view": True, "bucket_cap_mb": 25} | ddp_kwargs))
        self.compressor, self.rank, self.start_iter = compressor, rank, start_iter
        self.strategy_name = f"ddp_{compressor}"
        self._state: CompressionState | None = None

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank put into gradient collectives so far."""
        return 0 if self._state is None else self._state.bytes_sent

    @override
    def configure_ddp(self) -> None:
        check_dense_gradients(self._module, f"strategy={self.strategy_name!r}")
        assert self._timeout is not None  # CommDDPStrategy always sets one
        timeout = self._timeout.total_seconds()
        self._state = CompressionState(
            self._module, self.compressor, rank=self.rank, start_iter=self.start_iter, timeout=timeout
        )
        if self.root_device.type == "cpu":  # compiled now, not in the first training step
            compile_fused(self.compressor, self.world_size)
        super().configure_ddp()

    @override
    def _comm_hook(self) -> tuple[Any, Any]:
        return self._state, hook_for(self.compressor)

    @override
    def _rank_state(self) -> dict[str, Any]:
        return {} if self._state is None else self._state.state_dict()

    @override
    def _load_rank_state(self, state: dict[str, Any]) -> None:
        if state and self._state is not None:
            self._state.load_state_dict(state, self.root_device)
