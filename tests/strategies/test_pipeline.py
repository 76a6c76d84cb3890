"""PipelineStrategy against one process: each rank runs ``Trainer(devices=N, strategy=PipelineStrategy(...))`` as
torchrun would start it (the harness sets RANK/WORLD_SIZE), and the reference is one process training the same module
on the same samples in micro-batches (batch B/m, accumulating m·a batches per optimizer step), which is what a
pipeline computes (BatchNorm sees micro-batches)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_dl.callbacks import GradientClipping, LRSchedule
from lightning_dl.plot import plot_pipeline_timeline
from lightning_dl.strategies.pipeline import PipelineStrategy
from tests.helpers.distributed import run_distributed
from tests.helpers.models import SequentialPipelineModule, regression_dataset
from tests.helpers.trainer import quiet_trainer

BATCH, M = 8, 4
TOL = {"rtol": 1e-5, "atol": 1e-6}


class PipeNet(SequentialPipelineModule):
    """Four blocks (8 → 16 → 16 → 16 → 1); ``batch_norm`` puts a BatchNorm in block 2 (a non-first stage)."""

    def __init__(self, batch_norm: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(16) if batch_norm else nn.Identity()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(8, 16), nn.Tanh()),
            nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
            nn.Sequential(nn.Linear(16, 16), norm, nn.Tanh()),
            nn.Linear(16, 1),
        )
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), batch_size=len(x))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y), batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=0.01)


class Record(Callback):
    """Gradients by name as the optimizer is about to step (after every clipping), and each batch's loss."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


CONFIGS = {
    "1f1b_accumulate_clip_val_lr": dict(
        strategy=dict(schedule="1f1b", record_timeline=True),
        trainer=dict(accumulate_grad_batches=2, gradient_clip_val=0.05),
        callbacks=lambda: [LRSchedule("cosine", warmup_steps=1, log=False)],
    ),
    "interleaved_gradient_clipping": dict(
        strategy=dict(schedule="interleaved_1f1b", stages_per_rank=2),
        trainer=dict(),
        callbacks=lambda: [GradientClipping(max_norm=0.05, log_norm=False)],
    ),
    "looped_bfs_accumulate_gradient_clipping": dict(
        strategy=dict(schedule="looped_bfs"),
        trainer=dict(accumulate_grad_batches=2),
        callbacks=lambda: [GradientClipping(max_norm=0.05, log_norm=False)],
    ),
    "interleaved_zero_bubble_clip_val_lr": dict(
        strategy=dict(schedule="interleaved_zero_bubble"),
        trainer=dict(gradient_clip_val=0.05),
        callbacks=lambda: [LRSchedule("linear", warmup_steps=2, log=False)],
    ),
    "dualpipev_accumulate": dict(
        strategy=dict(schedule="dualpipev"), trainer=dict(accumulate_grad_batches=2), callbacks=lambda: []
    ),
    "gpipe_time_balance": dict(strategy=dict(schedule="gpipe", balance="time"), trainer=dict(), callbacks=lambda: []),
    # micro-batches of 4: BatchNorm over 2 samples amplifies float32 rounding beyond the tolerance (exactness in
    # float64 is tested for every schedule in tests/parallel/pipeline/test_engine.py)
    "zbv_batch_norm": dict(
        strategy=dict(schedule="zbv_zero_bubble"), trainer=dict(), callbacks=lambda: [], batch_norm=True, m=2
    ),
}
STEPS = 4


def _trainer(config: dict, *, pipeline: bool, devices: int = 2, **extra) -> tuple[L.Trainer, Record]:
    record = Record()
    kwargs = dict(config["trainer"])
    if pipeline:
        kwargs["strategy"] = PipelineStrategy(n_microbatches=config.get("m", M), **config["strategy"])
        kwargs["devices"] = devices
        kwargs["use_distributed_sampler"] = False
    else:
        kwargs["accumulate_grad_batches"] = kwargs.get("accumulate_grad_batches", 1) * config.get("m", M)
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[*config["callbacks"](), record], **kwargs, **extra)
    return trainer, record


def _loaders(pipeline: bool, m: int = M) -> tuple[DataLoader, DataLoader]:
    size = BATCH if pipeline else BATCH // m
    data = regression_dataset(num_samples=48, num_features=8)
    val = regression_dataset(num_samples=14, num_features=8, seed=1)  # a ragged last batch of 6: 3 micro-batches
    return DataLoader(data, batch_size=size, drop_last=True), DataLoader(val, batch_size=BATCH)


def _reference(config: dict) -> dict:
    module = PipeNet(batch_norm=config.get("batch_norm", False))
    trainer, record = _trainer(config, pipeline=False)
    train, val = _loaders(False, config.get("m", M))
    trainer.fit(module, train)
    metrics = trainer.validate(module, val, verbose=False)[0] | trainer.test(module, val, verbose=False)[0]
    # Lightning hands on_train_batch_end the loss divided by accumulate_grad_batches; one pipeline batch = M batches
    m = config.get("m", M)
    losses = torch.stack(record.losses).view(-1, m).mean(dim=1) * trainer.accumulate_grad_batches
    return {"losses": losses, "grads": record.grads, "state": module.state_dict(), "val": metrics}


def _pipelined(rank: int, world_size: int, tmp: str) -> dict:
    out = {}
    for name, config in CONFIGS.items():
        module = PipeNet(batch_norm=config.get("batch_norm", False))
        module.example_input_array = torch.zeros(BATCH, 8)  # balance="time" times the blocks on it
        trainer, record = _trainer(config, pipeline=True)
        train, val = _loaders(True)
        trainer.fit(module, train)
        last_step_loss = trainer.callback_metrics["train_loss_step"].clone()
        out[name] = {
            "losses": torch.stack(record.losses) * trainer.accumulate_grad_batches,
            "grads": record.grads,
            "state": {k: v.clone() for k, v in module.state_dict().items()},
            "last_step_loss": last_step_loss,
            # the forward-only schedule (a plain forward through the stages for V placement) after fit
            "val": trainer.validate(module, val, verbose=False)[0] | trainer.test(module, val, verbose=False)[0],
            "global_step": trainer.global_step,
            "balance": (trainer.strategy.stage_balance, trainer.strategy.predicted_stage_seconds),
            "timeline": trainer.strategy.gather_timeline(),
        }
    return out


@pytest.mark.distributed
def test_trainer_matches_one_process(tmp_path: Path) -> None:
    results = run_distributed(_pipelined, 2, str(tmp_path), timeout=300)
    for name, config in CONFIGS.items():
        expected = _reference(config)
        names = [set(r[name]["state"]) for r in results]
        assert not names[0] & names[1] and names[0] | names[1] == set(expected["state"]), name
        for ranked in (r[name] for r in results):
            assert ranked["global_step"] == STEPS
            balance, predicted = ranked["balance"]
            assert sum(balance) == 4 and len(balance) == (2 if name.startswith(("1f1b", "gpipe")) else 4)
            assert (predicted is not None and len(predicted) == 2) == name.endswith("time_balance")
            torch.testing.assert_close(ranked["losses"].float(), expected["losses"], **TOL, msg=name)
            for key in ("val_loss", "test_loss"):
                torch.testing.assert_close(ranked["val"][key], expected["val"][key], **TOL, msg=f"{name} {key}")
            torch.testing.assert_close(ranked["last_step_loss"], expected["losses"][-1], **TOL, msg=name)
            assert len(ranked["grads"]) == STEPS
            for got, want in zip(ranked["grads"], expected["grads"], strict=True):
                for key, grad in got.items():
                    torch.testing.assert_close(grad, want[key], **TOL, msg=f"{name} {key}")
            for key, value in ranked["state"].items():  # BatchNorm running statistics included
                torch.testing.assert_close(value, expected["state"][key], **TOL, msg=f"{name} {key}")
    _check_timeline(results[0]["1f1b_accumulate_clip_val_lr"]["timeline"], tmp_path)


def _check_timeline(events: list, tmp_path: Path) -> None:
    """4 optimizer steps of 2 batches, each of M micro-batches: F and B per micro-batch on each rank."""
    for rank in (0, 1):
        mine = [e for e in events if e.rank == rank]
        assert sorted(e.kind for e in mine) == ["B"] * 8 * M + ["F"] * 8 * M
        assert all(e.end >= e.start for e in mine)
    assert sorted({e.step for e in events}) == [0, 1, 2, 3]
    path, measured, theory = plot_pipeline_timeline(events, tmp_path / "timeline.png", n_microbatches=M)
    assert path.stat().st_size > 0 and 0.0 <= measured < 1.0 and theory == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match=r"`step=9` has no events; recorded steps: \[0, 1, 2, 3\]"):
        plot_pipeline_timeline(events, tmp_path / "none.png", n_microbatches=M, step=9)
