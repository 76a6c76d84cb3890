"""One rank's part of a pipeline: its stages over the whole model's blocks, a torch schedule per micro-batch shape,
a training step, a forward-only step, and gradient averaging over a data-parallel group. Torch only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from lightning_dl.parallel.pipeline.partition import boundaries
from lightning_dl.parallel.pipeline.schedules import (
    build_schedule,
    check_microbatches,
    get_spec,
    stage_ids,
    stage_owner,
)
from lightning_dl.parallel.pipeline.split import StageModule, stage_shapes
from lightning_dl.parallel.pipeline.timeline import TimelineRecorder

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def eval_microbatches(batch_size: int, n_microbatches: int) -> int:
    """Micro-batches for a forward-only step: the largest divisor of ``batch_size`` not above ``n_microbatches``,
    so validation takes any batch size (a ragged last batch included).

    Example::

        >>> eval_microbatches(8, 4), eval_microbatches(6, 4), eval_microbatches(5, 4)
        (4, 3, 1)
    """
    return max(d for d in range(1, min(batch_size, n_microbatches) + 1) if batch_size % d == 0)


class PipelineEngine:
    """Stages ``stage_ids(schedule, rank, pp, stages_per_rank)`` of ``blocks`` split by ``balance``, run by the
    named torch schedule over ``group`` (the pipeline ranks of one replica, in stage order).

    ``blocks`` are the whole model's blocks: those this rank owns real, the others may be on the meta device (they
    give shapes only). Each stage gets static input/output shapes (from a meta forward), so no shape inference
    runs on real tensors. ``metrics_fn(output, target)``, when given, is evaluated on each micro-batch at the last
    stage; :attr:`last_metrics` holds the step's micro-batch means on every rank.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        balance: Sequence[int],
        *,
        schedule: str,
        n_microbatches: int,
        stages_per_rank: int,
        loss_fn: LossFn,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        recorder: TimelineRecorder | None = None,
        metrics_fn: MetricsFn | None = None,
    ) -> None:
        self.spec = get_spec(schedule)
        self.schedule_name = schedule
        self.group = group
        self.pp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_stages = len(balance)
        if self.num_stages != self.pp * stages_per_rank:
            raise ValueError(
                f"`balance` gives {self.num_stages} stages, but {self.pp} ranks × stages_per_rank={stages_per_rank} "
                f"need {self.pp * stages_per_rank}."
            )
        check_microbatches(schedule, n_microbatches, self.num_stages, self.pp)
        self.n_microbatches = n_microbatches
        self.blocks = list(blocks)
        self.spans = boundaries(balance)
        self.local_ids = stage_ids(schedule, self.rank, self.pp, stages_per_rank)
        self.modules = {
            s: StageModule(self.blocks[a:b], a) for s, (a, b) in enumerate(self.spans) if s in self.local_ids
        }
        self.loss_fn = loss_fn
        self.device = device or torch.device("cpu")
        self.recorder = recorder
        self._cache: dict[tuple, tuple[list[PipelineStage], object]] = {}
        self._losses: list[torch.Tensor] = []
        self._scale = 1.0
        self.metrics_fn = metrics_fn
        self._metrics: list[dict[str, torch.Tensor]] = []
        self.last_metrics: dict[str, torch.Tensor] = {}
        """``metrics_fn``'s values of the last step, averaged over its micro-batches, on every rank."""
        self.last_rank = stage_owner(schedule, self.num_stages - 1, self.pp)

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules.values() for p in module.parameters()]

    def _micro_example(self, inputs: torch.Tensor, m: int) -> torch.Tensor:
        if inputs.shape[0] % m:
            raise ValueError(
                f"a batch of {inputs.shape[0]} samples does not split into `n_microbatches={m}` equal micro-batches: "
                "use a batch size divisible by n_microbatches (and `drop_last=True` in the training DataLoader)."
            )
        return inputs[: inputs.shape[0] // m]

    def _scaled_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(output, target)
        self._losses.append(loss.detach())
        self._record_metrics(output, target)
        return loss * self._scale

    def _record_metrics(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if self.metrics_fn is not None:
            with torch.no_grad():
                self._metrics.append({k: v.detach().double() for k, v in self.metrics_fn(output, target).items()})

    def _schedule(self, inputs: torch.Tensor, m: int, train: bool) -> object:
        example = self._micro_example(inputs, m)
        key = (train, tuple(example.shape), example.dtype, m)
        if key not in self._cache:
            shapes = stage_shapes(self.blocks, self.spans, example)
            stages = []
            for s in self.local_ids:
                first, out = shapes[s]
                stage = PipelineStage(
                    self.modules[s],
                    s,
                    self.num_stages,
                    self.device,
                    input_args=_example(first, grad=train and s > 0),
                    output_args=_example(out, grad=train),
                    group=self.group,
                )
                if self.recorder is not None:
                    self.recorder.watch(stage)
                stages.append(stage)
            self._cache[key] = (stages, build_schedule(self.schedule_name, stages, m, self._scaled_loss))
        return self._cache[key][1]

    def _batch_loss(self, holds_last: bool) -> torch.Tensor:
        """Mean of the micro-batch losses (float64), broadcast from the rank holding the last stage."""
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if holds_last:
            loss = torch.stack(self._losses).double().mean()
        self._losses = []
        if self.pp > 1:
            dist.broadcast(loss, group_src=self.last_rank, group=self.group)
        if self.metrics_fn is not None:
            metrics = (
                {k: torch.stack([m[k] for m in self._metrics]).mean() for k in self._metrics[0]} if holds_last else {}
            )
            box: list[Any] = [metrics]
            if self.pp > 1:
                dist.broadcast_object_list(box, group_src=self.last_rank, group=self.group)
            self.last_metrics = box[0]
            self._metrics = []
        return loss

    def train_step(self, inputs: torch.Tensor, target: torch.Tensor, *, loss_scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of the whole batch in ``n_microbatches`` micro-batches; gradients are added into
        ``.grad`` as those of ``loss_scale · mean(batch loss)``. Returns the batch's mean loss
        (float64) on every rank."""
        schedule = self._schedule(inputs, self.n_microbatches, True)
        self._scale = loss_scale / self.n_microbatches
        holds_last = self.rank == self.last_rank
        first = 0 in self.local_ids
        schedule.step(  # type: ignore[attr-defined]
            *((inputs,) if first else ()), target=target if holds_last else None, losses=[] if holds_last else None
        )
        return self._batch_loss(holds_last)

    @torch.no_grad()
    def eval_step(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Forward only: the batch's mean loss on every rank. V-placement schedules cannot run torch's forward-only
        mode; they run the stages one after the other on the whole batch instead."""
        holds_last = self.rank == self.last_rank
        if self.spec.placement == "v":
            self._plain_forward(inputs, target, holds_last)
        else:
            m = eval_microbatches(inputs.shape[0], self.n_microbatches)
            schedule = self._schedule(inputs, m, False)
            self._scale = 1.0
            schedule.eval(  # type: ignore[attr-defined]
                *((inputs,) if 0 in self.local_ids else ()),
                target=target if holds_last else None,
                losses=[] if holds_last else None,
            )
        return self._batch_loss(holds_last)

    def _plain_forward(self, inputs: torch.Tensor, target: torch.Tensor, holds_last: bool) -> None:
        shapes = stage_shapes(self.blocks, self.spans, inputs)
        x = inputs
        for s in range(self.num_stages):
            owner = stage_owner(self.schedule_name, s, self.pp)
            if owner != self.rank:
                continue
            if s > 0 and stage_owner(self.schedule_name, s - 1, self.pp) != self.rank:
                meta = shapes[s][0]
                x = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
                dist.recv(x, group_src=stage_owner(self.schedule_name, s - 1, self.pp), group=self.group)
            x = self.modules[s](x)
            if s == self.num_stages - 1:
                self._losses.append(self.loss_fn(x, target).detach())
                self._record_metrics(x, target)
            elif stage_owner(self.schedule_name, s + 1, self.pp) != self.rank:
                dist.send(x.contiguous(), group_dst=stage_owner(self.schedule_name, s + 1, self.pp), group=self.group)


def _example(meta: torch.Tensor, *, grad: bool) -> torch.Tensor:
    """A real tensor shaped like ``meta``; a stage's floating input and output require grad when it trains (a
    stage sends input gradients back only for inputs that require them)."""
    return torch.empty(meta.shape, dtype=meta.dtype).requires_grad_(grad and meta.is_floating_point())


def all_reduce_mean(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Average ``tensors`` in place over ``group`` (one flat all-reduce); nothing when the group has one rank."""
    if group is None or dist.get_world_size(group) == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
