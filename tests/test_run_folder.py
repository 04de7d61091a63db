"""What a run folder may hold and reuse: nothing in it is unpickled (planted pickles never run),
and every stage output is tied to the settings it was made with (stale files are refused or
removed, never reused; read-only commands write nothing)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pccfast.cli import main
from pccfast.pipeline.config import RunConfig
from pccfast.pipeline.folder import RunFolder
from pccfast.pipeline.records import differences, downstream, fingerprint, stage_settings
from faults import fill_disk
from planted import planted_checkpoint, planted_model_file

FLAGS = ["--data", "digits", "--train-limit", "128", "--test-limit", "32", "--model",
         "vgg16_cifar", "--width", "0.125", "--epochs", "1", "--finetune-epochs", "1",
         "--batch-size", "64", "--calib-images", "32", "--target-flops", "0.5", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (every stage, one epoch each); tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", *FLAGS, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _state(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _crash_in(monkeypatch, stage: str, epoch: int):
    """Kills the next run in ``stage``'s epoch ``epoch`` (after its metrics, before its
    checkpoint); returns the undo."""
    real = RunFolder.log_metrics

    def crash(self, record):
        if record["stage"] == stage and record["epoch"] == epoch:
            raise KeyboardInterrupt
        real(self, record)

    monkeypatch.setattr(RunFolder, "log_metrics", crash)
    return lambda: monkeypatch.setattr(RunFolder, "log_metrics", real)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- nothing is unpickled

def test_planted_model_files_never_run(run, tmp_path, capsys):
    """pruned.pt / finetuned.pt holding a pickled module: eval and finetune refuse them."""
    marker = tmp_path / "ran"
    planted_model_file(run / "finetuned.pt", marker)
    assert main(["eval", "--out", str(run), "--no-progress"]) == 2
    assert "pickled" in _error(capsys) and not marker.exists()
    (run / "finetuned.pt").unlink()
    planted_model_file(run / "pruned.pt", marker)
    assert main(["eval", "--out", str(run), "--no-progress"]) == 2
    assert "pickled" in _error(capsys) and not marker.exists()
    assert main(["finetune", "--out", str(run), "--no-progress"]) == 2
    assert "pickled" in _error(capsys) and not marker.exists()


@pytest.mark.parametrize("stage, command", [("finetune", "run"), ("pretrain", "train")])
def test_planted_checkpoints_never_run(run, tmp_path, monkeypatch, capsys, stage, command):
    """A stage killed in its first epoch, its checkpoint then replaced by a planted pickle:
    --resume refuses it."""
    marker = tmp_path / "ran"
    restore = _crash_in(monkeypatch, stage, 1)
    with pytest.raises(KeyboardInterrupt):
        main(["train" if stage == "pretrain" else stage, "--out", str(run), "--no-progress"])
    restore()
    RunFolder(run).model_path(stage).unlink(missing_ok=True)  # (gone already since the fix)
    planted_checkpoint(run / "checkpoints" / f"{stage}.pt", marker, stage)
    code = main([command, "--resume", "--out", str(run), "--no-progress"])
    assert not marker.exists()
    assert code == 2 and "tensors and numbers" in _error(capsys)


def test_factory_models_are_stored_without_pickle(tmp_path, monkeypatch, capsys):
    """A package.module:factory model: its run-folder files hold a description and weights
    (weights_only), and its later stages rebuild it through the config's factory."""
    (tmp_path / "rf_factory.py").write_text(
        "import pccfast\n"
        "def vgg(num_classes, width=1.0):\n"
        "    m = pccfast.models.vgg16_cifar(num_classes=num_classes, width=width)\n"
        "    del m._pccfast_recipe  # not a zoo model any more\n"
        "    return m\n"
        "def not_a_model(num_classes, width=1.0):\n"
        "    return [num_classes]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    flags = [f for f in FLAGS if f != "vgg16_cifar"]
    flags[flags.index("--model") + 1:flags.index("--model") + 1] = ["rf_factory:vgg"]
    for stage in ("train", "scores", "prune"):
        assert main([stage, *flags, "--out", str(out)]) == 0, stage
    for name in ("pretrained.pt", "pruned.pt"):
        payload = torch.load(out / name, weights_only=True)
        assert payload["kind"] == "external" and "module" not in payload, name
        assert payload["description"]["model"] == "rf_factory:vgg"
    assert main(["eval", "--out", str(out), "--no-progress"]) == 0
    assert "pruned.pt: test accuracy" in capsys.readouterr().out
    assert main(["train", *flags, "--model", "rf_factory:not_a_model", "--out", str(out)]) == 2
    assert "returned a list, not a torch.nn.Module" in _error(capsys)


# ---------------------------------------------------------------- stale files

def test_fresh_run_after_a_finished_one_never_reuses_its_files(run, monkeypatch, capsys):
    """Finished run A; run B (other settings) killed in pre-training; B --resume must fine-tune
    B's pruned model, not pick up A's fine-tuning checkpoint."""
    before = _state(run / "finetuned.pt")
    restore = _crash_in(monkeypatch, "pretrain", 1)
    with pytest.raises(KeyboardInterrupt):
        main(["run", *FLAGS, "--lr", "0.05", "--out", str(run)])
    restore()
    for name in ("pruned.pt", "finetuned.pt", "plan.json", "scores.pt", "report.md",
                 "checkpoints/finetune.pt", "checkpoints/pretrain.pt"):
        assert not (run / name).exists(), name  # nothing of A is left to be picked up
    assert main(["eval", "--out", str(run), "--no-progress"]) == 2
    assert "holds no model yet" in _error(capsys)
    assert main(["run", "--resume", "--out", str(run), "--no-progress"]) == 0
    after = _state(run / "finetuned.pt")
    assert after.keys() != before.keys() or any(
        not torch.equal(after[k], before[k]) for k in before)
    epochs = [(r["stage"], r["epoch"]) for r in RunFolder(run).read_metrics()]
    assert epochs == [("pretrain", 1), ("finetune", 1)]
    config = json.loads((run / "config.json").read_text())
    assert config["pretrain"]["lr"] == 0.05
    records = RunFolder(run).read_records()
    assert all(r["settings"]["pretrain.lr"] == 0.05 for r in records.values())


def test_resume_with_other_settings_is_refused_and_config_kept(run, capsys):
    """run --resume --epochs 2 on a finished 1-epoch run: refused, config.json untouched."""
    config = (run / "config.json").read_bytes()
    assert main(["run", "--resume", "--epochs", "2", "--out", str(run), "--no-progress"]) == 2
    err = _error(capsys)
    assert "pretrain.epochs=1 (now 2)" in err and "a new --out" in err
    assert "schedule spans them all" in err
    assert main(["finetune", "--resume", "--finetune-epochs", "3", "--out", str(run)]) == 2
    assert "finetune.epochs=1 (now 3)" in _error(capsys)
    assert (run / "config.json").read_bytes() == config
    # the same settings: everything is skipped, nothing is rewritten
    stamp = (run / "finetuned.pt").stat().st_mtime_ns
    assert main(["run", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert (run / "finetuned.pt").stat().st_mtime_ns == stamp


def test_checkpoint_of_other_settings_is_refused(run, monkeypatch, capsys):
    """Pre-training killed in epoch 2 of 2, resumed with another learning rate: refused."""
    restore = _crash_in(monkeypatch, "pretrain", 2)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--epochs", "2", "--out", str(run), "--no-progress"])
    restore()
    assert (run / "checkpoints" / "pretrain.pt").is_file()
    assert main(["run", "--resume", "--lr", "0.2", "--out", str(run), "--no-progress"]) == 2
    err = _error(capsys)
    assert "checkpoints/pretrain.pt was made with other settings: pretrain.lr=0.1 (now 0.2)" in err


def test_read_only_commands_write_no_config(run, capsys):
    config = (run / "config.json").read_bytes()
    assert main(["eval", "--out", str(run), "--lr", "0.7", "--no-progress"]) == 2
    err = _error(capsys)
    assert "pretrain.lr=0.1 (now 0.7)" in err and "pccfast train" in err
    assert main(["report", "--out", str(run), "--epochs", "9"]) == 0
    assert (run / "config.json").read_bytes() == config
    missing = run.parent / "missing"
    assert main(["eval", "--out", str(missing), "--no-progress"]) == 2
    assert not missing.exists()


def test_a_stage_rerun_removes_what_read_from_it(run, capsys):
    """prune again with another budget: the old fine-tuned model is gone, eval reports the new
    pruned one, and finetune then runs on it."""
    assert main(["prune", "--target-flops", "0.3", "--out", str(run), "--no-progress"]) == 0
    assert not (run / "finetuned.pt").exists() and not (run / "checkpoints/finetune.pt").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finetuned_acc"] is None and "finetune" not in summary["seconds"]
    assert abs(summary["flops_removed"] - 0.3) <= 0.005
    capsys.readouterr()
    assert main(["eval", "--out", str(run), "--no-progress"]) == 0
    assert "pruned.pt: test accuracy" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["prune"]["target_flops"] == 0.3
    assert set(RunFolder(run).read_records()) == {"pretrain", "scores", "prune"}


# ---------------------------------------------------------------- settings records

def test_stage_settings_chain_and_ignore_speed_settings():
    cfg = RunConfig()
    tree = cfg.to_dict()
    finetune = stage_settings(tree, "finetune")
    assert {"pretrain.lr", "pcc.weight", "ci.images", "prune.target_flops", "finetune.epochs",
            "data.spec", "model.width", "run.seed"} <= set(finetune)
    assert not {"run.device", "data.workers", "pcc.backend", "pretrain.compile"} & set(finetune)
    assert "finetune.epochs" not in stage_settings(tree, "prune")
    assert "pcc.weight" not in stage_settings(tree, "baseline")
    faster = RunConfig.from_dict({"run": {"device": "cuda"}, "data": {"workers": 9}})
    assert fingerprint(stage_settings(faster.to_dict(), "finetune")) == fingerprint(finetune)
    wider = RunConfig.from_dict({"model": {"width": 1}})  # a TOML 1 is the flag's 1.0
    assert fingerprint(stage_settings(wider.to_dict(), "scores")) == fingerprint(
        stage_settings(RunConfig.from_dict({"model": {"width": 1.0}}).to_dict(), "scores"))
    assert differences({"a.b": 1, "c.d": "x"}, {"a.b": 2, "c.d": "x", "e.f": None}) == \
        ["a.b=1 (now 2)", "e.f=unset (now null)"]
    assert downstream("pretrain") == ["pretrain", "scores", "prune", "finetune"]
    assert downstream("baseline") == ["baseline"]


# ---------------------------------------------------------------- the user's own files

@pytest.mark.parametrize("name", ["config.json", "report.md", "summary.json", "plan.json",
                                  "metrics.jsonl", "plots/channels_kept.png",
                                  "checkpoints/pretrain.pt"])
def test_run_never_touches_the_users_files(tmp_path, capsys, name):
    """`run --out .` in a project holding its own file of a pccfast name refuses, naming it,
    before anything is written; the file is unchanged."""
    own = tmp_path / name
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text('{"project": "mine"}\n')
    assert main(["run", *FLAGS, "--out", str(tmp_path)]) == 2
    err = _error(capsys)
    assert f"{own} is not a file pccfast wrote" in err and "another --out" in err
    assert own.read_text() == '{"project": "mine"}\n'
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file()) == [name]


@pytest.mark.parametrize("command", ["train", "prune", "report"])
def test_stage_commands_name_a_foreign_config(tmp_path, capsys, command):
    (tmp_path / "config.json").write_text('{"model": "mine", "lr": 3}\n')
    assert main([command, "--out", str(tmp_path), "--no-progress"]) == 2
    assert f"{tmp_path / 'config.json'} is not a file pccfast wrote" in _error(capsys)
    assert (tmp_path / "config.json").read_text() == '{"model": "mine", "lr": 3}\n'


def test_a_broken_pccfast_config_is_named(run, capsys):
    tree = json.loads((run / "config.json").read_text())
    tree["model"]["colour"] = "red"
    (run / "config.json").write_text(json.dumps(tree))
    assert main(["train", "--out", str(run), "--no-progress"]) == 2
    err = _error(capsys)
    assert f"{run / 'config.json'}: config [model] has no key 'colour'" in err


def test_run_folders_claim_their_files_and_keep_others(run, capsys):
    """A finished run claimed its files (its manifest); a folder from before manifests (a whole
    pccfast config.json) is adopted; the user's other files stay."""
    manifest = json.loads((run / ".pccfast-files.json").read_text())
    assert {"config.json", "report.md", "stages.json", "plan.json"} <= set(manifest["files"])
    (run / ".pccfast-files.json").unlink()  # as an older pccfast left it
    (run / "notes.md").write_text("mine")
    assert main(["report", "--out", str(run)]) == 0
    assert (run / "notes.md").read_text() == "mine"
    assert RunFolder(run).foreign() == []


def test_report_of_an_empty_folder_is_refused(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "holds no pccfast run" in _error(capsys)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- data replaced under a run

def _digits_npz(path, flip: bool = False):
    """The bundled digits as an npz file; ``flip``: the same shapes, other images."""
    import numpy as np

    from pccfast.data import load_data

    data = load_data("digits", train_limit=128, test_limit=32, seed=0)
    x_train = data.train.images.permute(0, 2, 3, 1).numpy()
    x_test = data.test.images.permute(0, 2, 3, 1).numpy()
    if flip:
        x_train, x_test = x_train[:, :, ::-1].copy(), x_test[:, :, ::-1].copy()
    np.savez(path, x_train=x_train, y_train=data.train.labels.numpy(), x_test=x_test,
             y_test=data.test.labels.numpy())
    return path


def test_data_replaced_under_a_run_is_refused(tmp_path, capsys):
    """Same path, same shapes, other images: --resume and the later stages refuse, naming the
    file; a finished stage is never reported done on data it never saw."""
    npz = _digits_npz(tmp_path / "digits.npz")
    out = tmp_path / "run"
    flags = [f for f in FLAGS if f != "digits"]
    flags[flags.index("--data") + 1:flags.index("--data") + 1] = [f"npz:{npz}"]
    assert main(["train", *flags, "--out", str(out)]) == 0
    settings = json.loads((out / "stages.json").read_text())["pretrain"]["settings"]
    assert settings["data.file:digits.npz"].startswith("sha256 ")
    capsys.readouterr()
    _digits_npz(npz, flip=True)
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 2
    err = _error(capsys)
    assert "cannot resume" in err and "data.file:digits.npz=" in err
    assert main(["scores", "--out", str(out), "--no-progress"]) == 2
    assert "made with other settings: data.file:digits.npz=" in _error(capsys)
    _digits_npz(npz)  # the original bytes again (a newer modification time)
    assert main(["scores", "--out", str(out), "--no-progress"]) == 0


def test_data_stamps(tmp_path):
    """Content for files (a new modification time alone is no change), modification times for
    image folders' class folders; records made before stamps still compare equal."""
    import os

    from pccfast.data.stamps import data_stamps

    npz = _digits_npz(tmp_path / "d.npz")
    first = data_stamps(f"npz:{npz}")
    os.utime(npz, (1e9, 1e9))
    assert data_stamps(f"npz:{npz}") == first
    with open(npz, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    assert data_stamps(f"npz:{npz}") != first
    assert data_stamps("digits") == {}
    root = tmp_path / "images"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            os.utime(root / split / cls, (1e9, 1e9))
    before = data_stamps(f"imagefolder:{root}")
    assert set(before) >= {"data.file:train/cat/", "data.file:val/dog/"}
    os.utime(root / "train" / "dog", (2e9, 2e9))  # (what adding an image does)
    assert data_stamps(f"imagefolder:{root}") != before
    current = stage_settings(RunConfig().to_dict(), "scores", None, first)
    legacy = {k: v for k, v in current.items() if not k.startswith("data.file")}
    assert differences(legacy, current) == []
    assert differences({**legacy, "data.file:d.npz": "sha256 0"}, current) != []


def test_a_stage_run_from_python_never_touches_the_users_files(tmp_path):
    """Pipeline (no CLI): a stage claims what it removes and rewrites before touching it."""
    from pccfast.pipeline import Pipeline

    own = tmp_path / "plan.json"
    own.write_text("mine")
    with pytest.raises(ValueError, match=f"{own} is not a file pccfast wrote"):
        RunFolder(tmp_path).invalidate("prune")
    with pytest.raises(ValueError, match=f"{own} is not a file pccfast wrote"):
        Pipeline(RunConfig(), tmp_path).folder.clear()
    assert own.read_text() == "mine"


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    fill_disk(monkeypatch)
    assert main(["train", *FLAGS, "--out", str(tmp_path / "run")]) == 2
    err = _error(capsys)
    assert f"no space left on device: cannot write {tmp_path / 'run'}" in err


def test_a_folder_of_the_older_ci_stage_is_refused_then_rescored(finished, tmp_path, capsys):
    """Before the scores stage was named for scores it was `ci` (ci_scores.pt, a "ci" record):
    such a folder keeps its pre-training, the stages after it say to run `pccfast scores`,
    and the old command name still runs the stage; the old file goes with its stage."""
    out = tmp_path / "old"
    shutil.copytree(finished, out)
    (out / "scores.pt").rename(out / "ci_scores.pt")
    records = json.loads((out / "stages.json").read_text())
    records["ci"] = records.pop("scores")
    (out / "stages.json").write_text(json.dumps(records))
    assert main(["prune", "--out", str(out), "--no-progress"]) == 2
    assert f"run `pccfast scores --out {out}` first" in _error(capsys)
    assert main(["ci", "--out", str(out), "--no-progress"]) == 0  # the old name of the stage
    assert (out / "scores.pt").is_file() and not (out / "ci_scores.pt").exists()
    assert main(["prune", "--out", str(out), "--no-progress"]) == 0
