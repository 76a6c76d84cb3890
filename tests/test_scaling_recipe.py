"""The scaling and too-big recipes' own logic, without processes: the layout → strategy mapping, the parameter
count the memory cap is chosen from, and bad arguments refused before anything starts."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.strategies import HybridStrategy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(EXAMPLES))  # the recipes import examples/_report.py
    try:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


scaling = _load("scaling")
too_big = _load("too_big")


def test_every_layout_trains_through_the_hybrid_strategy():
    """One process gets Lightning's default; every other layout, tp × pp included, one HybridStrategy with it."""
    assert scaling.strategy_for(scaling.parse_layout("1")) == "auto"
    for text in (*scaling.LAYOUTS[1:], "tp2,pp2", "dp2,tp2,pp2"):
        strategy = scaling.strategy_for(scaling.parse_layout(text))
        assert isinstance(strategy, HybridStrategy) and strategy.parallel_layout == ParallelLayout.parse(text)
        assert (strategy.schedule, strategy.n_microbatches) == ("1f1b", scaling.MICROBATCHES)
        assert scaling.describe(strategy).startswith(f"HybridStrategy(layout='{ParallelLayout.parse(text)}'")
    assert [scaling.parse_layout(t).world_size for t in scaling.LAYOUTS] == [1, 2, 2, 2, 4, 4, 4]
    assert scaling.layout_name(ParallelLayout(dp=2, pp=2)) == "dp2 x pp2"
    assert scaling.layout_name(ParallelLayout()) == "1 process"


def test_layouts_that_do_not_parse_are_refused_by_name():
    with pytest.raises(ValueError, match=r"cannot read 'dq2'"):
        scaling.parse_layout("dq2")


def test_parameter_bytes_counts_the_built_model():
    module = too_big.WideMLP(width=32, layers=3)
    with torch.device("meta"):
        module.configure_model()
    assert too_big.parameter_bytes(32, 3) == 4 * sum(p.numel() for p in module.parameters())
    assert len(module.pipeline_blocks()) == 4


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("scaling.py", ["--layouts", "dp4", "--batch-size", "24"], "--batch-size 24 must divide by dp × 4"),
        ("too_big.py", ["--microbatches", "3"], "--microbatches must divide --batch-size"),
    ],
)
def test_bad_arguments_fail_before_any_process(script, args, message):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-1000:]


def _result(name: str, n: int, step: float, curve: list, **extra) -> dict:
    return {
        "name": name, "world_size": n, "step_seconds": step, "samples_per_second": 64 / step,
        "seconds_to_target": curve[-1][1] if curve[-1][2] <= 0.2 else None, "peak_rss_bytes": [2**29] * n,
        "curve": curve, **extra,
    }  # fmt: skip


def test_report_takes_each_efficiency_against_the_one_process_run_before_it(tmp_path):
    """E_N = T_1 / (N · T_N) with the T_1 trained just before the layout; the list's own T_1 kept beside it."""
    one = _result("1 process", 1, 0.1, [(5, 0.5, 0.5), (10, 1.0, 0.15)])
    dp2 = _result("dp2", 2, 0.08, [(5, 0.4, 0.5), (10, 0.8, 0.3)], reference={"step_seconds": 0.12})
    ceiling = {"alone_step_seconds": 0.1, "step_seconds": [0.2, 0.25], "ceiling_E2": 0.2 / 0.225}
    args = argparse.Namespace(target=0.2, out=tmp_path)
    scaling.report([one, dp2], {"usable_cpus": 2, "two_independent": ceiling}, args, (1.0, 1.0, 1.0))
    layouts = json.loads((tmp_path / "scaling.json").read_text())["layouts"]
    assert layouts[0]["efficiency"] == 1.0
    assert layouts[1]["efficiency"] == pytest.approx(0.12 / (2 * 0.08))
    assert layouts[1]["efficiency_first_t_1"] == pytest.approx(0.1 / (2 * 0.08))
    rows = (tmp_path / "scaling.md").read_text().splitlines()
    assert rows[2].split(" | ")[:2] == ["| 1 process", "1.0"] and rows[3].split(" | ")[:2] == ["| dp2", "not reached"]
    assert "| 80.0 | 120.0 | 0.75 |" in rows[3]
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
