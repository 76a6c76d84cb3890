"""PipelineEngine on 2 gloo processes against one process running the same micro-batches: every torch schedule,
with gradient accumulation, BatchNorm in a non-first stage, forward-only evaluation and a timeline."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_dl.parallel.pipeline import (
    SCHEDULES,
    PipelineEngine,
    TimelineRecorder,
    bubble_fraction,
    materialize,
    param_counts,
    partition_costs,
    resolve_stages_per_rank,
    split_model,
    stage_ids,
)
from tests.helpers.distributed import run_distributed

BATCH, FEATURES, M, STEPS, ACCUMULATE = 8, 6, 4, 2, 2


def make_model(seed: int = 0) -> nn.Sequential:
    """Eight blocks in float64 (summation order differs between schedules; float32 would blur the comparison near
    zero, e.g. the bias before a BatchNorm); block 5 holds a BatchNorm (a non-first stage under every split)."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = [nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh()) for _ in range(8)]
    blocks[5] = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES), nn.Tanh())
    blocks[7] = nn.Linear(FEATURES, 1)
    return nn.Sequential(*blocks).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, FEATURES, generator=generator, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS * ACCUMULATE)
    ]


def reference() -> dict:
    """One process: each batch as M micro-batches, loss / (M · ACCUMULATE), SGD after ACCUMULATE batches."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    data = batches()
    for step in range(STEPS):
        for x, y in data[step * ACCUMULATE : (step + 1) * ACCUMULATE]:
            micro = [F.mse_loss(model(xm), ym) for xm, ym in zip(x.chunk(M), y.chunk(M), strict=True)]
            for loss in micro:
                (loss / (M * ACCUMULATE)).backward()
            losses.append(torch.stack(micro).mean().detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        eval_loss = F.mse_loss(model(data[0][0][:6]), data[0][1][:6])
    return {"losses": losses, "grads": grads, "state": model.state_dict(), "eval": eval_loss}


def _run_schedule(rank: int, schedule: str) -> dict:
    pp = dist.get_world_size()
    spr = resolve_stages_per_rank(schedule, None)
    model = make_model()
    blocks = list(model)
    balance = partition_costs(param_counts(blocks), pp * spr)
    owned = [i for s in stage_ids(schedule, rank, pp, spr) for i in range(sum(balance[:s]), sum(balance[: s + 1]))]
    split_model(model, blocks, owned)
    recorder = TimelineRecorder(rank)
    engine = PipelineEngine(
        blocks, balance, schedule=schedule, n_microbatches=M, stages_per_rank=spr, loss_fn=F.mse_loss, recorder=recorder
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    data = batches()
    for step in range(STEPS):
        recorder.step = step
        for x, y in data[step * ACCUMULATE : (step + 1) * ACCUMULATE]:
            losses.append(engine.train_step(x, y, loss_scale=1 / ACCUMULATE))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    recorder.step = None
    model.eval()
    eval_loss = engine.eval_step(data[0][0][:6], data[0][1][:6])
    return {
        "losses": losses,
        "grads": grads,
        "state": model.state_dict(),
        "eval": eval_loss,
        "events": recorder.events,
    }


def _every_schedule(rank: int, world_size: int) -> dict:
    return {schedule: _run_schedule(rank, schedule) for schedule in SCHEDULES}


@pytest.mark.distributed
def test_every_schedule_matches_one_process() -> None:
    expected = reference()
    results = run_distributed(_every_schedule, 2, timeout=240)
    for schedule in SCHEDULES:
        per_rank = [r[schedule] for r in results]
        for ranked in per_rank:  # the loss is the batch mean, the same on every rank
            torch.testing.assert_close(
                torch.stack(ranked["losses"]), torch.stack(expected["losses"]), rtol=1e-10, atol=1e-12
            )
            torch.testing.assert_close(ranked["eval"], expected["eval"], rtol=1e-10, atol=1e-12)
        names = [set(r["state"]) for r in per_rank]
        assert not names[0] & names[1], f"{schedule}: a parameter lives on both ranks"
        assert names[0] | names[1] == set(expected["state"]), schedule
        for ranked in per_rank:
            for name, value in ranked["state"].items():  # names are the whole model's; BatchNorm statistics too
                torch.testing.assert_close(
                    value, expected["state"][name], rtol=1e-10, atol=1e-12, msg=f"{schedule} {name}"
                )
            for got, want in zip(ranked["grads"], expected["grads"], strict=True):
                for name, grad in got.items():
                    torch.testing.assert_close(grad, want[name], rtol=1e-10, atol=1e-12, msg=f"{schedule} {name}")
        events = [e for r in per_rank for e in r["events"]]
        kinds = {e.kind for e in events}
        assert "F" in kinds and "B" in kinds, schedule
        forwards = [e for e in events if e.kind == "F"]
        assert len(forwards) == STEPS * ACCUMULATE * M * len(per_rank) * resolve_stages_per_rank(schedule, None)
        assert 0.0 <= bubble_fraction(events) < 1.0


def test_materialize_depends_on_the_block_not_the_layout() -> None:
    with torch.device("meta"):
        first, second = make_model(), make_model()
    materialize(list(first), range(8), device=torch.device("cpu"), seed=3)
    materialize(list(second), [5, 2], device=torch.device("cpu"), seed=3)
    for index in (2, 5):
        for a, b in zip(first[index].parameters(), second[index].parameters(), strict=True):
            torch.testing.assert_close(a, b)
    assert second[0][0].weight.is_meta and not first[0][0].weight.is_meta
