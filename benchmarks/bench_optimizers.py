"""Time of ``optimizer.step()`` for ``lamb``, ``lars``, ``simplified_adam`` and ``adaptive_sgd`` against torch's
``adam`` (foreach) on the same ~9.5M-parameter MLP, interleaved in one process (the order rotates each round) on
fixed random gradients. Prints ratios (ours / adam) and absolute figures; writes benchmarks/results/optimizers.json
and .png.

    python benchmarks/bench_optimizers.py [--reps 80]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from lightning_dl.nn import MLP
from lightning_dl.optim import build_optimizer

RESULTS = Path(__file__).parent / "results"
CONTENDERS = {
    "adam": dict(foreach=True),
    "lamb": {},
    "lars": {},
    "simplified_adam": {},
    "adaptive_sgd": dict(warmup_steps=0),  # update from the first step, so every step does the whole rule
}
GOALS = {"lamb": 1.5, "lars": 1.5, "simplified_adam": 1.2, "adaptive_sgd": 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=80, help="timed steps per optimizer (interleaved)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: MLP(512, [2048, 2048, 2048], 10) for name in CONTENDERS}
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
    environment = {
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    print(
        f"{params / 1e6:.1f}M parameters, {args.reps} interleaved steps each, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; median time of optimizer.step()"
    )
    for name in names:
        goal = f"  {ratios[name]:.2f}x adam (goal <= {GOALS[name]:.1f}x)" if name in GOALS else ""
        print(f"  {name:<16} {step_ms[name]:8.2f} ms{goal}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "parameters": params,
        "args": vars(args),
        "step_ms": step_ms,
        "ratio_to_adam": ratios,
        "goals": GOALS,
        "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
        "environment": environment,
    }
    (RESULTS / "optimizers.json").write_text(json.dumps(payload, indent=2))
    plot(payload, RESULTS / "optimizers.png")
    print(f"wrote {RESULTS / 'optimizers.json'} and {RESULTS / 'optimizers.png'}")


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_ms, env = payload["step_ms"], payload["environment"]
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
        f"{payload['parameters'] / 1e6:.1f}M-param MLP, {env['cpu_threads']} CPU threads, torch {env['torch']}",
        fontsize=9,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
