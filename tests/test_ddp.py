"""DDP under torchrun on the CPU (gloo): two processes, each on half of every global batch, give
the result of one process on the whole batch, through every stage of ``pccfast run``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pccfast.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def plain_cnn(num_classes=10, width=1.0):
    """No BatchNorm (its batch statistics are per process without SyncBatchNorm, which has no
    CPU kernel), so the two runs must agree to rounding."""
    c1, c2 = int(8 * width), int(16 * width)
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(c2 * 16, num_classes),
    )


FLAGS = ["--data", "digits", "--train-limit", "256", "--test-limit", "96",
         "--model", "test_ddp:plain_cnn", "--epochs", "2", "--batch-size", "32", "--lr", "0.05",
         "--pcc-weight", "0.2", "--calib-images", "64", "--tau", "0.7",
         "--finetune-epochs", "1", "--finetune-lr", "0.02", "--device", "cpu", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.syspath_prepend(str(TESTS))
    assert main(["run", *FLAGS, "--out", str(one)]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "pccfast", "run", *FLAGS, "--out", str(two)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("finetune  1 epochs") == 1  # only rank 0 prints

    a, b = (json.loads((one / "summary.json").read_text()),
            json.loads((two / "summary.json").read_text()))
    for key in ("pcc_acc", "pruned_acc", "finetuned_acc"):
        assert abs(a[key] - b[key]) <= 1 / 96 + 1e-9, key  # at most one test image apart
    assert 0 < a["flops_removed"] == pytest.approx(b["flops_removed"])

    # Pre-training: the same weights after 16 optimiser steps, to the fp32 rounding of the split
    # batch and the all-reduce, which training amplifies (no bound to derive: up to 8e-5 apart
    # measured over 1 and 2 threads and MKL's AVX-512, AVX2 and CBWR paths; 10x that allowed).
    wa, wb = (_weights(one / "checkpoints" / "pretrain.pt"),
              _weights(two / "checkpoints" / "pretrain.pt"))
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-3, atol=1e-4), name
    ra = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in ra] == [(r["stage"], r["epoch"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        if x["stage"] == "pretrain":
            assert x["pcc"] == pytest.approx(y["pcc"], rel=1e-4)

    # CI: each rank scored half of the 64 images; the all-reduced means equal one process's.
    from pccfast.pipeline.steps import read_scores

    sa, sb = ({"scores": scores, **meta} for scores, meta in
              (read_scores(one / "scores.pt"), read_scores(two / "scores.pt")))
    assert sa["images"] == sb["images"] == 64
    for name in sa["scores"]:  # from those weights: as far apart as they are (above)
        assert torch.allclose(sa["scores"][name], sb["scores"][name], rtol=1e-3, atol=1e-5), name
    pa, pb = (json.loads((one / "plan.json").read_text()),
              json.loads((two / "plan.json").read_text()))
    assert [l["name"] for l in pa["layers"]] == [l["name"] for l in pb["layers"]]
    for la, lb in zip(pa["layers"], pb["layers"]):
        # the same channels, unless the scores' agreement above cannot decide between them
        _assert_same_choice(sa["scores"][la["name"]], la["kept_indices"], lb["kept_indices"],
                            tau=0.7, slack=2 * (1e-3 * sa["scores"][la["name"]].abs().max() + 1e-5))


def _assert_same_choice(score, kept_a, kept_b, *, tau, slack):
    """Two runs' kept channels for one layer agree, or differ only by near-ties of ``score``
    (run a's scores; run b's agree with them to ``slack`` per channel, not bitwise).

    Run a's plan must follow from its scores exactly; run b's must follow from scores that each
    move by at most ``slack``: its count from the tau cut, its channels a top-k set."""
    score = score.double()
    n = len(score)
    order = torch.argsort(-score, stable=True)  # ties to the lower index, as the planner ranks
    cumulative = torch.cumsum(score[order], 0)
    assert kept_a == sorted(order[:len(kept_a)].tolist())
    if kept_a == kept_b:
        return
    k, cut, moved = len(kept_b), tau * float(score.sum()), (1 + tau) * n * slack
    assert float(cumulative[k - 1]) >= cut - moved, (kept_a, kept_b)  # reached by k channels
    assert k == 1 or float(cumulative[k - 2]) < cut + moved, (kept_a, kept_b)  # not by k - 1
    left_out = [c for c in range(n) if c not in set(kept_b)]
    if left_out:
        assert float(score[left_out].max()) <= float(score[kept_b].min()) + 2 * slack, \
            (kept_a, kept_b)


def test_the_plan_comparison_allows_near_ties_only():
    score = torch.tensor([5.0, 3.0, 3.0001, 1.0, 0.5])  # tau 0.6 keeps channels 0 and 2
    _assert_same_choice(score, [0, 2], [0, 1], tau=0.6, slack=1e-3)  # 3.0 vs 3.0001: a near-tie
    _assert_same_choice(score, [0, 2], [0, 1, 2], tau=8.0 / 12.5, slack=1e-3)  # the cut itself
    for wrong in ([0, 3], [0, 1, 2], [0]):  # a real difference, the count off by one either way
        with pytest.raises(AssertionError):
            _assert_same_choice(score, [0, 2], wrong, tau=0.6, slack=1e-3)
    with pytest.raises(AssertionError):  # run a's plan must follow from its own scores
        _assert_same_choice(score, [0, 1], [0, 1], tau=0.6, slack=1e-3)


BN_WORKER = '''
import sys, torch, torch.distributed as dist
from torch import nn
from pccfast.train import recalibrate_batchnorm
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
batches = [torch.randn(5, 3, 6, 6) * (1 + i) + i for i in range(4)]
recalibrate_batchnorm(model, batches[rank::world])
bn = model[1]
if rank == 0:
    torch.save({"mean": bn.running_mean, "var": bn.running_var}, sys.argv[1])
dist.destroy_process_group()
'''


def test_batchnorm_recalibration_is_averaged_over_ranks(tmp_path):
    """Two ranks, each on half of the batches, end with the statistics one process gets on all."""
    from pccfast.train import recalibrate_batchnorm

    worker = tmp_path / "bn_worker.py"
    worker.write_text(BN_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(worker),
           str(tmp_path / "stats.pt")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = torch.load(tmp_path / "stats.pt")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    batches = [torch.randn(5, 3, 6, 6) * (1 + i) + i for i in range(4)]
    recalibrate_batchnorm(model, batches)
    torch.testing.assert_close(got["mean"], model[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["var"], model[1].running_var, rtol=1e-5, atol=1e-6)
