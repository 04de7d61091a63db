"""The whole pipeline: the demo's table, the report, and real CIFAR-10 data end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pccfast.cli import main
from pccfast.pipeline.folder import RunFolder
from pccfast.report import format_table, layer_widths, summary_rows, write_report

SHARED_CIFAR = Path("/work/shared/data/cifar10_jpeg.npz")


def test_demo_prints_the_table(tmp_path, capsys):
    """The demo's path at one epoch per stage (the full demo is the README's command)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--finetune-epochs", "1",
                 "--train-limit", "512", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for row in ("baseline accuracy (no PCC)", "PCC-pretrained accuracy",
                "pruned accuracy (before fine-tuning)", "fine-tuned accuracy", "params removed",
                "FLOPs removed", "time: baseline", "time: pretrain", "time: scores", "time: prune",
                "time: finetune", "time: total"):
        assert row in printed, row
    s = json.loads((out / "summary.json").read_text())
    assert s["baseline_acc"] is not None and set(s["seconds"]) == {
        "baseline", "pretrain", "scores", "prune", "finetune"}
    assert abs(s["flops_removed"] - 0.5) <= 0.005
    assert "pruned, BN statistics re-estimated" in printed  # the demo sets prune.bn_images
    assert 0 <= s["pruned_bn_acc"] <= 1
    baseline = [r for r in RunFolder(out).read_metrics() if r["stage"] == "baseline"]
    assert baseline and "pcc" not in baseline[0]  # the baseline trains without the PCC term


def test_table_and_rows_from_a_summary():
    summary = {"baseline_acc": None, "pcc_acc": 0.9512, "pruned_acc": 0.4, "finetuned_acc": 0.93,
               "params_removed": 0.928, "flops_removed": 0.844,
               "seconds": {"pretrain": 10.0, "scores": 1.5, "prune": 0.5, "finetune": 3.0}}
    rows = dict(summary_rows(summary))
    assert (rows["baseline accuracy (no PCC)"] == "–"
            and rows["PCC-pretrained accuracy"] == "95.12%")
    assert rows["FLOPs removed"] == "84.40%" and rows["time: total"] == "15.0 s"
    table = format_table(summary)
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned


def test_report_from_a_real_plan(tmp_path):
    """report.md and its three plots from a pruned VGG's plan and CI scores."""
    import pccfast
    from pccfast.pipeline.config import save_json
    from pccfast.train.checkpoint import atomic_torch_save

    torch.manual_seed(0)
    model = pccfast.models.vgg16_cifar(width=0.125)
    col = pccfast.CICollector(model, max_images=4, progress=False)
    col.update(torch.randn(4, 3, 32, 32))
    scores = col.scores()
    _, plan = pccfast.prune(model, scores, rates="[0.3]*7+[0.6]*5")
    folder = RunFolder(tmp_path)
    save_json(folder.path("plan.json"), plan.to_dict())
    atomic_torch_save({"format": "pccfast-ci-scores", "images": 4, "scores": scores},
                      folder.path("scores.pt"))
    folder.update_summary(seconds={"scores": 1.0}, pcc_acc=0.5)
    for epoch in (1, 2, 2):  # a resumed epoch is logged twice; the report keeps the last
        folder.log_metrics({"stage": "pretrain", "epoch": epoch, "train_loss": 1.0 / epoch,
                            "train_acc": 0.5, "test_acc": 0.4 + 0.1 * epoch, "pcc": 0.3})
    widths = layer_widths(plan.to_dict())
    assert [w[0] for w in widths] == [layer.name for layer in plan.layers]
    assert all(after == round(before * (1 - (0.3 if i < 7 else 0.6))) or after >= 1
               for i, (_, before, after) in enumerate(widths))
    report = write_report(tmp_path).read_text()
    for png in ("training_curves.png", "score_distribution.png", "channels_kept.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
        assert f"plots/{png}" in report
    assert f"| {widths[0][0]} | {widths[0][1]} | {widths[0][2]} |" in report
    assert len(folder.read_metrics()) == 2


def test_report_of_an_empty_folder_is_refused(tmp_path):
    """No config, summary or metrics: nothing to report (not a report of "? on ?")."""
    with pytest.raises(ValueError, match="holds no pccfast run"):
        write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} is absent")
def test_whole_pipeline_on_a_cifar10_slice(tmp_path):
    """Real CIFAR-10 (JPEG copy): a 2,000-image slice, VGG-16 at width 0.25, every stage."""
    out = tmp_path / "cifar"
    assert main(["run", "--data", f"npz:{SHARED_CIFAR}", "--train-limit", "2000", "--test-limit",
                 "500", "--model", "vgg16_cifar", "--width", "0.25", "--epochs", "3",
                 "--batch-size", "64", "--finetune-epochs", "2", "--target-flops", "0.5",
                 "--calib-images", "256", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["pcc_acc"] > 0.25 and s["finetuned_acc"] > 0.2  # chance is 0.1
    assert abs(s["flops_removed"] - 0.5) <= 0.005 and 0.3 < s["params_removed"] < 0.9
    assert s["score_images"] == 256 and s["score_layers"] == 13
    plan = json.loads((out / "plan.json").read_text())
    scores = torch.load(out / "scores.pt", weights_only=True)["scores"]
    for layer in plan["layers"]:  # the kept channels are the highest-CI ones of each layer
        ci = scores[layer["name"]]
        kept = torch.tensor(layer["kept_indices"])
        dropped = torch.ones(len(ci), dtype=torch.bool)
        dropped[kept] = False
        if dropped.any():
            assert ci[kept].min() >= ci[dropped].max()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} is absent")
def test_gpu_check_script_logic_on_the_cpu(tmp_path):
    """benchmarks/gpu/cifar10_vgg16.sh at toy size on the CPU: both runs, the results table."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, EPOCHS="1", FT_EPOCHS="1", WIDTH="0.125", TRAIN_LIMIT="256",
               TEST_LIMIT="128", DEVICE="cpu", AMP="none", DATA=str(SHARED_CIFAR),
               RUNS_DIR=str(tmp_path / "runs"), RESULTS_FILE=str(tmp_path / "RESULTS.md"),
               OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu" / "cifar10_vgg16.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| with PCC |" in table and "| without PCC |" in table
    assert (out / "RESULTS_cifar10_vgg16.md").read_text().strip() in table
    with_pcc = json.loads((out / "summary_pcc.json").read_text())
    without = json.loads((out / "summary_no_pcc.json").read_text())
    assert with_pcc["pcc_weight"] > 0 and without["pcc_weight"] == 0
    # the published rate list: ~92.8% params / 84.4% FLOPs at width 1, similar at width 0.125
    assert with_pcc["params_removed"] > 0.85 and with_pcc["flops_removed"] > 0.75
