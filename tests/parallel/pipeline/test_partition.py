"""Partitioning blocks into stages, schedule placement and checks, stage splitting: one process, no Trainer."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_dl.parallel.pipeline import (
    SCHEDULES,
    boundaries,
    check_balance,
    check_microbatches,
    param_counts,
    partition_costs,
    resolve_stages_per_rank,
    split_model,
    stage_costs,
    stage_ids,
    stage_owner,
    stage_shapes,
    time_blocks,
)


def _brute_force(costs: list[float], stages: int) -> float:
    """The smallest largest-stage cost over every contiguous split (literal enumeration)."""
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = [0, *cuts, n]
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(edges)))
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_partition_minimises_the_slowest_stage(seed: int, stages: int) -> None:
    costs = torch.randint(0, 10, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    balance = partition_costs(costs, stages)
    assert len(balance) == stages and sum(balance) == 7 and min(balance) >= 1
    assert max(stage_costs(costs, balance)) == _brute_force(costs, stages)


def test_partition_by_params_and_boundaries() -> None:
    blocks = [nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1)]
    assert param_counts(blocks) == [110, 0, 110, 0, 11]
    balance = partition_costs(param_counts(blocks), 2)
    assert balance == [2, 3]
    assert boundaries(balance) == [(0, 2), (2, 5)]


@pytest.mark.parametrize(
    ("balance", "blocks", "stages", "message"),
    [
        ([2, 2], 5, 2, r"`balance=\[2, 2\]` sums to 4, but the module has 5 pipeline blocks"),
        ([5], 5, 2, r"must list 2 positive integers"),
        ([0, 5], 5, 2, r"must list 2 positive integers"),
        ([1, 1, 1], 2, 3, r"3 pipeline stages need at least 3 blocks, but `pipeline_blocks\(\)` returned 2"),
    ],
)
def test_bad_balance_is_named(balance, blocks, stages, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_balance(balance, blocks, stages)


def test_more_stages_than_blocks() -> None:
    with pytest.raises(ValueError, match="4 pipeline stages need at least 4 blocks"):
        partition_costs([1, 2, 3], 4)


def test_placement_loop_and_v() -> None:
    assert [stage_ids("1f1b", r, 4, 1) for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_ids("looped_bfs", r, 2, 3) for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    for name in ("zbv_zero_bubble", "dualpipev"):  # rank r holds r and 2p - 1 - r
        assert [stage_ids(name, r, 3, 2) for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
        assert [stage_owner(name, s, 3) for s in range(6)] == [0, 1, 2, 2, 1, 0]
    assert [stage_owner("interleaved_1f1b", s, 2) for s in range(4)] == [0, 1, 0, 1]


def test_schedule_checks_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="`schedule='pipedream'` is not a pipeline schedule; valid: gpipe, 1f1b"):
        resolve_stages_per_rank("pipedream", None)
    with pytest.raises(ValueError, match="`stages_per_rank=3` is not allowed by `schedule='zbv_zero_bubble'`"):
        resolve_stages_per_rank("zbv_zero_bubble", 3)
    with pytest.raises(ValueError, match="`stages_per_rank=2` is not allowed by `schedule='1f1b'`"):
        resolve_stages_per_rank("1f1b", 2)
    assert resolve_stages_per_rank("looped_bfs", 3) == 3
    with pytest.raises(
        ValueError, match=r"`n_microbatches=2` is smaller than the 4 pipeline stages; `schedule='1f1b'`"
    ):
        check_microbatches("1f1b", 2, 4, 4)
    with pytest.raises(ValueError, match=r"`n_microbatches=5` does not suit `schedule='interleaved_1f1b'`"):
        check_microbatches("interleaved_1f1b", 5, 4, 2)
    check_microbatches("gpipe", 1, 4, 4)
    assert set(SCHEDULES) == {
        "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble", "dualpipev"
    }  # fmt: skip


def test_split_keeps_names_and_frees_the_rest() -> None:
    torch.manual_seed(0)
    root = nn.Module()
    root.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    blocks = list(root.net)
    shadows = split_model(root, blocks, keep=[1, 2])
    assert list(root.state_dict()) == [
        "net.1.weight", "net.1.bias", "net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked",
        "net.2.weight", "net.2.bias",
    ]  # fmt: skip
    assert shadows[0].weight.is_meta and not shadows[2].weight.is_meta
    before = root.net[1].running_mean.clone()
    shapes = stage_shapes(shadows, [(0, 2), (2, 3)], torch.zeros(8, 4, dtype=torch.float32))
    assert [tuple(t.shape) for pair in shapes for t in pair] == [(8, 4), (8, 4), (8, 4), (8, 2)]
    torch.testing.assert_close(root.net[1].running_mean, before)  # the meta forward left the statistics alone


def test_split_rejects_parameters_outside_blocks() -> None:
    root = nn.Module()
    root.net = nn.Sequential(nn.Linear(2, 2))
    root.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=r"parameters \['scale'\] belong to no block"):
        split_model(root, list(root.net), keep=[0])


def test_time_blocks_leaves_model_untouched() -> None:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 1)]
    before = [t.clone() for b in blocks for t in b.state_dict().values()]
    x = torch.randn(8, 4)
    state = torch.random.get_rng_state()
    times = time_blocks(blocks, x, repeats=3)
    assert len(times.seconds) == 2 and all(s > 0 for s in times.seconds)
    assert times.predict([1, 1]) == times.seconds
    for a, b in zip(before, [t for blk in blocks for t in blk.state_dict().values()], strict=True):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for b in blocks for p in b.parameters())
    assert torch.equal(state, torch.random.get_rng_state())
