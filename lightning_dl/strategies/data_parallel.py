"""The registered names of the communication-efficient data-parallel strategies, as one table of
(name, class, init arguments, description)."""

from __future__ import annotations

from typing import Any

from lightning_dl.strategies.compressed import CompressedDDPStrategy
from lightning_dl.strategies.deepspeed_cpu import DeepSpeedCPUStrategy
from lightning_dl.strategies.diloco import DiLoCoStrategy
from lightning_dl.strategies.local_sgd import LocalSGDStrategy

STRATEGIES: tuple[tuple[str, type, dict[str, Any], str], ...] = (
    ("local_sgd", LocalSGDStrategy, {}, "Local SGD: parameters averaged every `sync_every` (8) optimizer steps"),
    ("diloco", DiLoCoStrategy, {}, "DiLoCo: outer Nesterov step on the averaged pseudo-gradient every 16 steps"),
    ("ddp_powersgd", CompressedDDPStrategy, {"compressor": "powersgd"}, "DDP with PowerSGD (rank 4), error feedback"),
    ("ddp_int8", CompressedDDPStrategy, {"compressor": "int8"}, "DDP with per-tensor int8 gradients, error feedback"),
    ("ddp_sign", CompressedDDPStrategy, {"compressor": "sign"}, "DDP with 1-bit sign gradients, error feedback"),
    ("deepspeed_zero1", DeepSpeedCPUStrategy, {"stage": 1}, "DeepSpeed ZeRO-1 (optimizer state sharded), CPU or GPU"),
    ("deepspeed_zero2", DeepSpeedCPUStrategy, {"stage": 2}, "DeepSpeed ZeRO-2 (+ gradients sharded), CPU or GPU"),
    ("deepspeed_zero3", DeepSpeedCPUStrategy, {"stage": 3}, "DeepSpeed ZeRO-3 (+ parameters sharded), CPU or GPU"),
)
"""Every name here builds its class with the arguments given; further arguments by constructing the class."""
