"""``apply_tp`` on 2 gloo ranks equals one process: losses, gradients and parameters after several SGD steps, on
models written by others (torch's TransformerEncoder, Lightning's demo Transformer) and ours; applying twice is a
no-op; tied weights stay tied."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from lightning_dl.parallel.tensor import apply_tp
from tests.helpers.distributed import run_distributed
from tests.parallel.tensor.models import MODELS, batch, build, loss_fn

STEPS = 3


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _train(model: torch.nn.Module, name: str, parallel_loss: bool) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        with loss_parallel() if parallel_loss else nullcontext():
            loss = loss_fn(name)(model, batch(name, step))
            loss.backward()
        losses.append(_full(loss).item())
        grads.append({n: _full(p.grad).clone() for n, p in model.named_parameters()})
        optimizer.step()
    return {
        "losses": losses,
        "grads": grads,
        "params": {n: _full(p).detach().clone() for n, p in model.named_parameters()},
    }


def _compare_models(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    results = {}
    for name in MODELS:
        reference = build(name)
        model = copy.deepcopy(reference)
        parallel_loss = name.startswith("transformer_lm")
        plan = apply_tp(model, mesh, loss_parallel=parallel_loss)
        again = apply_tp(model, mesh, loss_parallel=parallel_loss)
        results[name] = {
            "tp": _train(model, name, parallel_loss),
            "ref": _train(reference, name, False),
            "sharded": plan.sharded_names,
            "same_plan": again is plan,
            "dtensors": sum(isinstance(p, DTensor) for p in model.parameters()),
            "tied": name != "transformer_lm_tied" or model.head[1].weight is model.embed.token.weight,
        }
    # sequence parallelism between the pairs (with loss parallel) gives the same numbers too
    model = build("transformer_lm")
    plan = apply_tp(model, mesh, loss_parallel=True, sequence_parallel=True)
    results["transformer_lm_sp"] = {
        "tp": _train(model, "transformer_lm", True),
        "ref": _train(build("transformer_lm"), "transformer_lm", False),
        "styles": {e.name: e.style for e in plan.entries},
    }
    try:
        model(torch.zeros(2, 7, dtype=torch.long))
    except ValueError as err:
        results["transformer_lm_sp"]["odd_length"] = str(err)
    # a dict plan with torch styles and a callable plan give the same numbers
    for label, plan in (
        ("dict", {"0": ColwiseParallel(), "2": "rowwise"}),
        ("callable", lambda m, mesh: parallelize_module(m, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})),
    ):
        model = build("mlp")
        apply_tp(model, mesh, plan)
        results[f"mlp_{label}"] = {"tp": _train(model, "mlp", False), "ref": _train(build("mlp"), "mlp", False)}
    return results


@pytest.mark.distributed
def test_tp2_equals_one_process_on_library_and_own_models() -> None:
    ranks = run_distributed(_compare_models, 2, timeout=240)
    for name in MODELS:
        result = ranks[0][name]
        assert result["same_plan"] and result["tied"], name
        assert result["dtensors"] > 0 and result["sharded"], name
        torch.testing.assert_close(result["tp"]["losses"], result["ref"]["losses"], rtol=1e-5, atol=1e-6)
        for step in range(STEPS):
            for key, grad in result["ref"]["grads"][step].items():
                torch.testing.assert_close(result["tp"]["grads"][step][key], grad, rtol=1e-5, atol=1e-6, msg=key)
        for key, param in result["ref"]["params"].items():
            torch.testing.assert_close(result["tp"]["params"][key], param, rtol=1e-5, atol=1e-6, msg=key)
            torch.testing.assert_close(ranks[1][name]["tp"]["params"][key], param, rtol=1e-5, atol=1e-6)
        # the parameters moved: the comparison is not between two untouched models
        initial = dict(build(name).named_parameters())
        assert any(not torch.allclose(initial[k], p) for k, p in result["ref"]["params"].items()), name
    sp = ranks[0]["transformer_lm_sp"]
    assert (
        sp["odd_length"] == "sequence parallelism splits the sequence over tp=2 ranks; a length of 7 does not divide."
    )
    assert (sp["styles"]["blocks.0.norm1"], sp["styles"]["blocks.1.mlp.fc2"]) == ("sequence", "rowwise_seq")
    for step in range(STEPS):
        for key, grad in sp["ref"]["grads"][step].items():
            torch.testing.assert_close(sp["tp"]["grads"][step][key], grad, rtol=1e-5, atol=1e-6, msg=key)
    for label in ("dict", "callable", "sp"):
        result = ranks[0][f"mlp_{label}" if label != "sp" else "transformer_lm_sp"]
        torch.testing.assert_close(result["tp"]["params"], result["ref"]["params"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["tp"]["losses"], result["ref"]["losses"], rtol=1e-5, atol=1e-6)
    assert "layers.0.self_attn" in ranks[0]["torch_encoder"]["sharded"]
    assert "transformer.decoder.layers.0.multihead_attn" in ranks[0]["lightning_demo"]["sharded"]
    assert {"blocks.0.attn.qkv", "head.1", "embed.token"} <= set(ranks[0]["transformer_lm"]["sharded"])
