"""GradientClipping inside a Trainer: each mode against a direct computation, non-finite handling, errors, and
the DDP norm equal to the single-process norm of the full batch."""

import copy
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dl.callbacks import GradientClipping, LRSchedule
from tests.helpers.distributed import run_distributed
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net
from tests.helpers.trainer import StepRecorder, loader, quiet_trainer


class RawGrads(StepRecorder):
    """Placed first: records the gradients before any clipping."""


def _fit(clipping, steps=4, module=None, **kwargs):
    raw, clipped = RawGrads(), StepRecorder()
    module = module or TinyRegressor(tiny_net(), lr=0.5)
    trainer = quiet_trainer(max_steps=steps, callbacks=[raw, clipping, clipped], **kwargs)
    trainer.fit(module, loader(regression_dataset(64), batch_size=8))
    return trainer, raw, clipped


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_norm_mode_equals_torch_clip_grad_norm(norm_type) -> None:
    trainer, raw, clipped = _fit(GradientClipping(max_norm=0.05, norm_type=norm_type))
    for before, after in zip(raw.grads, clipped.grads, strict=True):
        total = torch.nn.utils.get_total_norm(before, norm_type)
        coef = min(1.0, 0.05 / (total.item() + 1e-6))
        for g_after, g_before in zip(after, before, strict=True):
            torch.testing.assert_close(g_after, g_before * coef)
    metrics = trainer.callback_metrics
    assert metrics["grad_norm/pre_clip"] == pytest.approx(
        torch.nn.utils.get_total_norm(raw.grads[-1], norm_type).item()
    )
    assert metrics["grad_norm/post_clip"] == pytest.approx(0.05, rel=1e-4)
    assert metrics["grad_norm/clipped"] == 1.0


def test_no_clipping_below_the_threshold() -> None:
    trainer, raw, clipped = _fit(GradientClipping(max_norm=1e6))
    for before, after in zip(raw.grads, clipped.grads, strict=True):
        for a, b in zip(after, before, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert trainer.callback_metrics["grad_norm/clipped"] == 0.0


class TwoGroups(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}], lr=0.5)


def test_per_group_thresholds() -> None:
    _, raw, clipped = _fit(GradientClipping(max_norm=[0.02, 10.0], log_group_norms=True), module=TwoGroups(tiny_net()))
    for before, after in zip(raw.grads, clipped.grads, strict=True):
        first, second = before[:2], before[2:]
        coef = min(1.0, 0.02 / (torch.nn.utils.get_total_norm(first).item() + 1e-6))
        for a, b in zip(after[:2], first, strict=True):
            torch.testing.assert_close(a, b * coef)
        for a, b in zip(after[2:], second, strict=True):
            torch.testing.assert_close(a, b)


def test_value_mode_clamps_elements() -> None:
    _, raw, clipped = _fit(GradientClipping(max_value=0.01, mode="value"))
    for before, after in zip(raw.grads, clipped.grads, strict=True):
        for a, b in zip(after, before, strict=True):
            torch.testing.assert_close(a, b.clamp(-0.01, 0.01))


def test_agc_mode_matches_the_unitwise_rule() -> None:
    module = TinyRegressor(tiny_net(), lr=0.5)
    weights = []

    class Weights(StepRecorder):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    raw, clipped = RawGrads(), StepRecorder()
    trainer = quiet_trainer(
        max_steps=3, callbacks=[Weights(), raw, GradientClipping(mode="agc", clip_factor=0.01), clipped]
    )
    trainer.fit(module, loader(regression_dataset(64)))
    for ws, before, after in zip(weights, raw.grads, clipped.grads, strict=True):
        for w, g, out in zip(ws, before, after, strict=True):
            rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
            rows_g = g.reshape(g.shape[0], -1) if g.ndim > 1 else g.reshape(1, -1)
            expected = []
            for rw, rg in zip(rows_w, rows_g, strict=True):
                limit = 0.01 * max(rw.norm().item(), 1e-3)
                norm = rg.norm().item()
                expected.append(rg * min(1.0, limit / max(norm, 1e-6)))
            torch.testing.assert_close(out, torch.stack(expected).reshape(g.shape))


def test_zscore_clips_a_spike_after_warmup() -> None:
    clipping = GradientClipping(mode="zscore", z=2.0, zscore_warmup=5, ema_decay=0.9)
    norms = [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 10.0, 1.0]
    coefs = [clipping._zscore_coefficient(norm) for norm in norms]
    assert coefs[:6] == [1.0] * 6 and coefs[7] == 1.0
    # the bound after six norms, transcribed: EMA mean and variance of the applied norms
    mean, var = norms[0], 0.0
    for norm in norms[1:6]:
        delta = norm - mean
        mean += 0.1 * delta
        var = 0.9 * (var + 0.1 * delta * delta)
    bound = mean + 2.0 * var**0.5
    assert coefs[6] == pytest.approx(bound / 10.0)
    assert clipping.zscore_state["count"] == 8


def test_zscore_mode_in_a_trainer_clips_to_the_bound() -> None:
    clipping = GradientClipping(mode="zscore", z=0.5, zscore_warmup=3)
    _, raw, clipped = _fit(clipping, steps=8)
    assert clipping.zscore_state["count"] == 8
    changed = [
        not all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        for before, after in zip(raw.grads, clipped.grads, strict=True)
    ]
    assert not any(changed[:3]) and any(changed[3:])


class NanAtStep(TinyRegressor):
    def __init__(self, bad_step: int) -> None:
        super().__init__(tiny_net(), lr=0.1)
        self.bad_step = bad_step

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.bad_step:
            self.net[0].weight.grad[0, 0] = float("nan")


def test_nonfinite_error_names_the_parameter() -> None:
    with pytest.raises(
        FloatingPointError, match=r"Non-finite gradients in 1 parameter\(s\), first: \['net.0.weight'\]"
    ):
        _fit(GradientClipping(max_norm=1.0), module=NanAtStep(bad_step=1))


def test_nonfinite_skip_changes_nothing() -> None:
    module = NanAtStep(bad_step=2)
    snapshots = []

    class Snapshot(StepRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            snapshots.append(
                ([p.detach().clone() for p in pl_module.parameters()], copy.deepcopy(optimizer.state_dict()["state"]))
            )

    clipping = GradientClipping(max_norm=1.0, nonfinite="skip")
    trainer = quiet_trainer(max_steps=4, callbacks=[clipping, Snapshot()])
    trainer.fit(module, loader(regression_dataset(64)))
    assert clipping.skipped_steps == 1 and trainer.global_step == 4
    (params_before, state_before), (params_after, state_after) = snapshots[1], snapshots[2]
    for a, b in zip(params_before, params_after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key in state_before:
        torch.testing.assert_close(state_before[key]["momentum_buffer"], state_after[key]["momentum_buffer"])
    assert not torch.equal(snapshots[3][0][0], params_after[0])  # later steps train again
    assert trainer.callback_metrics["grad_norm/skipped_steps"] == 1.0


def test_nonfinite_zero_replaces_entries() -> None:
    raw_after = StepRecorder()
    trainer = quiet_trainer(max_steps=3, callbacks=[GradientClipping(max_norm=1e6, nonfinite="zero"), raw_after])
    trainer.fit(NanAtStep(bad_step=1), loader(regression_dataset(64)))
    assert raw_after.grads[1][0][0, 0] == 0.0
    assert all(torch.isfinite(g).all() for step in raw_after.grads for g in step)


def test_conflict_with_trainer_gradient_clip_val() -> None:
    trainer = quiet_trainer(max_steps=1, gradient_clip_val=1.0, callbacks=[GradientClipping(max_norm=1.0)])
    with pytest.raises(ValueError, match=r"the Trainer also has `gradient_clip_val=1.0`: remove one of the two"):
        trainer.fit(TinyRegressor(tiny_net()), loader(regression_dataset(16)))


def test_per_group_count_must_match() -> None:
    trainer = quiet_trainer(max_steps=1, callbacks=[GradientClipping(max_norm=[1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match=r"`max_norm` has 3 thresholds but the optimizer has 1 param groups"):
        trainer.fit(TinyRegressor(tiny_net()), loader(regression_dataset(16)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_norm": 0.0}, r"`max_norm` must be > 0 \(a number, or one per param group\), got 0.0"),
        ({"max_norm": -1.0}, r"`max_norm` must be > 0"),
        ({"max_norm": [1.0, -2.0]}, r"`max_norm` must be > 0 .*got \[1.0, -2.0\]"),
        ({"mode": "percentile", "max_norm": 1.0}, r"`mode` must be one of \('norm', 'value', 'agc', 'zscore'\)"),
        ({"mode": "norm"}, r"`mode='norm'` needs `max_norm`"),
        ({"mode": "value"}, r"`mode='value'` needs `max_value`"),
        ({"max_norm": 1.0, "nonfinite": "ignore"}, r"`nonfinite` must be one of \('error', 'skip', 'zero'\)"),
        ({"max_norm": 1.0, "norm_type": 0}, r"`norm_type` must be > 0"),
        ({"mode": "zscore", "ema_decay": 1.0}, r"`ema_decay` must lie in \(0, 1\), got 1.0"),
    ],
)
def test_constructor_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradientClipping(**kwargs)


# -- DDP: every rank clips with the norm of the averaged gradient ---------------------------------------------------


def _ddp_clipped_fit(rank: int, world_size: int) -> dict:
    module = TinyRegressor(tiny_net(), lr=0.5)
    clipping, recorder = GradientClipping(max_norm=0.05), StepRecorder()
    schedule = LRSchedule("linear", total_steps=3, log=False)  # the schedule under DDP too
    trainer = quiet_trainer(
        devices=world_size, strategy="ddp", max_steps=3, log_every_n_steps=1, callbacks=[clipping, schedule, recorder]
    )
    trainer.fit(module, DataLoader(regression_dataset(64), batch_size=4))
    return {
        "lrs": recorder.lrs,
        "grads": recorder.grads,
        "params": [p.detach().clone() for p in module.parameters()],
        "pre_clip": trainer.callback_metrics["grad_norm/pre_clip"].item(),
    }


@pytest.mark.distributed
def test_ddp_norm_and_schedule_equal_single_process_on_the_full_batch() -> None:
    ranks = run_distributed(_ddp_clipped_fit, 2, timeout=180)
    # single-process reference on the same global batches, clipped by torch
    dataset = regression_dataset(64)
    parts = [
        list(DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, 2, r, shuffle=True, seed=0)))
        for r in range(2)
    ]
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    for step in range(3):
        x = torch.cat([parts[0][step][0], parts[1][step][0]])
        y = torch.cat([parts[0][step][1], parts[1][step][1]])
        optimizer.zero_grad()
        F.mse_loss(net(x), y).backward()
        pre = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        optimizer.param_groups[0]["lr"] = 0.5 * (1 - step / 3)  # linear schedule, transcribed
        for rank in ranks:
            assert rank["lrs"][step] == pytest.approx([0.5 * (1 - step / 3)])
            for g_rank, p in zip(rank["grads"][step], net.parameters(), strict=True):
                torch.testing.assert_close(g_rank, p.grad)
        optimizer.step()
    for rank in ranks:
        assert rank["pre_clip"] == pytest.approx(pre.item(), rel=1e-5)
        for a, b in zip(rank["params"], net.parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_clips_once_per_optimizer_step_under_accumulation() -> None:
    clipping = GradientClipping(max_norm=0.05)
    trainer, raw, clipped = _fit(clipping, steps=3, accumulate_grad_batches=4)
    assert len(raw.grads) == len(clipped.grads) == 3 == trainer.global_step  # one call per optimizer step
    for before, after in zip(raw.grads, clipped.grads, strict=True):
        total = torch.nn.utils.get_total_norm(before).item()  # the accumulated gradient's norm
        for a, b in zip(after, before, strict=True):
            torch.testing.assert_close(a, b * min(1.0, 0.05 / (total + 1e-6)))


# -- pipeline stages holding different param groups: one collective, norms per group of the whole model -------------

# the whole model: 4 Linear blocks in 3 param groups; stage 0 holds blocks 0-1, stage 1 blocks 2-3 and an empty group
WHOLE_GROUPS = [[0, 2], [1], [3]]
STAGE_GROUPS = [[[0], [1]], [[2], [3], []]]


def _whole_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(4)))
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 0.3
    return model


def _blocks_params(model: torch.nn.Module, blocks: list[int]) -> list[torch.nn.Parameter]:
    return [p for b in blocks for p in model[b].parameters()]


def _stage_clip(rank: int, world_size: int, clipping: GradientClipping, with_layout: bool) -> dict:
    """This rank's stage (the whole model's names, blocks it does not hold removed) clipped by ``clipping`` through
    a stand-in trainer whose strategy reduces norms over the world group; counts the all-reduces of the step."""
    stage = _whole_model()
    owned = {b for group in STAGE_GROUPS[rank] for b in group}
    for index in range(4):
        if index not in owned:
            stage._modules[str(index)] = None
    optimizer = torch.optim.SGD([{"params": _blocks_params(stage, g)} for g in STAGE_GROUPS[rank]], lr=0.1)
    layout = [[f"{b}.{n}" for b in g for n in ("weight", "bias")] for g in WHOLE_GROUPS]
    # the strategy gives the whole model's groups as a list or as a method of (optimizer index, optimizer)
    given = layout if rank == 0 else lambda index, optimizer: layout
    strategy = SimpleNamespace(
        grad_norm_group=dist.group.WORLD, **({"_optimizer_layout": given} if with_layout else {})
    )
    trainer = SimpleNamespace(strategy=strategy, optimizers=[optimizer], gradient_clip_val=None)
    try:
        clipping.on_fit_start(trainer, stage)
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
            clipping.on_before_optimizer_step(trainer, stage, optimizer)
    except ValueError as error:
        return {"error": str(error)}
    return {"grads": {n: p.grad.clone() for n, p in stage.named_parameters()}, "all_reduces": all_reduce.call_count}


def _reference(max_norm, norm_type: float) -> dict[str, torch.Tensor]:
    """One process, the whole model's optimizer with its 3 groups, clipped with torch's norms."""
    model = _whole_model()
    groups = [_blocks_params(model, g) for g in WHOLE_GROUPS]
    if isinstance(max_norm, list):
        for params, limit in zip(groups, max_norm, strict=True):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type).item()
            for p in params:
                p.grad.mul_(min(1.0, limit / (norm + 1e-6)))
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    return {n: p.grad for n, p in model.named_parameters()}


def _stage_runs(rank: int, world_size: int) -> list[dict]:
    runs = [
        (GradientClipping(max_norm=[0.3, 10.0, 0.2], log_norm=False), True),  # 3 groups; stage counts 2 and 3
        (GradientClipping(max_norm=0.5, log_norm=False), True),
        (GradientClipping(max_norm=0.5, norm_type=float("inf"), log_norm=False), True),
        (GradientClipping(max_norm=0.5, log_norm=False), False),  # no layout: one slot for the global norm
        (GradientClipping(max_norm=[0.3, 10.0], log_norm=False), False),  # no layout: per-group refused
    ]
    return [_stage_clip(rank, world_size, clipping, with_layout) for clipping, with_layout in runs]


@pytest.mark.distributed
def test_stages_with_different_group_counts_clip_with_the_whole_model_norms() -> None:
    """Stage 0 holds 2 param groups, stage 1 three (one empty): per-group thresholds apply to each group's norm over
    both stages, the global 2- and inf-norm equal one process's, one all-reduce per step; without the whole
    model's groups the global norm is still right and per-group thresholds are refused on every rank."""
    ranks = run_distributed(_stage_runs, 2, timeout=120)
    expected = [_reference([0.3, 10.0, 0.2], 2.0), _reference(0.5, 2.0), _reference(0.5, float("inf"))]
    expected.append(expected[1])
    for run, reference in enumerate(expected):
        for rank, results in enumerate(ranks):
            result = results[run]
            assert result["all_reduces"] == 1, (run, rank)  # the group counts were compared in on_fit_start
            held = {f"{b}.{n}" for g in STAGE_GROUPS[rank] for b in g for n in ("weight", "bias")}
            assert set(result["grads"]) == held
            for name, grad in result["grads"].items():
                torch.testing.assert_close(grad, reference[name], msg=lambda m, n=name, r=run: f"run {r} {n}: {m}")
    # a reference that clips group 0 and 2 but not group 1 (threshold 10): the test would see a wrong grouping
    raw = {n: p.grad for n, p in _whole_model().named_parameters()}
    assert not torch.equal(expected[0]["0.weight"], raw["0.weight"])
    assert torch.equal(expected[0]["1.weight"], raw["1.weight"])
    for results in ranks:
        assert "between 2 and 3 param groups" in results[4]["error"]
