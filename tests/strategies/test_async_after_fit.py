"""After ``fit`` on an asynchronous strategy the calling process holds the trained model and the run's state:
``save_checkpoint`` writes a checkpoint that loads strictly into a fresh module and resumes where the run ended,
and ``test``/``validate``/``predict`` run here without RPC. On Lightning's own ``BoringModel``."""

import pytest
import torch
import torch.distributed.rpc
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.testing import assert_close

import lightning_dl  # noqa: F401  (registers the strategy names)
from lightning_dl.parallel.param_server import rpc
from lightning_dl.strategies import AsyncSGDStrategy
from tests.helpers.async_tools import Boring, ProgressAudit, ServerAudit, fixed_data
from tests.helpers.trainer import quiet_trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

STEPS = 12  # more than one epoch of the servers (8 pushes) and of each Hogwild process (3 steps)


def _no_rpc(*args, **kwargs):
    raise AssertionError("an RPC call was made after fit")


@pytest.mark.parametrize(
    ("strategy", "resume"),
    [
        (lambda: AsyncSGDStrategy(num_servers=1, timeout=60), False),
        (lambda: AsyncSGDStrategy(num_servers=2, timeout=60), True),
        (lambda: "hogwild", False),  # resumed in test_async_sgd.py
    ],
    ids=["async_sgd-1-server", "async_sgd-2-servers", "hogwild"],
)
def test_after_fit_the_calling_process_saves_evaluates_and_resumes(strategy, resume, tmp_path, monkeypatch):
    hogwild = strategy() == "hogwild"
    model = Boring()
    start = [p.detach().clone() for p in model.parameters()]
    saved_by_rank_zero = ModelCheckpoint(dirpath=tmp_path / "run")
    trainer = quiet_trainer(
        strategy=strategy(),
        devices=3,
        max_steps=STEPS,
        callbacks=[ProgressAudit(), saved_by_rank_zero],
        enable_checkpointing=True,
    )
    trainer.fit(model)
    monkeypatch.setattr(rpc, "call", _no_rpc)
    monkeypatch.setattr(torch.distributed.rpc, "rpc_sync", _no_rpc)
    monkeypatch.setattr(torch.distributed.rpc, "rpc_async", _no_rpc)

    # the calling process's Trainer is where rank 0's run ended
    metrics = trainer.callback_metrics
    assert trainer.global_step == STEPS == metrics["audit/global_step"]  # exact, Hogwild included
    assert trainer.current_epoch == metrics["audit/epoch"]
    # async_sgd: rank 0's pushes cover more than one epoch; Hogwild: rank 0's share of the steps depends on the race
    assert trainer.current_epoch >= (0 if hogwild else 1)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == metrics["audit/batches"]
    assert [p.name.split("-")[1] for p in (tmp_path / "run").iterdir()] == [f"step={STEPS}.ckpt"]  # rank 0 wrote it

    # a checkpoint saved here: strict load into a fresh module, equal to this process's parameters, full state
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    checkpoint = torch.load(tmp_path / "end.ckpt", weights_only=False)
    fresh = Boring()
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert_close(fresh.state_dict(), model.state_dict())
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))  # it trained
    assert checkpoint["global_step"] == STEPS and checkpoint["epoch"] == trainer.current_epoch
    assert len(checkpoint["optimizer_states"][0]["state"]) == 2  # momentum of both tensors (of every shard)
    steps_of_the_schedule = checkpoint["lr_schedulers"][0]["last_epoch"]
    # rank 0's own steps: under Hogwild its share of the shared budget (the batches it completed)
    assert steps_of_the_schedule == (metrics["audit/batches"] if hogwild else STEPS)

    # test, validate and predict run here, on the parameters this process holds
    with torch.no_grad():
        outputs = model(fixed_data())
        loss = model.loss(outputs).item()
    # Lightning averages the two float32 batch losses: equal to the whole-set loss up to float32 rounding
    assert_close(trainer.test(model, verbose=False)[0]["test_loss"], loss, rtol=1e-5, atol=0)
    assert_close(trainer.validate(model, verbose=False)[0]["val_loss"], loss, rtol=1e-5, atol=0)
    assert_close(torch.cat(trainer.predict(model)), outputs)
    monkeypatch.undo()

    if resume:  # from the checkpoint saved after fit: the step count goes on, only the remaining budget runs
        again = quiet_trainer(strategy=strategy(), devices=3, max_steps=STEPS + 4, callbacks=[ServerAudit()])
        again.fit(Boring(), ckpt_path=tmp_path / "end.ckpt")
        assert again.global_step == STEPS + 4 == again.callback_metrics["audit/version"]
        assert again.callback_metrics["audit/applied"] == 4
