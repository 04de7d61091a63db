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
    for table in ("| case | M x K | fused ms", "| layer | C | H*W",
                  "ratio to no PCC (target <= 1.15)",
                  "vgg16_cifar training step", "End to end: CICollector on ResNet-50",
                  "| model | round_to | FLOPs removed | params removed | eager b1 | eager b2 |"):
        assert table in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["bench_ci.log", "bench_pcc.log", "bench_train_step.log",
                                            "bench_train_step_vgg.log", "info.log", "speedup.md",
                                            "speedup_table.log"]


def _run_with_fake_tools(tmp_path, python_body: str, **env):
    """check.sh's device branch with a fake nvidia-smi and a fake python that logs its
    arguments and runs ``python_body``: (completed process, logged calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake H100, 81559 MiB, 580'\n")
    log = tmp_path / "calls.log"
    (bin_dir / "python").write_text(f"#!/bin/bash\necho \"$*\" >> {log}\n{python_body}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": str(bin_dir / "python"), "OUT": str(tmp_path / "out"), **env}
    out = subprocess.run(["bash", "benchmarks/gpu/check.sh"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    return out, log.read_text().splitlines()


def test_check_script_gpu_steps_in_order(tmp_path):
    """The device branch (without a device): build, info, quick GPU tests, the benchmarks,
    then the exhaustive compiled sweep; every step runs although one fails."""
    out, calls = _run_with_fake_tools(tmp_path, 'case "$*" in *bench_ci*) exit 3;; esac; exit 0')
    assert out.returncode == 1, out.stdout  # bench_ci failed, the rest still ran
    calls = [c for c in calls if c != "-c import xdist"]
    order = ["setup.py build_ext", "-m pccfast info", "not against_reference_on_gpu",
             "bench_pcc.py", "bench_train_step.py --model resnet50",
             "bench_train_step.py --model vgg16_cifar", "bench_ci.py",
             "speedup_table.py --device cuda --dtype bfloat16 --channels-last",
             "-k against_reference_on_gpu"]
    assert len(calls) == len(order), calls
    for call, expected in zip(calls, order):
        assert expected in call, (call, expected)
    assert "=== bench_ci: exit 3" in out.stdout and "=== gpu_sweep: exit 0" in out.stdout


def test_check_script_skips_steps_past_its_budget(tmp_path):
    out, calls = _run_with_fake_tools(tmp_path, "sleep 3", BUDGET="20")
    assert out.returncode == 1
    assert "=== gpu_sweep: skipped, the budget is spent" in out.stdout, out.stdout
    assert 2 <= len(calls) < 8


@pytest.mark.slow
def test_study_script_dry_run(tmp_path):
    """benchmarks/gpu/study_vgg16.sh on the CPU at toy sizes: both arms, ci and random at the
    fixed allocation, fine-tuned, the feature record; the tables and plots copied to $OUT."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "RUNS_DIR": str(tmp_path / "runs")}
    out = subprocess.run(["bash", "benchmarks/gpu/study_vgg16.sh", "--dry-run"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "accuracy_vs_flops.png", "features.csv", "features.png", "paired_differences.png",
        "study.csv", "study.md"]
    text = (tmp_path / "out" / "study.md").read_text()
    assert "## Primary endpoint" in text and "## What pre-training did to the features" in text
    rows = (tmp_path / "out" / "study.csv").read_text().splitlines()
    assert any(",finetuned," in r and ",fixed,ci,0.846000," in r for r in rows)
    for arm in ("no_pcc", "pcc"):
        for criterion in ("ci", "random"):
            assert f"{arm} / {criterion}" in text
