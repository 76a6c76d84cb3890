"""Torch-only machinery for communication-efficient data parallelism: gradient compressors with error feedback as
DDP communication hooks, parameter averaging, DiLoCo's outer step, and naming a dead rank."""

from lightning_dl.parallel.comm.averaging import average_, check_outer, check_sync, outer_step_
from lightning_dl.parallel.comm.compressors import COMPRESSORS, check_compressor, check_dense_gradients
from lightning_dl.parallel.comm.faults import dead_ranks_message, leave_together, missing_ranks
from lightning_dl.parallel.comm.hooks import CompressionState, LocalState, compile_fused, hook_for, local_hook

__all__ = [
    "COMPRESSORS",
    "CompressionState",
    "LocalState",
    "average_",
    "check_compressor",
    "check_dense_gradients",
    "check_outer",
    "check_sync",
    "compile_fused",
    "dead_ranks_message",
    "hook_for",
    "leave_together",
    "local_hook",
    "missing_ranks",
    "outer_step_",
]
