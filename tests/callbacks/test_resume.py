"""Resume is exact: stopping and resuming from a checkpoint with all four callbacks (z-score clipping, AdaScale,
noise scale, a schedule) reproduces the uninterrupted run: LRs, gradients, parameters and callback state."""

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dl.callbacks import BatchSizeScaling, GradientClipping, GradientNoiseScale, LRSchedule
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net
from tests.helpers.trainer import StepRecorder, loader, quiet_trainer

EPOCHS, STOP_EPOCH, STEPS_PER_EPOCH = 6, 2, 2
STEPS, STOP = EPOCHS * STEPS_PER_EPOCH, STOP_EPOCH * STEPS_PER_EPOCH


def _run(tmp_path, max_epochs, ckpt_path=None, save=False):
    L.seed_everything(0)
    callbacks = [
        GradientClipping(mode="zscore", z=1.0, zscore_warmup=3),
        BatchSizeScaling(reference_batch_size=4, rule="adascale"),
        GradientNoiseScale(every_n_steps=2),
        LRSchedule("cosine", warmup_steps=3, total_steps=4 * STEPS),  # AdaScale advances it by its gain (1 to 4)
        StepRecorder(),
    ]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    trainer = quiet_trainer(
        max_epochs=max_epochs, accumulate_grad_batches=2, callbacks=callbacks, enable_checkpointing=save
    )
    module = TinyRegressor(tiny_net(), lr=0.2)
    # 2 optimizer steps of 2 micro-batches an epoch; the interrupted run ends on max_epochs, a clean epoch end
    # (stopped on max_steps, Lightning replays a batch of the finished epoch when resuming)
    trainer.fit(module, loader(regression_dataset(32), batch_size=8), ckpt_path=ckpt_path)
    return callbacks, [p.detach().clone() for p in module.parameters()]


def test_resume_reproduces_the_uninterrupted_run(tmp_path) -> None:
    full, full_params = _run(tmp_path, EPOCHS)
    _run(tmp_path, STOP_EPOCH, save=True)
    resumed, resumed_params = _run(tmp_path, EPOCHS, ckpt_path=tmp_path / "last.ckpt")

    full_rec, resumed_rec = full[4], resumed[4]
    assert resumed_rec.global_steps == list(range(STOP, STEPS))
    assert resumed_rec.lrs == full_rec.lrs[STOP:]
    assert len(set(lr[0] for lr in full_rec.lrs)) > 5  # schedule and gains moved the LR
    for a, b in zip(resumed_rec.grads, full_rec.grads[STOP:], strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb)
    for a, b in zip(resumed_params, full_params, strict=True):
        torch.testing.assert_close(a, b)
    clipping_full, clipping_resumed = full[0], resumed[0]
    assert clipping_resumed.zscore_state == clipping_full.zscore_state
    assert clipping_full.zscore_state["count"] == STEPS
    assert resumed[1].state_dict() == full[1].state_dict()
    assert resumed[2].b_simple == full[2].b_simple
