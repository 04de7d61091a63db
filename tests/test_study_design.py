"""The study's design (issue 16) and bookkeeping (issue 19): fixed allocation apart from the
ranking, the feature record, a validation split, paired statistics, caches keyed by every
setting, exact target keys, one study per folder, a record checked on read."""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch

from pccfast.study import Study, StudyConfig, StudyError
from pccfast.study import report as study_report
from pccfast.study import stats as study_stats
from pccfast.study.runner import read_rows
from studies import run, study_config

DESIGN = {
    "data": {"spec": "digits", "workers": 0, "train_limit": 500, "test_limit": 200,
             "val_images": 100},
    "model": {"name": "vgg16_cifar", "width": 0.125},
    "pretrain": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "ci": {"images": 64, "batch_size": 64},
    "prune": {"bn_images": 128},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "run": {"device": "cpu"},
    "study": {"seeds": [0, 1], "criteria": ["ci", "l1", "random"], "targets": [0.5, 0.7],
              "finetune_targets": [0.5], "allocation": ["fixed", "adaptive"],
              "profile": "[0.3]*7+[0.6]*5", "feature_images": 32},
    "arms": {"no_pcc": {"pcc": {"weight": 0.0}}, "pcc": {}},
}


def design(**changes) -> StudyConfig:
    return study_config(DESIGN, **changes)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("design")
    run(design(), out)
    return out


def test_fixed_allocation_keeps_the_same_counts_for_every_criterion_and_arm(done):
    rows = [r for r in read_rows(done / "study.csv") if r["stage"] != "pretrained"]
    for target in ("0.500000", "0.700000"):
        fixed = {r["kept"] for r in rows if r["allocation"] == "fixed" and r["target"] == target}
        assert len(fixed) == 1 and "-" in next(iter(fixed))  # one profile for all
        adaptive = {(r["arm"], r["seed"], r["criterion"]): r["kept"] for r in rows
                    if r["allocation"] == "adaptive" and r["target"] == target}
        assert len(set(adaptive.values())) > 1  # tau on each criterion's scores differs
    for r in rows:
        assert abs(float(r["flops_removed"]) - float(r["target"])) <= 0.005
        assert sum(int(k) for k in r["kept"].split("-")) > 0


def test_every_row_is_measured_on_the_validation_split_too(done):
    rows = read_rows(done / "study.csv")
    assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in rows)
    text = (done / "study.md").read_text()
    assert "## Validation accuracy after pruning, BatchNorm statistics re-estimated" in text


def test_the_feature_record_covers_every_pretrained_model(done):
    with open(done / "features.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = {(r["arm"], r["seed"]) for r in rows}
    assert pairs == {(a, s) for a in ("no_pcc", "pcc") for s in ("0", "1")}
    layers = {r["layer"] for r in rows if (r["arm"], r["seed"]) == ("pcc", "0")}
    assert len(layers) == 13  # VGG-16's scored activations
    for r in rows:
        assert 0.0 <= float(r["pcc_channel"]) <= 1.0 and 0.0 < float(r["ci_share"]) <= 1 + 1e-9
        assert int(r["images"]) == 32
    text = (done / "study.md").read_text()
    assert "## What pre-training did to the features" in text
    assert (done / "plots" / "features.png").stat().st_size > 0


def test_feature_record_against_a_direct_computation():
    """Duplicated channels: PCC 1 between them, CI share below 1; checked against SVDs."""
    from pccfast import pcc_matrix
    from pccfast.study.features import feature_record

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight[4] = conv.weight[0]
        conv.bias[4] = conv.bias[0]
    model = torch.nn.Sequential(conv, torch.nn.ReLU())
    images = torch.randn(7, 3, 6, 5)
    (row,) = feature_record(model, [(images[:4], None), (images[4:], None)], 7)
    a = model(images).detach().double()
    r = pcc_matrix(a, orientation="channel")
    off = ~torch.eye(5, dtype=torch.bool)
    assert row["pcc_channel"] == pytest.approx(float(r[:, off].abs().mean()), rel=1e-5)
    assert r[:, 0, 4].min() > 0.999
    flat = a.reshape(7, 5, 30)
    nuclear = torch.linalg.matrix_norm(flat, ord="nuc")
    ci = torch.stack([nuclear - torch.linalg.matrix_norm(
        flat * (torch.arange(5) != c).double()[None, :, None], ord="nuc") for c in range(5)], 1)
    assert row["ci_share"] == pytest.approx(float((ci.sum(1) / nuclear).mean()), rel=1e-6)
    assert row["ci_share"] < 0.9  # two identical channels each hold little alone
    rp = pcc_matrix(a, orientation="pixel")
    offp = ~torch.eye(30, dtype=torch.bool)
    assert row["pcc_pixel"] == pytest.approx(float(rp[:, offp].abs().mean()), rel=1e-5)


# ----------------------------------------------------------------------------- statistics
def _rows(values: dict) -> list[dict]:
    """Hand-made study rows: (arm, criterion, seed) -> accuracy at one cell."""
    return [{"arm": a, "seed": str(s), "allocation": "fixed", "criterion": c,
             "target": "0.846000", "stage": "finetuned", "acc": f"{v:.6f}", "val_acc": "",
             "flops_removed": "0.846000", "params_removed": "0.9", "kept": "1-2",
             "seconds": "1", "arm_hash": "h", "note": ""}
            for (a, c, s), v in values.items()]


def test_paired_statistics_agree_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    base = {s: round(0.6 + 0.05 * float(torch.rand(1, generator=g)), 6) for s in range(7)}
    arm = {s: round(base[s] + 0.01 + 0.02 * float(torch.randn(1, generator=g)), 6)
           for s in range(6)}  # (rows keep 6 decimals)
    rows = _rows({**{("no_pcc", "ci", s): v for s, v in base.items()},
                  **{("pcc", "ci", s): v for s, v in arm.items()}})
    got = study_report.paired_differences(rows, "no_pcc")[("finetuned", "pcc", "fixed", "ci",
                                                           0.846)]
    a = [arm[s] for s in range(6)]
    b = [base[s] for s in range(6)]  # seed 6 has no partner: left out
    test = scipy_stats.ttest_rel(a, b)
    interval = test.confidence_interval(0.95)
    assert got.n == 6
    assert got.p == pytest.approx(test.pvalue, rel=1e-9)
    assert (got.low, got.high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert got.mean == pytest.approx(sum(a) / 6 - sum(b) / 6, rel=1e-12)


def test_the_interaction_and_the_reading_say_no_more_than_the_interval():
    pytest.importorskip("scipy")
    values = {}
    for s in range(6):
        for arm, shift in (("no_pcc", 0.0), ("pcc", 0.01 * (-1) ** s)):
            values[(arm, "ci", s)] = 0.7 + 0.01 * s + shift
            values[(arm, "random", s)] = 0.5 + 0.02 * s
    rows = _rows(values)
    got = study_report.interaction(rows, "no_pcc", "pcc", "ci")[("finetuned", "fixed", 0.846)]
    expected = [0.01 * (-1) ** s for s in range(6)]
    assert got.n == 6 and got.mean == pytest.approx(sum(expected) / 6, abs=1e-12)
    text = study_stats.reading(got, "x")
    assert "no effect shown" in text and f"{100 * got.bound:.2f} points" in text
    clear = study_stats.paired([0.02, 0.03, 0.025, 0.02, 0.03, 0.028])
    assert clear.excludes_zero and "excludes 0" in study_stats.reading(clear, "x")
    one = study_stats.paired([0.05])
    assert math.isnan(one.low) and "no conclusion" in study_stats.reading(one, "x")


def test_differences_without_spread_get_no_interval_and_no_test():
    """Cells at chance in every seed differ by exactly 0: the report must not print a
    point interval [+0.00, +0.00] with p = nan, nor call a constant nonzero difference
    significant."""
    pytest.importorskip("scipy")
    zero = study_stats.paired([0.0, 0.0, 0.0])
    assert zero.no_spread and not zero.excludes_zero
    assert "no spread" in study_stats.reading(zero, "x")
    constant = study_stats.paired([0.01, 0.01])
    assert constant.no_spread and not constant.excludes_zero
    assert not study_stats.paired([0.01, 0.02]).no_spread
    values = {}
    for s in range(3):
        for arm in ("no_pcc", "pcc"):
            values[(arm, "ci", s)] = 0.1
            values[(arm, "random", s)] = 0.1
    text = study_report.markdown(_rows(values))
    assert "nan" not in text and "[+0.00, +0.00]" not in text
    assert "– (no spread)" in text and "nothing to test" in text


def test_holm_adjusted_p_values_follow_the_step_down_procedure():
    """Hand-made cases, then random ones (ties included) against the rejection procedure
    itself: reject the smallest p-values while p_(k) <= alpha / (m - k), stop at the first
    that is not; the adjusted p-values must reject exactly those at every alpha."""
    got = study_stats.holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    got = study_stats.holm([0.01, math.nan, 0.02])  # nothing to test: kept out of m
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)
    assert study_stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert study_stats.holm([]) == []
    g = torch.Generator().manual_seed(5)
    for trial in range(200):
        m = int(torch.randint(1, 12, (1,), generator=g))
        p = [round(float(v), 2) for v in torch.rand(m, generator=g) ** 3]  # ties, small ones
        adjusted = study_stats.holm(p)
        for alpha in (0.001, 0.01, 0.05, 0.1, 0.3):
            rejected = set()
            for k, i in enumerate(sorted(range(m), key=lambda i: p[i])):
                if p[i] > alpha / (m - k):
                    break
                rejected.add(i)
            assert {i for i in range(m) if adjusted[i] <= alpha} == rejected, (p, alpha)
        assert all(a >= b for a, b in zip(adjusted, p))
    for bad in ([1.5], [-0.1], [0.2, float("inf")]):
        with pytest.raises(ValueError, match="holm"):
            study_stats.holm(bad)


def test_the_report_adjusts_every_secondary_comparison_it_prints():
    """Holm's family is every comparison the section prints with a p-value, the primary
    endpoint left out: here pcc / l1, pcc / random and the interaction after fine-tuning."""
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(11)
    values = {}
    for s in range(4):
        for arm, shift in (("no_pcc", 0.0), ("pcc", 0.01)):
            for c, level in (("ci", 0.7), ("l1", 0.69), ("random", 0.6)):
                values[(arm, c, s)] = level + shift + 0.003 * float(torch.randn(1, generator=g))
    rows = _rows(values)
    text = study_report.markdown(rows)
    diffs = study_report.paired_differences(rows, "no_pcc")
    cell = ("finetuned", "pcc", "fixed")
    inter = study_report.interaction(rows, "no_pcc", "pcc", "ci")[("finetuned", "fixed", 0.846)]
    family = [diffs[(*cell, "l1", 0.846)].p, diffs[(*cell, "random", 0.846)].p, inter.p]
    l1, random, both = study_stats.holm(family)
    assert "over the 3 secondary comparisons" in text
    lines = text.splitlines()
    assert any(line.startswith("| pcc / ci | 84.6% |") and "| (primary) |" in line
               for line in lines)
    assert any(line.startswith("| pcc / l1 | 84.6% |") and f"| {l1:.3g} |" in line
               for line in lines)
    assert any(line.startswith("| pcc / random | 84.6% |") and f"| {random:.3g} |" in line
               for line in lines)
    assert any(line.startswith("| fine-tuned | fixed | 84.6% |") and f"| {both:.3g} |" in line
               for line in lines)
    assert min(l1, random, both) < 1  # the check above is not of three 1s


def test_only_a_best_mean_no_other_row_ties_is_bold():
    """Right after deep pruning every row can sit at chance: bolding all of them as "the best"
    says nothing, so a tie marks none; a unique best is marked once."""
    tied = {(a, c, s): 0.1 for a in ("no_pcc", "pcc") for c in ("ci", "random") for s in range(3)}
    table = [line for line in study_report.markdown(_rows(tied)).splitlines()
             if line.startswith(("| no_pcc /", "| pcc /")) and " ± " in line]
    assert len(table) == 4 and not any("**" in line for line in table)
    best = {**tied, **{("pcc", "ci", s): 0.7 + 0.01 * s for s in range(3)}}
    table = [line for line in study_report.markdown(_rows(best)).splitlines()
             if line.startswith(("| no_pcc /", "| pcc /")) and " ± " in line]
    assert [line.count("**") for line in table] == [0, 0, 2, 0]
    assert "| pcc / ci | **71.00 ± 1.00 (3)** |" in table

# ----------------------------------------------------------------------------- bookkeeping
def test_changed_settings_are_never_served_from_the_caches(tmp_path, monkeypatch):
    """Issue 19, item 1: after deleting the rows a changed setting refused, the rerun measures
    again (the cells' and scores' caches are keyed by every setting they depend on)."""
    import pccfast.train.loop

    small = dict(seeds=[0], criteria=["l1"], targets=[0.5], finetune_targets=[0.5],
                 allocation=["adaptive"], feature_images=0)
    out = tmp_path / "s"
    run(design(study=small, arms={"no_pcc": {"pcc": {"weight": 0.0}}}), out)
    changed = design(study=small, arms={"no_pcc": {"pcc": {"weight": 0.0}}},
                     finetune={"epochs": 2}, prune={"bn_images": 64})
    with pytest.raises(StudyError, match="other settings"):
        run(changed, out)
    (out / "study.csv").unlink()
    stages = []
    real = pccfast.train.loop.fit
    monkeypatch.setattr(pccfast.train.loop, "fit",
                        lambda *a, **kw: stages.append(kw["stage"]) or real(*a, **kw))
    run(changed, out)
    assert stages == ["finetune"]  # the pre-trained model is reused, the cell is not
    import json

    cell = next((out / "work" / "no_pcc-seed0" / "cells").iterdir())
    settings = json.loads((cell / "finetune.json").read_text())["settings"]
    assert settings["finetune.epochs"] == 2
    result = json.loads((cell / "result.json").read_text())["settings"]
    assert result["prune.bn_images"] == 64


def test_targets_are_exact_keys():
    with pytest.raises(ValueError, match="more than 6 decimals"):
        design(study={"targets": [0.5, 0.5000001], "finetune_targets": [0.5]})
    with pytest.raises(ValueError, match="more than 6 decimals"):
        design(study={"targets": [0.3333333], "finetune_targets": []})


def quick(**study):
    """One seed, one criterion, one target, no fine-tuning: two arm x seed pairs."""
    return design(study={"seeds": [0], "criteria": ["l1"], "targets": [0.5],
                         "finetune_targets": [], "allocation": ["fixed"], **study})


def test_a_pair_another_process_runs_is_left_to_it(tmp_path):
    from pccfast.study.runner import _FileLock

    config, said = quick(), []
    (tmp_path / "work").mkdir()
    other = _FileLock(tmp_path / "work" / ".pcc-seed0.lock")
    assert other.acquire(blocking=False)
    other.sign()
    try:
        Study(config, tmp_path, progress=False, echo=said.append).run()
    finally:
        other.release()
    first = read_rows(tmp_path / "study.csv")
    assert {r["arm"] for r in first} == {"no_pcc"}
    assert any("pcc seed 0: run by pid" in line and "left to it" in line for line in said)
    run(config, tmp_path)  # the other process went away: its pair is done now
    rows = read_rows(tmp_path / "study.csv")
    assert {(r["arm"], r["stage"]) for r in rows} == {
        (a, s) for a in ("no_pcc", "pcc") for s in ("pretrained", "pruned", "pruned_bn")}
    assert [r for r in rows if r["arm"] == "no_pcc"] == first  # not redone


def test_dry_run_says_how_far_a_running_pair_is(tmp_path):
    """--dry-run names the pre-training epochs a pair's checkpoint holds (under its own
    settings only), counts only the epochs left, and names the process running the pair."""
    import json
    import os

    from pccfast.study import cells
    from pccfast.study.runner import _FileLock, _pretrain_units

    config = study_config(DESIGN, pretrain={"epochs": 4}, study={
        "seeds": [0, 1], "criteria": ["l1"], "targets": [0.5], "finetune_targets": [],
        "allocation": ["fixed"]})
    study = Study(config, tmp_path, progress=False, echo=None)
    arm = next(a for a in config.arms if a.name == "pcc")
    fresh = study._units(arm, 1)
    work = study.work_dir(arm, 0)
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "pretrain.pt").write_bytes(b"a checkpoint")
    (work / "settings.json").write_text(json.dumps(
        {"settings": cells.pretrain_settings(config.arm_config(arm, 0))}))
    epochs = [{"stage": "pretrain", "epoch": e, "epochs": 4} for e in (1, 2, 3, 3)]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs) + '{"sta')
    lock = _FileLock(tmp_path / "work" / ".pcc-seed0.lock")
    assert lock.acquire(blocking=False)
    try:
        lines = study.describe().splitlines()
    finally:
        lock.release()
    (ours,) = [line for line in lines if line.split()[:3] == ["pcc", "seed", "0:"]]
    assert "pre-training 3/4 epochs" in ours and f"running in pid {os.getpid()}" in ours
    assert not any("pre-training" in line or "running" in line
                   for line in lines if line is not ours)
    pretrain = fresh - study._units(arm, 0)
    assert pretrain == pytest.approx(3 / 4 * _pretrain_units(arm.config))
    # the same files under other settings: nothing of them counts
    (work / "settings.json").write_text(json.dumps({"settings": {"pretrain.epochs": 5}}))
    assert "pre-training" not in study.describe() and study._units(arm, 0) == fresh


def test_rows_other_processes_write_meanwhile_are_kept_and_not_redone(tmp_path, monkeypatch):
    """Two processes share a folder: what one writes while the other runs stays in the record,
    and a pair it finished is not run again."""
    from pccfast.study import runner

    config = quick()
    elsewhere = tmp_path / "elsewhere"
    run(config, elsewhere)  # what the other process will have written
    theirs = [r for r in read_rows(elsewhere / "study.csv") if r["arm"] == "pcc"]
    features = [f for f in runner.read_features(elsewhere / "features.csv") if f["arm"] == "pcc"]
    ran, real = [], runner.Study._run_pair

    def run_pair_while_the_other_finishes(self, arm, seed, rows, feats, bar):
        ran.append(arm.name)
        real(self, arm, seed, rows, feats, bar)
        with self._record_lock():  # the other process saves its pair meanwhile
            runner.write_rows(self.csv_path, runner.read_rows(self.csv_path) + theirs)
            runner.write_features(self.features_path,
                                  runner.read_features(self.features_path) + features)

    monkeypatch.setattr(runner.Study, "_run_pair", run_pair_while_the_other_finishes)
    out = tmp_path / "shared"
    run(config, out)
    assert ran == ["no_pcc"]
    rows = read_rows(out / "study.csv")
    assert [r for r in rows if r["arm"] == "pcc"] == theirs
    assert {r["arm"] for r in rows} == {"no_pcc", "pcc"}
    assert {f["arm"] for f in runner.read_features(out / "features.csv")} == {"no_pcc", "pcc"}


def test_arms_can_be_run_apart(tmp_path):
    """--arms runs only the pairs of the arms named (the baseline while the other arm is being
    chosen); a later run of every arm adds the rest and redoes nothing."""
    config = quick()
    with pytest.raises(ValueError, match=r"--arms: \['pc'\] names no arm of this study; its "
                                         r"arms are \['no_pcc', 'pcc'\]"):
        Study(config, tmp_path, progress=False, echo=None, only=["pc"])
    Study(config, tmp_path, progress=False, echo=None, only=["no_pcc"]).run()
    first = read_rows(tmp_path / "study.csv")
    assert {r["arm"] for r in first} == {"no_pcc"}
    run(config, tmp_path)
    rows = read_rows(tmp_path / "study.csv")
    assert {r["arm"] for r in rows} == {"no_pcc", "pcc"}
    assert [r for r in rows if r["arm"] == "no_pcc"] == first


def test_a_study_with_other_settings_is_refused_while_one_runs(tmp_path):
    from pccfast.study.runner import _FileLock

    run(quick(), tmp_path)
    member = _FileLock(tmp_path / ".study.lock")
    assert member.acquire(exclusive=False)  # a study runs in the folder
    try:
        with pytest.raises(StudyError, match="another pccfast study with other settings is "
                                             "running"):
            run(quick(targets=[0.5, 0.7]), tmp_path)
        run(quick(), tmp_path)  # the same settings join it (nothing is left to do here)
    finally:
        member.release()
    run(quick(targets=[0.5, 0.7]), tmp_path)  # once it has finished, other settings may run
    assert {r["target"] for r in read_rows(tmp_path / "study.csv")} >= {"0.500000", "0.700000"}


@pytest.mark.parametrize("column, value, message", [
    ("acc", "7.5", "acc '7.5' is not a fraction"),
    ("seed", "x", "seed 'x' is not an integer"),
    ("seed", str(2**64), "is not an integer"),
    ("stage", "half", "stage 'half'"),
])
def test_a_record_is_checked_on_read_naming_file_and_line(done, tmp_path, column, value,
                                                          message):
    rows = read_rows(done / "study.csv")
    rows[3][column] = value
    path = tmp_path / "study.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(StudyError, match=f"study.csv line 5: .*{message}"):
        read_rows(path)


def test_rows_of_arms_no_longer_configured_are_not_reported(done, tmp_path):
    import shutil

    out = tmp_path / "one_arm"
    shutil.copytree(done, out)
    messages = []
    Study(design(arms={"no_pcc": {"pcc": {"weight": 0.0}}}), out, progress=False,
          echo=messages.append).write_report()
    text = (out / "study.md").read_text()
    assert "| pcc /" not in text and "| no_pcc /" in text
    assert any("['pcc']" in m for m in messages)


def test_only_an_unmeetable_budget_is_recorded_as_not_measured(tmp_path, monkeypatch):
    from pccfast.study import cells

    def broken(self, *args, **kwargs):
        raise ValueError("a bug, not a budget")

    monkeypatch.setattr(cells.Cell, "prune", broken)
    small = dict(seeds=[0], criteria=["l1"], targets=[0.5], finetune_targets=[],
                 allocation=["adaptive"], feature_images=0)
    with pytest.raises(ValueError, match="a bug"):
        run(design(study=small, arms={"no_pcc": {"pcc": {"weight": 0.0}}}), tmp_path)
    assert all(r["acc"] != "" for r in read_rows(tmp_path / "study.csv"))


def test_study_settings_that_cannot_work_fail_before_training(tmp_path, monkeypatch, capsys):
    import pccfast.train.loop
    from pccfast.cli import main

    with pytest.raises(ValueError, match="bn_images must be positive"):
        design(arms={"a": {"prune": {"bn_images": 0}}})
    with pytest.raises(ValueError, match="2\\*\\*63"):
        design(study={"seeds": [2**64]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        design(arms={"a": {"run": {"seed": 3}}, "b": {"ci": {"criterion": "l1"}}})
    assert sum("the study sets per cell" in str(w.message) for w in caught) == 2
    monkeypatch.setattr(pccfast.train.loop, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"\[arms.no_pcc\]"):
        run(design(model={"name": "vgg16_cifar", "width": 0.0001}), tmp_path / "tiny")
    config = tmp_path / "s.toml"
    config.write_text('[data]\nspec = "digits"\n[prune]\nbn_images = 64\n'
                      '[study]\ntargets = [0.5]\n[arms.pcc]\n')
    assert main(["study", "--config", str(config), "--out", str(tmp_path / "o"),
                 "--device", "bogus"]) == 2
    assert "--device 'bogus'" in capsys.readouterr().err


def test_an_interrupted_study_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from pccfast.cli import main
    from pccfast.study import runner

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Study, "_run_pair", interrupted)
    config = tmp_path / "s.toml"
    config.write_text('[data]\nspec = "digits"\ntrain_limit = 200\n[prune]\nbn_images = 64\n'
                      '[study]\ntargets = [0.5]\n[arms.pcc]\n')
    assert main(["study", "--config", str(config), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err


def test_a_data_file_replaced_under_a_study_invalidates_its_caches(tmp_path):
    """The study's caches carry the data files' stamps, as run folders' records do."""
    import numpy as np

    from pccfast.study.cells import settings_of

    path = tmp_path / "d.npz"
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.arange(4) % 2
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    config = design(data={"spec": f"npz:{path}", "val_images": 0})
    cfg = config.arm_config(config.arms[0], 0)
    before = {stage: settings_of(cfg, stage) for stage in ("pretrain", "scores", "prune")}
    np.savez(path, x_train=x + 1, y_train=y, x_test=x, y_test=y)  # same shapes, new pixels
    for stage, settings in before.items():
        now = settings_of(cfg, stage)
        changed = [k for k in now if now[k] != settings.get(k)]
        assert changed and all(k.startswith("data.file:") for k in changed), stage
