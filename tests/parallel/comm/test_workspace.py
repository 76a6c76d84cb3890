"""The in-place compressed exchange in one process: two or three simulated ranks encode into their bucket workspaces,
swap messages as an all-gather would, and finish; the result is the mean of a literal transcription of each rule,
the residuals are what each rank did not send, every rank gets the same bits, and the sign hook's chunks (made tiny
here) cut tensors anywhere. Also the bit packing against the literal bit rule, and residuals adopted from a
checkpoint."""

import pytest
import torch

from lightning_dl.parallel.comm import codecs
from lightning_dl.parallel.comm.compressors import pack_bits_, pack_bits_multiply_, sign_decode_
from lightning_dl.parallel.comm.workspace import BucketWorkspace

# sizes not multiples of 8; 64 and 150 elements: whole 64-bit words of signs, and words with a tail
SHAPES = [torch.Size([37]), torch.Size([5, 7]), torch.Size([3]), torch.Size([16, 4]), torch.Size([3, 50])]


def _grads(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10 * rank + step)
    flat = torch.randn(sum(s.numel() for s in SHAPES), generator=generator)
    flat[::11] = 0.0  # exact zeros: sign(0) = +1
    return flat


def _int8(c: torch.Tensor) -> torch.Tensor:
    s = c.abs().max() / 127
    return torch.tensor([max(-127, min(127, round(v / s.item()))) for v in c.tolist()]) * s


def _sign(c: torch.Tensor) -> torch.Tensor:
    s = c.abs().sum() / c.numel()
    return torch.where(c >= 0, s, -s)


def _exchange(
    compressor: str, world: int, fused: bool, steps: int = 3, read_residuals: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every step's mean and, at the end, each rank's residual. ``read_residuals``: the residuals are read (written
    out first where the fused loops keep them in factors) and checked against the rule after every step; otherwise
    they are read only at the end, so the fused loops take each one off in the next step's first pass."""
    names = [f"p{i}" for i in range(len(SHAPES))]
    workspaces = [BucketWorkspace(names, SHAPES, compressor, world=world, fused=fused) for _ in range(world)]
    encode, finish = codecs.CODECS[compressor, fused]
    residuals = [torch.zeros(sum(s.numel() for s in SHAPES)) for _ in range(world)]
    rule = _int8 if compressor == "int8" else _sign
    means = []
    for step in range(steps):
        outs = [_grads(r, step) for r in range(world)]
        corrected = [g + e for g, e in zip(outs, residuals, strict=True)]
        for ws, out in zip(workspaces, outs, strict=True):
            encode(ws, out)
        for ws in workspaces:  # what all_gather leaves on every rank
            for r, other in enumerate(workspaces):
                ws.received[r].copy_(other.message)
        for me, (ws, out) in enumerate(zip(workspaces, outs, strict=True)):
            finish(ws, out, world, me)
        if not read_residuals:
            means.append(outs[0])
            continue
        for r, ws in enumerate(workspaces):
            ws.settle()
            sent = torch.cat([rule(ws.view(corrected[r], i)) for i in range(len(SHAPES))])
            torch.testing.assert_close(ws.residual, corrected[r] - sent, msg=f"{compressor} rank {r} step {step}")
            if compressor == "int8":
                assert torch.equal(sent + ws.residual, corrected[r])  # bit for bit
            residuals[r] = ws.residual.clone()
        mean = (
            sum(
                torch.cat([rule(ws.view(c, i)) for i in range(len(SHAPES))])
                for ws, c in zip(workspaces, corrected, strict=True)
            )
            / world
        )
        torch.testing.assert_close(outs[0], mean)
        for out in outs[1:]:
            assert torch.equal(out, outs[0])  # every rank the same bits
        means.append(outs[0])
    for ws in workspaces:
        ws.settle()
    return means, [ws.residual.clone() for ws in workspaces]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("compressor", ["int8", "sign"])
def test_exchange_equals_mean_of_rule(monkeypatch, compressor, world, fused) -> None:
    monkeypatch.setattr(codecs, "CHUNK", 16)  # several chunks per tensor, boundaries inside tensors
    _exchange(compressor, world, fused)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_int8_gives_the_bits_of_the_torch_path(world) -> None:
    for fused, plain in zip(_exchange("int8", world, True)[0], _exchange("int8", world, False)[0], strict=True):
        assert torch.equal(fused, plain)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_sign_residuals_left_in_the_message_give_the_same_bits(world) -> None:
    """The fused sign loops leave each residual ``c − s·σ`` to the next encode: steps that never read the residuals
    give the bits of steps that read (write out) them every time, means and final residuals alike."""
    means, residuals = _exchange("sign", world, True, steps=4)
    lazy_means, lazy_residuals = _exchange("sign", world, True, steps=4, read_residuals=False)
    assert all(torch.equal(a, b) for a, b in zip(means, lazy_means, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(residuals, lazy_residuals, strict=True))
    assert all(r.abs().sum() > 0 for r in residuals)


def test_pack_bits_numpy_and_multiply_follow_the_bit_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    bits = torch.rand(8 * 37, generator=generator) < 0.5
    expected = [sum(int(bits[8 * j + i]) << i for i in range(8)) for j in range(37)]
    words, out = torch.empty(37, dtype=torch.int64), torch.empty(37, dtype=torch.uint8)
    assert pack_bits_(bits, words, out).tolist() == expected
    assert pack_bits_multiply_(bits, words, torch.zeros_like(out)).tolist() == expected


def test_sign_decode_of_a_partial_byte() -> None:
    codes = torch.tensor([0b10110001, 0b00000101], dtype=torch.uint8)
    out = sign_decode_(codes, torch.tensor(0.5), torch.empty(11), torch.empty(2, dtype=torch.int32))
    bits = [1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 1]
    assert out.tolist() == [0.5 if b else -0.5 for b in bits]


def test_adopt_keeps_loaded_residuals_and_views_the_workspace() -> None:
    ws = BucketWorkspace(["a", "b"], [torch.Size([2, 3]), torch.Size([4])], "int8", world=2)
    loaded = {"a": torch.arange(6.0).view(2, 3)}
    ws.adopt(loaded)
    assert torch.equal(ws.residual[:6], torch.arange(6.0)) and torch.equal(ws.residual[6:], torch.zeros(4))
    assert loaded["a"].data_ptr() == ws.residual.data_ptr() and loaded["b"].shape == (4,)
    ws.residual.fill_(1.0)
    assert torch.equal(loaded["b"], torch.ones(4))  # views: what the hook writes, a checkpoint reads
