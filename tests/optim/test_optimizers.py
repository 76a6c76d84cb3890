"""Every optimizer implemented here against a literal per-element transcription of its update rule (plain Python
loops over floats), for 6 steps (adaptive SGD: 15) with two param groups; state_dict round trips; build_optimizer;
errors."""

import copy
import math

import pytest
import torch

from lightning_dl.optim import (
    LAMB,
    LARS,
    OPTIMIZERS,
    AdaptiveSGD,
    ConjugateGradient,
    SimplifiedAdam,
    build_optimizer,
)

STEPS = 6
SHAPES = [(3, 4), (3,), (2, 3)]  # group 0: a weight and a bias; group 1: a weight


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=g, dtype=torch.float64) + 0.3 for shape in SHAPES]


def _run(make, steps=STEPS, params=None, optimizer=None, start=0):
    params = params or _params()
    optimizer = optimizer or make(params)
    for step in range(start, steps):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


def _lists(params) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in params]


def _assert_equal(params, reference: list[list[float]]) -> None:
    for p, ref in zip(params, reference, strict=True):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(ref, dtype=torch.float64))


def _norm(xs: list[float]) -> float:
    return math.sqrt(sum(x * x for x in xs))


GROUPS = [{"index": [0, 1]}, {"index": [2]}]


def _groups(params, first: dict, second: dict) -> list[dict]:
    return [{"params": params[:2], **first}, {"params": params[2:], **second}]


# ---------------------------------------------------------------------------------------------------------- LARS
def _lars_reference(hyper: list[dict]) -> list[list[float]]:
    w = _lists(_params())
    buf: list[list[float] | None] = [None] * len(w)
    for step in range(STEPS):
        grads = [g.flatten().tolist() for g in _grads(step)]
        for k in range(len(w)):
            h = hyper[0] if k < 2 else hyper[1]
            adapt = len(SHAPES[k]) > 1
            wn, gn = _norm(w[k]), _norm(grads[k])
            trust, wd = 1.0, 0.0
            if adapt:
                wd = h["weight_decay"]
                if wn > 0 and gn > 0:
                    trust = h["trust_coefficient"] * wn / (gn + wd * wn + 1e-8)
                if h.get("trust_clip"):
                    trust = min(trust, 1.0)
            d = [trust * (grads[k][i] + wd * w[k][i]) for i in range(len(w[k]))]
            buf[k] = d if buf[k] is None else [h["momentum"] * b + x for b, x in zip(buf[k], d, strict=True)]
            w[k] = [w[k][i] - h["lr"] * buf[k][i] for i in range(len(w[k]))]
    return w


def test_lars_matches_its_transcription() -> None:
    hyper = [
        dict(lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02),
        dict(lr=0.05, momentum=0.5, weight_decay=0.1, trust_coefficient=0.5, trust_clip=True),
    ]
    params, _ = _run(lambda ps: LARS(_groups(ps, hyper[0], hyper[1])))
    _assert_equal(params, _lars_reference(hyper))


# ---------------------------------------------------------------------------------------------------------- LAMB
def _lamb_reference(hyper: list[dict]) -> list[list[float]]:
    w = _lists(_params())
    m = [[0.0] * len(x) for x in w]
    v = [[0.0] * len(x) for x in w]
    for t in range(1, STEPS + 1):
        grads = [g.flatten().tolist() for g in _grads(t - 1)]
        for k in range(len(w)):
            h = hyper[0] if k < 2 else hyper[1]
            b1, b2 = h["betas"]
            adapt = len(SHAPES[k]) > 1
            u = []
            for i in range(len(w[k])):
                m[k][i] = b1 * m[k][i] + (1 - b1) * grads[k][i]
                v[k][i] = b2 * v[k][i] + (1 - b2) * grads[k][i] ** 2
                r = (m[k][i] / (1 - b1**t)) / (math.sqrt(v[k][i] / (1 - b2**t)) + h["eps"])
                u.append(r + (h["weight_decay"] * w[k][i] if adapt else 0.0))
            wn, un = _norm(w[k]), _norm(u)
            trust = wn / un if adapt and wn > 0 and un > 0 else 1.0
            if adapt and h.get("max_trust") is not None:
                trust = min(trust, h["max_trust"])
            w[k] = [w[k][i] - h["lr"] * trust * u[i] for i in range(len(w[k]))]
    return w


def test_lamb_matches_its_transcription() -> None:
    hyper = [
        dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01),
        dict(lr=0.02, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1, max_trust=0.5),
    ]
    params, _ = _run(lambda ps: LAMB(_groups(ps, hyper[0], hyper[1])))
    _assert_equal(params, _lamb_reference(hyper))


# --------------------------------------------------------------------------------------------- simplified Adam
def _simplified_adam_reference(hyper: list[dict]) -> list[list[float]]:
    w = _lists(_params())
    mu = [[0.0] * len(x) for x in w]
    s = [[0.0] * len(x) for x in w]
    for t in range(1, STEPS + 1):
        grads = [g.flatten().tolist() for g in _grads(t - 1)]
        for k in range(len(w)):
            h = hyper[0] if k < 2 else hyper[1]
            a, b = 1 / min(t, h["horizon_g"]), 1 / min(t, h["horizon_s"])
            for i in range(len(w[k])):
                mu[k][i] = (1 - a) * mu[k][i] + a * grads[k][i]
                s[k][i] = (1 - b) * s[k][i] + b * grads[k][i] ** 2
                w[k][i] -= h["lr"] * mu[k][i] / (math.sqrt(s[k][i]) + h["eps"])
    return w


def test_simplified_adam_matches_its_transcription() -> None:
    hyper = [dict(lr=0.01, horizon_g=3, horizon_s=5, eps=1e-8), dict(lr=0.03, horizon_g=2, horizon_s=100, eps=1e-3)]
    params, _ = _run(lambda ps: SimplifiedAdam(_groups(ps, hyper[0], hyper[1])))
    _assert_equal(params, _simplified_adam_reference(hyper))


# ------------------------------------------------------------------------------------------------ adaptive SGD
ADAPTIVE_STEPS = 15


def _adaptive_sgd_reference(hyper: list[dict]) -> tuple[list[list[float]], dict[str, int]]:
    """The rule of issue 9 written out per element; also counts how often each branch of it was taken."""
    w = _lists(_params())
    g_avg = [[0.0] * len(x) for x in w]
    s_avg = [[0.0] * len(x) for x in w]
    horizon = [[float(hyper[0 if k < 2 else 1]["warmup_steps"])] * len(x) for k, x in enumerate(w)]  # N_0 = K
    taken = {"horizon_below_t": 0, "min_horizon": 0, "max_eta": 0}
    for t in range(1, ADAPTIVE_STEPS + 1):
        grads = [g.flatten().tolist() for g in _grads(t - 1)]
        for k in range(len(w)):
            h = hyper[0] if k < 2 else hyper[1]
            K = h["warmup_steps"]
            for i in range(len(w[k])):
                taken["horizon_below_t"] += horizon[k][i] < t
                weight = 1.0 / min(t, horizon[k][i])
                g_avg[k][i] = (1 - weight) * g_avg[k][i] + weight * grads[k][i]
                s_avg[k][i] = (1 - weight) * s_avg[k][i] + weight * grads[k][i] ** 2
                var = max(s_avg[k][i] - g_avg[k][i] ** 2, 0.0)
                if t <= K:
                    horizon[k][i], eta = float(K), 0.0
                else:
                    n = h["lambda_b"] * var / (g_avg[k][i] ** 2 + h["eps"])
                    eta = h["lambda_eta"] * g_avg[k][i] ** 2 / (var + h["eps"])
                    taken["min_horizon"] += n < h["min_horizon"]
                    taken["max_eta"] += eta > h["max_eta"]
                    horizon[k][i] = max(n, h["min_horizon"])
                    eta = min(eta, h["max_eta"])
                w[k][i] -= h["lr"] * eta * grads[k][i]
    return w, taken


def test_adaptive_sgd_matches_its_transcription() -> None:
    hyper = [
        dict(batch_size=4, warmup_steps=3, lambda_b=16.0, lambda_eta=0.05, eps=1e-8, lr=1.0, min_horizon=2.0),
        dict(
            batch_size=8, warmup_steps=2, lambda_b=0.2, lambda_eta=0.5, eps=1e-3, lr=0.5, min_horizon=1.5, max_eta=0.3
        ),
    ]
    params, optimizer = _run(lambda ps: AdaptiveSGD(_groups(ps, hyper[0], hyper[1])), steps=ADAPTIVE_STEPS)
    reference, taken = _adaptive_sgd_reference([{"max_eta": 1.0} | hyper[0], hyper[1]])
    _assert_equal(params, reference)
    assert all(count > 0 for count in taken.values()), taken  # every branch of the rule was exercised
    # B* = B·N in samples, averaged over coordinates; η averaged likewise
    horizons = [optimizer.state[p]["rate"].reciprocal() for p in params]
    b_star = sum(h["batch_size"] * float(n.sum()) for h, n in zip([hyper[0]] * 2 + [hyper[1]], horizons, strict=True))
    stats = optimizer.statistics()
    assert stats["b_star"] == pytest.approx(b_star / sum(n.numel() for n in horizons))
    assert 0 < stats["eta"] <= 1.0


def _least_squares(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 10, generator=g, dtype=torch.float64)
    return x, x @ torch.randn(10, generator=g, dtype=torch.float64) + 0.1 * torch.randn(20, generator=g)


@pytest.mark.parametrize("batch", [20, 8], ids=["full-batch", "minibatch"])
def test_adaptive_sgd_defaults_stay_finite_and_lower_a_least_squares_loss(batch) -> None:
    """20x10 least squares, lr=1e-2 and every other argument at its default (batch_size=32, warmup_steps=10): with
    full-batch gradients σ̃² is 0 during warmup, where the unbounded rule took η = λ_η·g̃²/ε."""
    x, y = _least_squares()
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    optimizer = AdaptiveSGD([w], lr=1e-2)
    g = torch.Generator().manual_seed(1)

    def loss(rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return 0.5 * (x[rows] @ w - y[rows]).pow(2).mean()

    start = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss(torch.randperm(20, generator=g)[:batch]).backward()
        optimizer.step()
    assert torch.isfinite(w).all()
    assert loss().item() < 0.95 * start


def test_adaptive_sgd_min_horizon_keeps_the_variance_estimate_alive() -> None:
    """A tiny λ_B would put N below one batch; ``min_horizon`` holds it at 2, so σ̃² stays positive and B* = 2B."""
    _, optimizer = _run(lambda ps: AdaptiveSGD(ps, batch_size=8, warmup_steps=2, lambda_b=1e-6))
    for state in optimizer.state.values():
        assert (state["rate"] == 0.5).all()
        assert (state["mean_sq"] - state["mean"] ** 2 > 0).all()
    assert optimizer.statistics()["b_star"] == pytest.approx(16.0)


# ------------------------------------------------------------------------------------------ conjugate gradient
def _cg_reference(lr: float, beta_rule: str, restart_every) -> list[list[float]]:
    w = [x for tensor in _lists(_params()) for x in tensor]
    prev_g = prev_p = None
    for t in range(STEPS):
        g = [x for tensor in _grads(t) for x in tensor.flatten().tolist()]
        beta = 0.0
        if prev_g is not None and not (restart_every and t % restart_every == 0):
            if beta_rule == "fletcher_reeves":
                beta = sum(x * x for x in g) / sum(x * x for x in prev_g)
            else:
                y = [a - b for a, b in zip(g, prev_g, strict=True)]
                beta = sum(a * b for a, b in zip(g, y, strict=True)) / sum(
                    a * b for a, b in zip(y, prev_p, strict=True)
                )
            beta = max(beta, 0.0) if math.isfinite(beta) else 0.0
        p = [-x + (beta * q if beta else 0.0) for x, q in zip(g, prev_p or g, strict=True)]
        if sum(a * b for a, b in zip(g, p, strict=True)) >= 0:
            p = [-x for x in g]
        w = [a + lr * b for a, b in zip(w, p, strict=True)]
        prev_g, prev_p = g, p
    sizes = [math.prod(s) for s in SHAPES]
    return [w[sum(sizes[:k]) : sum(sizes[: k + 1])] for k in range(len(sizes))]


@pytest.mark.parametrize(
    ("beta", "restart_every"), [("fletcher_reeves", None), ("hestenes_stiefel", None), ("fletcher_reeves", 3)]
)
def test_conjugate_gradient_matches_its_transcription(beta, restart_every) -> None:
    params, _ = _run(lambda ps: ConjugateGradient(ps, lr=0.05, beta=beta, restart_every=restart_every))
    _assert_equal(params, _cg_reference(0.05, beta, restart_every))


def test_conjugate_gradient_line_search_satisfies_armijo_and_solves_a_quadratic() -> None:
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    hessian = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    optimizer = ConjugateGradient([x], lr=1.0, beta="fletcher_reeves", line_search=True, restart_every=6)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * x @ hessian @ x - b @ x
        loss.backward()
        return loss

    losses = []
    for _ in range(40):
        before = closure().item()
        optimizer.step(closure)
        with torch.no_grad():
            losses.append((0.5 * x @ hessian @ x - b @ x).item())
        assert losses[-1] <= before + 1e-12  # the Armijo condition makes every step a descent
    torch.testing.assert_close(x.detach(), torch.linalg.solve(hessian, b), atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------- state round trip
MAKERS = {
    "lars": lambda ps: LARS(ps, lr=0.1, weight_decay=0.01, trust_coefficient=0.1),
    "lamb": lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01),
    "simplified_adam": lambda ps: SimplifiedAdam(ps, lr=0.01, horizon_g=3, horizon_s=10),
    "adaptive_sgd": lambda ps: AdaptiveSGD(ps, batch_size=1, warmup_steps=2, lambda_eta=0.1),
    "conjugate_gradient": lambda ps: ConjugateGradient(ps, lr=0.05, beta="hestenes_stiefel"),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_mid_run_reproduces_the_uninterrupted_run(name) -> None:
    full, _ = _run(MAKERS[name])
    half_params, half_optimizer = _run(MAKERS[name], steps=3)
    saved = copy.deepcopy(half_optimizer.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in half_params]
    resumed_optimizer = MAKERS[name](resumed_params)
    resumed_optimizer.load_state_dict(saved)
    resumed, _ = _run(MAKERS[name], params=resumed_params, optimizer=resumed_optimizer, start=3)
    for a, b in zip(resumed, full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- build_optimizer
@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.01)),
        ("momentum", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
        ("momentum_ema", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, dampening=0.9)),
        ("nesterov", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True)),
        ("adagrad", torch.optim.Adagrad),
        ("rmsprop", torch.optim.RMSprop),
        ("adadelta", torch.optim.Adadelta),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
    ],
)
def test_build_optimizer_equals_torch(name, reference) -> None:
    ours, _ = _run(lambda ps: build_optimizer(name, ps))
    theirs, _ = _run(reference)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_momentum_ema_is_the_weighted_form() -> None:
    """w(m+1) = w(m) + (1 − α)Δw_bp(m) + αΔw(m−1), with Δw_bp = −lr·g, transcribed."""
    alpha, lr = 0.9, 0.01
    w = _lists(_params())
    delta = [[0.0] * len(x) for x in w]
    for step in range(STEPS):
        grads = [g.flatten().tolist() for g in _grads(step)]
        for k in range(len(w)):
            for i in range(len(w[k])):
                # torch initialises the buffer with the first gradient, undamped
                d = -lr * grads[k][i] if step == 0 else (1 - alpha) * -lr * grads[k][i] + alpha * delta[k][i]
                delta[k][i] = d
                w[k][i] += d
    params, _ = _run(lambda ps: build_optimizer("momentum_ema", ps))
    _assert_equal(params, w)


def test_build_optimizer_passes_keyword_arguments_and_lists_valid_names() -> None:
    optimizer = build_optimizer("momentum", _params(), lr=0.5, momentum=0.8)
    assert optimizer.param_groups[0]["lr"] == 0.5 and optimizer.param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamax'; valid names: sgd, momentum, momentum_ema"):
        build_optimizer("adamax", _params())
    assert len(OPTIMIZERS) == 14


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: LARS(ps, lr=-0.1), r"`lr` must lie in \[0.0, inf\), got -0.1"),
        (lambda ps: LARS(ps, momentum=1.0), r"`momentum` must lie in \[0.0, 1.0\), got 1.0"),
        (lambda ps: LARS(ps, trust_coefficient=0.0), r"`trust_coefficient` must lie in \(0.0, inf\), got 0.0"),
        (lambda ps: LAMB(ps, betas=(0.9, 1.0)), r"`betas\[1\]` must lie in \[0.0, 1.0\), got 1.0"),
        (lambda ps: LAMB(ps, eps=0.0), r"`eps` must lie in \(0.0, inf\), got 0.0"),
        (lambda ps: SimplifiedAdam(ps, horizon_g=0), r"`horizon_g` must lie in \[1.0, inf\), got 0"),
        (lambda ps: AdaptiveSGD(ps, warmup_steps=-1), r"`warmup_steps` must lie in \[0.0, inf\), got -1"),
        (lambda ps: AdaptiveSGD(ps, lambda_b=0.0), r"`lambda_b` must lie in \(0.0, inf\), got 0.0"),
        (lambda ps: AdaptiveSGD(ps, lambda_eta=-1.0), r"`lambda_eta` must lie in \(0.0, inf\), got -1.0"),
        (lambda ps: AdaptiveSGD(ps, min_horizon=0.5), r"`min_horizon` must lie in \[1.0, inf\), got 0.5"),
        (lambda ps: AdaptiveSGD(ps, max_eta=0.0), r"`max_eta` must lie in \(0.0, inf\), got 0.0"),
        (lambda ps: ConjugateGradient(ps, beta="polak"), r"`beta` must be one of \('fletcher_reeves', 'hestenes"),
        (lambda ps: ConjugateGradient([{"params": ps[:1]}, {"params": ps[1:]}]), "takes one param group, got 2"),
    ],
)
def test_invalid_values_are_rejected(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make(_params())


@pytest.mark.parametrize("name", list(MAKERS))
def test_sparse_gradients_are_a_clear_error(name) -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = MAKERS[name](list(embedding.parameters()))
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()


def test_line_search_needs_a_closure() -> None:
    optimizer = ConjugateGradient(_params(), line_search=True)
    with pytest.raises(ValueError, match=r"`line_search=True` needs `step\(closure\)`"):
        optimizer.step()
