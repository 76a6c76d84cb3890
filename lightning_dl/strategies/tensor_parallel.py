"""``strategy="tensor_parallel"``: Lightning's ``ModelParallelStrategy`` with the plan found for the user
(``plan="auto"``, a dict, or a callable), the mesh of ``ParallelLayout`` (dims pp, dp, tp), FSDP2 over dp after TP,
global-norm clipping, full or DCP-sharded checkpoints with the plain module's names, and a spawn launcher that hands
the calling process the whole trained model as plain tensors."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_context
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.parallel.tensor import TPPlan, apply_tp, auto_plan, plan_from_dict
from lightning_dl.parallel.tensor.apply import Plan
from lightning_dl.strategies._tensor_parallel_glue import (
    FullStateSpawnLauncher,
    clip_by_global_norm,
    fully_shard_over_dp,
    optimizer_state_by_ids,
    optimizer_state_by_names,
)

CHECKPOINT_FORMATS = ("auto", "full", "sharded")
FULL_CHECKPOINT_LIMIT = 2**30
"""``checkpoint_format="auto"`` writes one full file below this many bytes of parameters (1 GiB: rank 0 holds the
whole model and its optimizer state in memory while writing), a sharded DCP folder above."""
PRECISIONS = ("32-true", "bf16-mixed")
"""Precisions this strategy runs on CPU (tested): Lightning's ModelParallelStrategy already refuses ``64-true``;
``16-mixed`` needs CUDA; the ``*-true`` half types are refused here."""


def _size(name: str, value: Any) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}={value!r}` must be a positive integer or 'auto'.")


class TensorParallelStrategy(ModelParallelStrategy):
    """Tensor parallelism on DTensor over ``tensor_parallel_size`` processes, times ``data_parallel_size`` replicas
    sharded with FSDP2, on an unchanged LightningModule.

    Args:
        tensor_parallel_size: ranks that split each layer; ``"auto"``: ``devices // data_parallel_size``.
        data_parallel_size: replicas (FSDP2 over them); ``"auto"``: 1.
        plan: ``"auto"`` (the planner of :mod:`lightning_dl.parallel.tensor`), a dict of submodule names (of the
            LightningModule) to ``"colwise"``, ``"rowwise"``, ``"sequence"``, ``"heads"``, ``"vocab"`` or a torch
            ``ParallelStyle``, or a callable ``(module, tp_mesh) -> None``. A module that shards itself in
            ``configure_model()`` (its parameters are DTensors) is left as it is.
        sequence_parallel: with ``plan="auto"``, the block list runs split along the sequence between the Linear
            pairs (Megatron's sequence parallelism; see :mod:`lightning_dl.parallel.tensor.sequence`).
        loss_parallel: the output head keeps its logits split along the vocabulary and ``training_step`` /
            ``backward`` run inside torch's ``loss_parallel()`` (cross-entropy on sharded logits).
        checkpoint_format: ``"full"`` (one file of plain tensors that loads ``strict=True`` into the plain module),
            ``"sharded"`` (a torch.distributed.checkpoint folder, the plain module's names), or ``"auto"``: full
            below ``FULL_CHECKPOINT_LIMIT`` bytes of parameters, sharded above.
        start_method: how the launcher starts processes when none exist yet (``"spawn"``).
        timeout: collective timeout: a rank that died is reported after at most this long.

    Example::

        >>> strategy = TensorParallelStrategy(tensor_parallel_size=2, data_parallel_size=2, loss_parallel=True)
        >>> strategy.layout(4)
        ParallelLayout(dp=2, tp=2, pp=1)
    """

    strategy_name = "tensor_parallel"

    def __init__(
        self,
        *,
        tensor_parallel_size: int | str = "auto",
        data_parallel_size: int | str = "auto",
        plan: Plan = "auto",
        sequence_parallel: bool = False,
        loss_parallel: bool = False,
        checkpoint_format: str = "auto",
        start_method: Literal["spawn", "fork", "forkserver"] = "spawn",
        timeout: timedelta = timedelta(seconds=120),
        process_group_backend: str | None = None,
    ) -> None:
        _size("tensor_parallel_size", tensor_parallel_size)
        _size("data_parallel_size", data_parallel_size)
        if start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError(f"`start_method={start_method!r}` must be one of ('spawn', 'fork', 'forkserver').")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"`checkpoint_format={checkpoint_format!r}` must be one of {CHECKPOINT_FORMATS}.")
        if isinstance(plan, str) and plan != "auto":
            raise ValueError(f"`plan={plan!r}` must be 'auto', a dict of module name to style, or a callable.")
        if sequence_parallel and not isinstance(plan, str):
            raise ValueError(
                "`sequence_parallel=True` applies to plan='auto'; a hand-written plan splits the sequence with its "
                "own styles ('sequence', or torch's SequenceParallel and layouts)."
            )
        super().__init__(
            data_parallel_size=data_parallel_size,  # type: ignore[arg-type]
            tensor_parallel_size=tensor_parallel_size,  # type: ignore[arg-type]
            save_distributed_checkpoint=checkpoint_format == "sharded",
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plan = plan
        self.loss_parallel = loss_parallel
        self.sequence_parallel = sequence_parallel
        self.checkpoint_format = checkpoint_format
        self.start_method = start_method
        self.applied_plan: TPPlan | None = None
        self._format = checkpoint_format
        self._layout: ParallelLayout | None = None

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Tensor parallelism with an automatic plan (DTensor), FSDP2 over dp"
        )

    def layout(self, world_size: int) -> ParallelLayout:
        """The ``ParallelLayout`` for ``world_size`` processes; raises when the sizes do not multiply to it."""
        tp, dp = self._tensor_parallel_size, self._data_parallel_size
        if tp == "auto":
            tp = world_size // (1 if dp == "auto" else int(dp)) or 1
        if dp == "auto":
            dp = world_size // int(tp) or 1
        if int(tp) * int(dp) != world_size:
            raise ValueError(
                f"The sizes `data_parallel_size={dp}` and `tensor_parallel_size={tp}` multiplied should equal the "
                f"world size ({world_size}, the number of devices): choose sizes whose product is {world_size}."
            )
        return ParallelLayout(dp=int(dp), tp=int(tp))

    def _check(self) -> None:
        """What can be checked before any process starts: the sizes against the devices, the precision."""
        self.layout(self.num_processes * self.num_nodes)
        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        if self.root_device.type == "cpu" and precision not in PRECISIONS:
            raise ValueError(
                f"`precision={precision!r}` is not supported by TensorParallelStrategy on CPU; valid: {PRECISIONS}."
            )

    def check_before_launch(self, trainer: L.Trainer) -> None:
        """In the calling process, before any process starts: a dict plan names existing modules with fitting
        styles, and ``loss_parallel`` finds an output head (skipped for a module built in ``configure_model``)."""
        module = trainer.lightning_module
        if not any(True for _ in module.parameters()):
            return
        layout = self.layout(self.num_processes * self.num_nodes)
        if isinstance(self.plan, Mapping):
            plan_from_dict(module, self.plan, layout.tp)
        elif self.plan == "auto" and (self.loss_parallel or self.sequence_parallel):
            auto_plan(module, layout.tp, loss_parallel=self.loss_parallel, sequence_parallel=self.sequence_parallel)

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._check()
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = FullStateSpawnLauncher(self, start_method=self.start_method)

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()
        self._layout = self.layout(self.world_size)
        self._device_mesh = self._layout.build_mesh(self.root_device.type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp_mesh = self.device_mesh["dp"]
        return {"num_replicas": dp_mesh.size(), "rank": dp_mesh.get_local_rank()}

    @property
    def tp_mesh(self) -> Any:
        return self.device_mesh["tp"]

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # a module that builds itself in configure_model() (the strategy holds the module then) is created on the
        # meta device and materialised sharded; `trainer.init_module()` before fit builds real tensors unless asked
        meta = empty_init is True or (empty_init is None and self._lightning_module is not None)
        with (
            torch.device("meta") if meta else nullcontext(),
            self.precision_plugin.tensor_init_context(),
        ):
            yield

    @override
    def setup(self, trainer: L.Trainer) -> None:
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        assert self.model is not None and self.accelerator is not None and self._layout is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        if self.applied_plan is None:
            self.applied_plan = apply_tp(
                module,
                self.tp_mesh,
                self.plan,
                loss_parallel=self.loss_parallel,
                sequence_parallel=self.sequence_parallel,
            )
            rank_zero_info(f"tensor-parallel plan ({self._layout}):\n{self.applied_plan.table()}")
            if self._layout.dp_enabled:
                fully_shard_over_dp(module, self.device_mesh["dp"])
        if self._format == "auto":
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            self.checkpoint_format = "full" if size < FULL_CHECKPOINT_LIMIT else "sharded"
            self._save_distributed_checkpoint = self.checkpoint_format == "sharded"
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        clip_by_global_norm(self.precision_plugin)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _loss_context(self) -> Any:
        return loss_parallel_context() if self.loss_parallel else nullcontext()

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return super().training_step(*args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            return super().test_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        with self._loss_context():
            loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        assert self.model is not None
        for param in self.model.parameters():
            # a vocabulary-parallel embedding's gradient comes back replicated (whole-sized on every rank), which
            # would make its optimizer state whole-sized too: lay it out as the parameter
            grad = param.grad
            if isinstance(param, DTensor) and isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad.redistribute(placements=param.placements)
        return loss

    def full_state_dict(self) -> dict[str, Any]:
        """The whole module's ``state_dict`` as plain CPU tensors on rank 0 ({} elsewhere); a collective."""
        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.checkpoint_format == "full":
            return self.full_state_dict()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.checkpoint_format != "full":
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        return optimizer_state_by_ids(state) if self.global_rank == 0 else {}

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        assert self.model is not None and self.lightning_module is not None
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only or False)
        strict = self.lightning_module.strict_loading
        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        states = checkpoint.get("optimizer_states", [])
        for optimizer, state in zip(self.optimizers, states, strict=False):
            by_names = optimizer_state_by_names(state, optimizer, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_names, options=options)
        return checkpoint


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every DTensor gathered whole (a collective over its mesh)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}
