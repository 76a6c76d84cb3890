"""Exact resume across layouts through the public Trainer API: a run stopped under tp2 × pp2 (4 processes; full and
sharded checkpoints) resumes under pp2 and in one process exactly as the uninterrupted run on that layout goes on
(batches, losses and parameters after the resumed steps); under ``pipeline``, resuming from a pipeline checkpoint and
from a one-process checkpoint reproduces the uninterrupted run. Checkpoints are taken where Lightning's own resume is
exact: on the last batch of an epoch (``ModelCheckpoint(every_n_train_steps=<steps per epoch>)``) for a run bounded
by ``max_steps``, or at an epoch's end for a run bounded by ``max_epochs`` (see the last test for why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_dl  # noqa: F401  (registers the names)
from lightning_dl import cli
from lightning_dl.parallel.checkpoint import is_sharded
from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.strategies.hybrid import HybridStrategy
from lightning_dl.strategies.pipeline import PipelineStrategy
from tests.helpers.distributed import run_distributed
from tests.helpers.models import SequentialPipelineModule
from tests.helpers.trainer import quiet_trainer

BATCH, M, PER_EPOCH = 8, 4, 4
STEPS = 2 * PER_EPOCH  # stopped after the first epoch, resumed for the second
TOL = {"rtol": 1e-5, "atol": 1e-6}


class PairNet(SequentialPipelineModule):
    """Four blocks of a Linear pair (8 → 16 → 8): pipeline stages and tensor-parallel shards; MSE; Adam (its step
    count enters every update, so a resume that lost it would show)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(4)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2, foreach=False)


def _loader(dp: int = 1, dp_rank: int | None = None) -> DataLoader:
    """``PER_EPOCH`` global batches of ``dp · BATCH``, in order (no sampler: every layout reads the same batches);
    with ``dp_rank``, that replica's half of each global batch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(PER_EPOCH * BATCH * dp, 8, generator=g)
    data = TensorDataset(x, torch.tanh(x.flip(1)))
    if dp_rank is None:
        return DataLoader(data, batch_size=BATCH * dp)
    return DataLoader(Subset(data, [i for i in range(len(data)) if (i // BATCH) % dp == dp_rank]), batch_size=BATCH)


class Losses(Callback):
    """The loss of every optimizer step, the trainer's (epoch, global_step) after it, and which batch it read (its
    first input value)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.steps: list[tuple[int, int]] = []
        self.batches: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.steps.append((trainer.current_epoch, trainer.global_step))
        self.batches.append(batch[0][0, 0].item())


def _fit(
    strategy: Any,
    devices: int,
    ckpt: str | Path | None = None,
    save_dir: Path | None = None,
    loader: DataLoader | None = None,
    **limits: Any,
) -> dict:
    """One fit; ``save_dir``: a checkpoint on the last batch of every epoch. Returns the losses, the steps and the
    whole model (gathered: a collective)."""
    record = Losses()
    callbacks: list[Callback] = [record]
    if save_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=save_dir, filename="{step}", every_n_train_steps=PER_EPOCH, save_top_k=-1)
        )
    trainer = quiet_trainer(
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        callbacks=callbacks,
        enable_checkpointing=save_dir is not None,
        **({"max_steps": STEPS} | limits),
    )
    module = PairNet()
    trainer.fit(module, loader or _loader(), ckpt_path=ckpt)
    state = trainer.strategy.lightning_module_state_dict() if devices > 1 else module.state_dict()
    state = {k: v.clone() for k, v in state.items()}
    return {
        "losses": record.losses,
        "steps": record.steps,
        "batches": record.batches,
        "state": state,
        "trainer": trainer,
    }


def _stopped_under_tp2_pp2(rank: int, world_size: int, tmp: str) -> dict:
    run = _fit(HybridStrategy(layout="tp2,pp2", n_microbatches=M), 4, save_dir=Path(tmp) / "tp2_pp2")
    sharded = HybridStrategy(layout="tp2,pp2", n_microbatches=M, checkpoint_format="sharded")
    _fit(sharded, 4, save_dir=Path(tmp) / "tp2_pp2_sharded", max_steps=PER_EPOCH)  # each rank writes its part
    return {"losses": run["losses"], "state": run["state"]}


def _resumed_under_pp2(rank: int, world_size: int, tmp: str) -> dict:
    tmp_path = Path(tmp)

    def pipeline() -> PipelineStrategy:
        return PipelineStrategy(schedule="1f1b", n_microbatches=M)

    out = {"uninterrupted": _fit(pipeline(), 2, save_dir=tmp_path / "pp2")}
    first = f"step={PER_EPOCH}.ckpt"
    out["from tp2,pp2"] = _fit(pipeline(), 2, ckpt=tmp_path / "tp2_pp2" / first)
    out["from tp2,pp2 sharded"] = _fit(pipeline(), 2, ckpt=tmp_path / "tp2_pp2_sharded" / first)
    out["from pp2"] = _fit(pipeline(), 2, ckpt=tmp_path / "pp2" / first)
    out["from one process"] = _fit(pipeline(), 2, ckpt=tmp_path / "one" / first)
    # an epoch-end checkpoint (trainer.save_checkpoint after one epoch), resumed by epochs
    run = _fit(pipeline(), 2, max_steps=-1, max_epochs=1)
    run["trainer"].save_checkpoint(tmp_path / "pp2_epoch.ckpt")
    out["from pp2 at the epoch's end, by epochs"] = _fit(
        pipeline(), 2, ckpt=tmp_path / "pp2_epoch.ckpt", max_steps=-1, max_epochs=2
    )
    return {name: {k: v for k, v in run.items() if k != "trainer"} for name, run in out.items()}


def _check_resumed(resumed: dict, uninterrupted: dict, what: str, *, state: bool = True) -> None:
    """The resumed run's steps are the uninterrupted run's second epoch: the same batches, losses and, at the end,
    parameters (``state=False``: a rank that holds no gathered model)."""
    assert resumed["steps"] == uninterrupted["steps"][PER_EPOCH:], what
    assert resumed["batches"] == uninterrupted["batches"][PER_EPOCH:], what
    want = torch.tensor(uninterrupted["losses"][PER_EPOCH:])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), want, **TOL, msg=lambda m: f"{what} losses: {m}")
    if state:
        assert resumed["state"] and set(resumed["state"]) == set(uninterrupted["state"]), what
        for key, value in uninterrupted["state"].items():
            torch.testing.assert_close(resumed["state"][key], value, **TOL, msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.distributed
def test_stopped_under_tp2_pp2_resumes_exactly_under_pp2_and_in_one_process(tmp_path: Path) -> None:
    one = _fit("auto", 1, save_dir=tmp_path / "one")  # also the one-process checkpoint the pipeline resumes from
    tp2_pp2 = run_distributed(_stopped_under_tp2_pp2, 4, str(tmp_path), timeout=400)[0]
    pp2 = run_distributed(_resumed_under_pp2, 2, str(tmp_path), timeout=400)
    # every layout's uninterrupted run is one process's, to rounding
    for got, what in ((tp2_pp2, "tp2,pp2"), (pp2[0]["uninterrupted"], "pp2")):
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one["losses"]), **TOL, msg=what)
    for rank, runs in enumerate(pp2):
        uninterrupted = runs["uninterrupted"]
        if rank == 0:  # rank 0 holds the gathered model
            for key, value in one["state"].items():
                torch.testing.assert_close(uninterrupted["state"][key], value, **TOL, msg=key)
        for name, resumed in runs.items():
            if name != "uninterrupted":
                _check_resumed(resumed, uninterrupted, f"rank {rank} pp2 {name}", state=rank == 0)
    # one process resumes the tp2 x pp2 checkpoint (whole-model names, optimizer state in its order) exactly too,
    # and the sharded folder once `lightning-dl checkpoint convert` made it one file
    first = f"step={PER_EPOCH}.ckpt"
    assert is_sharded(tmp_path / "tp2_pp2_sharded" / first) and (tmp_path / "tp2_pp2" / first).is_file()
    _check_resumed(_fit("auto", 1, ckpt=tmp_path / "tp2_pp2" / first), one, "one process from tp2,pp2")
    convert = ["checkpoint", "convert", str(tmp_path / "tp2_pp2_sharded" / first), str(tmp_path / "full.ckpt")]
    assert cli.main([*convert, "--to", "full"]) == 0
    _check_resumed(_fit("auto", 1, ckpt=tmp_path / "full.ckpt"), one, "one process from tp2,pp2 sharded, converted")


def _stopped_under_dp2_tp2_pp2(rank: int, world_size: int, tmp: str) -> None:
    layout = ParallelLayout(dp=2, tp=2, pp=2)
    loader = _loader(dp=2, dp_rank=layout.coordinates(rank)["dp"])
    _fit(HybridStrategy(layout=layout, n_microbatches=M), 8, save_dir=Path(tmp) / "dp2_tp2_pp2", loader=loader)
    # FSDP2 over dp inside each stage, each rank writing its shards
    sharded = HybridStrategy(layout=layout, n_microbatches=M, dp_shard=True, checkpoint_format="sharded")
    _fit(sharded, 8, save_dir=Path(tmp) / "dp2_tp2_pp2_sharded", loader=loader, max_steps=PER_EPOCH)


def _dp2_resumed_under_pp2(rank: int, world_size: int, tmp: str) -> dict:
    runs = {}
    first = f"step={PER_EPOCH}.ckpt"
    checkpoints = (None, Path(tmp) / "dp2_tp2_pp2" / first, Path(tmp) / "dp2_tp2_pp2_sharded" / first)
    for name, ckpt in zip(("uninterrupted", "resumed", "resumed from sharded"), checkpoints, strict=True):
        run = _fit(PipelineStrategy(schedule="1f1b", n_microbatches=M), 2, ckpt=ckpt, loader=_loader(dp=2))
        runs[name] = {k: v for k, v in run.items() if k != "trainer"}
    return runs


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.slow
@pytest.mark.distributed
def test_stopped_under_dp2_tp2_pp2_resumes_exactly_under_pp2_and_in_one_process(tmp_path: Path) -> None:
    """8 processes, each replica reading its half of every global batch (full checkpoints, and sharded ones under
    FSDP2 over dp); resumed where one process reads the whole global batch."""
    run_distributed(_stopped_under_dp2_tp2_pp2, 8, str(tmp_path), timeout=600)
    pp2 = run_distributed(_dp2_resumed_under_pp2, 2, str(tmp_path), timeout=400)
    one = _fit("auto", 1, loader=_loader(dp=2))
    resumed = _fit("auto", 1, ckpt=tmp_path / "dp2_tp2_pp2" / f"step={PER_EPOCH}.ckpt", loader=_loader(dp=2))
    _check_resumed(resumed, one, "one process from dp2,tp2,pp2")
    for rank, runs in enumerate(pp2):
        _check_resumed(runs["resumed"], runs["uninterrupted"], f"rank {rank} pp2 from dp2,tp2,pp2", state=rank == 0)
        what = f"rank {rank} pp2 from dp2,tp2,pp2 with FSDP2, sharded"
        _check_resumed(runs["resumed from sharded"], runs["uninterrupted"], what, state=rank == 0)
    torch.testing.assert_close(torch.tensor(pp2[0]["uninterrupted"]["losses"]), torch.tensor(one["losses"]), **TOL)


def test_lightning_replays_a_batch_when_an_epoch_end_checkpoint_is_resumed_by_steps(tmp_path: Path) -> None:
    """Why the tests above choose their checkpoints. A checkpoint written at an epoch's end (``on_train_epoch_end``,
    or ``trainer.save_checkpoint`` after a fit that ended there) records the epoch as processed but not completed.
    Resumed by ``max_epochs``, the fit loop sees a finished epoch and starts the next: exact. Resumed by
    ``max_steps`` (iteration-based training), Lightning 2.6 always restarts the epoch loop, which, with validation not
    yet run, takes one more batch from a fresh iterator of the old epoch's loader: its first batch again."""
    uninterrupted = _fit("auto", 1)
    run = _fit("auto", 1, max_steps=-1, max_epochs=1)
    run["trainer"].save_checkpoint(tmp_path / "epoch.ckpt")
    by_epochs = _fit("auto", 1, ckpt=tmp_path / "epoch.ckpt", max_steps=-1, max_epochs=2)
    _check_resumed(by_epochs, uninterrupted, "resumed by epochs")
    by_steps = _fit("auto", 1, ckpt=tmp_path / "epoch.ckpt")
    first, second, third = uninterrupted["batches"][:3]
    assert uninterrupted["batches"][PER_EPOCH:] == [first, second, third, uninterrupted["batches"][3]]
    assert by_steps["batches"] == [first, first, second, third]  # one batch more, from the old epoch's loader
    assert by_steps["steps"][:2] == [(1, PER_EPOCH + 1), (2, PER_EPOCH + 2)]  # and the epoch count runs one ahead
