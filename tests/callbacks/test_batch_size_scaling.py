"""BatchSizeScaling inside a Trainer: the effective batch, each rule's values, composition with LRSchedule, and
AdaScale against fairscale's AdaScale on the same micro-batches."""

import pytest
import torch
import torch.nn.functional as F
from fairscale.optim import AdaScale

from lightning_dl.callbacks import BatchSizeScaling, LRSchedule
from lightning_dl.schedules import lr_factor
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net
from tests.helpers.trainer import StepRecorder, loader, quiet_trainer


class AdamRegressor(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, betas=(0.9, 0.999))


def _fit(scaling, module=None, accumulate=2, steps=3, extra=()):
    recorder = StepRecorder()
    trainer = quiet_trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[*extra, scaling, recorder])
    trainer.fit(module or TinyRegressor(tiny_net(), lr=0.1), loader(regression_dataset(96), batch_size=8))
    return trainer, recorder


@pytest.mark.parametrize(("rule", "lr"), [("linear", 0.4), ("sqrt", 0.2), ("none", 0.1), ("mcallester", 0.4)])
def test_lr_rules_with_accumulation(rule, lr) -> None:
    scaling = BatchSizeScaling(reference_batch_size=4, rule=rule)  # B = 8 x 2 = 16, k = 4
    trainer, recorder = _fit(scaling)
    assert scaling.geometry is not None and scaling.geometry.effective == 16 and scaling.k == 4.0
    assert [step[0] for step in recorder.lrs] == pytest.approx([lr] * 3)
    momentum = 0.6 if rule == "mcallester" else 0.9  # max(0, 1 - 4 (1 - 0.9))
    assert [step[0] for step in recorder.momenta] == pytest.approx([momentum] * 3)
    assert trainer.callback_metrics["batch_size/effective"] == 16.0
    assert trainer.callback_metrics["batch_size/k"] == 4.0


def test_mcallester_scales_adam_beta1_only() -> None:
    _, recorder = _fit(BatchSizeScaling(reference_batch_size=4, rule="mcallester"), module=AdamRegressor(tiny_net()))
    assert recorder.momenta[-1][0] == pytest.approx(0.6) and recorder.lrs[-1][0] == pytest.approx(0.04)


def test_betas2_untouched() -> None:
    trainer, _ = _fit(BatchSizeScaling(reference_batch_size=4, rule="mcallester"), module=AdamRegressor(tiny_net()))
    assert trainer.optimizers[0].param_groups[0]["betas"] == pytest.approx((0.6, 0.999))


def test_schedule_applies_to_the_scaled_lr() -> None:
    schedule = LRSchedule("cosine", warmup_steps=2, total_steps=6)
    _, recorder = _fit(BatchSizeScaling(reference_batch_size=8, rule="linear"), steps=6, extra=[schedule])
    expected = [0.1 * 2 * lr_factor("cosine", s, total_steps=6, warmup_steps=2) for s in range(6)]
    assert [step[0] for step in recorder.lrs] == pytest.approx(expected)


def test_adaptive_sgd_style_group_is_told_the_batch_size() -> None:
    class WithBatchSize(TinyRegressor):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            optimizer.param_groups[0]["batch_size"] = 1
            return optimizer

    trainer, _ = _fit(BatchSizeScaling(reference_batch_size=8, rule="none"), module=WithBatchSize(tiny_net()))
    assert trainer.optimizers[0].param_groups[0]["batch_size"] == 16


def test_adascale_equals_fairscale_on_the_same_micro_batches() -> None:
    scaling = BatchSizeScaling(reference_batch_size=4, rule="adascale")  # k = 4 from 2 micro-batches of 8
    trainer, recorder = _fit(scaling, steps=5)
    # reference: plain loop, fairscale AdaScale with the loss scaled by 1/accumulation as Lightning does
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ada = AdaScale(optimizer, num_gradients_to_accumulate=2, scale=4.0, is_scaled_loss=True)
    batches = list(loader(regression_dataset(96), batch_size=8))
    expected_lrs = []
    for step in range(5):
        for x, y in batches[2 * step : 2 * step + 2]:
            (F.mse_loss(net(x), y) / 2).backward()
        expected_lrs.append(0.1 * ada.gain(pg_idx=0))
        ada.step()
        ada.zero_grad()
    ada.unhook()
    assert [step[0] for step in recorder.lrs] == pytest.approx(expected_lrs, abs=1e-6)
    assert all(lr > 0.1 for lr in expected_lrs)  # the gain did something
    for ours, theirs in zip(trainer.lightning_module.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
    assert scaling.progress(trainer) > 0


def test_adascale_needs_two_gradients_per_step() -> None:
    with pytest.raises(
        ValueError,
        match="from at least 2 gradients per step: use devices >= 2 or accumulate_grad_batches >= 2",
    ):
        _fit(BatchSizeScaling(reference_batch_size=4, rule="adascale"), accumulate=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference_batch_size": 0}, r"`reference_batch_size` must be an integer >= 1, got 0"),
        ({"reference_batch_size": -32}, r"`reference_batch_size` must be an integer >= 1, got -32"),
        ({"reference_batch_size": 32, "rule": "cube"}, r"`rule` must be one of \('linear', 'sqrt', 'mcallester'"),
        ({"reference_batch_size": 32, "smoothing": 1.0}, r"`smoothing` must lie in \[0, 1\), got 1.0"),
        ({"reference_batch_size": 32, "batch_size": 0}, r"`batch_size` must be >= 1, got 0"),
    ],
)
def test_constructor_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BatchSizeScaling(**kwargs)


def _ddp_adascale(rank: int, world_size: int) -> dict:

    scaling, recorder = BatchSizeScaling(reference_batch_size=4, rule="adascale"), StepRecorder()
    trainer = quiet_trainer(devices=world_size, strategy="ddp", max_steps=4, callbacks=[scaling, recorder])
    module = TinyRegressor(tiny_net(), lr=0.1)
    trainer.fit(module, loader(regression_dataset(96), batch_size=8))
    return {
        "effective": scaling.geometry.effective,
        "k": scaling.k,
        "lrs": [s[0] for s in recorder.lrs],
        "params": [p.detach().clone() for p in module.parameters()],
    }


@pytest.mark.distributed
def test_adascale_under_ddp_equals_fairscale_on_the_rank_batches() -> None:
    """Each rank's gradient is a small gradient (read before DDP averages them)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from tests.helpers.distributed import run_distributed

    ranks = run_distributed(_ddp_adascale, 2, timeout=180)
    assert ranks[0]["effective"] == 16 and ranks[0]["k"] == 4.0
    dataset = regression_dataset(96)
    parts = [
        list(DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, 2, r, shuffle=True, seed=0)))
        for r in range(2)
    ]
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ada = AdaScale(optimizer, num_gradients_to_accumulate=2, scale=4.0, is_scaled_loss=True)
    expected_lrs = []
    for step in range(4):
        for rank in range(2):
            x, y = parts[rank][step]
            (F.mse_loss(net(x), y) / 2).backward()
        expected_lrs.append(0.1 * ada.gain(pg_idx=0))
        ada.step()
        ada.zero_grad()
    ada.unhook()
    for result in ranks:
        assert result["lrs"] == pytest.approx(expected_lrs, abs=1e-6)
        for ours, theirs in zip(result["params"], net.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs)


def test_recomputed_when_the_batch_size_changes() -> None:
    """A batch size changed between epochs (as BatchSizeFinder does) changes k and the LR from the next epoch."""

    class GrowingBatch(TinyRegressor):
        def train_dataloader(self):
            return loader(regression_dataset(64), batch_size=8 * (self.current_epoch + 1))

    scaling, recorder = BatchSizeScaling(reference_batch_size=8, rule="linear"), StepRecorder()
    trainer = quiet_trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[scaling, recorder])
    trainer.fit(GrowingBatch(tiny_net(), lr=0.1))
    assert [round(step[0], 6) for step in recorder.lrs] == [0.1] * 8 + [0.2] * 4
    assert scaling.geometry is not None and scaling.geometry.effective == 16 and scaling.k == 2.0
