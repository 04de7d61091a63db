"""The run's measured speed-up (summary.json, report.md, --no-speed), --round-to through the
pipeline, and `pccfast bench` / `pccfast export` on a run folder and on a model file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pccfast
from pccfast.cli import main
from pccfast.data import load_data


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A small finished run (digits, a quarter-width VGG, one epoch each, round_to 4)."""
    data = load_data("digits", train_limit=256, test_limit=64, seed=0)
    root = tmp_path_factory.mktemp("deploy")
    npz = root / "digits.npz"
    np.savez(npz, x_train=data.train.images.permute(0, 2, 3, 1).numpy(),
             y_train=data.train.labels.numpy(),
             x_test=data.test.images.permute(0, 2, 3, 1).numpy(), y_test=data.test.labels.numpy())
    out = root / "run"
    assert main(["run", "--data", f"npz:{npz}", "--model", "vgg16_cifar", "--width", "0.25",
                 "--epochs", "1", "--finetune-epochs", "1", "--target-flops", "0.5",
                 "--round-to", "4", "--out", str(out), "--no-progress"]) == 0
    return out


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_the_run_measures_the_speedup_and_rounds_the_channels(run_folder):
    s = _summary(run_folder)
    assert s["speedup_cpu"] > 0 and s["speedup_cpu_q1"] <= s["speedup_cpu"] <= s["speedup_cpu_q3"]
    assert s["speedup_cpu_batch"] == 1 and s["speedup_cpu_threads"] >= 1
    assert set(s["latency_cpu_ms"]) == {"original", "pruned"}
    assert "measured CPU speed-up (batch 1" in (run_folder / "report.md").read_text()
    plan = json.loads((run_folder / "plan.json").read_text())
    assert plan["round_to"] == 4
    for layer in plan["layers"]:
        assert layer["width_after"] % 4 == 0 or layer["width_after"] == layer["width_before"]
    assert abs(s["flops_removed"] - 0.5) <= 0.005  # met over the rounded counts


def test_bench_times_the_runs_pruned_model_against_its_original(run_folder, capsys):
    assert main(["bench", "--out", str(run_folder), "--batch-sizes", "1,3", "--rounds", "2",
                 "--threads", "1", "--clock", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "finetuned.pt" in printed and "pretrained.pt" in printed
    result = json.loads((run_folder / "bench.json").read_text())
    rows = result["pytorch"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert all(r["speedup"] > 0 and r["baseline"]["runs"] == 2 for r in rows)
    assert result["pytorch"]["threads"] == 1 and result["pytorch"]["input_size"] == [3, 32, 32]


def test_export_writes_the_runs_latest_model_and_checks_it(run_folder, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["export", "--out", str(run_folder), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert (run_folder / "export" / "finetuned.onnx").is_file()
    difference = float(printed.split("max |difference| ")[1].split()[0])
    scale = float(printed.split("output scale ")[1].split()[0])
    assert difference <= 1e-4 * max(scale, 1e-6)


def test_bench_and_export_take_a_model_file(tmp_path, capsys):
    model = pccfast.models.resnet_cifar(8, width=0.25)
    path = tmp_path / "m.pt"
    pccfast.save(model, path)
    assert main(["export", "--model-file", str(path), "--input-size", "3,16,16", "--format",
                 "exported"]) == 0
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert main(["bench", "--model-file", str(path), "--input-size", "3x16x16",
                 "--batch-sizes", "2", "--rounds", "1"]) == 0
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench"], "needs --out DIR (a run folder) or --model-file FILE"),
    (["bench", "--model-file", "x.pt"], "needs --input-size"),
])
def test_bench_without_a_model_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_no_speed_skips_the_measurement(run_folder, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_folder, out)
    assert main(["prune", "--out", str(out), "--no-speed", "--no-progress"]) == 0
    s = _summary(out)
    assert "speedup_cpu" not in s and s["pruned_acc"] is not None


@pytest.mark.parametrize("command, flags", [
    ("bench", ("--out", "--model-file", "--baseline-file", "--batch-sizes", "--threads",
               "--clock", "--onnx", "--input-size")),
    ("export", ("--out", "--model-file", "--format", "--path", "--input-size")),
])
def test_help_of_bench_and_export(command, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"pccfast {command}" in text
    for flag in flags:
        assert flag in text, flag
