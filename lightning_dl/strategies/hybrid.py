"""``HybridStrategy``: the model-parallel engine. Data × tensor × pipeline parallelism on one DeviceMesh ``("pp",
"dp", "tp")`` for any ``ParallelLayout``, given as one string (``layout="dp2,tp2,pp2"``) or chosen from the device
count and the model. ``PipelineStrategy`` and ``TensorParallelStrategy`` are presets of it. Lightning glue only: the
stages come from ``lightning_dl.parallel.pipeline``, the shards from ``lightning_dl.parallel.tensor``."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_context
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.parallel.pipeline import all_reduce_mean
from lightning_dl.parallel.tensor import TPPlan, apply_fsdp, apply_tp
from lightning_dl.parallel.tensor.apply import Plan
from lightning_dl.strategies._engine_checkpoint import (
    CheckpointingStrategy,
    local,
    optimizer_layout,
)
from lightning_dl.strategies._engine_layout import (
    CHECKPOINT_FORMATS,
    FULL_CHECKPOINT_LIMIT,
    check_layout,
    choose_layout,
)
from lightning_dl.strategies._engine_pipeline import (
    PipelineResults,
    PipelineRunner,
    builds_in_configure_model,
    check_pipeline_module,
    unpack,
)
from lightning_dl.strategies._model_parallel import FullStateLauncher, first_optimizer, use_global_norm_clipping

PRECISIONS = ("32-true", "bf16-mixed")
"""Precisions the engine runs on CPU (tested): ``16-mixed`` needs CUDA, the ``*-true`` half types are refused."""
START_METHODS = ("spawn", "fork", "forkserver")

__all__ = ["CHECKPOINT_FORMATS", "FULL_CHECKPOINT_LIMIT", "HybridStrategy", "choose_layout"]


class HybridStrategy(PipelineResults, CheckpointingStrategy):
    """Any layout ``dp × tp × pp`` on one mesh, applied in this order: the module's ``pipeline_blocks()`` split into
    ``pp`` stages (pp > 1), tensor parallelism on each stage (or on the whole module when pp = 1) over ``tp``, then
    FSDP2 over ``dp`` (``dp_shard=True``) or a plain gradient all-reduce over ``dp``. With pp = 1 the module's own
    ``training_step`` runs (any LightningModule); with pp > 1 a pipeline schedule runs inside ``training_step``.

    Args:
        layout: ``"dp2,tp2,pp2"`` (a dimension left out is 1), a :class:`ParallelLayout`, or None to choose one from
            the device count and the model (printed with the reason).
        schedule, n_microbatches, stages_per_rank, balance, record_timeline, seed: the pipeline's, as for
            :class:`~lightning_dl.strategies.PipelineStrategy` (used when pp > 1).
        plan: the tensor-parallel plan (of each stage when pp > 1, names relative to it: ``blocks.<i>.<name>``):
            ``"auto"``, a dict of submodule names to styles, or a callable ``(module, tp_mesh)``.
        dp_shard: True: FSDP2 (``fully_shard``) over dp after TP; False: gradients all-reduced over dp, every replica
            keeps its whole part of the model.
        loss_parallel, sequence_parallel: as for :class:`~lightning_dl.strategies.TensorParallelStrategy` (pp = 1).
        checkpoint_format: ``"full"`` (one file of plain tensors that loads ``strict=True`` into the plain module,
            optimizer state in the single-process format), ``"sharded"`` (a torch.distributed.checkpoint folder with
            the plain module's names) or ``"auto"``: full below ``FULL_CHECKPOINT_LIMIT`` bytes of parameters.
        timeout, start_method, process_group_backend: collective timeout (a dead rank is reported after at most this
            long), how the launcher starts processes, the process-group backend (default: gloo on CPU).

    Example::

        >>> strategy = HybridStrategy(layout="dp2,tp2,pp2", n_microbatches=4)
        >>> strategy.parallel_layout, strategy.schedule
        (ParallelLayout(dp=2, tp=2, pp=2), '1f1b')
    """

    strategy_name = "hybrid"
    _pipeline_always = False
    """Presets that always run the pipeline (``PipelineStrategy``: even on one process)."""
    _require_shardable = True
    """Whether tp > 1 on a module whose automatic plan shards nothing is an error (before any process starts)."""

    def __init__(
        self,
        *,
        layout: str | ParallelLayout | None = None,
        schedule: str = "1f1b",
        n_microbatches: int = 4,
        stages_per_rank: int | None = None,
        plan: Plan = "auto",
        dp_shard: bool = False,
        loss_parallel: bool = False,
        sequence_parallel: bool = False,
        balance: str | Sequence[int] = "params",
        record_timeline: bool = False,
        seed: int = 0,
        checkpoint_format: str = "auto",
        timeout: timedelta = timedelta(seconds=300),
        start_method: Literal["spawn", "fork", "forkserver"] = "spawn",
        process_group_backend: str | None = None,
    ) -> None:
        if start_method not in START_METHODS:
            raise ValueError(f"`start_method={start_method!r}` must be one of {START_METHODS}.")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"`checkpoint_format={checkpoint_format!r}` must be one of {CHECKPOINT_FORMATS}.")
        if isinstance(plan, str) and plan != "auto":
            raise ValueError(f"`plan={plan!r}` must be 'auto', a dict of module name to style, or a callable.")
        if sequence_parallel and not isinstance(plan, str):
            raise ValueError(
                "`sequence_parallel=True` applies to plan='auto'; a hand-written plan splits the sequence with its "
                "own styles ('sequence', or torch's SequenceParallel and layouts)."
            )
        parsed = layout if isinstance(layout, ParallelLayout) or layout is None else ParallelLayout.parse(layout)
        super().__init__(
            save_distributed_checkpoint=checkpoint_format == "sharded",
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.runner = PipelineRunner(
            schedule=schedule,
            n_microbatches=n_microbatches,
            stages_per_rank=stages_per_rank,
            balance=balance,
            record_timeline=record_timeline,
            seed=seed,
        )
        self.parallel_layout = parsed
        self.plan = plan
        self.dp_shard = dp_shard
        self.loss_parallel = loss_parallel
        self.sequence_parallel = sequence_parallel
        self.checkpoint_format = checkpoint_format
        self.start_method = start_method
        self.applied_plan: TPPlan | None = None
        self._format = checkpoint_format
        self._built = False
        self._pipelined = False
        self._state_keys: list[str] = []
        self._optimizer_layouts: list[list[list[str]]] | None = None
        self._groups: dict[tuple[int, str], dist.ProcessGroup | None] = {}

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "hybrid", cls, description="data x tensor x pipeline parallel; layout from the devices and the model"
        )

    # --- layout -------------------------------------------------------------------------------------------------
    @property
    def layout(self) -> ParallelLayout | None:
        """The layout of the run (None until it is chosen)."""
        return self.parallel_layout

    @property
    def schedule(self) -> str:
        return self.runner.schedule

    @property
    def n_microbatches(self) -> int:
        return self.runner.n_microbatches

    @property
    def stages_per_rank(self) -> int:
        return self.runner.stages_per_rank

    def _layout_for(self, world_size: int, module: L.LightningModule | None) -> ParallelLayout:
        """The degrees for ``world_size`` processes (presets derive them from their sizes)."""
        if self.parallel_layout is None:
            if module is None or builds_in_configure_model(module):
                raise ValueError(
                    "`strategy='hybrid'` without `layout` chooses one from the model's blocks, which "
                    "`configure_model()` builds inside the processes: give `layout`, e.g. 'dp2,pp2'."
                )
            blocks = list(module.pipeline_blocks()) if callable(getattr(module, "pipeline_blocks", None)) else []  # type: ignore[operator]
            chosen, reason = choose_layout(world_size, blocks)
            rank_zero_info(f"HybridStrategy chose layout {chosen} for {world_size} processes ({reason}).")
            self.parallel_layout = chosen
        return self.parallel_layout

    def _resolve(self, world_size: int, module: L.LightningModule) -> ParallelLayout:
        """The layout, checked against the world size and the module (blocks, plan) where they are known."""
        layout = self._layout_for(world_size, module)
        layout.check_world_size(world_size)
        self._pipelined = self._pipeline_always or layout.pp_enabled
        if self._pipelined and self.loss_parallel:
            raise ValueError("`loss_parallel=True` applies to layouts with pp1: a pipeline computes `pipeline_loss`.")
        check_layout(self, layout, module, pipelined=self._pipelined)
        return layout

    def check_before_launch(self, trainer: L.Trainer) -> None:
        """Everything that can be checked in the calling process, before any process starts."""
        self._resolve(self.num_nodes * self.num_processes, trainer.lightning_module)

    def _check_at_construction(self) -> None:
        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        if self.root_device.type == "cpu" and precision not in PRECISIONS:
            raise ValueError(
                f"`precision={precision!r}` is not supported by {type(self).__name__} on CPU; valid: {PRECISIONS}."
            )

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._check_at_construction()
        if not self.cluster_environment.creates_processes_externally:  # torchrun, or a harness that set RANK etc.
            self._launcher = FullStateLauncher(self, start_method=self.start_method)

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()
        module = self.lightning_module
        assert module is not None
        layout = self._resolve(self.world_size, module)
        self._device_mesh = layout.build_mesh(self.root_device.type)
        module._device_mesh = self._device_mesh  # a module's configure_model() may read `self.device_mesh`

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        assert self.parallel_layout is not None
        return {"num_replicas": self.parallel_layout.dp, "rank": self._coordinates["dp"]}

    def _group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group of mesh dimension ``dim`` (None when it has one rank), looked up once per mesh."""
        if self._device_mesh is None:
            return None
        key = (id(self._device_mesh), dim)
        if key not in self._groups:
            sub = self.device_mesh[dim]
            self._groups[key] = sub.get_group() if sub.size() > 1 else None
        return self._groups[key]

    @property
    def grad_norm_group(self) -> dist.ProcessGroup | None:
        """The pipeline group: stages hold different parameters, so norms are summed over it (GradientClipping)."""
        return self._group("pp")

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # a module that builds itself in configure_model() (the strategy holds the module then) is created on the
        # meta device and materialised per stage and shard; `trainer.init_module()` builds real tensors unless asked
        meta = empty_init is True or (empty_init is None and self._lightning_module is not None)
        with torch.device("meta") if meta else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    # --- setup --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None and self.parallel_layout is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        if not self._built:
            self._build(trainer, module, self.parallel_layout)
            self._built = True
        if not self._pipelined:
            _materialize_distributed_module(self.model, self.root_device)
            self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        use_global_norm_clipping(self.precision_plugin, lambda: self.grad_norm_group)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _build(self, trainer: L.Trainer, module: L.LightningModule, layout: ParallelLayout) -> None:
        """Stages (pp > 1), then TP over the tp submesh, then FSDP2 over the dp submesh (``dp_shard``)."""
        self._state_keys = list(module.state_dict())
        if self._format == "auto":
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            self.checkpoint_format = "full" if size < FULL_CHECKPOINT_LIMIT else "sharded"
            self._save_distributed_checkpoint = self.checkpoint_format == "sharded"
        mesh = self.device_mesh
        if self._pipelined:
            check_pipeline_module(module, self.strategy_name)  # under torchrun no launcher checked it
            if trainer.state.fn == TrainerFn.FITTING:  # the whole model's optimizer order, for checkpoints
                self._optimizer_layouts = [optimizer_layout(first_optimizer(module.configure_optimizers()), module)]
            self.runner.build(
                module,
                layout,
                mesh,
                rank=self.global_rank,
                device=self.root_device,
                plan=self.plan,
                dp_shard=self.dp_shard,
            )
            if self.runner.tp_plans:
                rank_zero_info(
                    f"{type(self).__name__} {layout}: stage 0 tensor-parallel plan\n{self.tp_plans.get(0, '')}"
                )
            return
        if layout.tp_enabled:
            self.applied_plan = apply_tp(
                module,
                mesh["tp"],
                self.plan,
                loss_parallel=self.loss_parallel,
                sequence_parallel=self.sequence_parallel,
            )
            rank_zero_info(f"tensor-parallel plan ({layout}):\n{self.applied_plan.table()}")
        if self.dp_shard and layout.dp_enabled:
            apply_fsdp(module, mesh["dp"])

    @override
    def setup_optimizers(self, trainer: L.Trainer) -> None:
        super().setup_optimizers(trainer)
        if self._pipelined and len(self.optimizers) != 1:
            raise ValueError(
                f"`strategy='{self.strategy_name}'` trains with one optimizer, got {len(self.optimizers)}."
            )

    # --- steps --------------------------------------------------------------------------------------------------
    def _loss_context(self) -> Any:
        return loss_parallel_context() if self.loss_parallel else nullcontext()

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizers[0].param_groups for p in group["params"]]

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._pipelined:
            with self._loss_context():
                return super().training_step(*args, **kwargs)
        assert self.lightning_module is not None
        batch = unpack(args[0] if args else kwargs["batch"], self.strategy_name)
        return self.runner.training_step(
            self.lightning_module, batch, self._params(), precision=self.precision_plugin, dp_group=self._group("dp")
        )

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        """pp > 1: the schedule already ran forward and backward in ``training_step``: add its gradients (averaged
        over dp unless FSDP2 did) into ``.grad``. pp = 1: the loss's backward (inside ``loss_parallel``), then the
        gradients averaged over dp unless FSDP2 did. Both between the precision plugin's pre/post hooks."""
        module = self.lightning_module
        assert module is not None and self.model is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        dp_group = None if self.dp_shard else self._group("dp")
        if self._pipelined:
            self.runner.add_gradients(self._params(), dp_group)
        else:
            with self._loss_context():
                self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
            params = [p for p in self.model.parameters() if p.grad is not None]
            for p in params:
                # a vocabulary-parallel embedding's gradient comes back replicated (whole-sized on every rank), which
                # would make its optimizer state whole-sized too: lay it out as the parameter
                if isinstance(p, DTensor) and isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                    p.grad = p.grad.redistribute(placements=p.placements)
            all_reduce_mean([local(p.grad) for p in params if p.grad is not None], dp_group)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _eval_step(self, batch: Any, name: str) -> torch.Tensor:
        assert self.lightning_module is not None
        inputs = unpack(batch, self.strategy_name)
        return self.runner.eval_step(self.lightning_module, inputs, name, dp_group=self._group("dp"))

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipelined:
            return self._eval_step(args[0] if args else kwargs["batch"], "val_loss")
        with self._loss_context():
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipelined:
            return self._eval_step(args[0] if args else kwargs["batch"], "test_loss")
        with self._loss_context():
            return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipelined:
            raise NotImplementedError(
                f"`strategy='{self.strategy_name}'` does not predict with pp > 1: the outputs live on the last "
                "stage's rank. Predict in one process with the trained module (after fit the calling process holds "
                "every parameter)."
            )
        return super().predict_step(*args, **kwargs)


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every DTensor gathered whole (a collective over its mesh)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}
