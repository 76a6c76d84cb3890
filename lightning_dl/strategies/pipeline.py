"""``PipelineStrategy``: pipeline parallelism for a LightningModule that exposes ``pipeline_blocks()`` and
``pipeline_loss(output, target)``, on ``torch.distributed.pipelining`` schedules, optionally replicated over
data-parallel ranks. The schedule runs inside ``training_step``; Lightning's backward adds its gradients."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer
from typing_extensions import override

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
from lightning_dl.strategies._model_parallel import (
    FullStateLauncher,
    OptimizerLayout,
    data_parallel_sampler_kwargs,
    first_optimizer,
    gather_optimizer_state,
    gather_state_dict,
    load_local_state_dict,
    load_optimizer_state,
    optimizer_layout,
    use_global_norm_clipping,
)

log = logging.getLogger(__name__)

PRESETS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("pipeline", {"schedule": "1f1b"}, "pipeline parallel, 1F1B, one stage per device"),
    ("pipeline_gpipe", {"schedule": "gpipe"}, "pipeline parallel, GPipe (all forwards, then all backwards)"),
    ("pipeline_1f1b", {"schedule": "1f1b"}, "pipeline parallel, 1F1B"),
    ("pipeline_interleaved", {"schedule": "interleaved_1f1b", "stages_per_rank": 2}, "interleaved 1F1B, 2 stages/rank"),
    ("pipeline_zero_bubble", {"schedule": "zbv_zero_bubble"}, "ZBV zero bubble, V placement (2 stages per rank)"),
)
"""Registered names: (name, constructor arguments, description)."""


class PipelineStrategy(DDPStrategy):
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
        timeout: process-group timeout: a rank that waits longer on a dead peer fails.

    Example::

        >>> PipelineStrategy(schedule="gpipe", n_microbatches=4).schedule
        'gpipe'
    """

    strategy_name = "pipeline"

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
        timeout: timedelta = timedelta(seconds=300),
        start_method: str = "spawn",
        **kwargs: Any,
    ) -> None:
        super().__init__(start_method=start_method, timeout=timeout, **kwargs)  # type: ignore[arg-type]
        self.stages_per_rank = resolve_stages_per_rank(schedule, stages_per_rank)
        check_microbatches(schedule, n_microbatches, 1, 1)
        if isinstance(balance, str) and balance not in BALANCES:
            raise ValueError(f"`balance={balance!r}` must be 'params', 'time' or a list of blocks per stage.")
        if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise ValueError(f"`data_parallel_size={data_parallel_size!r}` must be a positive integer.")
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.balance = balance if isinstance(balance, str) else list(balance)
        self.data_parallel_size = data_parallel_size
        self.record_timeline = record_timeline
        self.seed = seed
        self.layout: ParallelLayout | None = None
        self.engine: PipelineEngine | None = None
        self.recorder: TimelineRecorder | None = None
        self.stage_balance: list[int] | None = None
        self.predicted_stage_seconds: list[float] | None = None
        self._state_keys: list[str] = []
        self._optimizer_layout: OptimizerLayout | None = None
        self._pending: list[torch.Tensor | None] | None = None
        self._checked_loader = False
        self._gathered: list[Event] | None = None

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, kwargs, description in PRESETS:
            strategy_registry.register(name, cls, description=description, **kwargs)

    # --- layout -------------------------------------------------------------------------------------------------
    @property
    def pp_size(self) -> int:
        return self.world_size // self.data_parallel_size

    def _check_layout(self, world_size: int, blocks: int | None) -> int:
        if world_size % self.data_parallel_size:
            raise ValueError(
                f"`devices` × nodes = {world_size} processes must equal pp × dp with "
                f"`data_parallel_size={self.data_parallel_size}`: use a multiple of {self.data_parallel_size}."
            )
        pp = world_size // self.data_parallel_size
        stages = pp * self.stages_per_rank
        check_microbatches(self.schedule, self.n_microbatches, stages, pp)
        if blocks is not None:
            check_stages(blocks, stages)
            if isinstance(self.balance, list):
                check_balance(self.balance, blocks, stages)
        elif isinstance(self.balance, list) and len(self.balance) != stages:
            raise ValueError(f"`balance={self.balance!r}` must give one entry per stage ({stages} stages).")
        return pp

    def check_before_launch(self, trainer: L.Trainer) -> None:
        """Everything that can be checked in the calling process: the module's two methods, automatic
        optimization, the layout against the device count, the balance and micro-batch counts."""
        module = trainer.lightning_module
        _check_module(module)
        blocks = None
        if not _builds_in_configure_model(module):
            blocks = len(list(module.pipeline_blocks()))  # type: ignore[operator]
        self._check_layout(self.num_nodes * self.num_processes, blocks)

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:  # torchrun, or a harness that set RANK etc.
            self._launcher = None
            return
        if self._start_method == "popen":
            raise ValueError(
                "`strategy='pipeline'` starts its processes with `start_method` spawn, fork or forkserver."
            )
        self._launcher = FullStateLauncher(self, start_method=self._start_method)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        assert self.layout is not None
        return data_parallel_sampler_kwargs(self.layout.dp, self.layout.coordinates(self.global_rank)["dp"])

    @property
    def grad_norm_group(self) -> dist.ProcessGroup | None:
        """The pipeline group: stages hold different parameters, so norms are summed over it (GradientClipping)."""
        return self._mesh_group("pp")

    def _mesh_group(self, dim: str) -> dist.ProcessGroup | None:
        if self.layout is None:
            return None
        return self.layout.build_mesh("cpu")[dim].get_group()

    @contextlib.contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``configure_model()`` builds on the meta device: each rank materialises only its stages."""
        with torch.device("meta"):
            yield

    # --- setup --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        if self.engine is None:
            self._build(trainer, module)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        use_global_norm_clipping(self.precision_plugin, lambda: self.grad_norm_group)

    def _build(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        _check_module(module)  # again: under torchrun no launcher checked before the processes started
        blocks = list(module.pipeline_blocks())  # type: ignore[operator]
        pp = self._check_layout(self.world_size, len(blocks))
        self.layout = ParallelLayout(dp=self.data_parallel_size, pp=pp)
        example = getattr(module, "example_input_array", None)
        self.stage_balance, self.predicted_stage_seconds = resolve_balance(
            blocks, pp * self.stages_per_rank, self.balance, example=example, n_microbatches=self.n_microbatches
        )
        self._state_keys = list(module.state_dict())
        if trainer.state.fn == TrainerFn.FITTING:  # the whole model's optimizer order, for checkpoints
            self._optimizer_layout = optimizer_layout(first_optimizer(module.configure_optimizers()), module)
        self.recorder = TimelineRecorder(self.global_rank) if self.record_timeline else None
        self.engine = build_pipeline(
            module,
            blocks,
            self.stage_balance,
            schedule=self.schedule,
            pp_rank=self.layout.coordinates(self.global_rank)["pp"],
            stages_per_rank=self.stages_per_rank,
            n_microbatches=self.n_microbatches,
            loss_fn=module.pipeline_loss,  # type: ignore[arg-type]
            group=self.layout.build_mesh("cpu")["pp"].get_group(),
            device=self.root_device,
            seed=self.seed,
            recorder=self.recorder,
            metrics_fn=getattr(module, "pipeline_metrics", None),
        )
        log.info(
            "rank %d holds stages %s (blocks per stage %s, predicted stage seconds %s)",
            self.global_rank,
            self.engine.local_ids,
            self.stage_balance,
            self.predicted_stage_seconds,
        )

    @override
    def setup_optimizers(self, trainer: L.Trainer) -> None:
        super().setup_optimizers(trainer)
        if len(self.optimizers) != 1:
            raise ValueError(f"`strategy='pipeline'` trains with one optimizer, got {len(self.optimizers)}.")

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # --- steps --------------------------------------------------------------------------------------------------
    def _check_train_loader(self, trainer: L.Trainer) -> None:
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

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        module, engine = self.lightning_module, self.engine
        assert module is not None and engine is not None
        trainer = module.trainer
        if not self._checked_loader:
            self._check_train_loader(trainer)
            self._checked_loader = True
        inputs, target = _unpack(args[0] if args else kwargs["batch"])
        params = [p for group in self.optimizers[0].param_groups for p in group["params"]]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        if self.recorder is not None:
            self.recorder.step = trainer.global_step
        with self.precision_plugin.train_step_context():
            loss = engine.train_step(inputs, target, loss_scale=1.0 / trainer.accumulate_grad_batches)
        if self.recorder is not None:
            self.recorder.step = None
        self._pending = [p.grad for p in params]
        for p, grad in zip(params, kept, strict=True):
            p.grad = grad
        loss = self._mean_over_replicas(loss)
        module.log(
            "train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(inputs), sync_dist=True
        )
        self._log_metrics("train", len(inputs))
        return loss

    def _log_metrics(self, stage: str, batch_size: int) -> None:
        """The module's ``pipeline_metrics`` of this batch, as ``<stage>_<name>`` (epoch means weighted by batch)."""
        module, engine = self.lightning_module, self.engine
        assert module is not None and engine is not None
        for key, value in engine.last_metrics.items():
            module.log(
                f"{stage}_{key}",
                value.float(),
                on_step=stage == "train",
                on_epoch=True,
                prog_bar=stage != "train",
                batch_size=batch_size,
                sync_dist=True,
            )

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        """The schedule already ran forward and backward in ``training_step``: add its gradients (averaged over the
        data-parallel replicas) into ``.grad``, between the precision plugin's pre/post hooks."""
        module = self.lightning_module
        assert module is not None and self._pending is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        params = [p for group in self.optimizers[0].param_groups for p in group["params"]]
        fresh = [(p, g) for p, g in zip(params, self._pending, strict=True) if g is not None]
        all_reduce_mean([g for _, g in fresh], self._mesh_group("dp"))
        for p, grad in fresh:
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self._pending = None
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _mean_over_replicas(self, loss: torch.Tensor) -> torch.Tensor:
        loss = loss.float()
        group = self._mesh_group("dp")
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(loss, group=group)
            loss = loss / dist.get_world_size(group)
        return loss

    def _eval_step(self, batch: Any, name: str) -> torch.Tensor:
        module, engine = self.lightning_module, self.engine
        assert module is not None and engine is not None
        inputs, target = _unpack(batch)
        loss = self._mean_over_replicas(engine.eval_step(inputs, target))
        module.log(name, loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(inputs), sync_dist=True)
        self._log_metrics(name.removesuffix("_loss"), len(inputs))
        return loss

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._eval_step(args[0] if args else kwargs["batch"], "val_loss")

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._eval_step(args[0] if args else kwargs["batch"], "test_loss")

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "`strategy='pipeline'` does not predict: the outputs live on the last stage's rank. Predict in one "
            "process with the trained module (after fit the calling process holds every parameter)."
        )

    # --- checkpoints --------------------------------------------------------------------------------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The whole module's plain ``state_dict`` on rank 0 (a collective over all ranks)."""
        assert self.lightning_module is not None
        return gather_state_dict(self.lightning_module, self._state_keys)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The whole model's optimizer state in the single-process format, on rank 0 (a collective)."""
        assert self.lightning_module is not None and self._optimizer_layout is not None
        return gather_optimizer_state(optimizer, self.lightning_module, self._optimizer_layout)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        load_local_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        assert self.lightning_module is not None and self._optimizer_layout is not None
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            load_optimizer_state(optimizer, self.lightning_module, self._optimizer_layout, state)

    @property
    def timeline(self) -> list[Event]:
        """Recorded events (``record_timeline=True``): in a process of the run, this rank's; in the calling process
        after a spawned ``fit``, every rank's."""
        if self._gathered is not None:
            return list(self._gathered)
        return list(self.recorder.events) if self.recorder is not None else []

    def gather_timeline(self) -> list[Event]:
        """Every rank's events on every rank (a collective)."""
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, self.timeline)
        return sorted((e for part in parts for e in part), key=lambda e: (e.rank, e.start))

    def collect_results(self) -> dict[str, Any]:
        """What the spawn launcher sends back to the calling process (a collective): every rank's timeline (with
        ``record_timeline``), the blocks per stage and the predicted stage times of ``balance="time"``."""
        # plain dicts: Lightning's launcher maps over the results and refuses frozen dataclasses
        events = [e.as_dict() for e in self.gather_timeline()] if self.record_timeline else None
        return {"timeline": events, "stage_balance": self.stage_balance, "predicted": self.predicted_stage_seconds}

    def receive_results(self, results: dict[str, Any]) -> None:
        events = results["timeline"]
        self._gathered = None if events is None else [Event(**e) for e in events]
        self.stage_balance = results["stage_balance"]
        self.predicted_stage_seconds = results["predicted"]


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"`strategy='pipeline'` takes batches of (input, target), got {type(batch).__name__}.")


def _builds_in_configure_model(module: L.LightningModule) -> bool:
    return type(module).configure_model is not L.LightningModule.configure_model


def _check_module(module: L.LightningModule) -> None:
    missing = [name for name in ("pipeline_blocks", "pipeline_loss") if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(
            f"`strategy='pipeline'` needs the module to define `pipeline_blocks()` (its network as an ordered list of "
            f"blocks) and `pipeline_loss(output, target)` (the mean loss of a micro-batch); {type(module).__name__} "
            f"lacks {', '.join(missing)}."
        )
    if not module.automatic_optimization:
        raise ValueError(
            "`strategy='pipeline'` runs the backward inside its schedule and needs automatic optimization; the module "
            "sets `automatic_optimization=False`."
        )
