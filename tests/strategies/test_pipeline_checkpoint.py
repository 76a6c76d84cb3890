"""PipelineStrategy checkpoints, resume, the calling process after fit, pp2 × dp2, and errors before training."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader, Subset

import lightning_dl  # noqa: F401  (registers the names)
from lightning_dl.parallel.checkpoint import to_full
from lightning_dl.strategies.pipeline import PipelineStrategy
from tests.helpers.distributed import run_distributed
from tests.helpers.models import regression_dataset
from tests.helpers.trainer import quiet_trainer
from tests.strategies.test_pipeline import BATCH, TOL, PipeNet

M = 4
DATA = regression_dataset(num_samples=48, num_features=8)  # 6 batches of 8: one epoch = 6 optimizer steps


def _single(max_steps: int, ckpt: str | None = None, save: str | None = None) -> PipeNet:
    """One process on the same batches (no BatchNorm: a batch gives the mean of its micro-batches' gradients), so
    its loops count batches as the pipeline's do and a resume means the same thing in both."""
    module = PipeNet()
    trainer = quiet_trainer(max_steps=max_steps, max_epochs=1 if save else -1)
    trainer.fit(module, DataLoader(DATA, batch_size=BATCH), ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module


def _pipeline_trainer(max_steps: int, **kwargs):
    return quiet_trainer(
        devices=2,
        strategy=PipelineStrategy(schedule="1f1b", n_microbatches=M),
        use_distributed_sampler=False,
        max_steps=max_steps,
        **kwargs,
    )


def _checkpoints(rank: int, world_size: int, tmp: str) -> dict:
    bad_runs = _bad_runs(rank, world_size)  # errors inside the processes first: the group stays usable
    ckpt_dir = Path(tmp) / "pipeline"
    module = PipeNet()
    best = ModelCheckpoint(
        dirpath=ckpt_dir, monitor="val_loss", save_top_k=-1, filename="{epoch}", save_on_train_epoch_end=True
    )
    trainer = _pipeline_trainer(
        8, callbacks=[best, EarlyStopping(monitor="val_loss", patience=5)], enable_checkpointing=True
    )
    trainer.fit(module, DataLoader(DATA, batch_size=BATCH), DataLoader(DATA, batch_size=BATCH))
    uninterrupted = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.save_checkpoint(Path(tmp) / "final.ckpt")  # the same state in both formats
    trainer.strategy.checkpoint_format = "sharded"
    trainer.save_checkpoint(Path(tmp) / "final_sharded")
    resumed = PipeNet()
    _pipeline_trainer(8).fit(resumed, DataLoader(DATA, batch_size=BATCH), ckpt_path=str(ckpt_dir / "epoch=0.ckpt"))
    from_single = PipeNet()
    trainer = _pipeline_trainer(8)
    trainer.fit(from_single, DataLoader(DATA, batch_size=BATCH), ckpt_path=str(Path(tmp) / "single.ckpt"))
    return {
        "uninterrupted": uninterrupted,
        "resumed": resumed.state_dict(),
        "from_single": from_single.state_dict(),
        "sampler": trainer.strategy.distributed_sampler_kwargs,
        "bad_runs": bad_runs,
    }


@pytest.mark.distributed
def test_checkpoints_resume_and_errors_inside_the_processes(tmp_path: Path) -> None:
    _single(6, save=str(tmp_path / "single.ckpt"))  # one epoch, saved at its end
    results = run_distributed(_checkpoints, 2, str(tmp_path), timeout=300)
    # the pipeline checkpoint after one epoch: plain names, strict load, optimizer state in the one-process format
    checkpoint = torch.load(tmp_path / "pipeline" / "epoch=0.ckpt", weights_only=False)
    single = torch.load(tmp_path / "single.ckpt", weights_only=False)
    module = PipeNet()
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(checkpoint["state_dict"][key], value, **TOL)
    optimizer = module.configure_optimizers()
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    for index, state in single["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(checkpoint["optimizer_states"][0]["state"][index]["momentum_buffer"],
                                   state["momentum_buffer"], **TOL)  # fmt: skip
    assert checkpoint["global_step"] == single["global_step"] == 6
    # the names of the one-process numbering travel with it: a converted folder keys optimizer state by name
    assert checkpoint["optimizer_param_names"] == [[[n for n, _ in module.named_parameters()]]]
    full, sharded = torch.load(tmp_path / "final.ckpt", weights_only=False), to_full(tmp_path / "final_sharded")
    assert sharded["global_step"] == full["global_step"] and list(sharded["state_dict"]) == list(full["state_dict"])
    for key, value in full["state_dict"].items():  # the sharded folder holds what the full file holds
        assert torch.equal(sharded["state_dict"][key], value), key
    for index, state in full["optimizer_states"][0]["state"].items():
        assert torch.equal(sharded["optimizer_states"][0]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    expected = _single(8).state_dict()  # uninterrupted, one process
    # Lightning's own resume from a checkpoint written at an epoch's end runs one more batch of the old epoch (the
    # loop state says its last batch, the loader restarts), in one process too: the bar is the one-process resume
    resumed = _single(8, ckpt=str(tmp_path / "single.ckpt")).state_dict()
    for rank, result in enumerate(results):
        for message, (*_, pattern) in zip(result["bad_runs"], BAD_RUNS, strict=True):  # errors before training
            assert re.search(pattern, message), (pattern, message)
        assert result["sampler"] == {"num_replicas": 1, "rank": 0}
        for key, value in result["uninterrupted"].items():
            torch.testing.assert_close(value, expected[key], **TOL)
            torch.testing.assert_close(result["resumed"][key], resumed[key], **TOL, msg=f"rank {rank} {key}")
            torch.testing.assert_close(result["from_single"][key], resumed[key], **TOL, msg=f"rank {rank} {key}")


def _data_parallel(rank: int, world_size: int) -> dict:
    dp_rank = rank % 2  # ParallelLayout(dp=2, pp=2): rank = pp · 2 + dp
    # global batch 2·BATCH: replica d reads samples [2·BATCH·k + BATCH·d, ... + BATCH)
    indices = [i for i in range(len(DATA)) if (i // BATCH) % 2 == dp_rank]
    module = PipeNet()
    trainer = quiet_trainer(
        devices=4,
        strategy=PipelineStrategy(schedule="gpipe", n_microbatches=M, data_parallel_size=2),
        use_distributed_sampler=False,
        max_steps=3,
        gradient_clip_val=0.05,
    )
    trainer.fit(module, DataLoader(Subset(DATA, indices), batch_size=BATCH))
    return {"state": module.state_dict(), "sampler": trainer.strategy.distributed_sampler_kwargs}


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_times_data_parallel_on_four_processes() -> None:
    results = run_distributed(_data_parallel, 4, timeout=300)
    module = PipeNet()
    quiet_trainer(max_steps=3, accumulate_grad_batches=2 * M, gradient_clip_val=0.05).fit(
        module, DataLoader(DATA, batch_size=BATCH // M)
    )
    expected = module.state_dict()
    for rank, result in enumerate(results):
        assert result["sampler"] == {"num_replicas": 2, "rank": rank % 2}
        for key, value in result["state"].items():
            torch.testing.assert_close(value, expected[key], **TOL, msg=f"rank {rank} {key}")
    assert set(results[0]["state"]) | set(results[2]["state"]) == set(expected)


class DiesOnRankOne(PipeNet):
    def pipeline_loss(self, output, target):
        if self.trainer.global_step == 1:
            os._exit(3)
        return super().pipeline_loss(output, target)


@pytest.mark.distributed
def test_spawn_returns_every_stage_and_a_dead_stage_is_named() -> None:
    module = PipeNet()
    strategy = PipelineStrategy(record_timeline=True)
    trainer = quiet_trainer(devices=2, strategy=strategy, use_distributed_sampler=False, max_steps=40)
    trainer.fit(module, DataLoader(DATA, batch_size=BATCH))
    expected = _single(40).state_dict()
    for key, value in module.state_dict().items():  # the calling process holds both stages, trained
        torch.testing.assert_close(value, expected[key], **TOL, msg=key)
    # every rank's timeline comes back too: 40 steps × 4 micro-batches × (F, B) × 2 ranks, more than a pipe holds
    assert len(strategy.timeline) == 40 * M * 2 * 2 and strategy.stage_balance == [2, 2]
    trainer = quiet_trainer(devices=2, strategy=PipelineStrategy(timeout=__import__("datetime").timedelta(seconds=60)),
                            use_distributed_sampler=False, max_steps=3)  # fmt: skip
    with pytest.raises(Exception, match=r"[Pp]rocess 1 terminated with exit code 3"):
        trainer.fit(DiesOnRankOne(), DataLoader(DATA, batch_size=BATCH))


class ManualOptimization(PipeNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(PipeNet):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[:2].parameters(), lr=0.1), torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]


@pytest.mark.parametrize(
    ("module", "strategy", "devices", "batch", "message"),
    [
        (BoringModel(), {}, 2, BATCH, r"define `pipeline_blocks\(\)` .* and `pipeline_loss\(output, target\)`"),
        (PipeNet(), {"data_parallel_size": 2}, 3, BATCH, r"3 processes must equal pp × dp"),
        (PipeNet(), {"balance": [1, 2]}, 2, BATCH, r"`balance=\[1, 2\]` sums to 3, but the module has 4"),
        (PipeNet(), {"schedule": "looped_bfs", "stages_per_rank": 3}, 2, BATCH, r"6 pipeline stages need at least 6"),
        (PipeNet(), {"n_microbatches": 1}, 2, BATCH, r"`n_microbatches=1` is smaller than the 2 pipeline stages"),
        (ManualOptimization(), {}, 2, BATCH, r"needs automatic optimization"),
    ],
)
def test_errors_before_any_process_starts(module, strategy, devices, batch, message) -> None:
    trainer = quiet_trainer(devices=devices, strategy=PipelineStrategy(**strategy), use_distributed_sampler=False)
    with pytest.raises((ValueError, TypeError), match=message):
        trainer.fit(module, DataLoader(DATA, batch_size=batch))


def test_registered_names() -> None:
    expected = {
        "pipeline": {"schedule": "1f1b"},
        "pipeline_gpipe": {"schedule": "gpipe"},
        "pipeline_1f1b": {"schedule": "1f1b"},
        "pipeline_interleaved": {"schedule": "interleaved_1f1b", "stages_per_rank": 2},
        "pipeline_zero_bubble": {"schedule": "zbv_zero_bubble"},
    }
    for name, init in expected.items():
        assert StrategyRegistry[name]["strategy"] is PipelineStrategy and StrategyRegistry[name]["init_params"] == init
    assert isinstance(quiet_trainer(devices=2, strategy="pipeline_interleaved").strategy, PipelineStrategy)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"`stages_per_rank=1` is not allowed by `schedule='zbv_zero_bubble'`"):
        PipelineStrategy(schedule="zbv_zero_bubble", stages_per_rank=1)
    with pytest.raises(ValueError, match=r"`balance='flops'` must be 'params', 'time' or a list"):
        PipelineStrategy(balance="flops")
    with pytest.raises(ValueError, match=r"`data_parallel_size=0` must be a positive integer"):
        PipelineStrategy(data_parallel_size=0)
    with pytest.raises(ValueError, match=r"`schedule='chimera'` is not a pipeline schedule"):
        PipelineStrategy(schedule="chimera")


BAD_RUNS = (
    ("PipeNet", 6, True, r"the training batch size 6 does not divide by `n_microbatches=4`"),
    ("PipeNet", 20, False, r"`drop_last=False` and 48 samples per replica, not a multiple of the batch size 20"),
    ("TwoOptimizers", 8, True, r"exactly one optimizer; `configure_optimizers\(\)` returned 2"),
)


def _bad_runs(rank: int, world_size: int) -> list[str]:
    """Each bad run fails on every rank before any stage talks to another, so the group stays usable."""
    messages = []
    for module_cls, batch, drop_last, _ in BAD_RUNS:
        module = {"PipeNet": PipeNet, "TwoOptimizers": TwoOptimizers}[module_cls]()
        trainer = quiet_trainer(
            devices=2, strategy=PipelineStrategy(n_microbatches=M), use_distributed_sampler=False, max_steps=2
        )
        try:
            trainer.fit(module, DataLoader(DATA, batch_size=batch, drop_last=drop_last))
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    return messages
