"""LRSchedule inside a Trainer: the LR of every optimizer step follows the formula, per group, under
accumulation, and across a resume."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dl.callbacks import LRSchedule
from lightning_dl.schedules import lr_factor
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net
from tests.helpers.trainer import StepRecorder, loader, quiet_trainer


class TwoGroups(TinyRegressor):
    """Second layer at a tenth of the first layer's LR, with weight decay on it."""

    def configure_optimizers(self):
        return torch.optim.SGD(
            [
                {"params": self.net[0].parameters(), "lr": 0.2},
                {"params": self.net[2].parameters(), "lr": 0.02, "weight_decay": 0.01},
            ],
            lr=0.2,
            momentum=0.9,
        )


@pytest.mark.parametrize("accumulate", [1, 3])
def test_lr_per_optimizer_step_follows_the_formula(accumulate) -> None:
    recorder = StepRecorder()
    schedule = LRSchedule("cosine", warmup_steps=3, warmup_start_ratio=0.1, min_lr_ratio=0.05)
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[schedule, recorder])
    trainer.fit(TwoGroups(tiny_net()), loader(regression_dataset(96), batch_size=8))
    steps = 2 * 12 // accumulate
    assert schedule.total_steps is None and steps == trainer.global_step  # the argument is kept, the length resolved
    assert recorder.global_steps == list(range(steps))
    for step, (lr0, lr1) in enumerate(recorder.lrs):
        factor = lr_factor("cosine", step, total_steps=steps, warmup_steps=3, warmup_start_ratio=0.1, min_lr_ratio=0.05)
        assert lr0 == pytest.approx(0.2 * factor) and lr1 == pytest.approx(0.02 * factor)


def test_weight_decay_and_momentum_fields() -> None:
    recorder = StepRecorder()
    momentum = LRSchedule("linear", field="momentum", total_steps=10, min_lr_ratio=0.5, log=False)
    trainer = quiet_trainer(max_steps=10, callbacks=[momentum, recorder])
    module = TwoGroups(tiny_net())
    trainer.fit(module, loader(regression_dataset(80)))
    assert [m[0] for m in recorder.momenta] == pytest.approx([0.9 * (1 - 0.5 * s / 10) for s in range(10)])
    assert trainer.optimizers[0].param_groups[0]["initial_momentum"] == 0.9


def test_logs_the_lr(tmp_path) -> None:
    trainer = quiet_trainer(max_steps=4, callbacks=[LRSchedule("linear", total_steps=4)])
    trainer.fit(TinyRegressor(tiny_net()), loader(regression_dataset(32)))
    assert trainer.callback_metrics["lr"] == pytest.approx(0.1 * 0.25)  # last step: factor 1 - 3/4


def test_conflicting_torch_scheduler_is_an_error() -> None:
    class WithScheduler(TinyRegressor):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5)}

    trainer = quiet_trainer(max_steps=2, callbacks=[LRSchedule("cosine")])
    with pytest.raises(ValueError, match="also returns the LR scheduler StepLR: remove one of the two"):
        trainer.fit(WithScheduler(tiny_net()), loader(regression_dataset(32)))


def test_warmup_longer_than_training_is_an_error() -> None:
    trainer = quiet_trainer(max_steps=5, callbacks=[LRSchedule("cosine", warmup_steps=10)])
    with pytest.raises(ValueError, match=r"`warmup_steps` must be <= total_steps \(5\), got 10"):
        trainer.fit(TinyRegressor(tiny_net()), loader(regression_dataset(64)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": "zigzag"}, r"`shape` must be one of"),
        ({"field": "beta2"}, r"`field` must be one of \('lr', 'weight_decay', 'momentum'\), got 'beta2'"),
        ({"min_lr_ratio": 2.0}, r"`min_lr_ratio` must be in \[0, 1\], got 2.0"),
        ({"warmup_steps": -5}, r"`warmup_steps` must be >= 0, got -5"),
    ],
)
def test_constructor_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


def test_resume_reproduces_the_uninterrupted_lrs(tmp_path) -> None:
    def run(max_epochs, ckpt_path=None, save=False):
        L.seed_everything(0)
        recorder = StepRecorder()
        callbacks = [LRSchedule("wsd", warmup_steps=2, total_steps=12, decay_fraction=0.5), recorder]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=save)
        module = TwoGroups(tiny_net())
        # 3 steps an epoch; the interrupted run ends on max_epochs, a clean epoch end for Lightning's loop
        trainer.fit(module, loader(regression_dataset(24)), ckpt_path=ckpt_path)
        return recorder, [p.detach().clone() for p in module.parameters()]

    full, full_params = run(4)
    run(2, save=True)
    resumed, resumed_params = run(4, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_steps == list(range(6, 12))
    assert resumed.lrs == full.lrs[6:]
    for a, b in zip(resumed_params, full_params, strict=True):
        torch.testing.assert_close(a, b)


def test_one_callback_reused_for_fits_of_different_lengths() -> None:
    schedule, recorder = LRSchedule("linear", log=False), StepRecorder()
    for steps in (4, 8):
        recorder.lrs.clear()
        trainer = quiet_trainer(max_steps=steps, callbacks=[schedule, recorder])
        trainer.fit(TinyRegressor(tiny_net()), loader(regression_dataset(128)))
        assert [lr[0] for lr in recorder.lrs] == pytest.approx([0.1 * (1 - s / steps) for s in range(steps)])


def test_lr_schedule_and_batch_size_scaling_do_not_import_each_other() -> None:
    """What both need (param-group fields, finding each other in a Trainer) lives in one module both import."""
    import ast
    from pathlib import Path

    import lightning_dl.callbacks as package

    def imported(name: str) -> set[str]:
        tree = ast.parse((Path(package.__file__).parent / f"{name}.py").read_text())
        return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}

    assert "lightning_dl.callbacks.batch_size_scaling" not in imported("lr_schedule")
    assert "lightning_dl.callbacks.lr_schedule" not in imported("batch_size_scaling")
    assert "lightning_dl.callbacks._param_groups" in imported("lr_schedule") & imported("batch_size_scaling")
