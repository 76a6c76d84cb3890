"""The compressed hooks' own work per step and rank, torch path against the fused CPU loops (``kernels.py``), on the
gradients of bench_data_parallel's MLP 1024-2048-2048-10 (6.3 M float32 elements in one bucket), one thread: int8 and
sign (encode and finish, two ranks simulated in one process, messages swapped as the all-gather would) and
PowerSGD rank 4 (its passes over the matrices: ``M = g + e`` with ``P = MQ``, Gram-Schmidt, ``Qᵀ = P̂ᵀM``, and the
result ``P̂Q̄ᵀ``; the fused loops take the last residual off in the first pass, the torch path writes it at the end;
the all-reduces are not counted). Thread CPU time, the median call over ``--rounds`` rounds of every
contender (an encode call also copies the gradient back into the bucket, 25 MB, the same for both paths). Prints
ratios (fused / torch) and absolute figures; writes comm_hooks.json and comm_hooks.png.

    python benchmarks/bench_comm_hooks.py [--calls 5] [--rounds 5] [--quick] [--out DIR]
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from _common import Bench, bench_parser

from lightning_dl.parallel.comm import codecs, kernels
from lightning_dl.parallel.comm.compressors import EPS, orthogonalize_
from lightning_dl.parallel.comm.workspace import BucketWorkspace


def mlp_shapes(sizes: tuple[int, ...]) -> list[torch.Size]:
    """Gradient shapes of ``nn.Linear`` layers ``sizes[i] -> sizes[i + 1]``, in DDP's (reverse) bucket order."""
    shapes = []
    for a, b in itertools.pairwise(sizes):
        shapes += [torch.Size([b, a]), torch.Size([b])]
    return shapes[::-1]


def thread_ms(fn: Callable[[], object], calls: int) -> list[float]:
    fn()  # compiles (or loads from the cache) and touches every buffer
    times = []
    for _ in range(calls):
        start = time.thread_time()
        fn()
        times.append(1e3 * (time.thread_time() - start))
    return times


def quantized(compressor: str, fused: bool, shapes: list[torch.Size]) -> tuple[Callable[[], None], Callable[[], None]]:
    """Encode and finish of two simulated ranks, per rank."""
    names = [f"p{i}" for i in range(len(shapes))]
    numel = sum(s.numel() for s in shapes)
    workspaces = [BucketWorkspace(names, shapes, compressor, world=2, fused=fused) for _ in range(2)]
    encode, finish = codecs.CODECS[compressor, fused]
    grads = [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    outs = [g.clone() for g in grads]

    def run_encode() -> None:
        for ws, out, grad in zip(workspaces, outs, grads, strict=True):
            out.copy_(grad)  # the hook overwrites the bucket; every call starts from the gradient
            encode(ws, out)
        for ws in workspaces:
            for r, other in enumerate(workspaces):
                ws.received[r].copy_(other.message)

    def run_finish() -> None:
        for me, (ws, out) in enumerate(zip(workspaces, outs, strict=True)):
            finish(ws, out, 2, me)

    return run_encode, run_finish


def powersgd(fused: bool, shapes: list[torch.Size], rank: int) -> Callable[[], None]:
    """PowerSGD's passes over every matrix of one rank (the all-reduces in between left out)."""
    matrices = []
    for i, shape in enumerate(s for s in shapes if len(s) == 2 and rank * (s[0] + s[1]) < s.numel()):
        gen = torch.Generator().manual_seed(i)
        rows, cols = shape
        matrices.append(
            {
                "g": torch.randn(rows, cols, generator=gen),
                "e": torch.zeros(rows, cols),
                "q": torch.randn(cols, rank, generator=gen),
                "p": torch.empty(rows, rank),
                "q_t": torch.empty(rank, cols),
                "q_mean_t": torch.randn(rank, cols, generator=gen),
                "out": torch.empty(rows, cols),
            }
        )

    pending = [False] * len(matrices)  # fused: the residual left in factors for the next call to take off

    def run() -> None:
        for i, t in enumerate(matrices):
            if fused:
                n = {k: v.numpy() for k, v in t.items()}
                kernels.add_project(n["e"], n["g"], t["q"].T.contiguous().numpy(), n["p"], n["q_t"], pending[i])
                kernels.orthogonalize(n["p"], EPS)
                kernels.project_back(n["p"], n["e"], n["q_t"])
                kernels.result(n["p"], n["q_mean_t"], n["out"])
                pending[i] = True
            else:
                t["e"].add_(t["g"])
                torch.mm(t["e"], t["q"], out=t["p"])
                orthogonalize_(t["p"])
                torch.mm(t["p"].T, t["e"], out=t["q_t"])
                t["e"].addmm_(t["p"], t["q_t"], alpha=-1.0)
                torch.mm(t["p"], t["q_mean_t"], out=t["out"])

    return run


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per contender and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all contenders; the median call reported")
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1:
        parser.error(f"--calls and --rounds must be >= 1, got {args.calls} and {args.rounds}")
    bench = Bench("comm_hooks", args)
    torch.set_num_threads(1)
    sizes = (32, 64, 64, 10) if bench.quick else (1024, 2048, 2048, 10)
    calls, rounds = (2, 1) if bench.quick else (args.calls, args.rounds)
    shapes = mlp_shapes(sizes)
    timers: dict[tuple[str, str], Callable[[], object]] = {}
    for path, fused in (("torch", False), ("fused", True)):
        for compressor in ("int8", "sign"):
            timers[compressor, f"{path}_encode"], timers[compressor, f"{path}_finish"] = quantized(
                compressor, fused, shapes
            )
        timers["powersgd r=4", f"{path}_ms"] = powersgd(fused, shapes, 4)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
    for _ in range(rounds):  # every contender in each round: a change of load hits all of them alike
        for key, fn in timers.items():
            times[key] += thread_ms(fn, calls)
    rows: dict[str, dict[str, float]] = {}
    for (label, part), measured in times.items():
        per_rank = statistics.median(measured) / (1 if label.startswith("powersgd") else 2)  # two simulated ranks
        rows.setdefault(label, {})[part if part.endswith("_ms") else f"{part}_ms"] = per_rank
    for row in rows.values():
        for path in ("torch", "fused"):
            if f"{path}_encode_ms" in row:
                row[f"{path}_ms"] = row[f"{path}_encode_ms"] + row[f"{path}_finish_ms"]
        row["ratio"] = row["fused_ms"] / row["torch_ms"]
    copy = torch.randn(sum(s.numel() for s in shapes)), torch.randn(sum(s.numel() for s in shapes))
    add_ms = statistics.median(thread_ms(lambda: copy[0].add_(copy[1]), calls))
    print(f"\n{sum(s.numel() for s in shapes) / 1e6:.2f} M elements; one in-place add over them: {add_ms:.2f} ms")
    print(f"{'hook':<14} {'torch ms':>9} {'fused ms':>9} {'fused/torch':>12}")
    for label, row in rows.items():
        print(f"{label:<14} {row['torch_ms']:9.2f} {row['fused_ms']:9.2f} {row['ratio']:12.2f}")
    bench.write_json(
        {
            "sizes": sizes,
            "elements": sum(s.numel() for s in shapes),
            "calls": calls,
            "rounds": rounds,
            "add_ms": add_ms,
            "rows": rows,
            "what": "thread CPU ms per step and rank of the hook's own work (all-gather / all-reduce not counted)",
        }
    )
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.4))
    labels = list(rows)
    y = np.arange(len(labels))
    axis.barh(y - 0.2, [rows[k]["torch_ms"] for k in labels], height=0.4, label="torch operations")
    axis.barh(y + 0.2, [rows[k]["fused_ms"] for k in labels], height=0.4, label="fused loops (numba)")
    axis.set(yticks=y, yticklabels=labels, xlabel="CPU ms per step and rank", title="compressed hooks' own work")
    axis.invert_yaxis()
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    figure.tight_layout()
    bench.save_figure(figure, "comm_hooks.png")


if __name__ == "__main__":
    main()
