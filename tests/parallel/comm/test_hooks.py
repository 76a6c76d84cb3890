"""The compressed DDP hooks on 2 gloo ranks: each step's averaged gradient equals a transcription of the rule applied
to every rank's gradient plus its residual, and each residual is what that rank did not send. One spawned run
checks every compressor and ``average_``."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import lightning_dl.parallel.comm.hooks as hooks
from lightning_dl.parallel.comm import CompressionState, LocalState, average_, hook_for, local_hook
from lightning_dl.parallel.comm.compressors import initial_q
from lightning_dl.parallel.comm.host import ENV
from tests.helpers.distributed import run_distributed
from tests.helpers.models import tiny_net

pytestmark = pytest.mark.distributed

STEPS = 3
RANK = 2  # PowerSGD rank: the 16x8 weight is compressed, the 1x16 weight and the biases are not


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 8, generator=generator), torch.randn(4, 1, generator=generator)


def _trace(compressor: str, start_iter: int, rank: int, bucket_cap_mb: float = 25.0, fused: bool = True) -> list[dict]:
    hooks.FUSED = fused  # the workspace takes the path when it is built, at the first compressed step
    net = tiny_net(seed=0)
    state = CompressionState(net, compressor, rank=RANK, start_iter=start_iter)
    model = DistributedDataParallel(net, bucket_cap_mb=bucket_cap_mb)
    model.register_comm_hook(state, hook_for(compressor))
    steps = []
    for step in range(STEPS):
        x, y = _batch(rank, step)
        plain = copy.deepcopy(net)
        local = torch.autograd.grad(F.mse_loss(plain(x), y), list(plain.parameters()))
        before = {"residuals": copy.deepcopy(state.residuals), "qs": copy.deepcopy(state.qs)}
        bytes_before = state.bytes_sent
        F.mse_loss(model(x), y).backward()
        names = [n for n, _ in net.named_parameters()]
        steps.append(
            before
            | {
                "local": dict(zip(names, local, strict=True)),
                "output": {n: p.grad.clone() for n, p in net.named_parameters()},
                "after": copy.deepcopy(state.residuals),
                "bytes": state.bytes_sent - bytes_before,
                "exchange": [ws.exchange is not None for ws in state.workspaces.values()],
            }
        )
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    return steps


def _powersgd_unread(rank: int) -> dict:
    """``_trace("powersgd", ...)`` without reading the residuals between steps (fused, they stay in factors from one
    step to the next); at step 1 the state is saved, the step taken, then the state and the parameters loaded back
    into the same, already used, state and the step taken again."""
    net = tiny_net(seed=0)
    state = CompressionState(net, "powersgd", rank=RANK)
    model = DistributedDataParallel(net)
    model.register_comm_hook(state, hook_for("powersgd"))
    outputs, first_try = [], None
    for step in range(STEPS):
        x, y = _batch(rank, step)
        if step == 1:
            saved, parameters = state.state_dict(), copy.deepcopy(net.state_dict())
            F.mse_loss(model(x), y).backward()
            first_try = {n: p.grad.clone() for n, p in net.named_parameters()}
            net.zero_grad(set_to_none=True)
            state.load_state_dict(saved)
            net.load_state_dict(parameters)
        F.mse_loss(model(x), y).backward()
        outputs.append({n: p.grad.clone() for n, p in net.named_parameters()})
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    return {"outputs": outputs, "residuals": copy.deepcopy(state.residuals), "first_try": first_try}


def _encoder_grads(compressor: str, rank: int, read_residuals: bool, fused: bool = True) -> list[list[torch.Tensor]]:
    """torch's own ``nn.TransformerEncoderLayer`` (fused in-projection 48 x 16, layer norms) for 3 steps under a
    compressed hook (fused loops or the torch path), reading the residuals after every step or never: each step's
    averaged gradients."""
    hooks.FUSED = fused
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    state = CompressionState(layer, compressor, rank=RANK)
    model = DistributedDataParallel(layer)
    model.register_comm_hook(state, hook_for(compressor))
    steps = []
    for step in range(3):
        tokens = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(10 * rank + step))
        model(tokens).pow(2).mean().backward()
        steps.append([p.grad.clone() for p in layer.parameters()])
        if read_residuals:
            _ = state.residuals
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    return steps


def _run(rank: int, world_size: int) -> dict:
    out = {c: _trace(c, 0, rank) for c in ("int8", "sign", "powersgd")}
    out |= {f"{c}_torch": _trace(c, 0, rank, fused=False) for c in ("int8", "sign", "powersgd")}
    hooks.FUSED = True
    out["powersgd_unread"] = _powersgd_unread(rank)
    out["encoder"] = {(c, read): _encoder_grads(c, rank, read) for c in ("powersgd", "sign") for read in (True, False)}
    out["encoder"] |= {(c, "torch"): _encoder_grads(c, rank, False, fused=False) for c in ("powersgd", "sign")}
    hooks.FUSED = True
    os.environ[ENV] = "0"  # the messages through gloo instead of the host's shared memory
    out |= {f"{c}_gloo": _trace(c, 0, rank) for c in ("int8", "sign", "powersgd")}
    del os.environ[ENV]
    out["int8_start2"] = _trace("int8", 2, rank)
    for compressor in ("int8", "powersgd"):  # one bucket per tensor: collectives of several buckets in order
        out[f"{compressor}_buckets"] = _trace(compressor, 0, rank, bucket_cap_mb=1e-4)
    # local hook: no communication when told so
    net = tiny_net(seed=0)
    model = DistributedDataParallel(net)
    local_state = LocalState()
    local_state.allreduce = False
    model.register_comm_hook(local_state, local_hook)
    x, y = _batch(rank, 0)
    F.mse_loss(model(x), y).backward()
    out["local_grads"] = [p.grad.clone() for p in net.parameters()]
    out["local_bytes"] = local_state.bytes_sent
    # parameter averaging
    tensors = [torch.full((3, 2), float(rank + 1)), torch.arange(4.0) * (rank + 1)]
    out["average_bytes"] = average_(tensors)
    out["averaged"] = tensors
    out["world"] = dist.get_world_size()
    return out


def _int8(c: torch.Tensor) -> torch.Tensor:
    s = c.abs().max() / 127
    return torch.tensor([max(-127, min(127, round(v / s.item()))) for v in c.reshape(-1).tolist()]).view_as(c) * s


def _sign(c: torch.Tensor) -> torch.Tensor:
    s = c.abs().sum() / c.numel()
    return torch.where(c >= 0, s, -s)


def _gram_schmidt(p: torch.Tensor) -> torch.Tensor:
    cols: list[torch.Tensor] = []
    for i in range(p.shape[1]):
        v = p[:, i]
        for u in cols:
            v = v - (u @ v) * u
        cols.append(v / (v.norm() + 1e-8))
    return torch.stack(cols, dim=1)


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_run, 2, timeout=120)


def _corrected(rank_steps: dict, name: str) -> torch.Tensor:
    residual = rank_steps["residuals"].get(name)
    return rank_steps["local"][name] + (0 if residual is None else residual)


@pytest.mark.parametrize("path", ["", "_torch"], ids=["fused", "torch"])
@pytest.mark.parametrize("compressor", ["int8", "sign"])
def test_quantized_hooks_send_the_rule_and_keep_the_rest(ranks, compressor, path) -> None:
    rule = _int8 if compressor == "int8" else _sign
    for step in range(STEPS):
        per_rank = [r[compressor + path][step] for r in ranks]
        for name in per_rank[0]["local"]:
            corrected = [_corrected(s, name) for s in per_rank]
            sent = [rule(c) for c in corrected]
            torch.testing.assert_close(per_rank[0]["output"][name], (sent[0] + sent[1]) / 2)
            torch.testing.assert_close(per_rank[1]["output"][name], per_rank[0]["output"][name], rtol=0, atol=0)
            for s, c, rank_steps in zip(sent, corrected, per_rank, strict=True):
                new = rank_steps["after"][name]
                torch.testing.assert_close(new, c - s)
                if compressor == "int8":  # sent + new residual == gradient + old residual, bit for bit
                    assert torch.equal(s + new, c)
                else:
                    torch.testing.assert_close(s + new, c, rtol=0, atol=float(c.abs().max()) * 2**-22)
        numels = [t.numel() for t in per_rank[0]["local"].values()]
        code_bytes = sum(numels) if compressor == "int8" else sum(-(-n // 8) for n in numels)
        assert per_rank[0]["bytes"] == code_bytes + 4 * len(numels)
    assert ranks[0][compressor + path][-1]["after"]  # residuals exist and are not all zero
    assert any(t.abs().sum() > 0 for t in ranks[0][compressor + path][-1]["after"].values())


@pytest.mark.parametrize("path", ["", "_torch"], ids=["fused", "torch"])
def test_powersgd_hook_follows_vogels_rule_with_error_feedback(ranks, path) -> None:
    qs = {}
    for step in range(STEPS):
        per_rank = [r["powersgd" + path][step] for r in ranks]
        for name, grad in per_rank[0]["local"].items():
            corrected = [_corrected(s, name) for s in per_rank]
            if name != "0.weight":  # not worth compressing: plain mean, no residual
                torch.testing.assert_close(per_rank[0]["output"][name], (corrected[0] + corrected[1]) / 2)
                assert name not in per_rank[0]["after"]
                continue
            m = [c.reshape(grad.shape[0], -1) for c in corrected]
            q = qs.get(name)
            if q is None:
                import zlib

                q = initial_q(grad.shape, RANK, zlib.crc32(name.encode()))
            torch.testing.assert_close(per_rank[0]["qs"].get(name, q), q)
            p_hat = _gram_schmidt((m[0] @ q + m[1] @ q) / 2)
            q_local = [mi.T @ p_hat for mi in m]
            q_mean = (q_local[0] + q_local[1]) / 2
            torch.testing.assert_close(per_rank[0]["output"][name], (p_hat @ q_mean.T).view_as(grad))
            for mi, qi, rank_steps in zip(m, q_local, per_rank, strict=True):
                sent = p_hat @ qi.T
                torch.testing.assert_close(rank_steps["after"][name], (mi - sent).view_as(grad))
                torch.testing.assert_close(sent + rank_steps["after"][name].view_as(mi), mi)
            qs[name] = q_mean
        n, m_ = 16, 8
        plain = sum(t.numel() for k, t in per_rank[0]["local"].items() if k != "0.weight")
        assert per_rank[0]["bytes"] == 4 * (RANK * n + plain + RANK * m_)


def test_powersgd_residuals_left_in_factors_give_the_same_bits(ranks) -> None:
    """Fused PowerSGD takes each residual off in the next step's first pass unless something reads it first: steps
    that never read it give the bits of steps that read it every time, and a state loaded back into a used one
    repeats a step bit for bit."""
    for r in ranks:
        lazy = r["powersgd_unread"]
        for read, unread in zip(r["powersgd"], lazy["outputs"], strict=True):
            assert all(torch.equal(read["output"][n], g) for n, g in unread.items())
        assert lazy["residuals"].keys() == r["powersgd"][-1]["after"].keys() == {"0.weight"}
        assert torch.equal(lazy["residuals"]["0.weight"], r["powersgd"][-1]["after"]["0.weight"])
        assert all(torch.equal(lazy["first_try"][n], g) for n, g in lazy["outputs"][1].items())


@pytest.mark.parametrize("compressor", ["powersgd", "sign"])
def test_torch_encoder_layer_gets_the_same_bits_with_residuals_left_in_factors(ranks, compressor) -> None:
    for r in ranks:
        read, unread = r["encoder"][compressor, True], r["encoder"][compressor, False]
        for step_read, step_unread in zip(read, unread, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(step_read, step_unread, strict=True))
        for step_fused, step_torch in zip(unread, r["encoder"][compressor, "torch"], strict=True):  # the rule
            for a, b in zip(step_fused, step_torch, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert not all(torch.equal(a, b) for a, b in zip(read[0], read[-1], strict=True))


def test_start_iter_sends_plain_means_first(ranks) -> None:
    for step in range(STEPS):
        per_rank = [r["int8_start2"][step] for r in ranks]
        for name in per_rank[0]["local"]:
            corrected = [_corrected(s, name) for s in per_rank]
            expected = (
                (corrected[0] + corrected[1]) / 2 if step < 2 else (_int8(corrected[0]) + _int8(corrected[1])) / 2
            )
            torch.testing.assert_close(per_rank[0]["output"][name], expected)
        assert bool(per_rank[0]["after"]) == (step >= 2)


def test_local_hook_and_average(ranks) -> None:
    assert ranks[0]["local_bytes"] == 0
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["local_grads"], ranks[1]["local_grads"], strict=True))
    for r in ranks:
        torch.testing.assert_close(r["averaged"][0], torch.full((3, 2), 1.5))
        torch.testing.assert_close(r["averaged"][1], torch.arange(4.0) * 1.5)
        assert r["average_bytes"] == 10 * 4


@pytest.mark.parametrize("compressor", ["int8", "sign", "powersgd"])
def test_messages_through_shared_memory_or_gloo_give_the_same_bits(ranks, compressor) -> None:
    for r in ranks:
        assert all(all(step["exchange"]) for step in r[compressor])  # both ranks on this host: shared memory
        assert not any(any(step["exchange"]) for step in r[f"{compressor}_gloo"])
        for shm, gloo in zip(r[compressor], r[f"{compressor}_gloo"], strict=True):
            for key in ("output", "after"):
                assert shm[key].keys() == gloo[key].keys()
                assert all(torch.equal(shm[key][name], gloo[key][name]) for name in shm[key])
            assert shm["bytes"] == gloo["bytes"]


@pytest.mark.parametrize("compressor", ["int8", "powersgd"])
def test_several_buckets_give_the_same_result(ranks, compressor) -> None:
    for r in ranks:
        for one, many in zip(r[compressor], r[f"{compressor}_buckets"], strict=True):
            for name, grad in one["output"].items():
                torch.testing.assert_close(many["output"][name], grad)
