"""ScalingEfficiency: step times, samples per second, time to target and E_N under a fake clock whose every tick the
test chooses, so each figure is known exactly; peak memory and the gathering over ranks in two processes."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import TensorDataset

from lightning_dl.callbacks import ScalingEfficiency
from lightning_dl.callbacks.scaling_efficiency import efficiency, gather_floats, peak_rss_bytes
from tests.helpers.distributed import run_distributed
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net
from tests.helpers.trainer import loader, quiet_trainer


class FakeClock:
    """A clock that moves only when the model says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TimedRegressor(TinyRegressor):
    """Each training batch takes ``batch_seconds[i]`` seconds on the fake clock (i counts batches); validation
    epoch ``e`` reports ``val_loss = val_losses[e] + offset``."""

    def __init__(self, clock: FakeClock, batch_seconds: list[float], val_losses: list[float], offset: float = 0.0):
        super().__init__(tiny_net())
        self.clock, self.batch_seconds, self.val_losses, self.offset = clock, batch_seconds, val_losses, offset
        self.batches = 0
        self.validations = 0

    def training_step(self, batch, batch_idx):
        self.clock.now += self.batch_seconds[self.batches]
        self.batches += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        F.mse_loss(self(x), y)  # the real loss is computed but the logged value is the scripted one

    def on_validation_epoch_end(self):
        self.log("val_loss", self.val_losses[self.validations] + self.offset)
        self.validations += 1


def test_efficiency_is_the_lecture_formula():
    """E_N = T / (N × T_N) × 100%: T_N = T/N gives 100%, T_N = 2T/N gives 50% (the lecture's two examples)."""
    t = 12.0
    for n in (1, 2, 4, 8):
        assert efficiency(t, t / n, n) == pytest.approx(1.0)
        assert efficiency(t, 2 * t / n, n) == pytest.approx(0.5)
    assert efficiency(3.0, 2.0, 4) == pytest.approx(3.0 / (4 * 2.0))


@pytest.mark.parametrize(
    ("args", "match"),
    [((0.0, 1.0, 2), "t_1=0.0"), ((1.0, float("inf"), 2), "t_n=inf"), ((1.0, 1.0, 0), "`n=0`")],
)
def test_efficiency_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        efficiency(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": -1}, r"`warmup_steps=-1` must be an integer >= 0"),
        ({"target": float("nan")}, r"`target=nan` must be a finite number"),
        ({"reference_step_seconds": 0.0}, r"`reference_step_seconds=0.0` must be a finite number > 0"),
        ({"batch_size": 0}, r"`batch_size=0` must be an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScalingEfficiency(**kwargs)


def test_step_times_throughput_target_and_efficiency_on_a_fake_clock():
    """16 samples, batches of 4, 2 batches per optimizer step: 2 steps per epoch, 3 epochs. Step k takes the sum
    of its two batches' scripted seconds; the first step is warm-up; val_loss 0.9, 0.4, 0.2 reaches 0.5 after
    epoch 2, i.e. after the first 4 steps' training seconds."""
    clock = FakeClock()
    batch_seconds = [5.0, 1.0, 0.5, 0.25, 0.75, 0.5, 1.5, 0.5, 0.25, 0.25, 1.0, 1.0]
    module = TimedRegressor(clock, batch_seconds, val_losses=[0.9, 0.4, 0.2])
    callback = ScalingEfficiency(warmup_steps=1, target=0.5, reference_step_seconds=3.0, clock=clock)
    trainer = quiet_trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(module, loader(regression_dataset(16), 4), loader(regression_dataset(8, seed=1), 4))

    steps = [a + b for a, b in zip(batch_seconds[::2], batch_seconds[1::2], strict=True)]
    assert callback.step_seconds == pytest.approx(steps)
    report = callback.report
    assert report is not None
    t_n = sum(steps[1:]) / len(steps[1:])
    assert report.steps_measured == 5
    assert report.step_seconds == pytest.approx(t_n)
    assert report.step_seconds_median == pytest.approx(statistics.median(steps[1:]))
    assert report.global_batch_size == 8  # batches of 4, two per step, one process
    assert report.samples_per_second == pytest.approx(8 / t_n)
    assert report.train_seconds == pytest.approx(sum(batch_seconds))
    assert report.seconds_to_target == pytest.approx(sum(steps[:4]))
    assert report.efficiency == pytest.approx(3.0 / (1 * t_n))
    assert [(s, round(t, 6), v) for s, t, v in report.curve] == [
        (2, sum(steps[:2]), pytest.approx(0.9)),
        (4, sum(steps[:4]), pytest.approx(0.4)),
        (6, sum(steps), pytest.approx(0.2)),
    ]
    assert report.world_size == 1 and len(report.peak_rss_bytes) == 1
    assert trainer.callback_metrics["scaling/step_seconds"] == pytest.approx(steps[-1])
    assert trainer.callback_metrics["scaling/samples_per_second"] == pytest.approx(8 / steps[-1])
    assert 50 < float(trainer.callback_metrics["scaling/peak_rss_mib"]) <= peak_rss_bytes() / 2**20
    module.validations = 0
    trainer.validate(module, loader(regression_dataset(8, seed=1), 4), verbose=False)
    assert len(callback.curve) == 3  # a validation outside fit is not a point of the training curve


def test_target_not_reached_and_no_reference():
    clock = FakeClock()
    module = TimedRegressor(clock, [1.0] * 4, val_losses=[0.9, 0.8])
    callback = ScalingEfficiency(warmup_steps=0, target=0.1, clock=clock)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(module, loader(regression_dataset(8), 4), loader(regression_dataset(8, seed=1), 4))
    assert callback.report is not None and [point[2] for point in callback.report.curve] == pytest.approx([0.9, 0.8])
    assert callback.report.seconds_to_target is None and callback.report.efficiency is None
    assert callback.report.step_seconds == pytest.approx(1.0)


def test_resume_continues_the_measurement(tmp_path):
    """The step times, training seconds and curve come back from a checkpoint; the resumed fit appends to them."""
    clock = FakeClock()
    first = ScalingEfficiency(warmup_steps=1, target=0.5, clock=clock)
    trainer = quiet_trainer(max_epochs=1, callbacks=[first])
    trainer.fit(
        TimedRegressor(clock, [1.0, 2.0], val_losses=[0.4]),
        loader(regression_dataset(8), 4),
        loader(regression_dataset(8, seed=1), 4),
    )
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    resumed = ScalingEfficiency(warmup_steps=1, target=0.5, clock=clock)
    module = TimedRegressor(clock, [4.0, 8.0], val_losses=[0.3])
    trainer = quiet_trainer(max_epochs=2, callbacks=[resumed])
    trainer.fit(module, loader(regression_dataset(8), 4), loader(regression_dataset(8, seed=1), 4), ckpt_path=path)
    assert resumed.step_seconds == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert resumed.warmup_indices == [0, 2]  # the resumed fit warms up again
    assert resumed.seconds_to_target == pytest.approx(3.0)  # reached before the interruption, kept
    assert resumed.report is not None and resumed.report.step_seconds == pytest.approx((2.0 + 8.0) / 2)
    assert [point[:2] for point in resumed.report.curve] == [(2, 3.0), (4, 15.0)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_matches_the_kernel_high_water_mark():
    torch.ones(64 * 2**20, dtype=torch.uint8).fill_(1)  # touch 64 MiB so the peak is well above start-up noise
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    hwm = int(status["VmHWM"].split()[0]) * 1024
    assert abs(peak_rss_bytes() - hwm) <= 4 * 2**20


def _ddp_fit(rank: int, world_size: int) -> tuple[dict, list[list[float]]]:
    """Both ranks train under ddp; rank 1's batches take twice as long, and its val_loss is 0.2 higher."""
    clock = FakeClock()
    module = TimedRegressor(clock, [(rank + 1) * s for s in (1.0, 1.0, 2.0, 3.0)], [0.5, 0.3], offset=0.2 * rank)
    callback = ScalingEfficiency(warmup_steps=1, target=0.45, reference_step_seconds=5.0, clock=clock)
    trainer = quiet_trainer(devices=world_size, strategy="ddp", max_epochs=2, callbacks=[callback])
    data = regression_dataset(16)
    trainer.fit(module, loader(data, 4), loader(regression_dataset(8, seed=1), 4))
    assert callback.report is not None
    return callback.report.as_dict(), gather_floats([float(rank), 10.0 * rank])


@pytest.mark.distributed
def test_two_processes_gather_the_slowest_rank_and_every_peak():
    """T_N is the slowest rank's mean step time; the peak RSS of each rank comes back; the validation value is the
    mean over ranks; E_N uses N = 2; 16 samples under ddp on 2 ranks are 2 steps of 4 per rank per epoch."""
    results = run_distributed(_ddp_fit, 2, timeout=180)
    report, gathered = results[0]
    assert results[1][0] == report  # every rank holds the same report
    assert gathered == [[0.0, 0.0], [1.0, 10.0]]
    t_n = 2 * (1.0 + 2.0 + 3.0) / 3  # rank 1, steps after the warm-up one
    assert report["world_size"] == 2 and report["global_batch_size"] == 8
    assert report["step_seconds"] == pytest.approx(t_n)
    assert report["efficiency"] == pytest.approx(5.0 / (2 * t_n))
    assert len(report["peak_rss_bytes"]) == 2 and min(report["peak_rss_bytes"]) > 50 * 2**20
    assert [round(value, 6) for _, _, value in report["curve"]] == [0.6, 0.4]  # means of (0.5, 0.7), (0.3, 0.5)
    assert report["seconds_to_target"] == pytest.approx(2 * (1.0 + 1.0 + 2.0 + 3.0))  # the slowest rank's seconds
    assert [point[:2] for point in report["curve"]] == [(2, 4.0), (4, 14.0)]


class BoringPipe(BoringModel):
    """Lightning's BoringModel with its Linear split into two blocks and (input, target) batches, so that the pipeline
    and hybrid strategies can train it too; logs ``val_loss``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 2))

    def pipeline_blocks(self):
        return self.layer

    def pipeline_loss(self, output, target):
        return F.mse_loss(output, target)

    def training_step(self, batch, batch_idx):
        return self.pipeline_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.pipeline_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _boring_data(samples: int = 32) -> TensorDataset:
    x = RandomDataset(32, samples).data
    return TensorDataset(x, torch.ones(samples, 2))


def _check_report(callback: ScalingEfficiency, world_size: int, global_batch: int, steps: int) -> None:
    """The report against the callback's own step times, with the formulas written out."""
    report = callback.report
    assert report is not None and report.world_size == world_size and report.global_batch_size == global_batch
    assert len(callback.step_seconds) == steps and callback.warmup_indices == [0]
    measured = callback.step_seconds[1:]
    if world_size == 1:  # with several ranks T_N is the slowest rank's mean: checked against the gathered means
        assert report.step_seconds == pytest.approx(sum(measured) / len(measured))
    assert report.samples_per_second == pytest.approx(global_batch / report.step_seconds)
    assert report.efficiency == pytest.approx(0.5 / (world_size * report.step_seconds))  # T / (N × T_N)
    assert [point[0] for point in report.curve] == [steps // 2, steps]
    assert len(report.peak_rss_bytes) == world_size and min(report.peak_rss_bytes) > 50 * 2**20


def test_boring_model_in_a_plain_trainer():
    """Lightning's BoringModel-style module, real clock, one process: 32 samples in batches of 4, 2 epochs."""
    callback = ScalingEfficiency(warmup_steps=1, target=1e9, reference_step_seconds=0.5)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(BoringPipe(), loader(_boring_data(), 4), loader(_boring_data(8), 4))
    _check_report(callback, 1, 4, 16)
    assert callback.report is not None and callback.report.seconds_to_target == pytest.approx(callback.curve[0][1])
    metrics = trainer.callback_metrics
    assert float(metrics["scaling/report_step_seconds"]) == pytest.approx(callback.report.step_seconds)
    assert float(metrics["scaling/report_efficiency"]) == pytest.approx(callback.report.efficiency)
    assert float(metrics["scaling/report_seconds_to_target"]) == pytest.approx(callback.report.seconds_to_target)
    assert callback.report.train_seconds > 0 and callback.curve[0][1] == pytest.approx(sum(callback.step_seconds[:8]))


def _boring_fits(rank: int, world_size: int) -> list[tuple[list[float], list[float]]]:
    """The BoringModel-style module under Lightning's ddp, then under HybridStrategy pp2, in the same processes."""
    from lightning_dl.strategies import HybridStrategy

    gathered = []
    for strategy, global_batch in (("ddp", 8), (HybridStrategy(layout="pp2", n_microbatches=2), 4)):
        callback = ScalingEfficiency(warmup_steps=1, target=1e9, reference_step_seconds=0.5)
        trainer = quiet_trainer(devices=world_size, strategy=strategy, max_epochs=2, callbacks=[callback])
        data = _boring_data()
        steps = 2 * len(data) // global_batch
        trainer.fit(BoringPipe(), loader(data, 4), loader(_boring_data(8), 4))
        _check_report(callback, world_size, global_batch, steps)
        assert callback.report is not None
        means = gather_floats([sum(callback.step_seconds[1:]) / (steps - 1)])
        assert callback.report.step_seconds == pytest.approx(max(m[0] for m in means))  # the slowest rank's
        gathered.append(gather_floats([callback.report.step_seconds, *callback.report.curve[-1][1:]]))
    return gathered


@pytest.mark.distributed
def test_boring_model_under_ddp_and_the_hybrid_strategy():
    """Two processes: every rank's report has N = 2, the global batch of the layout (ddp: 2 replicas of 4; pp2: one
    replica of 4), T_N the slowest rank's mean, one peak RSS per rank, and the same T_N and curve on every rank."""
    for gathered in run_distributed(_boring_fits, 2, timeout=240)[0]:
        assert gathered[0] == gathered[1]


@pytest.mark.distributed
def test_a_spawning_launcher_hands_the_report_to_the_calling_process():
    """Under ``ddp_spawn`` the callback runs in the spawned ranks only; the report's headline figures come back
    through ``trainer.callback_metrics`` (2 ranks, batches of 4: a global batch of 8)."""
    callback = ScalingEfficiency(warmup_steps=1, target=1e9, reference_step_seconds=0.5)
    trainer = quiet_trainer(devices=2, strategy="ddp_spawn", max_epochs=1, callbacks=[callback])
    trainer.fit(BoringPipe(), loader(_boring_data(), 4), loader(_boring_data(8), 4))
    assert callback.report is None  # this process's copy never ran
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("scaling/report_")}
    t_n = metrics["scaling/report_step_seconds"]
    assert t_n > 0 and metrics["scaling/report_samples_per_second"] == pytest.approx(8 / t_n)
    assert metrics["scaling/report_efficiency"] == pytest.approx(0.5 / (2 * t_n))
    assert metrics["scaling/report_peak_rss_mib"] > 50 and metrics["scaling/report_seconds_to_target"] > 0
