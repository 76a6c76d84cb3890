"""Pipeline parallelism on ``torch.distributed.pipelining``: partition blocks into stages, build a rank's stages by
deleting what it does not own (names stay the whole model's), run any torch schedule by name, record a timeline.
Torch only."""

from lightning_dl.parallel.pipeline.build import BALANCES, build_pipeline, resolve_balance
from lightning_dl.parallel.pipeline.engine import PipelineEngine, all_reduce_mean, eval_microbatches
from lightning_dl.parallel.pipeline.partition import (
    BlockTimes,
    boundaries,
    check_balance,
    check_stages,
    param_counts,
    partition_costs,
    stage_costs,
    time_blocks,
)
from lightning_dl.parallel.pipeline.schedules import (
    SCHEDULES,
    ScheduleSpec,
    build_schedule,
    check_microbatches,
    get_spec,
    resolve_stages_per_rank,
    stage_ids,
    stage_owner,
)
from lightning_dl.parallel.pipeline.split import StageModule, materialize, split_model, stage_shapes
from lightning_dl.parallel.pipeline.timeline import Event, TimelineRecorder, bubble_fraction, bubble_theory

__all__ = [
    "BALANCES",
    "SCHEDULES",
    "BlockTimes",
    "Event",
    "PipelineEngine",
    "ScheduleSpec",
    "StageModule",
    "TimelineRecorder",
    "all_reduce_mean",
    "boundaries",
    "bubble_fraction",
    "bubble_theory",
    "build_pipeline",
    "build_schedule",
    "check_balance",
    "check_microbatches",
    "check_stages",
    "eval_microbatches",
    "get_spec",
    "materialize",
    "param_counts",
    "partition_costs",
    "resolve_balance",
    "resolve_stages_per_rank",
    "split_model",
    "stage_costs",
    "stage_ids",
    "stage_owner",
    "stage_shapes",
    "time_blocks",
]
