"""HybridStrategy with pp = 1 trains any LightningModule (no pipeline methods): Lightning's own ``BoringModel`` under
dp2 and dp4 (a plain gradient all-reduce over dp), Lightning's demo ``Transformer`` under tp2, dp2 × tp2 (TP, then the
all-reduce over dp) and dp2 × tp2 with ``dp_shard=True`` (TP, then FSDP2 over dp) equal one process on the same
global batches: losses, gradients and parameters, ≤ 1e-5 relative, with ``gradient_clip_val`` clipping by the global
norm. Ranks are started by the harness as torchrun would start them; Lightning's DistributedSampler spans dp only."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightning_dl.parallel.comm import leave_together
from lightning_dl.strategies import HybridStrategy
from lightning_dl.strategies.hybrid import plain_state_dict
from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import quiet_trainer
from tests.parallel.tensor.task import CLIP, GradRecorder, Task, assert_matches, global_batches, loader, reference

EPOCHS, BORING_BATCH = 2, 8


class Boring(BoringModel):
    """Lightning's BoringModel (Linear(32, 2), SGD), recording each batch's loss."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.losses.append(out["loss"].item())
        return out


def _boring_data() -> RandomDataset:
    torch.manual_seed(1)
    return RandomDataset(32, 64)


def _boring(layout: str, world: int) -> dict:
    module, recorder = Boring(), GradRecorder()
    trainer = quiet_trainer(
        devices=world,
        strategy=HybridStrategy(layout=layout),
        max_epochs=1,
        gradient_clip_val=CLIP,
        callbacks=[recorder],
    )
    trainer.fit(module, DataLoader(_boring_data(), batch_size=BORING_BATCH))
    return {"losses": module.losses, "grads": recorder.grads, "params": plain_state_dict(module)}


def _boring_reference(dp: int) -> dict:
    """One process on the global batches: step k reads every dp replica's k-th batch of its sampler shard."""
    data = _boring_data()
    shards = [list(DistributedSampler(data, num_replicas=dp, rank=r, shuffle=True, seed=0)) for r in range(dp)]
    b = BORING_BATCH
    order = [i for k in range(len(shards[0]) // b) for s in shards for i in s[k * b : (k + 1) * b]]
    module, recorder = Boring(), GradRecorder()
    trainer = quiet_trainer(max_epochs=1, gradient_clip_val=CLIP, callbacks=[recorder])
    trainer.fit(module, DataLoader(Subset(data, order), batch_size=BORING_BATCH * dp))
    return {"losses": module.losses, "grads": recorder.grads, "params": module.state_dict()}


def _demo(layout: str, world: int, dp_shard: bool = False) -> dict:
    task, recorder = Task("lightning_demo"), GradRecorder()
    strategy = HybridStrategy(layout=layout, dp_shard=dp_shard)
    trainer = quiet_trainer(
        devices=world, strategy=strategy, max_epochs=EPOCHS, gradient_clip_val=CLIP, callbacks=[recorder]
    )
    trainer.fit(task, loader("lightning_demo"))
    meshes = {p.device_mesh.mesh_dim_names for p in task.parameters() if isinstance(p, DTensor)}
    return {"losses": task.losses, "grads": recorder.grads, "params": plain_state_dict(task), "meshes": meshes}


def _two(rank: int, world: int) -> dict:
    return {"dp2": _boring("dp2", world), "tp2": _demo("tp2", world)}


def _four(rank: int, world: int) -> dict:
    return {
        "dp4": _boring("dp4", world),
        "dp2,tp2": _demo("dp2,tp2", world),
        "dp2,tp2 fsdp": _demo("dp2,tp2", world, dp_shard=True),
    }


def _replicas(results: list[dict], key: str, ranks: list[int]) -> dict:
    """Rank ``ranks[0]``'s run with the losses of every dp replica (one rank each) in replica order."""
    return {**results[ranks[0]][key], "losses": [x for r in ranks for x in results[r][key]["losses"]]}


@pytest.mark.distributed
def test_two_processes_dp2_and_tp2_equal_one_process() -> None:
    results = run_distributed(_two, 2, timeout=300)
    assert_matches(_replicas(results, "dp2", [0, 1]), _boring_reference(2), dp=2)
    want = reference("lightning_demo", global_batches("lightning_demo", 1, EPOCHS))
    for result in results:
        assert result["tp2"]["meshes"] == {("tp",)}
        assert_matches(result["tp2"], want)


@pytest.mark.slow
@pytest.mark.distributed
def test_four_processes_dp4_and_dp2_tp2_with_and_without_fsdp_equal_one_process() -> None:
    results = run_distributed(_four, 4, timeout=400)
    assert_matches(_replicas(results, "dp4", [0, 1, 2, 3]), _boring_reference(4), dp=4)
    want = reference("lightning_demo", global_batches("lightning_demo", 2, EPOCHS))
    for key, meshes in (("dp2,tp2", {("tp",)}), ("dp2,tp2 fsdp", {("dp", "tp"), ("dp",)})):
        for rank in range(4):  # rank = dp · 2 + tp
            assert results[rank][key]["meshes"] <= meshes and results[rank][key]["meshes"], key
            assert_matches(_replicas(results, key, [rank % 2, rank % 2 + 2]), want, dp=2)


def test_tp_on_a_module_without_linear_pairs_fails_before_processes_start() -> None:
    trainer = quiet_trainer(devices=2, strategy=HybridStrategy(layout="tp2"), max_steps=1)
    with pytest.raises(ValueError, match=r"`layout='dp1,tp2,pp1'` asks for tp2, but the tensor-parallel plan finds no"):
        trainer.fit(Boring(), DataLoader(_boring_data(), batch_size=BORING_BATCH))


def _leave(rank: int, tmp: str) -> None:
    """A spawned rank of its own group (as the launcher's processes are): rank 1 finishes a second later."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    time.sleep(1.0 * rank)
    start = time.monotonic()
    leave_together()
    torch.save({"waited": time.monotonic() - start, "initialized": dist.is_initialized()}, f"{tmp}/{rank}.pt")


@pytest.mark.distributed
def test_ranks_leave_the_group_together(tmp_path) -> None:
    """The launcher's last step: the first rank to finish waits for the other, then each destroys its group."""
    mp.spawn(_leave, args=(str(tmp_path),), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert [r["initialized"] for r in results] == [False, False]
    assert results[0]["waited"] > 0.5 > results[1]["waited"]
