"""Compressor rules, DiLoCo's outer step and the argument checks, each against a literal transcription."""

import copy

import pytest
import torch
from torch import nn

from lightning_dl.parallel.comm import check_compressor, check_dense_gradients, check_outer, check_sync, outer_step_
from lightning_dl.parallel.comm.compressors import (
    compressible,
    int8_decode,
    int8_encode,
    orthogonalize_,
    sign_decode,
    sign_encode,
)


def _values(n: int = 37, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator) * torch.logspace(-3, 1, n)


def test_int8_decodes_to_the_rounded_scaled_values() -> None:
    c = _values()
    codes, scale = int8_encode(c)
    s = max(abs(v) for v in c.tolist()) / 127
    expected = [max(-127, min(127, round(v / s))) for v in c.tolist()]  # Python rounds half to even too
    assert codes.dtype == torch.uint8 and codes.numel() == c.numel()
    assert codes.view(torch.int8).tolist() == expected
    torch.testing.assert_close(scale, torch.tensor([s], dtype=torch.float32))
    torch.testing.assert_close(int8_decode(codes, scale), torch.tensor(expected, dtype=torch.float32) * scale)


def test_int8_error_feedback_invariant_is_exact() -> None:
    residual = _values(seed=1) * 0.01
    for step in range(5):
        gradient = _values(seed=10 + step)
        corrected = gradient + residual
        sent = int8_decode(*int8_encode(corrected))
        new_residual = corrected - sent
        assert torch.equal(sent + new_residual, corrected)  # bit for bit (Sterbenz)
        residual = new_residual


def test_int8_of_zeros_sends_zeros() -> None:
    codes, scale = int8_encode(torch.zeros(5))
    assert scale.item() == 0 and torch.equal(int8_decode(codes, scale), torch.zeros(5))


def test_sign_decodes_to_scaled_signs_packed_one_bit_each() -> None:
    c = torch.cat([_values(), torch.zeros(2)])
    codes, scale = sign_encode(c)
    values = c.tolist()
    s = sum(abs(v) for v in values) / len(values)
    assert codes.numel() == -(-len(values) // 8)
    expected_bits = [1 if v >= 0 else 0 for v in values]
    bits = [(codes[i // 8].item() >> (i % 8)) & 1 for i in range(len(values))]
    assert bits == expected_bits
    torch.testing.assert_close(scale, torch.tensor([s], dtype=torch.float32))
    decoded = sign_decode(codes, scale, len(values))
    torch.testing.assert_close(decoded, torch.tensor([s if b else -s for b in expected_bits]))
    # error feedback: the residual is what was not sent; their sum is the corrected gradient to one rounding
    residual = c - decoded
    torch.testing.assert_close(decoded + residual, c, rtol=0, atol=float(c.abs().max()) * 2**-23)


def test_gram_schmidt_matches_the_column_by_column_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    expected = []
    for i in range(3):
        v = p[:, i].clone()
        for u in expected:
            v = v - (u @ v) * u
        expected.append(v / (v.norm() + 1e-8))
    got = orthogonalize_(p.clone())
    torch.testing.assert_close(got, torch.stack(expected, dim=1))
    torch.testing.assert_close(got.T @ got, torch.eye(3, dtype=torch.float64))


def test_compressible_when_p_and_q_are_smaller() -> None:
    assert compressible(torch.Size([16, 8]), 2)  # 2·24 < 128
    assert not compressible(torch.Size([1, 16]), 2)  # 2·17 > 16
    assert not compressible(torch.Size([16]), 1)
    assert compressible(torch.Size([4, 2, 3, 3]), 1)  # 4 × 18


def test_outer_step_matches_nesterov_formula_and_torch_sgd() -> None:
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=generator), torch.randn(3, generator=generator)]
    momentum = [torch.zeros_like(t) for t in start]
    ref = [t.clone().requires_grad_() for t in start]
    sgd = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
    lr, mu = 0.7, 0.9
    for _ in range(3):
        averaged = [t + torch.randn(t.shape, generator=generator) * 0.1 for t in start]
        params = [a.clone() for a in averaged]
        # transcription of the formula
        old_start, old_m = [t.clone() for t in start], [m.clone() for m in momentum]
        delta = [s - a for s, a in zip(old_start, averaged, strict=True)]
        m_new = [mu * m + d for m, d in zip(old_m, delta, strict=True)]
        theta = [s - lr * (d + mu * m) for s, d, m in zip(old_start, delta, m_new, strict=True)]
        outer_step_(params, start, momentum, lr=lr, mu=mu)
        for got, want in zip(params + start + momentum, theta + theta + m_new, strict=True):
            torch.testing.assert_close(got, want)
        # torch's SGD with the pseudo-gradient as gradient takes the same step
        for r, d in zip(ref, delta, strict=True):
            r.grad = d.clone()
        sgd.step()
        for r, s in zip(ref, start, strict=True):
            torch.testing.assert_close(r.detach(), s)


def test_outer_step_with_lr_one_and_no_momentum_keeps_the_average() -> None:
    start, averaged = [torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 3.0])]
    params = [averaged[0].clone()]
    outer_step_(params, start, [torch.zeros(2)], lr=1.0, mu=0.0)
    torch.testing.assert_close(params[0], averaged[0])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: check_sync(0), r"`sync_every` must be an integer >= 1 .*got 0"),
        (lambda: check_sync(2.5), r"`sync_every` must be an integer >= 1 .*got 2.5"),
        (lambda: check_sync(4, warmup_steps=-1), r"`warmup_steps` must be an integer >= 0, got -1"),
        (lambda: check_outer(0.0, 0.9), r"`outer_lr` must be > 0, got 0.0"),
        (lambda: check_outer(-1, 0.9), r"`outer_lr` must be > 0, got -1"),
        (lambda: check_outer(0.7, 1.0), r"`outer_momentum` must be in \[0, 1\), got 1.0"),
        (lambda: check_outer(0.7, -0.1), r"`outer_momentum` must be in \[0, 1\), got -0.1"),
        (lambda: check_compressor("powersgd", 0, 0), r"`rank` .* must be an integer >= 1, got 0"),
        (lambda: check_compressor("topk", 1, 0), r"`compressor` must be one of .*got 'topk'"),
        (lambda: check_compressor("int8", 1, -2), r"`start_iter` must be an integer >= 0, got -2"),
    ],
)
def test_bad_arguments_name_parameter_value_and_range(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_sparse_gradients_are_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"ddp_int8 compresses dense gradients, but module '0' \(Embedding\)"):
        check_dense_gradients(model, "ddp_int8")
    dense = copy.deepcopy(model)
    dense[0].sparse = False
    check_dense_gradients(dense, "ddp_int8")
