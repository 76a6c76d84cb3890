"""The fused CPU loops of ``kernels.py`` against the literal rules written with torch: the sign and int8 passes (bit
for bit where the rule fixes the arithmetic), and PowerSGD's three passes for ranks below, at and above the groups of
four columns the last pass works in, on shapes that are not multiples of anything."""

import numpy as np
import pytest
import torch

from lightning_dl.parallel.comm import kernels


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unpack(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Unit signs ±1 of the first ``n`` bits, bit ``k`` of byte ``j`` standing for element ``8j + k``."""
    bits = [(int(b) >> k) & 1 for b in codes.tolist() for k in range(8)][:n]
    return torch.tensor(bits, dtype=torch.float32) * 2 - 1


@pytest.mark.parametrize("n", [1, 8, 37, 64, 150])
def test_sign_encode_takes_the_last_residual_off_adds_packs_and_sums(n) -> None:
    c0, g = _randn(n, seed=0), _randn(n, seed=1)
    old = torch.randint(0, 256, (-(-n // 8),), dtype=torch.uint8, generator=torch.Generator().manual_seed(14))
    s = torch.tensor(0.375)
    e = c0 - s * _unpack(old, n)  # the residual the last message left: exact, s·σ is ±s
    g[::5] = -e[::5]  # exact zeros: bit set (sign(0) = +1)
    for scale, start in ((s, c0), (torch.tensor(0.0), e)):  # the residual in factors, or written out (zero s)
        c, packed = start.clone(), old.clone()
        total = kernels.sign_encode(c.numpy(), g.numpy(), packed.numpy(), scale.numpy())
        assert torch.equal(c, e + g)
        assert torch.equal(_unpack(packed, n), torch.where(e + g >= 0, 1.0, -1.0))
        assert torch.all(_unpack(packed, 8 * packed.numel())[n:] == -1)  # padding bits zero
        assert total == pytest.approx(float((e + g).abs().double().sum()), rel=1e-6)
        if n % 64 == 0:  # 64 at a time: the same bits
            c2, packed2 = start.clone(), old.clone()
            total2 = kernels.sign_encode_words(c2.numpy(), g.numpy(), packed2.numpy().view(np.uint64), scale.numpy())
            assert torch.equal(c2, c) and torch.equal(packed2, packed)
            assert total2 == pytest.approx(total, rel=1e-6)
    settled = c0.clone()
    kernels.sign_settle(settled.numpy(), old.numpy(), s.numpy())
    assert torch.equal(settled, e)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [5, 64, 150])
def test_sign_finish_averages_the_messages(world, n) -> None:
    codes = torch.randint(0, 256, (world, -(-n // 8)), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    scales = torch.rand(world, generator=torch.Generator().manual_seed(3)) + 0.1
    signs = [_unpack(codes[r], n) for r in range(world)]
    for me in range(world):
        out = torch.empty(n)
        kernels.sign_finish(codes.numpy(), scales.numpy(), me, out.numpy(), kernels.SIGNS)
        if world == 2:
            expected = scales[1 - me] / 2 * signs[1 - me] + scales[me] / 2 * signs[me]
        else:
            expected = sum((scales[r] * signs[r] for r in range(1, world)), scales[0] * signs[0]) / world
        assert torch.equal(out, expected)
        if world == 2 and n % 64 == 0:  # the word-at-a-time form gives the same bits
            words = codes.numpy().view(np.uint64)
            out2 = torch.empty(n)
            kernels.sign_finish_pair(words[me], words[1 - me], scales[me].numpy(), scales[1 - me].numpy(), out2.numpy())
            assert torch.equal(out2, out)


def test_int8_quantize_and_finish_follow_the_rule() -> None:
    c = _randn(101, seed=5)
    scale = c.abs().max() / 127
    codes, residual = torch.empty(101, dtype=torch.int8), c.clone()
    kernels.int8_quantize(residual.numpy(), np.float32(scale.item()), codes.numpy())
    q = torch.round(c / scale)  # half to even, as torch.round
    assert torch.equal(codes.float(), q)
    assert torch.equal(residual, c - q * scale) and torch.equal(q * scale + residual, c)  # exact (Sterbenz)
    zero = torch.zeros(3)
    kernels.int8_quantize(zero.numpy(), np.float32(0.0), codes[:3].numpy())
    assert codes[:3].tolist() == [0, 0, 0] and zero.tolist() == [0.0, 0.0, 0.0]
    rows = torch.randint(-127, 128, (3, 50), dtype=torch.int8, generator=torch.Generator().manual_seed(6))
    scales = torch.tensor([0.5, 0.25, 0.125])
    out = torch.empty(50)
    kernels.int8_finish(rows.numpy(), scales.numpy(), out.numpy())
    assert torch.equal(
        out, (rows[0].float() * scales[0] + rows[1].float() * scales[1] + rows[2].float() * scales[2]) / 3
    )
    kernels.int8_finish_pair(rows[0].numpy(), rows[1].numpy(), scales[0].numpy(), scales[1].numpy(), out.numpy())
    assert torch.equal(out, (rows[0].float() * scales[0] + rows[1].float() * scales[1]) / 2)


def _close_to_products(actual: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]], base=None) -> None:
    """``actual`` equals ``base + Σ a @ b`` (exact, in float64) to float32 rounding of the largest term: the loops
    add in their own order (four products at a time, fused multiply-adds), so a sum that cancels keeps an error of
    a few ulps of its terms, not of itself."""
    exact = sum((a.double() @ b.double() for a, b in terms), torch.zeros(actual.shape, dtype=torch.float64))
    scale = sum((a.double().abs() @ b.double().abs() for a, b in terms), torch.zeros_like(exact))
    if base is not None:
        exact, scale = exact + base.double(), scale + base.double().abs()
    assert ((actual.double() - exact).abs() <= 8 * torch.finfo(torch.float32).eps * scale).all()


@pytest.mark.parametrize("rank", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("rows", [13, 14, 15, 16])  # the first pass takes four rows at a time
def test_powersgd_passes_equal_the_matrix_products(rank, rows) -> None:
    cols = 21
    e, g = _randn(rows, cols, seed=7), _randn(rows, cols, seed=8)
    q_t, p, no_factors = _randn(rank, cols, seed=9), torch.empty(rows, rank), torch.zeros(rank, cols)
    m = e.clone()
    kernels.add_project(m.numpy(), g.numpy(), q_t.numpy(), p.numpy(), no_factors.numpy(), False)
    assert torch.equal(m, e + g)
    _close_to_products(p, [(m, q_t.T)])
    q_local_t = torch.empty(rank, cols)
    kernels.project_back(p.numpy(), m.numpy(), q_local_t.numpy())
    _close_to_products(q_local_t, [(p.T, m)])
    q_mean_t, out = _randn(rank, cols, seed=10), torch.empty(rows, cols)
    kernels.result(p.numpy(), q_mean_t.numpy(), out.numpy())
    _close_to_products(out, [(p, q_mean_t)])
    # the next step takes the residual M − P̂·Q_localᵀ off on the way, with the bits that settle writes out
    g2, q2_t = _randn(rows, cols, seed=11), _randn(rank, cols, seed=12)
    lazy, lazy_p = m.clone(), p.clone()
    kernels.add_project(lazy.numpy(), g2.numpy(), q2_t.numpy(), lazy_p.numpy(), q_local_t.numpy(), True)
    residual = m.clone()
    kernels.settle(residual.numpy(), p.numpy(), q_local_t.numpy())
    _close_to_products(residual, [(-p, q_local_t)], base=m)
    settled, settled_p = residual.clone(), torch.empty(rows, rank)
    kernels.add_project(settled.numpy(), g2.numpy(), q2_t.numpy(), settled_p.numpy(), q_local_t.numpy(), False)
    assert torch.equal(lazy, residual + g2) and torch.equal(lazy, settled) and torch.equal(lazy_p, settled_p)


@pytest.mark.parametrize("offset", [0, 1, 7, 15, 16])
def test_the_streamed_result_lands_at_any_alignment_and_nowhere_else(offset) -> None:
    """PowerSGD's result streams the 64-byte-aligned middle of each row: rows that start anywhere, shorter than one
    line, or many lines long, get every element and leave their neighbours alone."""
    for rows, cols, rank in ((3, 5, 4), (2, 40, 3), (4, 257, 6)):
        p, q_t = _randn(rows, rank, seed=20), _randn(rank, cols, seed=21)
        buffer = torch.zeros(offset + rows * cols + 40)
        out = buffer[offset : offset + rows * cols].view(rows, cols)
        kernels.result(p.numpy(), q_t.numpy(), out.numpy())
        _close_to_products(out, [(p, q_t)])
        assert torch.all(buffer[:offset] == 0) and torch.all(buffer[offset + rows * cols :] == 0)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_orthogonalize_follows_the_column_by_column_rule(rank) -> None:
    p = _randn(300, rank, seed=13)
    p[:, -1] = 0.0  # a zero column stays zero
    expected: list[torch.Tensor] = []
    for v in p.double().T:
        for u in expected:
            v = v - (u @ v) * u
        expected.append(v / (v.norm() + 1e-8))
    got = p.clone()
    kernels.orthogonalize(got.numpy(), 1e-8)
    torch.testing.assert_close(got, torch.stack(expected, dim=1).float(), rtol=0, atol=1e-5)
    assert torch.equal(got[:, -1], torch.zeros(300))


def _powersgd_steps(steps: int, settle_every_step: bool, rank: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One rank's fused PowerSGD passes over ``steps`` steps (no all-reduce: its own P̂ and Q are the means)."""
    rows, cols = 37, 29
    m, p, q_local_t = torch.zeros(rows, cols), torch.empty(rows, rank), torch.zeros(rank, cols)
    q_t = _randn(rank, cols, seed=20)
    outs, pending = [], False
    for step in range(steps):
        g = _randn(rows, cols, seed=30 + step)
        if settle_every_step and pending:
            kernels.settle(m.numpy(), p.numpy(), q_local_t.numpy())
            pending = False
        kernels.add_project(m.numpy(), g.numpy(), q_t.numpy(), p.numpy(), q_local_t.numpy(), pending)
        kernels.orthogonalize(p.numpy(), 1e-8)
        kernels.project_back(p.numpy(), m.numpy(), q_local_t.numpy())
        q_t = q_local_t.clone()
        out = torch.empty(rows, cols)
        kernels.result(p.numpy(), q_t.numpy(), out.numpy())
        outs.append(out)
        pending = True
    kernels.settle(m.numpy(), p.numpy(), q_local_t.numpy())
    return outs, m


@pytest.mark.parametrize("rank", [3, 8])
def test_powersgd_residual_in_factors_gives_the_bits_of_one_written_out_every_step(rank) -> None:
    lazy_outs, lazy_residual = _powersgd_steps(4, settle_every_step=False, rank=rank)
    outs, residual = _powersgd_steps(4, settle_every_step=True, rank=rank)
    assert all(torch.equal(a, b) for a, b in zip(lazy_outs, outs, strict=True))
    assert torch.equal(lazy_residual, residual) and lazy_residual.abs().sum() > 0


def test_compile_fused_covers_every_loop_the_exchange_calls() -> None:
    from lightning_dl.parallel.comm import compile_fused
    from tests.parallel.comm.test_workspace import _exchange

    for world in (2, 3):
        for compressor in ("int8", "sign", "powersgd"):
            compile_fused(compressor, world)
    loops = {name: fn for name, fn in vars(kernels).items() if hasattr(fn, "signatures") and not name.startswith("_")}
    before = {name: set(fn.signatures) for name, fn in loops.items()}
    assert all(before.values())  # every loop has been compiled for something
    for world in (2, 3):
        for compressor in ("int8", "sign"):
            _exchange(compressor, world, fused=True, steps=1)  # tensors at aligned and unaligned offsets
    assert {name: set(fn.signatures) for name, fn in loops.items()} == before  # nothing new compiled


@pytest.mark.parametrize(("compressor", "world", "match"), [("fp8", 2, "`compressor`"), ("sign", 0, "`world`")])
def test_compile_fused_names_a_bad_argument(compressor, world, match) -> None:
    from lightning_dl.parallel.comm import compile_fused

    with pytest.raises(ValueError, match=match):
        compile_fused(compressor, world)
