"""The server side of ``async_sgd``: a server runs Lightning's training loop with one iteration per push, applies
the pushed (staleness-corrected) gradients with the module's optimizer to the tensors it owns, and logs what it
saw. Rank 0 also gathers the other shards to validate, checkpoint and hand the model back."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.optim import Optimizer

from lightning_dl._log_steps import writes_logs
from lightning_dl.parallel.param_server import rpc
from lightning_dl.parallel.param_server.server import ParameterServer, Push

if TYPE_CHECKING:
    from lightning_dl.strategies.async_sgd import AsyncSGDStrategy


class ServerSide:
    """One server's shard, its watch on the workers, and the push being applied in this iteration."""

    def __init__(
        self, strategy: AsyncSGDStrategy, params: list[torch.Tensor], owners: list[list[int]], workers: list[str]
    ) -> None:
        self.strategy = strategy
        self.rank = strategy.global_rank
        self.params = params
        self.owners = owners  # parameter indices each server owns
        self.owned = [params[i] for i in owners[self.rank]]
        self.timeout = strategy.timeout
        self.server = ParameterServer(
            self.owned,
            strategy.num_workers,
            policy=strategy.staleness_policy,
            dc_lambda=strategy.dc_lambda,
            max_staleness=strategy.max_staleness,
        )
        rpc.serve(
            self.server, {"params": self._shard_params, "optimizer": self._shard_optimizer, "release": self._release}
        )
        self.watch = rpc.WorkerWatch(self.server, workers, timeout=min(self.timeout, 10.0)).start()
        self.push: Push | None = None
        self.correction: tuple[list[torch.Tensor], float] | None = None
        self.released = False
        self.together = False  # on a server other than rank 0: how rank 0 said to leave
        self.stats = _Window()

    def dataloader(self) -> _PushStream:
        return _PushStream(self.server, self.timeout)

    def on_train_start(self, trainer: L.Trainer) -> None:
        self.server.start(trainer.global_step)
        self.stats.reset(trainer.global_step, self.server)

    def take_push(self, trainer: L.Trainer) -> None:
        """The push this iteration applies; ends the epoch once every worker finished or died."""
        self.push = self.server.next_push(self.timeout)
        if self.push is None:
            trainer.should_stop = True
            raise StopIteration
        self.correction = self.server.correct(self.push)

    def training_step(self, trainer: L.Trainer, module: L.LightningModule) -> torch.Tensor:
        """The pushing worker's loss stands for the step's loss; the window's statistics are logged."""
        assert self.push is not None
        self.stats.add(self.push)
        if writes_logs(trainer, trainer.global_step + 1):
            for name, value in self.stats.flush(trainer.global_step + 1, self.server).items():
                module.log(
                    name, value, on_step=True, on_epoch=False, batch_size=1, prog_bar=name == "async/worker_loss"
                )
        return torch.tensor(self.push.loss)

    def set_gradients(self) -> None:
        """Lightning's backward on a server: the corrected pushed gradients become the owned tensors' ``.grad``."""
        assert self.correction is not None
        for param in self.params:
            param.grad = None
        for param, grad in zip(self.owned, self.correction[0], strict=True):
            param.grad = grad

    def apply(self, step: Callable[[], Any], optimizer: Optimizer) -> Any:
        """Run the optimizer ``step`` under the shard's lock, with the staleness policy's learning-rate factor."""
        assert self.push is not None and self.correction is not None
        with self.server.lock, _scaled_lr(optimizer, self.correction[1]):
            out = step()
        self.server.applied(self.push)
        self.push, self.correction = None, None
        return out

    def on_train_end(self) -> None:
        """Stop taking pushes, wait for the workers to leave; rank 0 collects the model and the optimizer state
        while the other servers still answer, then releases them."""
        self.server.stop()
        if not self.server.wait_workers_gone(self.timeout):
            raise TimeoutError(f"Workers {self.server.active_workers} did not finish within {self.timeout} s.")
        if self.rank != 0:
            self._wait_release()
            return
        self.gather_params()
        strategy = self.strategy
        strategy._final_optimizer_states = [strategy.optimizer_state(o) for o in strategy.optimizers]
        together = not any(s.dead for s in self.server.workers)  # a dead process cannot join a graceful exit
        for s in range(1, len(self.owners)):
            rpc.call(f"server{s}", "release", together, timeout=self.timeout)
        rpc.decide_leave(together)
        if not any(s.applied for s in self.server.workers):
            raise RuntimeError("No worker's gradient reached the parameter server: every worker died.")

    def gather_params(self) -> None:
        """Copy the other shards' current parameters into this process's module (rank 0 validates all of them)."""
        if len(self.owners) == 1 or self.rank != 0:
            return
        with torch.no_grad():
            for s in range(1, len(self.owners)):
                values = rpc.call(f"server{s}", "params", timeout=self.timeout)
                for index, value in zip(self.owners[s], values, strict=True):
                    self.params[index].copy_(value)

    def other_optimizer_states(self) -> dict[int, Any]:
        """The other shards' entries of the optimizer state (rank 0 saves the whole state)."""
        state: dict[int, Any] = {}
        for s in range(1, len(self.owners)):
            state.update(rpc.call(f"server{s}", "optimizer", timeout=self.timeout))
        return state

    def keep_own_optimizer_state(self, optimizers: list[Optimizer]) -> None:
        """After loading a whole checkpoint: drop the state of tensors another shard owns."""
        owned = {id(p) for p in self.owned}
        for optimizer in optimizers:
            for param in list(optimizer.state):
                if id(param) not in owned:
                    del optimizer.state[param]

    def close(self) -> None:
        self.watch.stop()

    def leave_together(self) -> bool:
        """Whether the processes leave RPC together: rank 0 decided it, the other servers heard it on release."""
        return rpc.decided_leave() if self.rank == 0 else self.together

    # ---- what the other servers' rank 0 calls over RPC ---------------------------------------------------------

    def _shard_params(self) -> list[torch.Tensor]:
        with self.server.lock:
            return [p.detach().clone() for p in self.owned]

    def _shard_optimizer(self) -> dict[int, Any]:
        """This shard's entries of the optimizer state, keyed like ``state_dict()`` (position over all groups)."""
        optimizer = self.strategy.optimizers[0]
        owned = {id(p) for p in self.owned}
        positions = {i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if id(p) in owned}
        return {i: s for i, s in optimizer.state_dict()["state"].items() if i in positions}

    def _release(self, together: bool) -> None:
        self.together = together
        self.released = True

    def _wait_release(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.released:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Server rank {self.rank}: rank 0 did not release it within {self.timeout} s.")
            time.sleep(0.05)


class _PushStream:
    """The server's training 'data': one ticket per expected push of an epoch; the push itself is taken in
    ``on_train_batch_start`` (Lightning fetches a batch ahead, and a ticket never blocks)."""

    def __init__(self, server: ParameterServer, timeout: float) -> None:
        self.server = server
        self.timeout = timeout

    def __len__(self) -> int:
        self.server.wait_registered(self.timeout)
        return max(self.server.expected_pushes(), 1)

    def __iter__(self) -> Iterator[int]:
        self.server.new_epoch()
        issued = 0
        while issued < self.server.expected_pushes() and self.server.active_workers:
            yield issued
            issued += 1


class _Window:
    """What the server logs, over the updates since its last log: worker loss, staleness, throughput."""

    def reset(self, step: int, server: ParameterServer) -> None:
        self.step, self.time = step, time.monotonic()
        self.samples = [w.samples for w in server.workers]
        self.staleness: list[int] = []
        self.loss = math.nan

    def add(self, push: Push) -> None:
        self.staleness.append(push.staleness)
        self.loss = push.loss

    def flush(self, step: int, server: ParameterServer) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.time, 1e-9)
        out = {
            "async/worker_loss": self.loss,
            "async/staleness_mean": sum(self.staleness) / max(len(self.staleness), 1),
            "async/staleness_max": float(max(self.staleness, default=0)),
            "async/updates_per_s": (step - self.step) / elapsed,
        }
        for index, worker in enumerate(server.workers):
            out[f"async/worker{index}_samples_per_s"] = (worker.samples - self.samples[index]) / elapsed
        self.reset(step, server)
        return out


@contextmanager
def _scaled_lr(optimizer: Optimizer, factor: float) -> Iterator[None]:
    """Multiply every group's learning rate by ``factor`` for one step (``inverse``: α/τ)."""
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr
