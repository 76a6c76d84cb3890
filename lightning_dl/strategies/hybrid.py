"""``HybridStrategy``: data × tensor × pipeline parallelism on one DeviceMesh ``("pp", "dp", "tp")``, given as one
string (``layout="dp2,tp2,pp2"``) or chosen from the device count and the model. Lightning glue only: the stages come
from ``lightning_dl.parallel.pipeline``, the shards from ``lightning_dl.parallel.tensor``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.parallel.grad_norm import total_norm
from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.parallel.pipeline import StageModule, all_reduce_mean
from lightning_dl.parallel.tensor import TPPlan, apply_tp, auto_plan
from lightning_dl.parallel.tensor.apply import Plan
from lightning_dl.strategies._model_parallel import gather_optimizer_state, gather_state_dict
from lightning_dl.strategies.pipeline import PipelineStrategy, _builds_in_configure_model, _check_module

log = logging.getLogger(__name__)


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
    try:
        return bool(auto_plan(StageModule(list(blocks), 0), tp).sharded_names)
    except Exception:  # a model the planner cannot trace has nothing it can shard
        return False


class HybridStrategy(PipelineStrategy):
    """Split the module's ``pipeline_blocks()`` into ``pp`` stages, shard each stage over ``tp`` processes with
    :func:`~lightning_dl.parallel.tensor.apply_tp`, and average gradients over ``dp`` replicas (a plain all-reduce).

    Args:
        layout: ``"dp2,tp2,pp2"`` (a dimension left out is 1), a :class:`ParallelLayout`, or None to choose one
            from the device count and the model (printed with the reason).
        schedule, n_microbatches, balance, seed, timeout, start_method: as for
            :class:`~lightning_dl.strategies.PipelineStrategy` (one stage per process).
        plan: the tensor-parallel plan of each stage: ``"auto"``, a dict of submodule names (relative to the stage,
            ``blocks.<i>.<name>``) to styles, or a callable ``(stage, tp_mesh)``.
        dp_shard: False: gradients are all-reduced over dp and every replica keeps the whole stage shard.

    Example::

        >>> strategy = HybridStrategy(layout="dp2,tp2,pp2", n_microbatches=4)
        >>> strategy.parallel_layout, strategy.schedule
        (ParallelLayout(dp=2, tp=2, pp=2), '1f1b')
    """

    strategy_name = "hybrid"

    def __init__(
        self,
        *,
        layout: str | ParallelLayout | None = None,
        schedule: str = "1f1b",
        n_microbatches: int = 4,
        plan: Plan = "auto",
        dp_shard: bool = False,
        balance: str | Sequence[int] = "params",
        seed: int = 0,
        timeout: timedelta = timedelta(seconds=300),
        start_method: str = "spawn",
        **kwargs: Any,
    ) -> None:
        parsed = layout if isinstance(layout, ParallelLayout) or layout is None else ParallelLayout.parse(layout)
        if dp_shard:
            raise ValueError(
                "`dp_shard=True` (FSDP2 over dp) is not composed with pipeline stages yet; use dp_shard=False "
                "(gradients all-reduced over dp)."
            )
        super().__init__(
            schedule=schedule,
            n_microbatches=n_microbatches,
            stages_per_rank=1,
            balance=balance,
            data_parallel_size=parsed.dp if parsed is not None else 1,
            seed=seed,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self.parallel_layout = parsed
        self.plan = plan
        self.dp_shard = dp_shard
        self.tp_plans: dict[int, TPPlan] = {}

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "hybrid", cls, description="data x tensor x pipeline parallel; layout from the devices and the model"
        )

    # --- layout -------------------------------------------------------------------------------------------------
    @property
    @override
    def pp_size(self) -> int:
        return self.parallel_layout.pp if self.parallel_layout is not None else 1

    def _resolve_layout(self, world_size: int, blocks: Sequence[nn.Module] | None) -> ParallelLayout:
        if self.parallel_layout is None:
            if blocks is None:
                raise ValueError(
                    "`strategy='hybrid'` without `layout` chooses one from the model's blocks, which "
                    "`configure_model()` builds inside the processes: give `layout`, e.g. 'dp2,pp2'."
                )
            chosen, reason = choose_layout(world_size, blocks)
            rank_zero_info(f"HybridStrategy chose layout {chosen} for {world_size} processes ({reason}).")
            self.parallel_layout = chosen
            self.data_parallel_size = chosen.dp
        layout = self.parallel_layout
        layout.check_world_size(world_size)
        if blocks is not None:
            if layout.pp > len(blocks):
                raise ValueError(
                    f"`layout='{layout}'` asks for pp{layout.pp} stages, but `pipeline_blocks()` returns {len(blocks)} "
                    f"blocks: use pp <= {len(blocks)} (every stage needs a block) or split the model finer."
                )
            if layout.tp_enabled and not _shardable(blocks, layout.tp):
                raise ValueError(
                    f"`layout='{layout}'` asks for tp{layout.tp}, but the tensor-parallel plan finds no Linear pairs "
                    f"of {', '.join(type(b).__name__ for b in blocks[:4])}... divisible by {layout.tp}: use tp1 "
                    "(dp or pp only) or a model with Linear pairs."
                )
        return layout

    @property
    def layout(self) -> ParallelLayout | None:
        """The layout of the run (the pipeline strategy's ``layout``, with tp)."""
        return self.parallel_layout

    @layout.setter
    def layout(self, value: ParallelLayout | None) -> None:
        # the pipeline strategy assigns its own (dp, pp) layout in ``_build``: the same degrees, without tp
        mine = getattr(self, "parallel_layout", None)
        if value is not None and mine is not None and (value.dp, value.pp) != (mine.dp, mine.pp):
            raise RuntimeError(f"the pipeline built the layout {value}, the hybrid strategy holds {mine}.")

    @override
    def _check_layout(self, world_size: int, blocks: int | None) -> int:
        if self.parallel_layout is None:
            raise RuntimeError("the hybrid layout is resolved before the pipeline checks it.")
        self.parallel_layout.check_world_size(world_size)
        return super()._check_layout(self.parallel_layout.dp * self.parallel_layout.pp, blocks)

    @override
    def check_before_launch(self, trainer: L.Trainer) -> None:
        module = trainer.lightning_module
        _check_module(module)
        blocks = None if _builds_in_configure_model(module) else list(module.pipeline_blocks())  # type: ignore[operator]
        world_size = self.num_nodes * self.num_processes
        self._resolve_layout(world_size, blocks)
        self._check_layout(world_size, None if blocks is None else len(blocks))

    # --- setup --------------------------------------------------------------------------------------------------
    @override
    def _build(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Split into stages (the pipeline strategy, over this rank's pp group), then TP on each stage over the tp
        submesh; gradients are averaged over dp in ``backward``."""
        _check_module(module)
        self._resolve_layout(self.world_size, list(module.pipeline_blocks()))  # type: ignore[operator]
        super()._build(trainer, module)
        engine, layout = self.engine, self.parallel_layout
        assert engine is not None and layout is not None
        if not layout.tp_enabled:
            return
        owned = {id(b) for stage in engine.modules.values() for b in stage.blocks}
        # the engine infers stage shapes by a meta forward of its blocks: keep unsharded meta copies for it
        engine.blocks = [copy.deepcopy(b).to("meta") if id(b) in owned else b for b in engine.blocks]
        tp_mesh = layout.build_mesh("cpu")["tp"]
        for stage_id, stage in engine.modules.items():
            self.tp_plans[stage_id] = apply_tp(stage, tp_mesh, self.plan)
        rank_zero_info(f"HybridStrategy {layout}: stage 0 tensor-parallel plan\n{self.tp_plans.get(0, '')}")

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        """Scale by the global norm over pp (stages) and tp (DTensor shards); one multiply per gradient, since a
        foreach kernel does not take gradients on different meshes."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = total_norm(grads, 2.0, group=self.grad_norm_group)
        coef = torch.clamp(float(clip_val) / (norm + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coef.to(norm.device))

    # --- steps --------------------------------------------------------------------------------------------------
    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        """As the pipeline's backward; DTensor gradients are averaged over dp through their local shards."""
        module = self.lightning_module
        assert module is not None and self._pending is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        params = [p for group in self.optimizers[0].param_groups for p in group["params"]]
        fresh = [(p, g) for p, g in zip(params, self._pending, strict=True) if g is not None]
        all_reduce_mean([_local(g) for _, g in fresh], self._mesh_group("dp"))
        for p, grad in fresh:
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self._pending = None
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    # --- checkpoints --------------------------------------------------------------------------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The whole module's plain ``state_dict`` on rank 0: shards joined over tp, then stages over the world."""
        module = self.lightning_module
        assert module is not None
        local = {k: _full(v).detach().cpu() for k, v in module.state_dict().items()}
        return gather_state_dict(_Dict(local), self._state_keys)  # type: ignore[arg-type]

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The whole model's optimizer state in the single-process format, on rank 0 (a collective)."""
        assert self.lightning_module is not None and self._optimizer_layout is not None
        return gather_optimizer_state(_FullOptimizer(optimizer), self.lightning_module, self._optimizer_layout)  # type: ignore[arg-type]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        own = module.state_dict()
        missing = [k for k in own if k not in checkpoint["state_dict"]]
        if strict and missing:
            raise KeyError(f"the checkpoint lacks {missing[:5]} (of {len(missing)} entries this rank holds).")
        with torch.no_grad():
            for key, value in own.items():
                if key in checkpoint["state_dict"]:
                    _local(value).copy_(_local(_shard_like(checkpoint["state_dict"][key], value)))

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state.get(p, {})
                    for key, value in state.items():
                        if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                            state[key] = _shard_like(value, p)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``t`` (a view for a DTensor): in-place changes write through."""
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut as ``like`` is (this rank's shard, no communication), or ``full`` when ``like`` is plain."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


class _Dict:
    """A module stand-in whose ``state_dict()`` is a given dict (the full tensors of this rank's stage)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class _FullOptimizer:
    """An optimizer stand-in whose ``state_dict()`` holds full tensors where the optimizer holds DTensor shards."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.param_groups = optimizer.param_groups
        self._optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        raw = self._optimizer.state_dict()
        state = {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in s.items()} for i, s in raw["state"].items()}
        return {"state": state, "param_groups": raw["param_groups"]}
