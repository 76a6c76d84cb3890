"""Every schedule of ``torch.distributed.pipelining`` (torch 2.13) by name, with the stage placement it needs and
the checks that fail before any process waits on another. Torch only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule


@dataclass(frozen=True)
class ScheduleSpec:
    """How a schedule places stages and what it needs."""

    cls: Any
    """The torch schedule class."""
    multi: bool
    """Several stages per rank (the schedule takes a list of stages)."""
    placement: str
    """``loop``: rank r holds stages r, r+p, r+2p, ...; ``v``: rank r holds r and 2p-1-r."""
    stages_per_rank: int | None
    """The only number of stages per rank it runs with, or None for any (>= 1)."""
    default_stages_per_rank: int
    microbatches_at_least_stages: bool
    """It needs n_microbatches >= the number of stages."""
    rounds: bool
    """Interleaved schedules: n_microbatches must be a multiple of max(1, n_microbatches // p)."""
    description: str


SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec(ScheduleGPipe, False, "loop", 1, 1, False, False, "all forwards, then all backwards"),
    "1f1b": ScheduleSpec(Schedule1F1B, False, "loop", 1, 1, True, False, "one forward, one backward in steady state"),
    "interleaved_1f1b": ScheduleSpec(
        ScheduleInterleaved1F1B, True, "loop", None, 2, False, True, "1F1B over several looped stages per rank"
    ),
    "looped_bfs": ScheduleSpec(
        ScheduleLoopedBFS, True, "loop", None, 2, False, False, "breadth first over looped stages per rank"
    ),
    "interleaved_zero_bubble": ScheduleSpec(
        ScheduleInterleavedZeroBubble, True, "loop", None, 2, False, True, "interleaved, weight gradients deferred"
    ),
    "zbv_zero_bubble": ScheduleSpec(
        ScheduleZBVZeroBubble, True, "v", 2, 2, False, False, "zero bubble in V placement (2 stages per rank)"
    ),
    "dualpipev": ScheduleSpec(
        ScheduleDualPipeV, True, "v", 2, 2, True, False, "DualPipe in V placement (2 stages per rank)"
    ),
}
"""Schedule name -> spec, in the order torch's documentation lists them."""


def get_spec(schedule: str) -> ScheduleSpec:
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule={schedule!r}` is not a pipeline schedule; valid: {', '.join(SCHEDULES)}.")
    return SCHEDULES[schedule]


def resolve_stages_per_rank(schedule: str, stages_per_rank: int | None) -> int:
    """The stages per rank ``schedule`` runs with: the given number when the schedule allows it, else its default.

    Example::

        >>> resolve_stages_per_rank("interleaved_1f1b", None), resolve_stages_per_rank("1f1b", 1)
        (2, 1)
    """
    spec = get_spec(schedule)
    if stages_per_rank is None:
        return spec.default_stages_per_rank
    if isinstance(stages_per_rank, bool) or not isinstance(stages_per_rank, int) or stages_per_rank < 1:
        raise ValueError(f"`stages_per_rank={stages_per_rank!r}` must be a positive integer.")
    if spec.stages_per_rank is not None and stages_per_rank != spec.stages_per_rank:
        raise ValueError(
            f"`stages_per_rank={stages_per_rank}` is not allowed by `schedule={schedule!r}`: it runs with exactly "
            f"{spec.stages_per_rank} stage(s) per rank."
        )
    return stages_per_rank


def check_microbatches(schedule: str, n_microbatches: int, num_stages: int, pp: int) -> None:
    """Raise when ``schedule`` cannot run ``n_microbatches`` over ``num_stages`` stages on ``pp`` ranks."""
    spec = get_spec(schedule)
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"`n_microbatches={n_microbatches!r}` must be a positive integer.")
    if spec.microbatches_at_least_stages and n_microbatches < num_stages:
        raise ValueError(
            f"`n_microbatches={n_microbatches}` is smaller than the {num_stages} pipeline stages; "
            f"`schedule={schedule!r}` needs n_microbatches >= {num_stages}."
        )
    rounds = max(1, n_microbatches // pp)
    if spec.rounds and n_microbatches % rounds:
        raise ValueError(
            f"`n_microbatches={n_microbatches}` does not suit `schedule={schedule!r}` on {pp} ranks: it must be "
            f"smaller than {pp} or a multiple of n_microbatches // {pp} (for example {pp} or {2 * pp})."
        )


def stage_ids(schedule: str, rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stage indices ``rank`` holds, in increasing order.

    Example::

        >>> stage_ids("interleaved_1f1b", 1, pp=2, stages_per_rank=2), stage_ids("zbv_zero_bubble", 0, 2, 2)
        ([1, 3], [0, 3])
    """
    if get_spec(schedule).placement == "v":
        return sorted({rank, 2 * pp - 1 - rank})
    return [rank + k * pp for k in range(stages_per_rank)]


def stage_owner(schedule: str, stage: int, pp: int) -> int:
    """The rank (within the pipeline group) that holds ``stage``."""
    if get_spec(schedule).placement == "v":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def build_schedule(
    schedule: str,
    stages: Sequence[PipelineStage],
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> _PipelineSchedule:
    """The torch schedule over this rank's ``stages`` with ``scale_grads=False``: ``loss_fn`` carries the whole
    scale (1/m, times 1/accumulate under gradient accumulation), so gradients left from earlier micro-steps are
    never rescaled."""
    spec = get_spec(schedule)
    if spec.multi:
        return spec.cls(list(stages), n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) != 1:
        raise ValueError(f"`schedule={schedule!r}` runs one stage per rank, got {len(stages)}.")
    return spec.cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
