"""The worker side of ``async_sgd``: a worker runs the user's ``training_step`` and backward, sums its gradients
over ``push_every`` steps, pushes them to every server shard and copies the parameters back every ``fetch_every``
steps; its ``trainer.global_step`` follows the servers' update count."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_dl.parallel.param_server import rpc
from lightning_dl.parallel.param_server.server import STOP
from lightning_dl.strategies._base import set_global_step


class WorkerSide:
    """One worker's client of the sharded servers and its gradient accumulator."""

    def __init__(
        self,
        index: int,
        params: list[torch.Tensor],
        servers: list[str],
        owners: list[list[int]],
        *,
        fetch_every: int,
        push_every: int,
        timeout: float,
    ) -> None:
        self.client = rpc.WorkerClient(index, params, servers, owners, timeout=timeout)
        self.acc = _Accumulator(params, copy=push_every > 1)
        self.fetch_every = fetch_every
        self.push_every = push_every

    def register(self, trainer: L.Trainer, dataloader: Any) -> None:
        """Tell every server how many pushes one of this worker's epochs makes."""
        batches = len(dataloader)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None:
            batches = int(batches * limit)
        steps = math.ceil(batches / trainer.accumulate_grad_batches)
        self.client.register(math.ceil(steps / self.push_every))

    def on_train_start(self, trainer: L.Trainer) -> None:
        self.client.fetch()
        set_global_step(trainer, self.client.versions[0], after_step=False)

    def count_samples(self, batch: Any) -> None:
        try:
            self.acc.samples += extract_batch_size(batch)
        except Exception:  # a batch whose size Lightning cannot infer still trains; throughput counts batches
            self.acc.samples += 1

    def optimizer_step(self, trainer: L.Trainer, closure: Callable[[], Any]) -> Any:
        """Lightning's optimizer step on a worker: compute, then push (or only fetch) instead of stepping."""
        loss = closure()  # training_step and backward on this worker; clipping and hooks run on the server
        self.acc.add(loss)
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        fetch = self.acc.steps_total % self.fetch_every == 0
        if self.acc.steps == self.push_every or last:
            grads, loss_mean, samples = self.acc.take()
            if self.client.push(grads, loss=loss_mean, samples=samples, fetch=fetch) == STOP:
                trainer.should_stop = True
        elif fetch:
            self.client.fetch()
        set_global_step(trainer, self.client.versions[0], after_step=True)
        return loss

    def finish(self) -> None:
        self.client.finish()


class _Accumulator:
    """A worker's gradients summed over the steps since its last push."""

    def __init__(self, params: list[torch.Tensor], *, copy: bool) -> None:
        self.params = params
        self.copy = copy  # False when every step pushes at once: the gradients are sent before they change
        self.sums: list[torch.Tensor] | None = None
        self.steps = 0
        self.steps_total = 0
        self.loss = 0.0
        self.samples = 0

    def add(self, loss: Any) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.sums is None:
            self.sums = [g.detach().clone() if self.copy else g.detach() for g in grads]
        else:
            torch._foreach_add_(self.sums, [g.detach() for g in grads])
        self.steps += 1
        self.steps_total += 1
        self.loss += float(loss) if loss is not None else math.nan

    def take(self) -> tuple[list[torch.Tensor], float, int]:
        assert self.sums is not None
        grads = self.sums
        if self.steps > 1:
            torch._foreach_div_(grads, self.steps)
        out = (grads, self.loss / self.steps, self.samples)
        self.sums, self.steps, self.loss, self.samples = None, 0, 0.0, 0
        return out
