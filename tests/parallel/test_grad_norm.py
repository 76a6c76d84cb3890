"""Gradient norms: equal to torch's on one process, and to the single-process norm when parameters are sharded
(DTensor) or split across stages (process group)."""

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lightning_dl.parallel.grad_norm import MicroBatchGradSquares, total_norm
from tests.helpers.distributed import run_distributed


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g), torch.randn(6, generator=g), torch.randn(4, 4, 2, generator=g) * 3]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_total_norm_equals_torch(norm_type) -> None:
    tensors = _tensors()
    expected = torch.nn.utils.get_total_norm(tensors, norm_type)
    torch.testing.assert_close(total_norm(tensors, norm_type), expected)


def test_total_norm_rejects_bad_norm_type() -> None:
    with pytest.raises(ValueError, match=r"`norm_type` must be > 0 \(2.0, 1.0 or inf\), got -1"):
        total_norm(_tensors(), -1)


def _sharded_norms(rank: int, world_size: int) -> list[float]:
    mesh = init_device_mesh("cpu", (world_size,))
    full = _tensors()
    dtensors = [
        distribute_tensor(full[0], mesh, [Shard(0)]),  # column-parallel weight
        distribute_tensor(full[1], mesh, [Replicate()]),  # replicated bias: counted once
        distribute_tensor(full[2], mesh, [Shard(1)]),
    ]
    assert dtensors[0].to_local().shape == (8 // world_size, 6)
    return [total_norm(dtensors, p).item() for p in (2.0, 1.0, math.inf)]


def _stage_norms(rank: int, world_size: int) -> list[float]:
    full = _tensors()
    mine = [full[i] for i in range(len(full)) if i % world_size == rank]  # each stage holds different tensors
    return [total_norm(mine, p, group=dist.group.WORLD).item() for p in (2.0, 1.0, math.inf)]


def _one_stage_without_gradients(rank: int, world_size: int) -> list[float]:
    mine = _tensors() if rank == 0 else []  # the other stage got no gradients: it must still join the reduction
    return [total_norm(mine, p, group=dist.group.WORLD).item() for p in (2.0, 1.0, math.inf)]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout", [_sharded_norms, _stage_norms, _one_stage_without_gradients], ids=["dtensor", "stages", "empty-stage"]
)
def test_distributed_norm_equals_single_process_norm(layout) -> None:
    ranks = run_distributed(layout, 2, timeout=120)
    expected = [torch.nn.utils.get_total_norm(_tensors(), p).item() for p in (2.0, 1.0, math.inf)]
    for norms in ranks:
        assert norms == pytest.approx(expected, rel=1e-5)


def test_micro_batch_squares_sum_each_backward_and_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    squares = MicroBatchGradSquares([[a], [b]], coordinates={id(a): torch.arange(3), id(b): torch.tensor([0, 1])})
    inputs = [
        (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0])),
        (torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0])),
    ]
    for xa, xb in inputs:
        ((a * xa).sum() + (b * xb).sum()).backward()
    torch.testing.assert_close(squares.pop(), torch.tensor([5.0 + 2.0, 9.0 + 2.0]))
    torch.testing.assert_close(squares.pop_elementwise([a, b]), torch.tensor([1.0, 5.0, 1.0, 10.0, 1.0]))
    assert squares.pop() is None and squares.pop_elementwise([a, b]) is None
    squares.remove()
    (a.sum()).backward()
    assert squares.pop() is None  # hooks removed
