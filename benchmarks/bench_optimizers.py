"""Time of ``optimizer.step()`` for ``lamb``, ``lars``, ``simplified_adam`` and ``adaptive_sgd`` against torch's
``adam`` (foreach) on the same ~9.5M-parameter MLP, interleaved in one process (the order rotates each round) on
fixed random gradients. Prints ratios (ours / adam) and absolute figures; writes optimizers.json and optimizers.png
to ``--out`` (default benchmarks/results).

    python benchmarks/bench_optimizers.py [--reps 80] [--quick] [--out DIR]

``--quick`` steps a tiny MLP a few times: it checks the script, not the timings.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import Bench, bench_parser  # benchmarks/ is on sys.path when a benchmark runs

from lightning_dl.nn import MLP
from lightning_dl.optim import build_optimizer

CONTENDERS = {
    "adam": dict(foreach=True),
    "lamb": {},
    "lars": {},
    "simplified_adam": {},
    "adaptive_sgd": dict(warmup_steps=0),  # update from the first step, so every step does the whole rule
}
GOALS = {"lamb": 1.5, "lars": 1.5, "simplified_adam": 1.2, "adaptive_sgd": 2.0}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--reps", type=int, default=80, help="timed steps per optimizer (interleaved)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.reps < 1 or args.threads < 1:
        parser.error(f"--reps and --threads must be >= 1, got {args.reps} and {args.threads}")
    bench = Bench("optimizers", args)
    if bench.quick:
        args.reps = 3
    features, width = (16, 32) if bench.quick else (512, 2048)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: MLP(features, [width, width, width], 10) for name in CONTENDERS}
    params = sum(p.numel() for p in next(iter(models.values())).parameters())
    optimizers = {}
    for name, model in models.items():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizers[name] = build_optimizer(name, model.parameters(), **CONTENDERS[name])
        for _ in range(3):  # warm up: allocate state
            optimizers[name].step()
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            optimizers[name].step()
            times[name].append(time.perf_counter() - start)
    step_ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    ratios = {name: step_ms[name] / step_ms["adam"] for name in GOALS}
    print(
        f"{params / 1e6:.1f}M parameters, {args.reps} interleaved steps each, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; median time of optimizer.step()"
    )
    for name in names:
        goal = f"  {ratios[name]:.2f}x adam (goal <= {GOALS[name]:.1f}x)" if name in GOALS else ""
        print(f"  {name:<16} {step_ms[name]:8.2f} ms{goal}")
    payload = {
        "parameters": params,
        "step_ms": step_ms,
        "ratio_to_adam": ratios,
        "goals": GOALS,
        "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
    }
    bench.write_json(payload)
    bench.save_figure(plot(payload, threads=torch.get_num_threads()), "optimizers.png")


def plot(payload: dict, *, threads: int):
    import matplotlib.pyplot as plt

    step_ms = payload["step_ms"]
    names = list(step_ms)
    fig, ax = plt.subplots(figsize=(8, 3.2), constrained_layout=True)
    ax.barh(names, [step_ms[n] for n in names], color=["#888"] + ["#1f77b4"] * (len(names) - 1))
    for i, name in enumerate(names):
        ratio = payload["ratio_to_adam"].get(name)
        label = f" {step_ms[name]:.1f} ms" + (f" ({ratio:.2f}x adam, goal {payload['goals'][name]}x)" if ratio else "")
        ax.text(step_ms[name], i, label, va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(step_ms.values()) * 1.9)
    ax.set_xlabel("median time of optimizer.step() (ms)")
    ax.set_title(
        f"{payload['parameters'] / 1e6:.1f}M-param MLP, {threads} CPU threads, torch {torch.__version__}",
        fontsize=9,
    )
    return fig


if __name__ == "__main__":
    main()
