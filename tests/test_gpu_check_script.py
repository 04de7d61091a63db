"""benchmarks/gpu/check.sh runs end to end (its --dry-run: every step on the CPU at toy sizes), so a
device call is not spent finding a typo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_check_script_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for table in ("| case | M x K | fused ms", "| layer | C | H*W", "| slowdown (target <= 1.15)"):
        assert table in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["bench_ci.log", "bench_pcc.log", "bench_train_step.log", "info.log"]
