"""Split an ordered list of blocks into contiguous pipeline stages: by parameter count, by measured time, or by an
explicit list of blocks per stage. Pure functions plus one timing helper; torch only."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


def check_balance(balance: Sequence[int], num_blocks: int, num_stages: int) -> list[int]:
    """Validate an explicit ``balance`` (blocks per stage) and return it as a list.

    Example::

        >>> check_balance([2, 1], num_blocks=3, num_stages=2)
        [2, 1]
    """
    check_stages(num_blocks, num_stages)
    values = list(balance)
    if len(values) != num_stages or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise ValueError(
            f"`balance={values!r}` must list {num_stages} positive integers (blocks per stage, one per stage)."
        )
    if sum(values) != num_blocks:
        raise ValueError(
            f"`balance={values!r}` sums to {sum(values)}, but the module has {num_blocks} pipeline blocks: "
            f"give blocks per stage that sum to {num_blocks}."
        )
    return values


def check_stages(num_blocks: int, num_stages: int) -> None:
    """Every stage needs at least one block."""
    if num_stages < 1:
        raise ValueError(f"the number of pipeline stages must be >= 1, got {num_stages}.")
    if num_stages > num_blocks:
        raise ValueError(
            f"{num_stages} pipeline stages need at least {num_stages} blocks, but `pipeline_blocks()` returned "
            f"{num_blocks}: use fewer stages (devices / data_parallel_size, times stages_per_rank) or finer blocks."
        )


def partition_costs(costs: Sequence[float], num_stages: int) -> list[int]:
    """Blocks per stage for contiguous stages that minimise the largest stage cost (ties: the smallest sum of
    squared stage costs, then of squared blocks per stage, so zero-cost blocks spread out). Exact dynamic programme,
    O(stages · blocks²).

    Example::

        >>> partition_costs([4, 1, 1, 1, 1], num_stages=2)
        [1, 4]
        >>> partition_costs([1, 1, 1, 1], num_stages=4)
        [1, 1, 1, 1]
    """
    n = len(costs)
    check_stages(n, num_stages)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = (float("inf"), float("inf"), float("inf"))
    # best[k][i]: (max cost, sum of squared costs, sum of squared sizes) of the first i blocks in k stages;
    # cut[k][i]: where the k-th stage starts
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0, 0.0)
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                prev = best[k - 1][j]
                if prev == inf:
                    continue
                stage = prefix[i] - prefix[j]
                value = (max(prev[0], stage), prev[1] + stage * stage, prev[2] + (i - j) ** 2)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def stage_costs(costs: Sequence[float], balance: Sequence[int]) -> list[float]:
    """The summed cost of each stage under ``balance``.

    Example::

        >>> stage_costs([4, 1, 1, 1, 1], [1, 4])
        [4.0, 4.0]
    """
    out, start = [], 0
    for size in balance:
        out.append(float(sum(costs[start : start + size])))
        start += size
    return out


def boundaries(balance: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` block ranges of each stage.

    Example::

        >>> boundaries([2, 1, 3])
        [(0, 2), (2, 3), (3, 6)]
    """
    out, start = [], 0
    for size in balance:
        out.append((start, start + size))
        start += size
    return out


def param_counts(blocks: Sequence[nn.Module]) -> list[int]:
    """Parameters of each block (meta parameters count too)."""
    return [sum(p.numel() for p in block.parameters()) for block in blocks]


@dataclass(frozen=True)
class BlockTimes:
    """Forward+backward seconds of each block on one micro-batch (median of ``repeats``)."""

    seconds: list[float]

    def predict(self, balance: Sequence[int]) -> list[float]:
        """Predicted seconds of each stage under ``balance``."""
        return stage_costs(self.seconds, balance)


def time_blocks(
    blocks: Sequence[nn.Module],
    micro_input: torch.Tensor,
    *,
    repeats: int = 3,
    clock: Callable[[], float] | None = None,
) -> BlockTimes:
    """Time each block's forward and backward on one micro-batch, in order (block i gets block i-1's output).

    Buffers (BatchNorm's running statistics) are cloned for the timing and the RNG state is restored, so timing
    leaves the model and the training run exactly as they were; gradients are taken with ``autograd.grad`` and
    never written into ``.grad``.
    """
    clock = clock or time.perf_counter
    seconds: list[float] = []
    x = micro_input
    with torch.random.fork_rng(devices=[]):
        for block in blocks:
            params = dict(block.named_parameters())
            state = {**params, **{n: b.clone() for n, b in block.named_buffers()}}
            x_in = x.detach().requires_grad_(x.is_floating_point())
            samples = []
            for _ in range(repeats):
                start = clock()
                y = functional_call(block, state, (x_in,))
                inputs = [t for t in (x_in, *params.values()) if t.requires_grad]
                if y.requires_grad and inputs:
                    torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
                samples.append(clock() - start)
            seconds.append(sorted(samples)[len(samples) // 2])
            x = y.detach()
    return BlockTimes(seconds)
