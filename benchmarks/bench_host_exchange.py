"""Latency of the compressed hooks' per-step messages between 2 CPU ranks of one host: gloo's all-reduce and
all-gather (loopback TCP, worker and device threads) against the shared-memory exchange of
``lightning_dl/parallel/comm/host.py``, for PowerSGD's 82 KB all-reduce (rank 4 on the MLP 1024-2048-2048-10) and
sign's 0.8 MB all-gather. Before each call both ranks compute for ``--gap-ms`` (as a training step does, so that
gloo's threads have gone to sleep), after a barrier. The figure is the time from the later rank's arrival to the
later rank's return: the collective's own cost, without the ranks' skew. Contenders alternate call by call, so a
change of load hits them alike. Prints medians, 90th percentiles and ratios (exchange / gloo); writes
host_exchange.json and host_exchange.png.

    python benchmarks/bench_host_exchange.py [--calls 200] [--gap-ms 3] [--quick] [--out DIR]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import Bench, bench_parser

from lightning_dl.parallel.comm.host import HostExchange  # imported once: the ranks are forked from this process

MESSAGES = {
    "all-reduce 82 KB (PowerSGD P)": ("all_reduce", 20_560),
    "all-gather 0.8 MB (sign)": ("all_gather", 197_000),
}
"""Label: (collective, float32 elements)."""


def _rank(rank: int, world: int, tmp: str, calls: int, gap_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    largest = max(n for _, n in MESSAGES.values())
    exchange = HostExchange.build(None, capacity=4 * largest, timeout=120.0)
    if exchange is None:
        raise RuntimeError("the host exchange is not usable on this machine (see lightning_dl/parallel/comm/host.py)")
    a, b = torch.randn(128, 128), torch.randn(128, 128)
    marks: dict[str, list[tuple[float, float]]] = {}
    for _ in range(calls):
        for label, (collective, n) in MESSAGES.items():
            x = torch.randn(n)
            outs = [torch.empty(n) for _ in range(world)]
            for path in ("gloo", "shared memory"):
                dist.barrier()
                until = time.perf_counter() + gap_s
                while time.perf_counter() < until:
                    torch.mm(a, b)
                start = time.perf_counter()
                if collective == "all_reduce":
                    exchange.all_reduce_(x) if path == "shared memory" else dist.all_reduce(x)
                else:
                    exchange.all_gather(outs, x) if path == "shared memory" else dist.all_gather(outs, x)
                marks.setdefault(f"{label}|{path}", []).append((start, time.perf_counter()))
    torch.save(marks, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--calls", type=int, default=200, help="calls per contender")
    parser.add_argument("--gap-ms", type=float, default=3.0, help="compute before each call, in milliseconds")
    args = parser.parse_args()
    if args.calls < 2 or args.gap_ms < 0:
        parser.error(f"--calls must be >= 2 and --gap-ms >= 0, got {args.calls} and {args.gap_ms}")
    bench = Bench("host_exchange", args)
    calls = 4 if bench.quick else args.calls
    world = 2
    with tempfile.TemporaryDirectory(prefix="lightning_dl_bench_") as tmp:
        mp.start_processes(_rank, args=(world, tmp, calls, args.gap_ms / 1e3), nprocs=world, start_method="fork")
        marks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    rows: dict[str, dict[str, Any]] = {}
    for key in marks[0]:
        label, path = key.split("|")
        cost = sorted(1e3 * (max(m[key][i][1] for m in marks) - max(m[key][i][0] for m in marks)) for i in range(calls))
        rows.setdefault(label, {})[path] = {
            "median_ms": statistics.median(cost),
            "p90_ms": cost[int(0.9 * (calls - 1))],
            "mean_ms": statistics.fmean(cost),
            "share_over_2ms": sum(c > 2.0 for c in cost) / calls,
        }
    print(f"\n{world} ranks, {calls} calls each, {args.gap_ms:g} ms of compute before each call")
    print(f"{'message':<32} {'path':<14} {'median ms':>9} {'p90 ms':>7} {'mean ms':>8} {'>2 ms':>6}")
    for label, paths in rows.items():
        for path, row in paths.items():
            print(
                f"{label:<32} {path:<14} {row['median_ms']:9.3f} {row['p90_ms']:7.3f} {row['mean_ms']:8.3f}"
                f" {row['share_over_2ms']:6.0%}"
            )
        paths["ratio_mean"] = paths["shared memory"]["mean_ms"] / paths["gloo"]["mean_ms"]
        print(f"{'':<32} {'exchange/gloo':<14} mean {paths['ratio_mean']:.3f}")
    bench.write_json(
        {
            "calls": calls,
            "gap_ms": args.gap_ms,
            "ranks": world,
            "rows": rows,
            "what": "ms from the later rank's arrival to the later rank's return, per call",
        }
    )
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(7, 3.4))
    labels = list(rows)
    y = np.arange(len(labels))
    for offset, path in ((-0.2, "gloo"), (0.2, "shared memory")):
        means = [rows[k][path]["mean_ms"] for k in labels]
        p90 = [rows[k][path]["p90_ms"] for k in labels]
        axis.barh(y + offset, means, height=0.4, label=f"{path}: mean (bar), 90th percentile (tick)")
        axis.plot(p90, y + offset, "k|", markersize=12)
    axis.set(yticks=y, yticklabels=labels, xlabel="ms after the later rank arrives", title="per-step messages, 2 ranks")
    axis.invert_yaxis()
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=1, frameon=False, fontsize=8)
    figure.tight_layout()
    bench.save_figure(figure, "host_exchange.png")


if __name__ == "__main__":
    main()
