"""Every ``benchmarks/bench_*.py`` runs in its quick mode (``--quick --out <tmp>``), exits 0 and writes a JSON file
that records the machine and a PNG file there, and leaves the measured figures in ``benchmarks/results`` alone. A
benchmark added later is found by the glob and tested without further ado."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py"))
MULTI_PROCESS = {"bench_async", "bench_data_parallel", "bench_host_exchange", "bench_pipeline", "bench_tensor_parallel"}
"""Benchmarks that start process groups (marked ``distributed``)."""


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*") if p.is_file()} if folder.is_dir() else {}


def test_the_benchmarks_are_found() -> None:
    assert {"bench_async.py", "bench_callbacks.py", "bench_optimizers.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [pytest.param(p, id=p.stem, marks=[pytest.mark.distributed] if p.stem in MULTI_PROCESS else []) for p in SCRIPTS],
)
def test_benchmark_runs_quick_and_records_the_machine(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "out"
    committed = _stamps(BENCHMARKS / "results")
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, (result.stdout[-1500:], result.stderr[-3000:])
    written = sorted(p.name for p in out.iterdir())
    jsons, pngs = [out / n for n in written if n.endswith(".json")], [out / n for n in written if n.endswith(".png")]
    assert jsons and pngs, written
    for path in jsons:
        record = json.loads(path.read_text())
        assert record["quick"] is True and record["args"]["out"] == str(out)
        environment = record["environment"]
        assert environment["cpu_count"] >= 1 and environment["torch"] and environment["lightning"]
        assert environment["python"] == ".".join(map(str, sys.version_info[:3]))
        for key in ("load_average_start", "load_average_end"):
            assert len(environment[key]) == 3 and all(v >= 0 for v in environment[key])
    for path in pngs:
        assert path.read_bytes()[:4] == b"\x89PNG"
    after = _stamps(BENCHMARKS / "results")  # the committed figures of the same names are untouched
    assert {n: after.get(n) for n in written if n in committed} == {n: committed[n] for n in written if n in committed}
