"""``local_sgd`` and ``diloco`` on 2 gloo ranks: with ``sync_every=1`` they equal DDP step for step; with H > 1 the
parameters after every step equal a transcription of each rank's local trajectory (averaged every H steps, DiLoCo's
outer step on top); a checkpoint taken mid-period resumes exactly. One spawned run holds every fit; the DiLoCo
checks live in test_diloco.py and share it."""

from __future__ import annotations

import functools
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_dl.strategies import DiLoCoStrategy, LocalSGDStrategy
from tests.helpers.distributed import loopback_env, run_distributed
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net
from tests.helpers.trainer import quiet_trainer

pytestmark = pytest.mark.distributed

WORLD, BATCH, LR, SAMPLES = 2, 4, 0.1, 40  # 5 steps per epoch: a 2-epoch run with H = 3 ends mid-period
H = 3
OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9}


class ParamsPerStep(L.Callback):
    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def _data() -> TensorDataset:
    return regression_dataset(num_samples=SAMPLES)


def fit(strategy, *, epochs: int = 2, max_steps: int = -1, ckpt_path=None, save: Path | None = None) -> dict:
    """One Trainer fit of TinyRegressor on this rank; returns per-step parameters, final parameters, bytes."""
    module = TinyRegressor(tiny_net(seed=0), lr=LR)
    recorder = ParamsPerStep()
    trainer = quiet_trainer(
        devices=WORLD, strategy=strategy, max_epochs=epochs, max_steps=max_steps, callbacks=[recorder]
    )
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return {
        "steps": recorder.params,
        "final": [p.detach().clone() for p in module.parameters()],
        "bytes": strategy.bytes_sent,
        "global_step": trainer.global_step,
    }


def _resume(make, tmp: str, name: str) -> dict:
    path = Path(tmp) / f"{name}.ckpt"
    fit(make(), epochs=1, save=path)
    return fit(make(), epochs=2, ckpt_path=path)


def _run(rank: int, world_size: int, tmp: str) -> dict:
    return {
        "local_h1": fit(LocalSGDStrategy(sync_every=1), max_steps=6),
        "diloco_h1": fit(DiLoCoStrategy(sync_every=1, outer_lr=1.0, outer_momentum=0.0), max_steps=6),
        "local_h3": fit(LocalSGDStrategy(sync_every=H)),
        "local_warm": fit(LocalSGDStrategy(sync_every=H, warmup_steps=2)),
        "diloco_h3": fit(DiLoCoStrategy(sync_every=H, **OUTER)),
        "local_resumed": _resume(lambda: LocalSGDStrategy(sync_every=H), tmp, "local"),
        "diloco_resumed": _resume(lambda: DiLoCoStrategy(sync_every=H, **OUTER), tmp, "diloco"),
        "checkpoint": torch.load(Path(tmp) / "diloco.ckpt", weights_only=False)["lightning_dl_comm"],
    }


@functools.cache
def comm_runs() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="lightning_dl_local_sgd_") as tmp:
        return run_distributed(_run, WORLD, tmp, timeout=240)


def per_rank_batches(epochs: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Step k's batch on each rank under Lightning's ``DistributedSampler(shuffle=True, seed=0)``, epoch by epoch."""
    steps = []
    for epoch in range(epochs):
        loaders = []
        for rank in range(WORLD):
            sampler = DistributedSampler(_data(), num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            loaders.append(list(DataLoader(_data(), batch_size=BATCH, sampler=sampler)))
        steps += [list(step) for step in zip(*loaders, strict=True)]
    return steps


def local_reference(
    steps: list, sync_every: int, *, warmup: int = 0, outer_lr: float = 1.0, outer_momentum: float = 0.0
) -> list[list[list[torch.Tensor]]]:
    """Transcription: every rank runs SGD (momentum 0.9) on its own batches; during warmup on the mean gradient;
    after every ``sync_every`` steps past warmup the parameters become the mean, then DiLoCo's outer Nesterov step
    ``Δ = θ₀ − θ̄, m = μm + Δ, θ₀ = θ₀ − lr(Δ + μm)``. Returns parameters per step per rank."""
    nets = [tiny_net(seed=0) for _ in range(WORLD)]
    optimizers = [torch.optim.SGD(n.parameters(), lr=LR, momentum=0.9) for n in nets]
    start = [p.detach().clone() for p in nets[0].parameters()]
    momentum = [torch.zeros_like(p) for p in start]
    history = []
    for k, batches in enumerate(steps, start=1):
        grads = []
        for net, (x, y) in zip(nets, batches, strict=True):
            grads.append(torch.autograd.grad(F.mse_loss(net(x), y), list(net.parameters())))
        for r, (net, opt) in enumerate(zip(nets, optimizers, strict=True)):
            for i, p in enumerate(net.parameters()):
                p.grad = sum(g[i] for g in grads) / WORLD if k <= warmup else grads[r][i].clone()
            opt.step()
        if k > warmup and (k - warmup) % sync_every == 0:
            mean = [sum(ps) / WORLD for ps in zip(*[list(n.parameters()) for n in nets], strict=True)]
            delta = [s - a for s, a in zip(start, mean, strict=True)]
            momentum = [outer_momentum * m + d for m, d in zip(momentum, delta, strict=True)]
            start = [s - outer_lr * (d + outer_momentum * m) for s, d, m in zip(start, delta, momentum, strict=True)]
            with torch.no_grad():
                for net in nets:
                    for p, s in zip(net.parameters(), start, strict=True):
                        p.copy_(s)
        history.append([[p.detach().clone() for p in net.parameters()] for net in nets])
    return history


def ddp_reference(steps: list) -> list[list[torch.Tensor]]:
    """One process, SGD on the global batch (both ranks' batches together): what DDP computes."""
    net = tiny_net(seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    history = []
    for batches in steps:
        x, y = (torch.cat(parts) for parts in zip(*batches, strict=True))
        optimizer.zero_grad()
        F.mse_loss(net(x), y).backward()
        optimizer.step()
        history.append([p.detach().clone() for p in net.parameters()])
    return history


def assert_trajectory(ranks: list[dict], key: str, reference: list[list[list[torch.Tensor]]]) -> None:
    for rank, result in enumerate(ranks):
        assert len(result[key]["steps"]) == len(reference)
        for step, (got, want) in enumerate(zip(result[key]["steps"], reference, strict=True)):
            for g, w in zip(got, want[rank], strict=True):
                torch.testing.assert_close(g, w, msg=lambda m, s=step, r=rank: f"{key} rank {r} step {s + 1}: {m}")


def test_sync_every_one_equals_ddp_step_for_step() -> None:
    ranks = comm_runs()
    reference = ddp_reference(per_rank_batches(2)[:6])
    for key in ("local_h1", "diloco_h1"):
        assert_trajectory(ranks, key, [[params] * WORLD for params in reference])


def test_local_sgd_equals_mean_of_local_trajectories() -> None:
    ranks = comm_runs()
    steps = per_rank_batches(2)
    reference = local_reference(steps, H)
    assert_trajectory(ranks, "local_h3", reference)
    # between syncs the ranks differ, right after a sync they agree
    first, second = ranks[0]["local_h3"]["steps"], ranks[1]["local_h3"]["steps"]
    assert not torch.equal(first[3][0], second[3][0])
    assert torch.equal(first[5][0], second[5][0])
    # bytes: three averages of every parameter (10 steps, H = 3), no gradient all-reduce
    numel = sum(p.numel() for p in tiny_net().parameters())
    assert ranks[0]["local_h3"]["bytes"] == 3 * 4 * numel


def test_warmup_steps_are_plain_ddp() -> None:
    ranks = comm_runs()
    reference = local_reference(per_rank_batches(2), H, warmup=2)
    assert_trajectory(ranks, "local_warm", reference)
    ddp = ddp_reference(per_rank_batches(1)[:2])
    for got, want in zip(ranks[1]["local_warm"]["steps"][:2], ddp, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_local_sgd_resumes_exactly_mid_period() -> None:
    ranks = comm_runs()
    for result in ranks:
        assert result["local_resumed"]["global_step"] == 10
        for got, want in zip(result["local_resumed"]["final"], result["local_h3"]["final"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the run ends mid-period (10 = 3·3 + 1): the ranks' parameters differ, and each resumed its own
    assert not torch.equal(ranks[0]["local_h3"]["final"][0], ranks[1]["local_h3"]["final"][0])


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"`sync_every` must be an integer >= 1 .*got 0"):
        LocalSGDStrategy(sync_every=0)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an integer >= 0, got -3"):
        LocalSGDStrategy(sync_every=2, warmup_steps=-3)
    with pytest.raises(ValueError, match=r"`timeout` must be > 0 seconds, got 0.0"):
        LocalSGDStrategy(timeout=0)


def test_registered_names_build_the_strategies() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = StrategyRegistry.get("local_sgd")
    assert isinstance(strategy, LocalSGDStrategy) and strategy.sync_every == 8
    assert StrategyRegistry.get("ddp").__class__.__name__ == "DDPStrategy"


class KillRank(L.Callback):
    """Sends its own process ``signum`` on ``rank`` after ``after`` training batches: SIGKILL (``kill -9``) kills
    it, SIGSTOP leaves it alive but silent (a hung rank)."""

    def __init__(self, rank: int, after: int, signum: int = signal.SIGKILL) -> None:
        self.rank, self.after, self.signum, self.seen = rank, after, signum, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.seen += 1
        if trainer.global_rank == self.rank and self.seen >= self.after:
            os.kill(os.getpid(), self.signum)


def _fault_worker(
    rank: int, port: int, out: str, victim: int = 1, signum: int = signal.SIGKILL, compressor: str = ""
) -> None:
    os.environ.update(loopback_env(rank, WORLD) | {"MASTER_PORT": str(port)})
    timeout = 5 if signum == signal.SIGSTOP else 30
    if compressor:  # a compressed DDP strategy: its messages go through the host's shared memory
        from lightning_dl.strategies import CompressedDDPStrategy

        strategy: Any = CompressedDDPStrategy(compressor=compressor, rank=1, timeout=timeout)
    else:
        strategy = LocalSGDStrategy(sync_every=2, timeout=timeout)
    trainer = quiet_trainer(
        devices=WORLD, strategy=strategy, max_steps=200, callbacks=[KillRank(victim, after=3, signum=signum)]
    )
    start = time.monotonic()
    try:
        trainer.fit(TinyRegressor(tiny_net(seed=0), lr=LR), DataLoader(_data(), batch_size=BATCH))
        message = "finished without error"
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"
    Path(out, f"rank{rank}.txt").write_text(f"{time.monotonic() - start}\n{message}")


def _kill_one(victim: int, signum: int = signal.SIGKILL, compressor: str = "") -> tuple[float, str]:
    """Two ranks under LocalSGDStrategy, or ``ddp_{compressor}`` (the process group initialised by Lightning, so
    the strategy's timeout applies); ``victim`` sends itself ``signum`` after 3 steps. Returns the survivor's
    seconds in ``fit`` and its error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    survivor = 1 - victim
    with tempfile.TemporaryDirectory(prefix="lightning_dl_fault_") as out:
        processes = [
            context.Process(target=_fault_worker, args=(r, port, out, victim, signum, compressor)) for r in range(WORLD)
        ]
        for p in processes:
            p.start()
        try:
            processes[survivor].join(timeout=120)
        finally:
            for p in processes:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
                p.join()
        assert signum == signal.SIGSTOP or processes[victim].exitcode == -signal.SIGKILL
        seconds, _, message = Path(out, f"rank{survivor}.txt").read_text().partition("\n")
    return float(seconds), message


def test_a_dead_rank_is_named_within_60_seconds() -> None:
    seconds, message = _kill_one(victim=1)
    assert seconds < 60
    assert "[local_sgd] a collective failed on rank 0: rank(s) [1] of 2 did not answer rank 0" in message
    assert "Collective timeout: 30 s" in message


def test_a_dead_rank_under_powersgd_is_named_within_60_seconds() -> None:
    """PowerSGD's messages go through shared memory between ranks of one host: the survivor sees its peer's
    process gone and fails within seconds, naming it."""
    seconds, message = _kill_one(victim=1, compressor="powersgd")
    assert seconds < 60
    assert "host exchange" in message and "rank(s) [1] of 2 died" in message
    assert "[ddp_powersgd] a collective failed on rank 0: rank(s) [1] of 2 did not answer rank 0" in message


@pytest.mark.slow
def test_a_dead_rank_zero_is_named_within_60_seconds() -> None:
    seconds, message = _kill_one(victim=0)
    assert seconds < 60
    assert "[local_sgd] a collective failed on rank 1: rank 1 cannot reach the rendezvous store" in message
    assert "rank 0 is likely dead" in message


@pytest.mark.slow
def test_a_hung_rank_is_named_after_the_timeout() -> None:
    """Rank 1 stops (SIGSTOP: alive, silent); with ``timeout=5`` rank 0 fails after about 5 s + the 5 s wait."""
    seconds, message = _kill_one(victim=1, signum=signal.SIGSTOP)
    assert seconds < 60
    assert "rank(s) [1] of 2 did not answer rank 0 within 5 s: dead or hung" in message
    assert "Collective timeout: 5 s" in message
