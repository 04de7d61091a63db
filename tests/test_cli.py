"""The ``pccfast`` command: the issue's exact ``run`` command, the same flags stage by stage,
resume after a crash, configs and flag precedence, --help, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pccfast.cli import build_parser, main, resolve_config
from pccfast.data import load_data
from pccfast.pipeline.folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    """The bundled digits as an npz file (x_train NHWC uint8 ...): learnable, offline, small."""
    data = load_data("digits", train_limit=512, test_limit=128, seed=0)
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path,
             x_train=data.train.images.permute(0, 2, 3, 1).numpy(),
             y_train=data.train.labels.numpy(),
             x_test=data.test.images.permute(0, 2, 3, 1).numpy(), y_test=data.test.labels.numpy())
    return path


def _summary(out) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def _issue_flags(npz, width="0.25"):
    return ["--data", f"npz:{npz}", "--model", "vgg16_cifar", "--width", width, "--epochs", "3",
            "--finetune-epochs", "2", "--target-flops", "0.5"]


def test_the_issue_command_writes_the_run_folder(digits_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *_issue_flags(digits_npz), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned accuracy" in printed and "FLOPs removed" in printed
    s = _summary(out)
    assert s["baseline_acc"] is None  # no --baseline
    for key in ("pcc_acc", "pruned_acc", "finetuned_acc", "params_removed", "flops_removed"):
        assert isinstance(s[key], float) and 0.0 <= s[key] <= 1.0, key
    assert abs(s["flops_removed"] - 0.5) <= 0.005  # the budget, met within 0.5 points
    assert 0.2 < s["params_removed"] < 0.95
    # (12 optimiser steps learn little: learning is checked by test_train and test_pipeline)
    assert set(s["seconds"]) == {"pretrain", "scores", "prune", "finetune"}
    assert all(v > 0 for v in s["seconds"].values())
    records = RunFolder(out).read_metrics()
    assert [(r["stage"], r["epoch"]) for r in records] == \
        [("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("finetune", 1), ("finetune", 2)]
    assert all({"train_loss", "train_acc", "test_acc", "lr", "images_per_s"} <= set(r)
               for r in records)
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["layers"]) >= 12 and all(
        len(l["kept_indices"]) == l["width_after"] <= l["width_before"] for l in plan["layers"])
    for name in ("pretrained.pt", "pruned.pt", "finetuned.pt", "scores.pt", "config.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    for png in ("training_curves.png", "score_distribution.png", "channels_kept.png"):
        assert f"plots/{png}" in report
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pccfast

    pruned = pccfast.load(out / "finetuned.pt")
    assert pccfast.count(pruned, (1, 3, 32, 32))["flops"] == s["flops_after"]


@pytest.mark.slow
def test_the_same_flags_stage_by_stage_equal_run(digits_npz, tmp_path, capsys):
    """train, ci, prune, finetune, eval and report with the run command's flags reproduce it."""
    flags = _issue_flags(digits_npz, width="0.125") + ["--calib-images", "128"]
    whole, staged = tmp_path / "whole", tmp_path / "staged"
    assert main(["run", *flags, "--out", str(whole), "--no-progress"]) == 0
    for stage in ("train", "scores", "prune", "finetune", "eval", "report"):
        assert main([stage, *flags, "--out", str(staged), "--no-progress"]) == 0, stage
    a, b = _summary(whole), _summary(staged)
    for key in ("pcc_acc", "pruned_acc", "finetuned_acc", "params_removed", "flops_removed"):
        assert a[key] == pytest.approx(b[key]), key
    assert "test accuracy" in capsys.readouterr().out  # eval printed
    assert (staged / "report.md").is_file()
    # A later stage command inherits the folder's settings: no flags needed.
    assert main(["eval", "--out", str(staged), "--no-progress"]) == 0
    assert f"{100 * b['finetuned_acc']:.2f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_run_resumes_after_a_crash(digits_npz, tmp_path, monkeypatch):
    flags = _issue_flags(digits_npz, width="0.125") + ["--calib-images", "128", "--no-progress"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(["run", *flags, "--out", str(straight)]) == 0

    real_log = RunFolder.log_metrics

    def crash_in_epoch_2(self, record):
        if record["stage"] == "pretrain" and record["epoch"] == 2:
            raise KeyboardInterrupt  # killed between epoch 2's metrics and its checkpoint
        real_log(self, record)

    monkeypatch.setattr(RunFolder, "log_metrics", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        main(["run", *flags, "--out", str(crashed)])
    monkeypatch.setattr(RunFolder, "log_metrics", real_log)
    assert main(["run", "--resume", "--out", str(crashed), "--no-progress"]) == 0
    a, b = _summary(straight), _summary(crashed)
    for key in ("pcc_acc", "pruned_acc", "finetuned_acc", "flops_removed"):
        assert a[key] == pytest.approx(b[key]), key
    epochs = [(r["stage"], r["epoch"]) for r in RunFolder(crashed).read_metrics()]
    assert epochs[:3] == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3)]
    # Resuming a finished run redoes nothing.
    before = (crashed / "finetuned.pt").stat().st_mtime_ns
    assert main(["run", "--resume", "--out", str(crashed), "--no-progress"]) == 0
    assert (crashed / "finetuned.pt").stat().st_mtime_ns == before


# ---------------------------------------------------------------- settings

def _args(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("name", ["vgg16_cifar10", "resnet56_cifar10", "resnet50_imagenet"])
def test_configs_load_and_flags_override_them(name):
    path = CONFIGS / f"{name}.toml"
    cfg = resolve_config(_args(["run", "--config", str(path)]), inherit=False)
    assert cfg.model.name in ("vgg16_cifar", "resnet56_cifar", "resnet50")
    assert cfg.prune.budget
    over = resolve_config(_args(["run", "--config", str(path), "--epochs", "3", "--target-params",
                                 "0.4", "--set", "finetune.weight_decay=0.002"]), inherit=False)
    assert over.pretrain.epochs == 3 and over.prune.budget == {"target_params": 0.4}
    assert over.finetune.weight_decay == 0.002


def test_published_recipes():
    vgg = resolve_config(_args(["run", "--config", str(CONFIGS / "vgg16_cifar10.toml")]), False)
    assert vgg.prune.rates == "[0.51]*7+[0.90]*5"
    r50 = resolve_config(_args(["run", "--config", str(CONFIGS / "resnet50_imagenet.toml")]), False)
    assert r50.pretrain.scaled_lr == pytest.approx(0.1 * r50.pretrain.batch_size / 256)
    assert r50.pretrain.warmup_epochs > 0 and r50.pretrain.label_smoothing == 0.1
    assert r50.pretrain.amp == "bf16" and r50.pretrain.channels_last
    assert r50.data.spec.startswith("imagefolder:")


def test_vgg_rate_list_removes_the_published_share():
    """[0.51]*7+[0.90]*5 on VGG-16-CIFAR: about 92.8% params / 84.4% FLOPs removed."""
    import torch

    import pccfast

    model = pccfast.models.vgg16_cifar()
    g = torch.Generator().manual_seed(0)
    col = pccfast.CICollector(model, max_images=2, progress=False)
    col.update(torch.randn(2, 3, 32, 32, generator=g))
    _, plan = pccfast.prune(model, col.scores(), rates="[0.51]*7+[0.90]*5", verify=False)
    assert plan.removed["params"] == pytest.approx(0.928, abs=0.002)
    assert plan.removed["flops"] == pytest.approx(0.844, abs=0.002)


def test_precedence_saved_config_then_flags(tmp_path):
    out = tmp_path / "r"
    RunFolder(out).write_config({"pretrain": {"epochs": 7, "lr": 0.3}, "model": {"width": 0.5}})
    cfg = resolve_config(_args(["scores", "--out", str(out), "--lr", "0.2"]), inherit=True)
    assert (cfg.pretrain.epochs, cfg.pretrain.lr, cfg.model.width) == (7, 0.2, 0.5)
    fresh = resolve_config(_args(["run", "--out", str(out)]), inherit=False)
    assert fresh.pretrain.epochs != 7


@pytest.mark.parametrize("argv, message", [
    (["run", "--out", "X", "--set", "pretrain.epoch=3"], "no key 'epoch'"),
    (["run", "--out", "X", "--set", "lr=3"], "SECTION.KEY=VALUE"),
    (["run", "--out", "X", "--epochs", "-2"], "epochs must be >= 0"),
    (["run", "--out", "X", "--target-flops", "1.5"], "prune.target_flops must be a fraction"),
    (["run", "--out", "X", "--data", "mnist"], "data kind must be one of"),
    (["run", "--out", "X", "--data", "npz:/nonexistent/d.npz"], "does not exist"),
    (["prune", "--out", "EMPTY", "--data", "digits"], "run `pccfast train"),
    (["run"], "needs --out DIR"),
])
def test_errors_are_one_line_with_status_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_conflicting_criteria_and_unknown_toml_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", "X", "--rates", "[0.5]*12", "--tau", "0.6"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nepochz = 3\n")
    assert main(["run", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "[pretrain] has no key 'epochz'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "run", "train", "scores", "prune", "finetune", "eval",
                                     "report", "info"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"pccfast {command}" in text
    if command != "info":
        for flag in ("--data", "--model", "--width", "--epochs", "--finetune-epochs",
                     "--target-flops", "--out", "--resume", "--config", "--set"):
            assert flag in text, flag


def test_info_and_module_entry_point():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pccfast", "info"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "backends:" in done.stdout


# ---------------------------------------------------------------- ordinary data, bad input

@pytest.fixture(scope="module")
def grey_npz(tmp_path_factory):
    """MNIST-shaped data: x_train (N, 28, 28) uint8 (the digits, one channel, resized)."""
    import torch.nn.functional as F

    data = load_data("digits", train_limit=64, test_limit=32, seed=0)

    def grey(images):
        return F.interpolate(images[:, :1].float(), size=(28, 28)).round().byte()[:, 0].numpy()

    path = tmp_path_factory.mktemp("grey") / "grey.npz"
    np.savez(path, x_train=grey(data.train.images), y_train=data.train.labels.numpy(),
             x_test=grey(data.test.images), y_test=data.test.labels.numpy())
    return path


def _tiny(npz):
    return ["--data", f"npz:{npz}", "--model", "vgg16_cifar", "--width", "0.125", "--epochs", "1",
            "--finetune-epochs", "1", "--batch-size", "32", "--calib-images", "32", "--no-progress"]


def test_grey_28x28_images_run_every_stage(grey_npz, tmp_path):
    """The issue's case: (N, 28, 28) images with the CIFAR VGG-16 (five 2x pools) used to die
    in the first conv; the model now takes the data's channel and size."""
    out = tmp_path / "grey"
    assert main(["run", *_tiny(grey_npz), "--target-flops", "0.3", "--out", str(out)]) == 0
    s = _summary(out)
    assert abs(s["flops_removed"] - 0.3) <= 0.005 and isinstance(s["finetuned_acc"], float)
    import pccfast

    model = pccfast.load(out / "finetuned.pt")
    assert model.features.conv0.in_channels == 1
    assert pccfast.count(model, (1, 1, 28, 28))["flops"] == s["flops_after"]


def rgb_only(num_classes, width=1.0):
    """A model factory that knows nothing of in_channels."""
    import pccfast

    return pccfast.models.vgg16_cifar(num_classes=num_classes, width=width)


def needs_32x32(num_classes, width=1.0, in_channels=3):
    """A model factory whose head fits 32x32 images only."""
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 32 * 32, num_classes))


@pytest.mark.parametrize("flags, message", [
    (["--rates", "[0.5]*11"], "prune.rates has 11 entries but VGGCifar expects 12"),
    (["--rates", "[0.5]*12+"], "rates '[0.5]*12+': ended early"),
    (["--rates", "[0.5]*99999999999999999999999"], "has about 10^23 entries, more than"),
    (["--target-params", "0.999"], "prune.target_params=0.999 cannot be met"),
    (["--config", "RATES_AND_TAU"], "config [prune] sets rates and tau"),
    (["--set", "finetune.batch_size=1000"],
     "finetune.batch_size: batch_size (1000) exceeds the 64"),
    (["--set", "pcc.backend='cuda'"], "pcc.backend: backend \"cuda\" is not implemented for pcc"),
    (["--set", "pcc.orientation='rows'"], "pcc.orientation must be one of"),
    (["--model", "test_cli:rgb_only"],
     "the data has 1-channel images, and rgb_only(..., in_channels=1) failed"),
    (["--model", "test_cli:needs_32x32"],
     "model test_cli:needs_32x32 cannot take the data's 1x28x28 (C x H x W) images"),
])
def test_bad_settings_fail_before_the_first_stage(grey_npz, tmp_path, capsys, monkeypatch, flags,
                                                   message):
    """Found before any training (fit never runs) and before the run folder is written."""
    import pccfast.pipeline.stages as stages

    def no_training(*args, **kwargs):
        raise AssertionError("a stage started before the settings were checked")

    monkeypatch.setattr(stages, "fit", no_training)
    toml = tmp_path / "both.toml"
    toml.write_text('[prune]\nrates = "[0.5]*12"\ntau = 0.5\n')
    flags = [str(toml) if f == "RATES_AND_TAU" else f for f in flags]
    out = tmp_path / "run"
    assert main(["run", *_tiny(grey_npz), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "run.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--set", "run.seed=-1"], "run.seed must be a non-negative integer, got -1"),
    (["--workers", "-1"], "data.workers must be a non-negative integer, got -1"),
    (["--set", "data.crop=-5"], "data.crop must be a positive integer, got -5"),
    (["--config", "BINARY"], "binary.toml is not a TOML text file (not UTF-8"),
    (["--out", "A_FILE"], "is a file, not a run folder"),
])
def test_bad_input_is_one_line_naming_the_setting(grey_npz, tmp_path, capsys, argv, message):
    (tmp_path / "binary.toml").write_bytes(bytes(range(128, 256)) * 3)
    (tmp_path / "a_file").write_text("x")
    argv = [str(tmp_path / "binary.toml") if a == "BINARY" else
            str(tmp_path / "a_file") if a == "A_FILE" else a for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert main(["run", *_tiny(grey_npz), *argv, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_read_only_run_folder_is_one_line(grey_npz, tmp_path, capsys, monkeypatch):
    import errno
    import os

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["run", *_tiny(grey_npz), "--out", str(tmp_path / "ro" / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'ro' / 'run'}: cannot write the run folder (Read-only file system" \
        in err and "Traceback" not in err and err.count("\n") == 1, err


def test_weights_of_another_width_name_the_file_and_the_shapes(grey_npz, tmp_path, capsys):
    """model.init and a resumed checkpoint written at width 0.25, run at width 0.125."""
    import torch

    import pccfast
    from pccfast.train.checkpoint import save_checkpoint

    wide = pccfast.models.vgg16_cifar(width=0.25, in_channels=1)
    init = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), init)
    assert main(["run", *_tiny(grey_npz), "--set", f"model.init='{init}'",
                 "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"model.init {init} does not fit this VGGCifar" in err and err.count("\n") == 1, err
    assert "features.conv0.weight (16, 1, 3, 3) vs (8, 1, 3, 3)" in err
    assert not (tmp_path / "a").exists()

    run = tmp_path / "b"
    RunFolder(run).claim()  # (as a run that wrote the checkpoint would have)
    ckpt = RunFolder(run).checkpoint("pretrain")
    save_checkpoint(ckpt, stage="pretrain", epoch=1, model=wide,
                    optimizer=torch.optim.SGD(wide.parameters(), lr=0.1), scaler=None,
                    history=[], config={})
    assert main(["run", "--resume", *_tiny(grey_npz), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} does not fit this VGGCifar" in err and err.count("\n") == 1, err
    assert "features.conv0.weight (16, 1, 3, 3) vs (8, 1, 3, 3)" in err


def test_missing_matplotlib_gives_a_report_without_plots(tmp_path, capsys, monkeypatch):
    """The report is the last stage: without matplotlib it is written without plots (and the
    run says so before its first stage) instead of failing after everything else ran."""
    import sys

    from pccfast.pipeline import Pipeline, RunConfig

    folder = RunFolder(tmp_path / "r")
    folder.update_summary(pcc_acc=0.5, pruned_acc=0.4, finetuned_acc=0.45)
    folder.log_metrics({"stage": "pretrain", "epoch": 1, "train_loss": 1.0, "test_acc": 0.5})
    (folder.out / "plan.json").write_text(json.dumps(
        {"layers": [{"name": "features.conv0", "width_before": 8, "width_after": 4}]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["report", "--out", str(folder.out)]) == 0
    report = (folder.out / "report.md").read_text()
    assert "No plots: matplotlib is not installed" in report and ".png" not in report
    assert "| features.conv0 | 8 | 4 | 50% |" in report and not (folder.out / "plots").exists()
    notes = Pipeline(RunConfig(), tmp_path / "x").check("report")
    assert notes == ["note: report.md will have no plots: matplotlib is not installed "
                     "(pip install matplotlib)"]
    assert "no plots" in capsys.readouterr().out
