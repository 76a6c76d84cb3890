"""``deepspeed_zero1/2/3`` on 2 CPU ranks (gloo) through Lightning's DeepSpeed strategy: parameters after every step
equal one process stepping on the same global batches (<= 1e-5 relative), each rank holds about half of the
optimizer state (ZeRO-3: of the parameters too), measured, and a checkpoint taken after one epoch resumes exactly.
One spawned run covers the three stages."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dl.strategies.deepspeed_cpu import DeepSpeedCPUStrategy, optimizer_state_numel
from tests.helpers.distributed import run_distributed
from tests.helpers.models import TinyRegressor, tiny_net
from tests.helpers.trainer import quiet_trainer
from tests.strategies.test_local_sgd import BATCH, LR, WORLD, _data, ddp_reference, per_rank_batches

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


class FullParamsPerStep(L.Callback):
    """Every rank's full parameters after each step (ZeRO-3 gathers its shards first: a collective on all ranks)."""

    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.params.append(gathered(pl_module))


def gathered(module: torch.nn.Module) -> list[torch.Tensor]:
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _fit(stage: int, epochs: int, ckpt_path: str | None = None, save: str | None = None) -> dict:
    strategy = DeepSpeedCPUStrategy(stage=stage)
    module = TinyRegressor(tiny_net(seed=0), lr=LR)
    recorder = FullParamsPerStep()
    trainer = quiet_trainer(devices=WORLD, strategy=strategy, max_epochs=epochs, callbacks=[recorder])
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return {
        "steps": recorder.params,
        "final": gathered(module),
        "global_step": trainer.global_step,
        "optimizer_numel": optimizer_state_numel(strategy),
        "param_numel": sum(getattr(p, "ds_tensor", p).numel() for p in module.parameters()),
        "optimizer": type(strategy.deepspeed_engine.optimizer).__name__,
    }


def _run(rank: int, world_size: int, tmp: str) -> dict:
    out = {}
    for stage in (1, 2, 3):
        out[stage] = _fit(stage, epochs=2)  # 10 steps
        path = str(Path(tmp) / f"zero{stage}.ckpt")  # DeepSpeed writes a folder of per-rank shards
        _fit(stage, epochs=1, save=path)
        out[f"{stage}_resumed"] = _fit(stage, epochs=2, ckpt_path=path)
    return out


@functools.cache
def runs() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="lightning_dl_zero_") as tmp:
        return run_distributed(_run, WORLD, tmp, timeout=400)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_equals_one_process_on_global_batches(stage) -> None:
    reference = ddp_reference(per_rank_batches(2))
    for rank, result in enumerate(runs()):
        assert len(result[stage]["steps"]) == len(reference) == 10
        for step, (got, want) in enumerate(zip(result[stage]["steps"], reference, strict=True)):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(
                    g, w, rtol=1e-5, atol=1e-7, msg=lambda m, s=step, r=rank: f"ZeRO-{stage} rank {r} step {s + 1}: {m}"
                )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_state_is_split_across_ranks(stage) -> None:
    total = sum(p.numel() for p in tiny_net().parameters())  # 161: SGD momentum holds one buffer per element
    held = [r[stage]["optimizer_numel"] for r in runs()]
    assert all(0 < n < total for n in held), held
    assert total <= sum(held) <= total + 2 * WORLD * 16, held  # the shards cover every element, up to padding
    params = [r[stage]["param_numel"] for r in runs()]
    if stage == 3:
        assert all(n < total for n in params) and sum(params) >= total, params
    else:
        assert params == [total, total]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_resumes_exactly(stage) -> None:
    for result in runs():
        assert result[f"{stage}_resumed"]["global_step"] == 10
        for got, want in zip(result[f"{stage}_resumed"]["final"], result[stage]["final"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_stage_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"`stage` \(ZeRO stage\) must be 1, 2 or 3, got 4"):
        DeepSpeedCPUStrategy(stage=4)


def test_registered_names() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    for stage in (1, 2, 3):
        strategy = StrategyRegistry.get(f"deepspeed_zero{stage}")
        assert isinstance(strategy, DeepSpeedCPUStrategy) and strategy.config["zero_optimization"]["stage"] == stage
