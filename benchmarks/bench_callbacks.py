"""Step time of a ~9.4M-parameter MLP under plain Lightning, Lightning's ``gradient_clip_val``, our
``GradientClipping``, and all four callbacks together (noise scale at its default ``every_n_steps=25`` and at every
step), side by side in one process. Contenders run interleaved over several rounds so that drift of a shared
machine hits them alike; the figure is the mean time per optimizer step (amortising work done every n steps), and
a ratio is the median over rounds of the ratio within a round. Because a small shared machine makes step times
swing by 20% between runs, the time spent inside our callbacks' hooks is also measured directly and set against the
plain step: (plain + hooks) / plain.

    python benchmarks/bench_callbacks.py [--steps 30] [--rounds 7] [--quick] [--out DIR]

Prints ratios (ours / reference) and absolute figures; writes callbacks.json and callbacks.png to ``--out``
(default benchmarks/results). ``--quick`` runs a tiny MLP for a few steps: it checks the script, not the timings.
"""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from _common import Bench, bench_parser  # benchmarks/ is on sys.path when a benchmark runs
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_dl.callbacks import BatchSizeScaling, GradientClipping, GradientNoiseScale, LRSchedule
from lightning_dl.nn import MLP

FULL = dict(features=512, width=2048)
QUICK = dict(features=16, width=32)


class Model(L.LightningModule):
    def __init__(self, features: int = 512, width: int = 2048) -> None:
        super().__init__()
        self.net = MLP(features, [width, width, width], 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepTimer(Callback):
    """Wall time of every optimizer step, batch start to batch end."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


CONTENDERS = {
    "plain Lightning": (dict(), lambda: []),
    "Lightning gradient_clip_val": (dict(gradient_clip_val=1.0), lambda: []),
    "GradientClipping": (dict(), lambda: [GradientClipping(max_norm=1.0)]),
    "all four (noise scale every 25)": (
        dict(),
        lambda: [
            GradientClipping(max_norm=1.0),
            LRSchedule("cosine", warmup_steps=10),
            BatchSizeScaling(reference_batch_size=32, rule="linear"),
            GradientNoiseScale(),
        ],
    ),
    "all four (noise scale every step)": (
        dict(),
        lambda: [
            GradientClipping(max_norm=1.0),
            LRSchedule("cosine", warmup_steps=10),
            BatchSizeScaling(reference_batch_size=32, rule="linear"),
            GradientNoiseScale(every_n_steps=1),
        ],
    ),
}
RATIOS = [  # (ours, reference, goal)
    ("GradientClipping", "Lightning gradient_clip_val", 1.0),
    ("all four (noise scale every 25)", "plain Lightning", 1.03),
    ("all four (noise scale every step)", "plain Lightning", None),
]


HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_epoch_start", "on_train_start")


def _timed(hook, spent: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    return wrapper


def time_contender(name: str, steps: int, warmup: int, data: TensorDataset, sizes: dict) -> tuple[float, float]:
    """Mean wall time per timed step, and mean time per step spent inside our callbacks' hooks."""
    trainer_kwargs, make_callbacks = CONTENDERS[name]
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks = make_callbacks()
    spent = [0.0]
    for callback in callbacks:
        for hook in HOOKS:
            setattr(callback, hook, _timed(getattr(callback, hook), spent))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
        **trainer_kwargs,
    )
    trainer.fit(Model(**sizes), DataLoader(data, batch_size=64, shuffle=True))
    return statistics.fmean(timer.times[warmup:]), spent[0] / (warmup + steps)


def clipping_micro(reps: int, sizes: dict) -> dict[str, dict[str, float]]:
    """Our clipping hook against the call Lightning makes for ``gradient_clip_val`` (``clip_grad_norm_``, foreach)
    on the same 9.5M gradients, interleaved ``reps`` times, with gradients above and below the threshold. The hook
    gets a real (unfitted) Trainer that never logs, so the figure is the clipping alone."""
    model = Model(**sizes)
    params = list(model.parameters())
    optimizer = model.configure_optimizers()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, log_every_n_steps=10**9, enable_progress_bar=False)
    results = {}
    for label, scale in (("clipping", 1.0), ("not clipping", 1e-6)):
        ours = GradientClipping(max_norm=1.0)
        times: dict[str, list[float]] = {"ours": [], "lightning": []}
        for rep in range(reps):
            for name in ("ours", "lightning") if rep % 2 == 0 else ("lightning", "ours"):
                for p in params:
                    p.grad = torch.full_like(p, scale)
                start = time.perf_counter()
                if name == "ours":
                    ours.on_before_optimizer_step(trainer, model, optimizer)
                else:
                    torch.nn.utils.clip_grad_norm_(params, 1.0, 2.0)
                times[name].append(time.perf_counter() - start)
        ours_ms, theirs_ms = (1e3 * statistics.median(times[k]) for k in ("ours", "lightning"))
        results[label] = {"ours_ms": ours_ms, "lightning_ms": theirs_ms, "ratio": ours_ms / theirs_ms}
    return results


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (order rotated each round)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--micro-reps", type=int, default=40, help="repetitions of the clipping micro-benchmark")
    args = parser.parse_args()
    for name in ("steps", "rounds", "threads", "micro_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    bench = Bench("callbacks", args)
    if bench.quick:
        args.steps, args.warmup, args.rounds, args.micro_reps = 9, 1, 1, 2  # 10 steps: LRSchedule warms up 10
    sizes = QUICK if bench.quick else FULL
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    n = 64 * (args.steps + args.warmup)
    data = TensorDataset(
        torch.randn(n, sizes["features"], generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )
    params = sum(p.numel() for p in Model(**sizes).parameters())

    names = list(CONTENDERS)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    in_hooks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: nobody always goes first
            step, hooks = time_contender(name, args.steps, args.warmup, data, sizes)
            rounds[name].append(step)
            in_hooks[name].append(hooks)
            print(
                f"round {r + 1}/{args.rounds}  {name:<36} {1e3 * step:8.2f} ms/step  "
                f"{1e3 * hooks:7.2f} ms in our hooks",
                flush=True,
            )
    micro = clipping_micro(args.micro_reps, sizes)
    step_ms = {name: 1e3 * statistics.median(times) for name, times in rounds.items()}
    hook_ms = {name: 1e3 * statistics.median(times) for name, times in in_hooks.items()}
    plain = step_ms["plain Lightning"]
    # overhead measured inside the hooks, set against the plain step: robust to the machine's step-time noise
    hook_overhead = {name: (plain + ms) / plain for name, ms in hook_ms.items()}
    # paired within each round, then the median over rounds: robust to the machine drifting between rounds
    ratios = []
    for ours, ref, goal in RATIOS:
        paired = sorted(a / b for a, b in zip(rounds[ours], rounds[ref], strict=True))
        ratios.append(
            {
                "ours": ours,
                "reference": ref,
                "ratio": statistics.median(paired),
                "goal": goal,
                "ratio_min": paired[0],
                "ratio_max": paired[-1],
            }
        )

    print(
        f"\n{params / 1e6:.1f}M-parameter MLP, batch 64, AdamW, {args.steps} timed steps x {args.rounds} rounds, "
        f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} CPU threads"
    )
    for name, ms in step_ms.items():
        print(
            f"  {name:<36} {ms:8.2f} ms/step  {hook_ms[name]:7.2f} ms/step in our hooks "
            f"-> (plain + hooks) / plain = {hook_overhead[name]:.3f}x"
        )
    for label, row in micro.items():
        print(
            f"  clipping alone, gradients {label}: ours {row['ours_ms']:.2f} ms, Lightning's clip_grad_norm_ "
            f"{row['lightning_ms']:.2f} ms -> {row['ratio']:.3f}x (goal <= 1.00x)"
        )
    for row in ratios:
        goal = f" (goal <= {row['goal']:.2f}x)" if row["goal"] else ""
        print(
            f"  {row['ours']} / {row['reference']}: {row['ratio']:.3f}x{goal}  "
            f"[rounds {row['ratio_min']:.3f} .. {row['ratio_max']:.3f}]"
        )

    payload = {
        "parameters": params,
        "batch_size": 64,
        "step_ms": step_ms,
        "hook_ms": hook_ms,
        "hook_overhead": hook_overhead,
        "clipping_micro": micro,
        "rounds_ms": {k: [1e3 * t for t in v] for k, v in rounds.items()},
        "ratios": ratios,
    }
    print()
    bench.write_json(payload)
    bench.save_figure(plot(payload, threads=torch.get_num_threads()), "callbacks.png")


def plot(payload: dict, *, threads: int):
    """Bars of the mean step time, labelled with the time spent inside our hooks."""
    import matplotlib.pyplot as plt

    step_ms, hook_ms = payload["step_ms"], payload["hook_ms"]
    fig, ax = plt.subplots(figsize=(9, 3.8), constrained_layout=True)
    names = list(step_ms)
    ax.barh(names, [step_ms[n] for n in names], color=["#888", "#888", "#1f77b4", "#2ca02c", "#d62728"])
    base = step_ms["plain Lightning"]
    for i, name in enumerate(names):
        hooks = f", {hook_ms[name]:.1f} ms in our hooks" if hook_ms[name] else ""
        ax.text(step_ms[name], i, f" {step_ms[name]:.1f} ms ({step_ms[name] / base:.2f}x plain{hooks})", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(step_ms.values()) * 2.0)
    ax.set_xlabel("mean time per optimizer step (ms), median of interleaved rounds")
    ax.set_title(
        f"{payload['parameters'] / 1e6:.1f}M-param MLP, batch 64, {threads} CPU threads, "
        f"torch {torch.__version__}, lightning {L.__version__}",
        fontsize=9,
    )
    return fig


if __name__ == "__main__":
    main()
