"""A successful ``async_sgd`` run looks successful: RPC shuts down without TensorPipe error lines, and what the
calling process logs after ``fit`` goes to a new version directory instead of deleting the fit's logs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def _columns(path: Path) -> set[str]:
    with path.open() as handle:
        return set(next(csv.reader(handle)))


def test_a_clean_run_prints_no_rpc_errors_and_keeps_the_fit_logs(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tests.helpers.async_tools", f"--out={tmp_path}"],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "tensorpipe" not in run.stderr and "encountered error" not in run.stderr, run.stderr
    assert "exists and is not empty" not in run.stderr, run.stderr
    fit, test = tmp_path / "clean" / "version_0", tmp_path / "clean" / "version_1"
    assert "async/worker_loss" in _columns(fit / "metrics.csv")  # the servers' log of the fit, kept
    assert "test_loss" in _columns(test / "metrics.csv")
