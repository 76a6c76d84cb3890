"""Choosing and checking the engine's layout against the devices and the module, before any process starts where
that can be known: the degrees, the pipeline's blocks and options, the tensor-parallel plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch import nn

from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.parallel.pipeline import StageModule
from lightning_dl.parallel.tensor import auto_plan, plan_from_dict
from lightning_dl.strategies._engine_pipeline import builds_in_configure_model, check_pipeline_module

CHECKPOINT_FORMATS = ("auto", "full", "sharded")
FULL_CHECKPOINT_LIMIT = 2**30
"""``checkpoint_format="auto"`` writes one full file below this many bytes of parameters (1 GiB: rank 0 holds the
whole model and its optimizer state in memory while writing), a sharded DCP folder above."""


def choose_layout(devices: int, blocks: Sequence[nn.Module]) -> tuple[ParallelLayout, str]:
    """A layout for ``devices`` processes and a model of ``blocks``, and why: tp2 where the automatic plan finds
    Linear pairs to shard (tp ranks talk twice per block, so the degree stays small), pp2 where there are at least 2
    blocks per stage, the rest data parallel.

    Example::

        >>> blocks = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(4)]
        >>> choose_layout(8, blocks)[0]
        ParallelLayout(dp=2, tp=2, pp=2)
        >>> choose_layout(2, [nn.Embedding(8, 4), nn.LayerNorm(4)])[0]
        ParallelLayout(dp=2, tp=1, pp=1)
    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"`devices={devices!r}` must be a positive integer.")
    reasons = []
    tp = 1
    if devices % 2 == 0:
        if _shardable(blocks, 2):
            tp = 2
            reasons.append("tp2: the plan finds Linear pairs to shard")
        else:
            reasons.append("tp1: the plan finds no Linear pairs to shard")
    pp = 1
    if (devices // tp) % 2 == 0:
        if len(blocks) >= 4:
            pp = 2
            reasons.append(f"pp2: {len(blocks)} blocks give at least 2 per stage")
        else:
            reasons.append(f"pp1: {len(blocks)} blocks, pp2 needs at least 4 (2 per stage)")
    dp = devices // (tp * pp)
    reasons.append(f"dp{dp}: the remaining processes replicate the model")
    return ParallelLayout(dp=dp, tp=tp, pp=pp), "; ".join(reasons)


def _shardable(blocks: Sequence[nn.Module], tp: int) -> bool:
    if not blocks:
        return False
    try:
        return bool(auto_plan(StageModule(list(blocks), 0), tp).sharded_names)
    except Exception:  # a model the planner cannot trace has nothing it can shard
        return False


def check_layout(strategy: Any, layout: ParallelLayout, module: L.LightningModule, *, pipelined: bool) -> None:
    """Raise when ``module`` cannot use ``layout``: a pipelined module's methods, blocks, balance and micro-batches;
    a tensor-parallel plan that names what does not exist or (``HybridStrategy``) shards nothing. Skipped for what
    ``configure_model()`` builds inside the processes."""
    if pipelined:
        check_pipeline_module(module, strategy.strategy_name)
        blocks = None if builds_in_configure_model(module) else list(module.pipeline_blocks())  # type: ignore[operator]
        if blocks is not None:
            if layout.pp > len(blocks):
                raise ValueError(
                    f"`layout='{layout}'` asks for pp{layout.pp} stages, but `pipeline_blocks()` returns "
                    f"{len(blocks)} blocks: use pp <= {len(blocks)} (every stage needs a block) or split the model "
                    "finer."
                )
            if layout.tp_enabled and not _shardable(blocks, layout.tp):
                raise ValueError(
                    f"`layout='{layout}'` asks for tp{layout.tp}, but the tensor-parallel plan finds no Linear pairs "
                    f"of {', '.join(type(b).__name__ for b in blocks[:4])}... divisible by {layout.tp}: use tp1 "
                    "(dp or pp only) or a model with Linear pairs."
                )
        strategy.runner.check(layout.pp, None if blocks is None else len(blocks))
        return
    if not layout.tp_enabled or not any(True for _ in module.parameters()):
        return
    if isinstance(strategy.plan, Mapping):
        plan_from_dict(module, strategy.plan, layout.tp)
    elif strategy.plan == "auto" and (
        strategy._require_shardable or strategy.loss_parallel or strategy.sequence_parallel
    ):
        found = auto_plan(
            module, layout.tp, loss_parallel=strategy.loss_parallel, sequence_parallel=strategy.sequence_parallel
        )
        if strategy._require_shardable and not found.sharded_names:
            raise ValueError(
                f"`layout='{layout}'` asks for tp{layout.tp}, but the tensor-parallel plan finds no Linear pairs in "
                f"{type(module).__name__} divisible by {layout.tp}: use tp1 (dp only) or a model with Linear pairs."
            )
