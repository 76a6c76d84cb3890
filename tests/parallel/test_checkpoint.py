"""Sharded checkpoints across layouts, at torch level: Adam trained under pp2 × tp2 (pruned stages holding DTensor
shards), saved, loaded under dp2 × tp2, FSDP2 over 4 ranks, pp2 × dp2 and in one process, each save and load compared
with one process training the whole model on the same gradients (model, Adam moments and step counts exact)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_dl.parallel.checkpoint import (
    NAMES_KEY,
    convert,
    is_sharded,
    load_sharded,
    optimizer_names,
    read_extra,
    save_sharded,
    to_full,
    to_sharded,
)
from tests.helpers.distributed import run_distributed

STEPS = 3
EXACT = {"rtol": 0.0, "atol": 0.0}  # Adam is elementwise: a shard's update is the whole update's slice, bit for bit


def _model() -> nn.Sequential:
    """Four blocks, each a Linear pair (TP splits the first column-wise, the second row-wise) and a BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.BatchNorm1d(8)) for _ in range(4))
    )


def _adam(module: nn.Module) -> torch.optim.Adam:
    """Two param groups (weights; biases and norms) with their own learning rates."""
    weights = [p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2]
    others = [p for n, p in module.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    groups = [{"params": weights, "lr": 1e-2}, {"params": others, "lr": 3e-3, "weight_decay": 0.1}]
    return torch.optim.Adam(groups, foreach=False)


def _reference(steps: int) -> tuple[nn.Sequential, torch.optim.Adam, list[dict[str, torch.Tensor]]]:
    """One process: ``steps`` Adam steps on random batches; the gradients of each step by name."""
    model, generator = _model(), torch.Generator().manual_seed(1)
    optimizer, grads = _adam(model), []
    for _ in range(steps):
        model(torch.randn(16, 8, generator=generator)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, grads


def _state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: _full(v) for k, v in s.items()} for p, s in optimizer.state.items()}


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, **EXACT, msg=lambda m: f"{what}: {m}")


def _full(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() if torch.is_tensor(t) else t


# --- inside the processes -----------------------------------------------------------------------------------------
def _layout(name: str, rank: int) -> tuple[nn.Module, torch.optim.Adam]:
    """This rank's part of the initial model under ``name``, built as the engine builds it: pipeline stages by
    deleting the blocks the rank does not own (names kept), TP on the Linear pairs, FSDP2 over dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lightning_dl.parallel.pipeline.split import split_model

    model = _model()
    if name == "fsdp4":
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, _adam(model)
    dims = {"pp2,tp2": ("pp", "tp"), "dp2,tp2": ("dp", "tp"), "pp2,dp2": ("pp", "dp")}[name]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=dims)
    owned = range(4)
    if "pp" in dims:
        stage = mesh["pp"].get_local_rank()
        owned = range(2 * stage, 2 * stage + 2)
        split_model(model, list(model), keep=owned)
    if "tp" in dims:
        plan = {f"{i}.{j}": ColwiseParallel() if j == 0 else RowwiseParallel() for i in owned for j in (0, 2)}
        parallelize_module(model, mesh["tp"], plan)
    return model, _adam(model)


def _train_as_reference(model: nn.Module, optimizer: torch.optim.Optimizer, grads: list[dict]) -> None:
    """Adam steps on the reference's gradients, cut to each parameter's layout (so the optimizer under the layout
    makes its own state), and the reference's BatchNorm statistics."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    for step in grads:
        for name, p in params.items():
            g = step[name]
            p.grad = (
                distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(p, DTensor)
                else g.clone()
            )
        optimizer.step()
        optimizer.zero_grad()


def _copy_buffers(model: nn.Module, steps: int) -> None:
    """The reference's BatchNorm statistics after ``steps`` (the layouts never run a forward)."""
    buffers = dict(_reference(steps)[0].named_buffers())
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    return {
        "model": {k: _full(v) for k, v in sorted(state.items())},
        "optimizer": _state_by_name(model, optimizer),
        "dtensor_state": sum(isinstance(v, DTensor) for s in optimizer.state.values() for v in s.values()),
        "groups": optimizer_names(optimizer, model),
        "lrs": [g["lr"] for g in optimizer.param_groups],
    }


def _across_layouts(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    _, _, grads = _reference(STEPS + 1)
    out: dict[str, Any] = {}
    # trained under pp2 x tp2 for STEPS steps, saved
    model, optimizer = _layout("pp2,tp2", rank)
    _train_as_reference(model, optimizer, grads[:STEPS])
    _copy_buffers(model, STEPS)
    save_sharded(f"{tmp}/pp2_tp2", model, [optimizer], {"global_step": STEPS, "loops": {"rank": rank}})
    out["pp2,tp2 saved"] = _snapshot(model, optimizer)
    # loaded under dp2 x tp2 (replicas of TP shards), one more step there, saved
    model, optimizer = _layout("dp2,tp2", rank)
    out["extra"] = load_sharded(f"{tmp}/pp2_tp2", model, [optimizer])
    out["dp2,tp2 loaded"] = _snapshot(model, optimizer)
    _train_as_reference(model, optimizer, grads[STEPS:])
    _copy_buffers(model, STEPS + 1)
    save_sharded(f"{tmp}/dp2_tp2", model, [optimizer], {"global_step": STEPS + 1})
    out["dp2,tp2 stepped"] = _snapshot(model, optimizer)
    # loaded under FSDP2 over 4 ranks, saved again
    model, optimizer = _layout("fsdp4", rank)
    load_sharded(f"{tmp}/dp2_tp2", model, [optimizer])
    out["fsdp4 loaded"] = _snapshot(model, optimizer)
    save_sharded(f"{tmp}/fsdp4", model, [optimizer], {"global_step": STEPS + 1})
    # loaded under pp2 x dp2 (pruned stages of plain tensors, replicated), saved again
    model, optimizer = _layout("pp2,dp2", rank)
    load_sharded(f"{tmp}/fsdp4", model, [optimizer])
    out["pp2,dp2 loaded"] = _snapshot(model, optimizer)
    save_sharded(f"{tmp}/pp2_dp2", model, [optimizer], {"global_step": STEPS + 1})
    # a folder converted from a one-process file without names (state by flat index): a stage needs the whole
    # model's names per param group
    model, optimizer = _layout("pp2,dp2", rank)
    try:
        load_sharded(f"{tmp}/by_index", model, [optimizer])
    except ValueError as err:
        out["by index, no names"] = str(err)
    whole = _model()
    load_sharded(f"{tmp}/by_index", model, [optimizer], optimizer_names=[optimizer_names(_adam(whole), whole)])
    out["by index"] = _snapshot(model, optimizer)
    # a rank that lacks entries fails every rank (none waits in DCP's collectives)
    if rank >= 2:
        model.add_module("extra", nn.Linear(1, 1))
    try:
        load_sharded(f"{tmp}/pp2_dp2", model, [])
    except KeyError as err:
        out["error"] = str(err)
    return out


# --- checks -------------------------------------------------------------------------------------------------------
def _check_snapshot(got: dict, model: nn.Module, optimizer: torch.optim.Optimizer, what: str) -> None:
    want_model = model.state_dict()
    want_optimizer = _state_by_name(model, optimizer)
    assert got["model"], what
    for key, value in got["model"].items():
        _same(value, want_model[key], f"{what} {key}")
    assert set(got["optimizer"]) == {n for n, _ in model.named_parameters() if n in got["model"]}, what
    for name, state in got["optimizer"].items():
        for key, value in state.items():
            _same(value, want_optimizer[name][key], f"{what} {name}.{key}")
    assert got["lrs"] == [1e-2, 3e-3], what


def _check_full(checkpoint: dict, model: nn.Module, optimizer: torch.optim.Optimizer, what: str) -> None:
    """A one-process checkpoint dict: strict load into the plain model, optimizer state in its order, exact."""
    fresh = _model()
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert list(checkpoint["state_dict"]) == list(model.state_dict()), what  # the whole model's order
    for key, value in model.state_dict().items():
        _same(checkpoint["state_dict"][key], value, f"{what} {key}")
    fresh_optimizer = _adam(fresh)
    fresh_optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    want, got = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"], what
    assert set(got["state"]) == set(want["state"]), what
    for index, state in want["state"].items():
        for key, value in state.items():
            _same(got["state"][index][key], value, f"{what} {index}.{key}")


@pytest.mark.distributed
def test_adam_state_survives_every_layout_change(tmp_path: Path) -> None:
    model, optimizer, _ = _reference(STEPS)
    one_process_file = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    to_sharded(one_process_file, tmp_path / "by_index")
    results = run_distributed(_across_layouts, 4, str(tmp_path), timeout=300)
    stepped_model, stepped_optimizer, _ = _reference(STEPS + 1)
    for rank, got in enumerate(results):
        _check_snapshot(got["pp2,tp2 saved"], model, optimizer, f"rank {rank} saved under pp2,tp2")
        assert got["pp2,tp2 saved"]["dtensor_state"] > 0  # the Adam moments of TP shards are DTensors
        _check_snapshot(got["dp2,tp2 loaded"], model, optimizer, f"rank {rank} loaded under dp2,tp2")
        assert got["extra"] == {"global_step": STEPS, "loops": {"rank": 0}}  # rank 0's rest
        _check_snapshot(got["dp2,tp2 stepped"], stepped_model, stepped_optimizer, f"rank {rank} stepped under dp2,tp2")
        _check_snapshot(got["fsdp4 loaded"], stepped_model, stepped_optimizer, f"rank {rank} loaded under fsdp4")
        assert got["fsdp4 loaded"]["dtensor_state"] > 0
        _check_snapshot(got["pp2,dp2 loaded"], stepped_model, stepped_optimizer, f"rank {rank} loaded under pp2,dp2")
        assert len(got["pp2,dp2 loaded"]["model"]) == len(stepped_model.state_dict()) // 2  # a pruned stage
        assert got["pp2,dp2 loaded"]["groups"][0][0] == ("0.0.weight" if rank < 2 else "2.0.weight")
        assert (
            "keyed by flat index (converted from a file without parameter names): pass `optimizer_names`"
            in got["by index, no names"]
        )
        _check_snapshot(got["by index"], model, optimizer, f"rank {rank} by index under pp2,dp2")
        assert re.fullmatch(
            r"\"rank 2: the checkpoint .*pp2_dp2 lacks \['extra.weight', 'extra.bias'\] .*\"", got["error"]
        )
    # one process, no model code: every folder as Lightning's one-process dict
    _check_full(to_full(tmp_path / "pp2_tp2"), model, optimizer, "to_full(pp2,tp2)")
    for folder in ("dp2_tp2", "fsdp4", "pp2_dp2"):
        _check_full(to_full(tmp_path / folder), stepped_model, stepped_optimizer, f"to_full({folder})")
    # one process with the model: load the pp2 x tp2 folder and continue; equals the reference's next step
    one = _model()
    one_optimizer = _adam(one)
    assert load_sharded(tmp_path / "pp2_tp2", one, [one_optimizer]) == {"global_step": STEPS, "loops": {"rank": 0}}
    _check_snapshot(_snapshot(one, one_optimizer), model, optimizer, "one process")
    _, _, grads = _reference(STEPS + 1)
    for name, p in one.named_parameters():
        p.grad = grads[STEPS][name].clone()
    one_optimizer.step()
    _copy_buffers(one, STEPS + 1)
    _check_snapshot(_snapshot(one, one_optimizer), stepped_model, stepped_optimizer, "one process after a step")


# --- one process --------------------------------------------------------------------------------------------------
def test_one_process_round_trip_and_conversions(tmp_path: Path) -> None:
    model, optimizer, _ = _reference(STEPS)
    extra = {"epoch": 0, "global_step": STEPS, "lr_schedulers": [{"last_epoch": 3}], "state_dict": "ignored"}
    save_sharded(tmp_path / "ckpt", model, [optimizer], extra)
    assert is_sharded(tmp_path / "ckpt") and not is_sharded(tmp_path)
    assert read_extra(tmp_path / "ckpt") == {"epoch": 0, "global_step": STEPS, "lr_schedulers": [{"last_epoch": 3}]}
    full = to_full(tmp_path / "ckpt")
    assert full[NAMES_KEY] == [optimizer_names(optimizer, model)]
    _check_full(full, model, optimizer, "to_full")
    # full -> sharded -> full keeps everything; a one-process Lightning file without names keys by flat index
    to_sharded(full, tmp_path / "again")
    _check_full(to_full(tmp_path / "again"), model, optimizer, "full -> sharded -> full")
    nameless = {k: v for k, v in full.items() if k != NAMES_KEY}
    to_sharded(nameless, tmp_path / "by_index")
    by_index = to_full(tmp_path / "by_index")
    assert NAMES_KEY not in by_index
    _check_full(by_index, model, optimizer, "by index")
    one = _model()
    one_optimizer = _adam(one)
    load_sharded(tmp_path / "by_index", one, [one_optimizer])  # one process: its own optimizer order
    _check_snapshot(_snapshot(one, one_optimizer), model, optimizer, "by index, loaded")
    # the convert() paths between files and folders
    torch.save(full, tmp_path / "full.ckpt")
    assert convert(tmp_path / "full.ckpt", tmp_path / "converted", to="sharded") == tmp_path / "converted"
    convert(tmp_path / "converted", tmp_path / "back.ckpt", to="full")
    _check_full(torch.load(tmp_path / "back.ckpt", weights_only=False), model, optimizer, "convert round trip")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_strict_and_missing_optimizer_errors(tmp_path: Path) -> None:
    model, optimizer, _ = _reference(1)
    save_sharded(tmp_path / "weights", model, [], {})
    bigger = nn.Sequential(*_model(), nn.Linear(8, 2))
    with pytest.raises(KeyError, match=r"lacks \['4.weight', '4.bias'\] \(of 2 entries this rank holds\)"):
        load_sharded(tmp_path / "weights", bigger, [])
    load_sharded(tmp_path / "weights", bigger, [], strict=False)
    torch.testing.assert_close(bigger[0][0].weight, model[0][0].weight, **EXACT)
    with pytest.raises(KeyError, match=r"holds no state of optimizer 0 \(saved with weights only\?\)"):
        load_sharded(tmp_path / "weights", _model(), [_adam(_model())])
    save_sharded(tmp_path / "ckpt", model, [optimizer], {})
    other = _model()
    with pytest.raises(
        ValueError, match=r"param group 0 of the optimizer holds parameters of the checkpoint's param groups \[0, 1\]"
    ):
        load_sharded(tmp_path / "ckpt", other, [torch.optim.Adam(other.parameters())])
    with pytest.raises(ValueError, match=r"is not a sharded checkpoint folder"):
        read_extra(tmp_path)


def test_a_file_in_the_way_is_replaced_and_an_old_save_is_overwritten(tmp_path: Path) -> None:
    model, optimizer, _ = _reference(1)
    (tmp_path / "ckpt").write_text("an older one-file checkpoint")
    save_sharded(tmp_path / "ckpt", model, [optimizer], {"global_step": 1})
    later, later_optimizer, _ = _reference(2)
    save_sharded(tmp_path / "ckpt", later, [later_optimizer], {"global_step": 2})
    _check_full(to_full(tmp_path / "ckpt"), later, later_optimizer, "overwritten")
    assert read_extra(tmp_path / "ckpt") == {"global_step": 2}
    assert optimizer_names(later_optimizer, later)[1][0] == "0.0.bias"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match=r"`path='.*notes'` is a folder that holds no checkpoint"):
        save_sharded(tmp_path / "notes", later, [later_optimizer], {})
    assert (tmp_path / "notes" / "todo.txt").read_text() == "not a checkpoint"


def test_a_stage_holding_fewer_param_groups_loads_its_part(tmp_path: Path) -> None:
    """The whole model's optimizer has a group for block 0 alone; the stage of blocks 2 and 3 drops it (empty)."""
    from lightning_dl.parallel.pipeline.split import split_model

    model = _model()
    rest = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    optimizer = torch.optim.Adam([{"params": rest}, {"params": model[0].parameters(), "lr": 1e-4}], lr=1e-2)
    model(torch.randn(16, 8)).square().mean().backward()
    optimizer.step()
    save_sharded(tmp_path / "ckpt", model, [optimizer], {})
    stage = _model()
    split_model(stage, list(stage), keep=[2, 3])
    stage_optimizer = torch.optim.Adam(stage.parameters(), lr=0.5)
    load_sharded(tmp_path / "ckpt", stage, [stage_optimizer])
    assert stage_optimizer.param_groups[0]["lr"] == 1e-2 and len(stage_optimizer.param_groups) == 1
    want = _state_by_name(model, optimizer)
    got = _state_by_name(stage, stage_optimizer)
    assert set(got) == {n for n, _ in stage.named_parameters()} and len(got) == 12
    for name, state in got.items():
        for key, value in state.items():
            _same(value, want[name][key], f"{name}.{key}")


def test_a_folder_written_as_lightning_model_parallel_writes_it_loads(tmp_path: Path) -> None:
    """Lightning's ModelParallelStrategy saves ``{"state_dict": get_model_state_dict(model), "optimizer_0":
    get_optimizer_state_dict(model, optimizer)}`` with DCP and the rest with ``torch.save`` to ``meta.pt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optimizer, _ = _reference(STEPS)
    state = {"state_dict": get_model_state_dict(model), "optimizer_0": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # DCP says it saves in one process: meant here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=tmp_path / "lightning", no_dist=True)
    torch.save({"global_step": STEPS}, tmp_path / "lightning" / "meta.pt")
    assert is_sharded(tmp_path / "lightning")
    _check_full(to_full(tmp_path / "lightning"), model, optimizer, "Lightning's folder, to_full")
    one = _model()
    one_optimizer = _adam(one)
    assert load_sharded(tmp_path / "lightning", one, [one_optimizer]) == {"global_step": STEPS}
    _check_snapshot(_snapshot(one, one_optimizer), model, optimizer, "Lightning's folder, loaded")
