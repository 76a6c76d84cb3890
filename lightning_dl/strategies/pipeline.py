"""``PipelineStrategy``: the engine's preset for pipeline parallelism (``layout pp = devices / data_parallel_size``,
``dp = data_parallel_size``) on ``torch.distributed.pipelining`` schedules, for a LightningModule that exposes
``pipeline_blocks()`` and ``pipeline_loss(output, target)``. The machinery is :class:`HybridStrategy`'s."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning as L
from typing_extensions import override

from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.strategies.hybrid import HybridStrategy

PRESETS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("pipeline", {"schedule": "1f1b"}, "pipeline parallel, 1F1B, one stage per device"),
    ("pipeline_gpipe", {"schedule": "gpipe"}, "pipeline parallel, GPipe (all forwards, then all backwards)"),
    ("pipeline_1f1b", {"schedule": "1f1b"}, "pipeline parallel, 1F1B"),
    ("pipeline_interleaved", {"schedule": "interleaved_1f1b", "stages_per_rank": 2}, "interleaved 1F1B, 2 stages/rank"),
    ("pipeline_zero_bubble", {"schedule": "zbv_zero_bubble"}, "ZBV zero bubble, V placement (2 stages per rank)"),
)
"""Registered names: (name, constructor arguments, description)."""


class PipelineStrategy(HybridStrategy):
    """Split the module's ``pipeline_blocks()`` into stages over ``devices / data_parallel_size`` processes and train
    with a ``torch.distributed.pipelining`` schedule; gradients are averaged over the data-parallel replicas only.

    Args:
        schedule: ``gpipe``, ``1f1b``, ``interleaved_1f1b``, ``looped_bfs``, ``interleaved_zero_bubble``,
            ``zbv_zero_bubble`` or ``dualpipev``.
        n_microbatches: micro-batches per batch (the batch size must divide by it).
        stages_per_rank: stages each process holds (None: the schedule's default; V schedules need 2).
        balance: ``"params"`` (even parameter counts), ``"time"`` (measured forward+backward per block on
            ``example_input_array``, split to minimise the slowest stage) or a list of blocks per stage.
        data_parallel_size: replicas of the pipeline (``devices = pp · data_parallel_size``).
        record_timeline: record every action of every step (:attr:`timeline` holds this rank's events).
        seed: base seed of blocks built on the meta device in ``configure_model()`` (block i: ``seed + i``).
        checkpoint_format: ``"full"``, ``"sharded"`` or ``"auto"`` (see :class:`HybridStrategy`).
        timeout: process-group timeout: a rank that waits longer on a dead peer fails.

    Example::

        >>> PipelineStrategy(schedule="gpipe", n_microbatches=4).schedule
        'gpipe'
    """

    strategy_name = "pipeline"
    _pipeline_always = True

    def __init__(
        self,
        *,
        schedule: str = "1f1b",
        n_microbatches: int = 4,
        stages_per_rank: int | None = None,
        balance: str | Sequence[int] = "params",
        data_parallel_size: int = 1,
        record_timeline: bool = False,
        seed: int = 0,
        checkpoint_format: str = "auto",
        timeout: timedelta = timedelta(seconds=300),
        start_method: Literal["spawn", "fork", "forkserver"] = "spawn",
        process_group_backend: str | None = None,
    ) -> None:
        if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise ValueError(f"`data_parallel_size={data_parallel_size!r}` must be a positive integer.")
        super().__init__(
            schedule=schedule,
            n_microbatches=n_microbatches,
            stages_per_rank=stages_per_rank,
            balance=balance,
            record_timeline=record_timeline,
            seed=seed,
            checkpoint_format=checkpoint_format,
            timeout=timeout,
            start_method=start_method,
            process_group_backend=process_group_backend,
        )
        self.data_parallel_size = data_parallel_size

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, kwargs, description in PRESETS:
            strategy_registry.register(name, cls, description=description, **kwargs)

    @property
    def pp_size(self) -> int:
        return self.world_size // self.data_parallel_size

    @override
    def _layout_for(self, world_size: int, module: L.LightningModule | None) -> ParallelLayout:
        if world_size % self.data_parallel_size:
            raise ValueError(
                f"`devices` × nodes = {world_size} processes must equal pp × dp with "
                f"`data_parallel_size={self.data_parallel_size}`: use a multiple of {self.data_parallel_size}."
            )
        layout = ParallelLayout(dp=self.data_parallel_size, pp=world_size // self.data_parallel_size)
        if layout != self.parallel_layout:  # the same degrees keep their mesh (validate after fit)
            self.parallel_layout = layout
        return self.parallel_layout
