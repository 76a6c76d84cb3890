"""The pipeline side of the model-parallel engine (layouts with pp > 1, and ``PipelineStrategy``): the module's
``pipeline_blocks()`` split into stages, TP on each stage, FSDP2 on each stage over dp (``dp_shard=True``), the
schedule run inside ``training_step`` and its gradients handed to Lightning's backward. Lightning glue over
``lightning_dl.parallel.pipeline`` and ``lightning_dl.parallel.tensor``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from torch.distributed.device_mesh import DeviceMesh

from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.parallel.pipeline import (
    BALANCES,
    Event,
    PipelineEngine,
    TimelineRecorder,
    all_reduce_mean,
    build_pipeline,
    check_balance,
    check_microbatches,
    check_stages,
    resolve_balance,
    resolve_stages_per_rank,
)
from lightning_dl.parallel.tensor import TPPlan, apply_fsdp, apply_tp
from lightning_dl.parallel.tensor.apply import Plan
from lightning_dl.strategies._engine_checkpoint import local

log = logging.getLogger(__name__)


def builds_in_configure_model(module: L.LightningModule) -> bool:
    return type(module).configure_model is not L.LightningModule.configure_model


def check_pipeline_module(module: L.LightningModule, name: str) -> None:
    """The two methods a pipelined module defines, and automatic optimization."""
    missing = [m for m in ("pipeline_blocks", "pipeline_loss") if not callable(getattr(module, m, None))]
    if missing:
        raise TypeError(
            f"`strategy='{name}'` needs the module to define `pipeline_blocks()` (its network as an ordered list of "
            f"blocks) and `pipeline_loss(output, target)` (the mean loss of a micro-batch); {type(module).__name__} "
            f"lacks {', '.join(missing)}."
        )
    if not module.automatic_optimization:
        raise ValueError(
            f"`strategy='{name}'` runs the backward inside its schedule and needs automatic optimization; the module "
            "sets `automatic_optimization=False`."
        )


def unpack(batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"`strategy='{name}'` takes batches of (input, target), got {type(batch).__name__}.")


def _mean_over(loss: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The mean of ``loss`` over the data-parallel replicas (float32)."""
    loss = loss.float()
    if group is not None:
        dist.all_reduce(loss, group=group)
        loss = loss / dist.get_world_size(group)
    return loss


class PipelineRunner:
    """One rank's pipeline: options checked at construction, stages built in :meth:`build`, and the steps."""

    def __init__(
        self,
        *,
        schedule: str,
        n_microbatches: int,
        stages_per_rank: int | None,
        balance: str | Sequence[int],
        record_timeline: bool,
        seed: int,
    ) -> None:
        self.stages_per_rank = resolve_stages_per_rank(schedule, stages_per_rank)
        check_microbatches(schedule, n_microbatches, 1, 1)
        if isinstance(balance, str) and balance not in BALANCES:
            raise ValueError(f"`balance={balance!r}` must be 'params', 'time' or a list of blocks per stage.")
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.balance = balance if isinstance(balance, str) else list(balance)
        self.record_timeline = record_timeline
        self.seed = seed
        self.engine: PipelineEngine | None = None
        self.recorder: TimelineRecorder | None = None
        self.stage_balance: list[int] | None = None
        self.predicted_stage_seconds: list[float] | None = None
        self.tp_plans: dict[int, TPPlan] = {}
        self.pending: list[torch.Tensor | None] | None = None
        self.checked_loader = False
        self.gathered: list[Event] | None = None

    def check(self, pp: int, blocks: int | None) -> None:
        """Micro-batches, stages and balance against ``pp`` ranks and the module's number of blocks."""
        stages = pp * self.stages_per_rank
        check_microbatches(self.schedule, self.n_microbatches, stages, pp)
        if blocks is not None:
            check_stages(blocks, stages)
            if isinstance(self.balance, list):
                check_balance(self.balance, blocks, stages)
        elif isinstance(self.balance, list) and len(self.balance) != stages:
            raise ValueError(f"`balance={self.balance!r}` must give one entry per stage ({stages} stages).")

    def build(
        self,
        module: L.LightningModule,
        layout: ParallelLayout,
        mesh: DeviceMesh,
        *,
        rank: int,
        device: torch.device,
        plan: Plan,
        dp_shard: bool,
    ) -> None:
        """Split into stages over this rank's pp group, then TP on each stage over the tp submesh, then FSDP2 of each
        stage over the dp submesh (``dp_shard``); gradients are otherwise averaged over dp in :meth:`add_gradients`."""
        blocks = list(module.pipeline_blocks())  # type: ignore[operator]
        self.check(layout.pp, len(blocks))
        example = getattr(module, "example_input_array", None)
        self.stage_balance, self.predicted_stage_seconds = resolve_balance(
            blocks,
            layout.pp * self.stages_per_rank,
            self.balance,
            example=example,
            n_microbatches=self.n_microbatches,
        )
        self.recorder = TimelineRecorder(rank) if self.record_timeline else None
        self.engine = engine = build_pipeline(
            module,
            blocks,
            self.stage_balance,
            schedule=self.schedule,
            pp_rank=layout.coordinates(rank)["pp"],
            stages_per_rank=self.stages_per_rank,
            n_microbatches=self.n_microbatches,
            loss_fn=module.pipeline_loss,  # type: ignore[arg-type]
            group=mesh["pp"].get_group(),
            device=device,
            seed=self.seed,
            recorder=self.recorder,
            metrics_fn=getattr(module, "pipeline_metrics", None),
        )
        if layout.tp_enabled or (dp_shard and layout.dp_enabled):
            owned = {id(b) for stage in engine.modules.values() for b in stage.blocks}
            # the engine infers stage shapes by a meta forward of its blocks: keep unsharded meta copies for it
            engine.blocks = [copy.deepcopy(b).to("meta") if id(b) in owned else b for b in engine.blocks]
        for stage_id, stage in engine.modules.items():
            if layout.tp_enabled:
                self.tp_plans[stage_id] = apply_tp(stage, mesh["tp"], plan)
            if dp_shard and layout.dp_enabled:
                apply_fsdp(stage, mesh["dp"], root=True)
        log.info(
            "rank %d holds stages %s (blocks per stage %s, predicted stage seconds %s)",
            rank,
            engine.local_ids,
            self.stage_balance,
            self.predicted_stage_seconds,
        )

    def check_loader(self, trainer: L.Trainer) -> None:
        if self.checked_loader:
            return
        self.checked_loader = True
        loader = trainer.train_dataloader
        size = getattr(loader, "batch_size", None)
        if size is None:
            return
        if size % self.n_microbatches:
            raise ValueError(
                f"the training batch size {size} does not divide by `n_microbatches={self.n_microbatches}`: "
                "choose a batch size that is a multiple of n_microbatches."
            )
        sampler = getattr(loader, "sampler", None)
        if not getattr(loader, "drop_last", True) and sampler is not None and len(sampler) % size:
            raise ValueError(
                f"the training DataLoader has `drop_last=False` and {len(sampler)} samples per replica, not a "
                f"multiple of the batch size {size}: its ragged last batch cannot be split into "
                f"{self.n_microbatches} equal micro-batches; set drop_last=True."
            )

    def training_step(
        self,
        module: L.LightningModule,
        batch: tuple[torch.Tensor, torch.Tensor],
        params: list[torch.Tensor],
        *,
        precision: Precision,
        dp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """Run the schedule and log ``train_loss`` (the batch mean over the replicas). Its gradients wait in
        :attr:`pending` (Lightning's closure zeroes ``.grad`` between ``training_step`` and ``backward``); the
        gradients accumulated before stay in ``.grad``."""
        assert self.engine is not None
        trainer = module.trainer
        self.check_loader(trainer)
        inputs, target = batch
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        if self.recorder is not None:
            self.recorder.step = trainer.global_step
        with precision.train_step_context():
            loss = self.engine.train_step(inputs, target, loss_scale=1.0 / trainer.accumulate_grad_batches)
        if self.recorder is not None:
            self.recorder.step = None
        self.pending = [p.grad for p in params]
        for p, grad in zip(params, kept, strict=True):
            p.grad = grad
        loss = _mean_over(loss, dp_group)
        module.log(
            "train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(inputs), sync_dist=True
        )
        self._log_metrics(module, "train", len(inputs))
        return loss

    def eval_step(
        self, module: L.LightningModule, batch: tuple[torch.Tensor, torch.Tensor], name: str, *, dp_group: Any
    ) -> torch.Tensor:
        """A forward-only step; logs ``name`` (``val_loss``/``test_loss``) and the module's metrics."""
        assert self.engine is not None
        inputs, target = batch
        loss = _mean_over(self.engine.eval_step(inputs, target), dp_group)
        module.log(name, loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(inputs), sync_dist=True)
        self._log_metrics(module, name.removesuffix("_loss"), len(inputs))
        return loss

    def _log_metrics(self, module: L.LightningModule, stage: str, batch_size: int) -> None:
        """The module's ``pipeline_metrics`` of this batch, as ``<stage>_<name>`` (epoch means weighted by batch)."""
        assert self.engine is not None
        for key, value in self.engine.last_metrics.items():
            module.log(
                f"{stage}_{key}",
                value.float(),
                on_step=stage == "train",
                on_epoch=True,
                prog_bar=stage != "train",
                batch_size=batch_size,
                sync_dist=True,
            )

    def add_gradients(self, params: list[torch.Tensor], dp_group: dist.ProcessGroup | None) -> None:
        """Add the schedule's gradients into ``.grad``, averaged over ``dp_group`` first (None: FSDP2 already
        reduce-scattered them), one flat all-reduce of the local shards."""
        assert self.pending is not None
        fresh = [(p, g) for p, g in zip(params, self.pending, strict=True) if g is not None]
        all_reduce_mean([local(g) for _, g in fresh], dp_group)
        for p, grad in fresh:
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self.pending = None

    @property
    def timeline(self) -> list[Event]:
        if self.gathered is not None:
            return list(self.gathered)
        return list(self.recorder.events) if self.recorder is not None else []

    def gather_timeline(self) -> list[Event]:
        """Every rank's events on every rank (a collective over the world)."""
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.timeline)
        return sorted((e for part in parts for e in part), key=lambda e: (e.rank, e.start))

    def collect_results(self) -> dict[str, Any]:
        # plain dicts: Lightning's launcher maps over the results and refuses frozen dataclasses
        events = [e.as_dict() for e in self.gather_timeline()] if self.record_timeline else None
        return {"timeline": events, "stage_balance": self.stage_balance, "predicted": self.predicted_stage_seconds}

    def receive_results(self, results: dict[str, Any]) -> None:
        events = results["timeline"]
        self.gathered = None if events is None else [Event(**e) for e in events]
        self.stage_balance = results["stage_balance"]
        self.predicted_stage_seconds = results["predicted"]


class PipelineResults:
    """What the engine's pipeline side exposes on the strategy: the stages, the balance, the timeline, and the
    results the spawn launcher carries back to the calling process."""

    runner: PipelineRunner

    @property
    def engine(self) -> Any:
        """This rank's :class:`~lightning_dl.parallel.pipeline.PipelineEngine` (pp > 1, after setup)."""
        return self.runner.engine

    @property
    def stage_balance(self) -> list[int] | None:
        return self.runner.stage_balance

    @property
    def predicted_stage_seconds(self) -> list[float] | None:
        return self.runner.predicted_stage_seconds

    @property
    def tp_plans(self) -> dict[int, TPPlan]:
        """The tensor-parallel plan applied to each of this rank's stages (pp > 1)."""
        return self.runner.tp_plans

    @property
    def timeline(self) -> list[Event]:
        """Recorded events (``record_timeline=True``): in a process of the run, this rank's; in the calling process
        after a spawned ``fit``, every rank's."""
        return self.runner.timeline

    def gather_timeline(self) -> list[Event]:
        """Every rank's events on every rank (a collective)."""
        return self.runner.gather_timeline()

    def collect_results(self) -> dict[str, Any] | None:
        """What the spawn launcher sends back to the calling process (a collective under pp > 1)."""
        return self.runner.collect_results() if self.runner.engine is not None else None

    def receive_results(self, results: dict[str, Any]) -> None:
        self.runner.receive_results(results)
