"""One call that turns a whole model into a rank's pipeline: the split by balance (params, time or a list), the
deletion of unowned blocks, local materialisation, and the engine. The pipeline and hybrid strategies call it.
Torch only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_dl.parallel.pipeline.engine import LossFn, MetricsFn, PipelineEngine
from lightning_dl.parallel.pipeline.partition import (
    check_balance,
    param_counts,
    partition_costs,
    stage_costs,
    time_blocks,
)
from lightning_dl.parallel.pipeline.schedules import stage_ids
from lightning_dl.parallel.pipeline.split import materialize, split_model
from lightning_dl.parallel.pipeline.timeline import TimelineRecorder

BALANCES = ("params", "time")


def resolve_balance(
    blocks: Sequence[nn.Module],
    num_stages: int,
    balance: str | Sequence[int],
    *,
    example: torch.Tensor | None = None,
    n_microbatches: int = 1,
) -> tuple[list[int], list[float] | None]:
    """Blocks per stage, and the predicted stage seconds under ``balance="time"`` (None otherwise).

    ``"time"`` times the blocks on the first ``len(example) // n_microbatches`` rows of ``example`` in rank 0 of the
    default group (when one is initialised) and broadcasts the times, so every rank splits the same way.

    Example::

        >>> resolve_balance([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)], 2, "params")
        ([1, 2], None)
    """
    if not isinstance(balance, str):
        return check_balance(balance, len(blocks), num_stages), None
    if balance == "params":
        return partition_costs(param_counts(blocks), num_stages), None
    if balance != "time":
        raise ValueError(f"`balance={balance!r}` must be 'params', 'time' or a list of blocks per stage.")
    if not isinstance(example, torch.Tensor):
        raise ValueError("`balance='time'` times the blocks on the module's `example_input_array` (one batch).")
    if any(t.is_meta for block in blocks for t in block.parameters()):
        raise ValueError("`balance='time'` needs real blocks; blocks built on meta in configure_model() cannot run.")
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    box: list[list[float] | None] = [None]
    if not distributed or dist.get_rank() == 0:
        box[0] = time_blocks(blocks, example[: max(1, example.shape[0] // n_microbatches)]).seconds
    if distributed:
        dist.broadcast_object_list(box, src=0)
    seconds = box[0]
    assert seconds is not None
    split = partition_costs(seconds, num_stages)
    return split, stage_costs(seconds, split)


def build_pipeline(
    root: nn.Module,
    blocks: Sequence[nn.Module],
    balance: Sequence[int],
    *,
    schedule: str,
    pp_rank: int,
    stages_per_rank: int,
    n_microbatches: int,
    loss_fn: LossFn,
    group: dist.ProcessGroup | None,
    device: torch.device,
    seed: int = 0,
    recorder: TimelineRecorder | None = None,
    metrics_fn: MetricsFn | None = None,
) -> PipelineEngine:
    """Keep in ``root`` the blocks of the stages ``pp_rank`` holds (the others deleted, names unchanged),
    materialise them on ``device`` if they are on meta (block i from ``seed + i``) and return the rank's engine over
    ``group`` (the pipeline ranks, in stage order)."""
    pp = dist.get_world_size(group)
    starts = [sum(balance[:s]) for s in range(len(balance) + 1)]
    owned = [i for s in stage_ids(schedule, pp_rank, pp, stages_per_rank) for i in range(starts[s], starts[s + 1])]
    split_model(root, blocks, owned)
    materialize(blocks, owned, device=device, seed=seed)
    return PipelineEngine(
        blocks,
        balance,
        schedule=schedule,
        n_microbatches=n_microbatches,
        stages_per_rank=stages_per_rank,
        loss_fn=loss_fn,
        group=group,
        device=device,
        recorder=recorder,
        metrics_fn=metrics_fn,
    )
