"""The training loop: schedule, config checks, learning, AMP, channels_last, and exact resume."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from pccfast.data import load_data
from pccfast.train import (PCCConfig, TrainConfig, evaluate, fit, load_checkpoint, lr_at,
                           save_checkpoint)


def small_cnn(num_classes=10, dropout=0.2):
    """A conv-BN-ReLU net with dropout (so resuming must restore the RNG)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(4), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16 * 16, num_classes),
    )


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", train_limit=320, test_limit=120)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- schedule and config

def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    lrs = [lr_at(s, total, 0.4, warm, 0.004) for s in range(total)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)
    assert lrs[10] == pytest.approx(0.4)
    mid = 10 + 45
    assert lrs[mid] == pytest.approx(0.004 + 0.5 * 0.396 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(total, total, 0.4, warm, 0.004) == pytest.approx(0.004)
    assert lr_at(0, 50, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(epochs=-1), ValueError, "epochs must be >= 0"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an integer"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
    (dict(amp="fp8"), ValueError, "amp must be one of"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing must be in"),
])
def test_train_config_errors_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**kwargs)


def test_lr_scaling_rule():
    assert (TrainConfig(lr=0.1, batch_size=1024, lr_reference_batch=256).scaled_lr
            == pytest.approx(0.4))
    with pytest.raises(ValueError, match="pcc.mode"):
        PCCConfig(mode="boost")


# ---------------------------------------------------------------- training

def test_fit_learns_and_logs(digits, tmp_path):
    torch.manual_seed(0)
    model = small_cnn()
    before = evaluate(model, digits.test_loader(64))["acc"]
    records = []
    result = fit(model, digits, TrainConfig(epochs=4, batch_size=32, lr=0.05, warmup_epochs=1,
                                            label_smoothing=0.1),
                 pcc=PCCConfig(weight=0.1), stage="pretrain", log=records.append,
                 checkpoint=tmp_path / "ck.pt", progress=False)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and result.history == records
    assert result.test_acc > max(0.5, before + 0.3)  # chance is 0.1
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(0 < r["pcc"] <= 1 and r["images_per_s"] > 0 for r in records)
    assert records[-1]["lr"] < records[1]["lr"]
    assert not [f for f in os.listdir(tmp_path) if f != "ck.pt"]  # no temp files left behind
    ckpt = load_checkpoint(tmp_path / "ck.pt", stage="pretrain")
    assert ckpt["epoch"] == 4 and ckpt["config"]["batch_size"] == 32
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][name], value)
    assert not any(m._forward_hooks for m in model.modules())  # the regulariser's hooks are gone


def test_pcc_mode_steers_the_correlation(digits):
    """The regulariser's sign reaches the gradient: promote ends more correlated than no PCC,
    suppress (decorrelation) far less."""
    from pccfast import pcc

    def mean_pcc(model):
        model.eval()
        x, _ = next(iter(digits.test_loader(64)))
        acts = []
        hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in model
                 if isinstance(m, nn.ReLU)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return sum(float(pcc(a)) for a in acts) / len(acts)

    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    scores = {}
    for weight, mode in ((0.0, "promote"), (1.0, "promote"), (1.0, "suppress")):
        torch.manual_seed(1)
        model = small_cnn(dropout=0.0)
        fit(model, digits, cfg, pcc=PCCConfig(weight=weight, mode=mode), progress=False)
        scores[weight, mode] = mean_pcc(model)
    assert scores[1.0, "promote"] > scores[0.0, "promote"]
    assert scores[1.0, "promote"] > scores[1.0, "suppress"] + 0.2


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_resume_continues_exactly(digits, tmp_path, amp):
    """Crash after epoch 2 of 3, resume: the weights equal those of an uninterrupted run."""
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, warmup_epochs=0.5, amp=amp)
    pcc = PCCConfig(weight=0.1)
    torch.manual_seed(3)
    straight = small_cnn()
    fit(straight, digits, cfg, pcc=pcc, stage="pretrain", checkpoint=tmp_path / "a.pt",
        progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(record):
        if record["epoch"] == 3:
            raise Crash  # after the epoch-2 checkpoint, before the epoch-3 one

    torch.manual_seed(3)
    interrupted = small_cnn()
    with pytest.raises(Crash):
        fit(interrupted, digits, cfg, pcc=pcc, stage="pretrain", checkpoint=tmp_path / "b.pt",
            log=crash_at_3, progress=False)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 2
    torch.manual_seed(12345)  # a fresh process: other RNG state, other initial weights
    resumed = small_cnn()
    result = fit(resumed, digits, cfg, pcc=pcc, stage="pretrain", checkpoint=tmp_path / "b.pt",
                 resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert load_checkpoint(tmp_path / "a.pt")["optimizer"]["state"].keys() == \
        load_checkpoint(tmp_path / "b.pt")["optimizer"]["state"].keys()
    if amp == "fp16":
        assert load_checkpoint(tmp_path / "b.pt")["scaler"]["scale"] > 0


def test_resume_without_checkpoint_starts_afresh_and_done_is_a_no_op(digits, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    torch.manual_seed(0)
    model = small_cnn()
    first = fit(model, digits, cfg, checkpoint=tmp_path / "c.pt", resume=True, progress=False)
    snapshot = _state(model)
    again = fit(model, digits, cfg, checkpoint=tmp_path / "c.pt", resume=True, progress=False)
    assert again.history == first.history
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_checkpoint_errors(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "x.pt", stage="finetune", epoch=1, model=model, optimizer=opt,
                    scaler=None, history=[], config={})
    with pytest.raises(ValueError, match="belongs to stage 'finetune'"):
        load_checkpoint(tmp_path / "x.pt", stage="pretrain")
    blob = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ValueError, match="truncated or unreadable"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save({"weights": 1}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="not a pccfast training checkpoint"):
        load_checkpoint(tmp_path / "f.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")


def test_checkpoints_hold_only_tensors_and_numbers(tmp_path):
    """Every part (optimiser, scaler, torch/NumPy/Python RNG states) round-trips through
    torch.load(weights_only=True), and the RNG states restore the exact next draws."""
    import random

    import numpy as np

    from pccfast.train.checkpoint import set_rng_state

    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers in the optimiser state
    scaler = torch.amp.GradScaler("cpu")
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    random.gauss(0, 1), np.random.randn()  # both cache a second Gaussian in their state
    save_checkpoint(tmp_path / "x.pt", stage="pretrain", epoch=1, model=model, optimizer=opt,
                    scaler=scaler, history=[{"epoch": 1, "lr": 0.1}], config={"lr": 0.1},
                    origin={"fingerprint": "abc", "settings": {"pretrain.lr": 0.1}})
    expected = (random.random(), random.gauss(0, 1), np.random.randn(4), torch.rand(4))
    raw = torch.load(tmp_path / "x.pt", weights_only=True)
    assert raw["optimizer"]["state"] and raw["scaler"]["scale"] > 0
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(raw["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.randn(4), torch.rand(4))
    assert again[:2] == expected[:2] and np.array_equal(again[2], expected[2])
    assert torch.equal(again[3], expected[3])
    assert load_checkpoint(tmp_path / "x.pt", fingerprint="abc")["epoch"] == 1
    with pytest.raises(ValueError, match="other settings"):
        load_checkpoint(tmp_path / "x.pt", fingerprint="abd")


def test_a_planted_pickle_in_a_checkpoint_never_runs(digits, tmp_path):
    from planted import planted_checkpoint

    marker = tmp_path / "ran"
    planted_checkpoint(tmp_path / "p.pt", marker, "pretrain")
    with pytest.raises(ValueError, match="tensors and numbers"):
        load_checkpoint(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="tensors and numbers"):
        fit(small_cnn(), digits, TrainConfig(epochs=1, batch_size=64), stage="pretrain",
            checkpoint=tmp_path / "p.pt", resume=True, progress=False)
    assert not marker.exists()


def test_bf16_autocast_and_channels_last(digits):
    torch.manual_seed(0)
    model = small_cnn(dropout=0.0)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, amp="bf16", channels_last=True)
    result = fit(model, digits, cfg, pcc=PCCConfig(weight=0.05), progress=False)
    rec = result.history[0]
    assert math.isfinite(rec["train_loss"]) and math.isfinite(rec["pcc"])
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    fp32 = evaluate(model, digits.test_loader(64))
    bf16 = evaluate(model, digits.test_loader(64), amp="bf16")
    assert abs(fp32["acc"] - bf16["acc"]) < 0.05 and abs(fp32["loss"] - bf16["loss"]) < 0.1


def test_label_smoothing_reaches_the_loss(digits):
    """One step from the same weights: the logged loss is the smoothed cross-entropy."""
    records = {}
    for smoothing in (0.0, 0.3):
        torch.manual_seed(0)
        model = small_cnn(dropout=0.0)
        cfg = TrainConfig(epochs=1, batch_size=320, lr=0.0, label_smoothing=smoothing)
        records[smoothing] = fit(model, digits, cfg, progress=False).history[0]["train_loss"]
    torch.manual_seed(0)
    model = small_cnn(dropout=0.0)
    x, y = next(iter(digits.train_loader(320, seed=0)))
    with torch.no_grad():
        logits = model(x)
    for smoothing, loss in records.items():
        expected = nn.functional.cross_entropy(logits, y, label_smoothing=smoothing)
        assert loss == pytest.approx(float(expected), rel=1e-5)


def test_recalibrate_batchnorm_averages_batch_statistics():
    from pccfast.train import recalibrate_batchnorm

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(5, momentum=0.3), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(4), nn.BatchNorm1d(4))
    batches = [(torch.randn(6, 3, 7, 7) * 2 + 1, torch.zeros(6)) for _ in range(3)]
    model(batches[0][0])  # materialise the lazy layer
    bn2d, bn1d = model[1], model[5]
    bn2d.running_mean.fill_(40.0)
    bn2d.running_var.fill_(1e-3)
    weights = [p.detach().clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, batches) == 18
    with torch.no_grad():
        y = [conv(x) for x, _ in batches]
        mean = torch.stack([t.mean((0, 2, 3)) for t in y]).mean(0)
        var = torch.stack([t.var((0, 2, 3), unbiased=True) for t in y]).mean(0)
    torch.testing.assert_close(bn2d.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn2d.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn1d.running_var.ne(1).all()
    assert not model.training and bn2d.momentum == 0.3 and bn1d.momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(model, [])


def test_bn_images_setting_is_checked_and_keeps_the_criterion():
    from pccfast.pipeline.config import RunConfig

    cfg = RunConfig.from_dict({"prune": {"rates": "[0.5]*12", "bn_images": 64}})
    assert cfg.prune.bn_images == 64 and cfg.prune.budget == {"rates": "[0.5]*12"}
    cfg = RunConfig.from_dict({"prune": {"bn_images": 32}}, base=cfg)
    assert cfg.prune.budget == {"rates": "[0.5]*12"}  # not cleared by a non-budget key
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="prune.bn_images must be a non-negative integer"):
            RunConfig.from_dict({"prune": {"bn_images": bad}})
