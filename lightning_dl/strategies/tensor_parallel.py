"""``strategy="tensor_parallel"``: the engine's preset for tensor parallelism (``tp = tensor_parallel_size``,
``dp = data_parallel_size`` with FSDP2 over dp after TP) with the plan found for the user (``plan="auto"``, a dict, or
a callable) on an unchanged LightningModule. The machinery is :class:`HybridStrategy`'s."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning as L
from typing_extensions import override

from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.parallel.tensor.apply import Plan
from lightning_dl.strategies.hybrid import CHECKPOINT_FORMATS, FULL_CHECKPOINT_LIMIT, HybridStrategy, plain_state_dict

__all__ = ["CHECKPOINT_FORMATS", "FULL_CHECKPOINT_LIMIT", "TensorParallelStrategy", "plain_state_dict"]


def _size(name: str, value: Any) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}={value!r}` must be a positive integer or 'auto'.")


class TensorParallelStrategy(HybridStrategy):
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
    _require_shardable = False

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
        super().__init__(
            plan=plan,
            dp_shard=True,
            loss_parallel=loss_parallel,
            sequence_parallel=sequence_parallel,
            checkpoint_format=checkpoint_format,
            timeout=timeout,
            start_method=start_method,
            process_group_backend=process_group_backend,
        )
        self._tp_size: int | str = tensor_parallel_size
        self._dp_size: int | str = data_parallel_size

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Tensor parallelism with an automatic plan (DTensor), FSDP2 over dp"
        )

    def layout(self, world_size: int) -> ParallelLayout:  # type: ignore[override]
        """The ``ParallelLayout`` for ``world_size`` processes; raises when the sizes do not multiply to it."""
        tp, dp = self._tp_size, self._dp_size
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

    @override
    def _layout_for(self, world_size: int, module: L.LightningModule | None) -> ParallelLayout:
        layout = self.layout(world_size)
        if layout != self.parallel_layout:  # the same degrees keep their mesh (validate after fit)
            self.parallel_layout = layout
        return self.parallel_layout

    @override
    def _check_at_construction(self) -> None:
        self.layout(self.num_processes * self.num_nodes)
        super()._check_at_construction()

    @property
    def tp_mesh(self) -> Any:
        return self.device_mesh["tp"]
