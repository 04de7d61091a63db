"""The study runner on a tiny digits study: its rows, its resume rules, its tables."""

from __future__ import annotations

import csv
import statistics

import pytest

from pccfast.study import Study, StudyConfig, StudyError
from pccfast.study import report as study_report
from pccfast.study.runner import PCC_STEP_COST, Key, read_rows
from studies import run, study_config

TINY = {
    "data": {"spec": "digits", "workers": 0, "train_limit": 400, "test_limit": 200},
    "model": {"name": "vgg16_cifar", "width": 0.125},
    "pretrain": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "ci": {"images": 64, "batch_size": 64},
    "prune": {"bn_images": 128},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "run": {"device": "cpu"},
    "study": {"seeds": [0, 1], "criteria": ["ci", "l1", "random"], "targets": [0.5, 0.6],
              "finetune_targets": [0.5]},
    "arms": {"no_pcc": {"pcc": {"weight": 0.0}}, "pcc": {}},
}


def tiny(**study) -> StudyConfig:
    return study_config(TINY, study=study)


def by_key(rows):
    return {(r["arm"], r["seed"], r["criterion"], r["target"], r["stage"]): r for r in rows}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run(tiny(), out)
    return out


def test_every_cell_has_its_rows(finished):
    rows = read_rows(finished / "study.csv")
    # per arm x seed: 1 pretrained + 3 criteria x 2 targets x (pruned, pruned_bn) + 3 fine-tuned
    assert len(rows) == 2 * 2 * (1 + 3 * 2 * 2 + 3)
    for r in rows:
        if r["acc"] == "":
            assert "cannot be met" in r["note"]
            continue
        assert 0.0 <= float(r["acc"]) <= 1.0
        if r["stage"] != "pretrained":
            assert abs(float(r["flops_removed"]) - float(r["target"])) <= 0.005
    assert (finished / "study.md").is_file()
    assert (finished / "plots" / "accuracy_vs_flops.png").is_file()


def test_a_finished_study_trains_nothing_again(finished, monkeypatch):
    import pccfast.train.loop

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(pccfast.train.loop, "fit", fail)
    before = (finished / "study.csv").read_text()
    run(tiny(), finished)
    assert (finished / "study.csv").read_text() == before


def test_more_targets_reuse_the_pretrained_models(finished, tmp_path, monkeypatch):
    import shutil

    import pccfast.train.loop

    out = tmp_path / "grown"
    shutil.copytree(finished, out)
    calls = []
    real_fit = pccfast.train.loop.fit

    def counting_fit(model, data, cfg, **kw):
        calls.append(kw.get("stage"))
        return real_fit(model, data, cfg, **kw)

    monkeypatch.setattr(pccfast.train.loop, "fit", counting_fit)
    grown = tiny(targets=[0.5, 0.6, 0.7])
    study = Study(grown, out, progress=False)  # the ETA counts only the work left:
    done = {Key.of(r) for r in read_rows(out / "study.csv")}
    for arm, seed in study.pairs():  # 3 criteria x the 0.7 cell (BN and test images, 30% left)
        assert study._units(arm, seed, done) == pytest.approx(3 * (128 + 200) * 0.3 / 3)
        # epochs x images x the cost of a PCC step
        pretraining = 1 * 400 * (1.0 if arm.name == "no_pcc" else PCC_STEP_COST)
        fresh = Study(grown, tmp_path / "new")._units(arm, seed)  # no pre-trained model there
        assert fresh == pytest.approx(study._units(arm, seed) + pretraining)
    run(grown, out)
    assert calls == []  # no pre-training, and 0.7 is not fine-tuned
    rows = by_key(read_rows(out / "study.csv"))
    old = by_key(read_rows(finished / "study.csv"))
    assert all(rows[k] == v for k, v in old.items())  # earlier rows untouched
    assert ("pcc", "1", "random", "0.700000", "pruned_bn") in rows


def test_from_the_record_alone_only_incomplete_pairs_are_redone(finished, tmp_path):
    """A fresh machine has study.csv (committed) but no work folder: complete arm x seed pairs
    are kept, an incomplete one is redone whole from its pre-training."""
    out = tmp_path / "fresh"
    out.mkdir()
    rows = read_rows(finished / "study.csv")
    cut = [r for r in rows
           if not (r["arm"] == "pcc" and r["seed"] == "1" and r["stage"] == "finetuned")]
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(cut)
    run(tiny(), out)
    again = by_key(read_rows(out / "study.csv"))
    assert set(again) == set(by_key(rows))
    kept = [k for k in again if not (k[0] == "pcc" and k[1] == "1")]
    assert all(again[k] == by_key(rows)[k] for k in kept)
    assert (out / "work" / "pcc-seed1" / "pretrained.pt").is_file()
    assert not (out / "work" / "pcc-seed0").exists()


def test_rows_of_other_settings_are_refused(finished, tmp_path):
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(finished, out)
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    tree["pretrain"] = {**TINY["pretrain"], "lr": 0.02}
    with pytest.raises(StudyError, match="other settings"):
        run(StudyConfig.from_dict(tree), out)


def test_tables_are_mean_and_spread_over_seeds(finished):
    rows = read_rows(finished / "study.csv")
    stats = study_report.aggregate(rows)
    accs = [float(r["acc"]) for r in rows
            if (r["arm"], r["criterion"], r["target"], r["stage"])
            == ("pcc", "ci", "0.500000", "finetuned")]
    assert len(accs) == 2
    mean, std = stats[("finetuned", "pcc", "adaptive", "ci", 0.5)]["acc"]
    assert mean == pytest.approx(statistics.mean(accs), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(accs), rel=1e-12)
    text = (finished / "study.md").read_text()
    cell = f"{100 * mean:.2f} ± {100 * std:.2f} (2)"
    fine = text[text.index("## Test accuracy after fine-tuning"):]
    row = next(line for line in fine.splitlines() if line.startswith("| pcc / ci |"))
    assert cell in row  # one row per arm x criterion, one column per target
    assert "**" in text  # the best of each target
    assert (finished / "plots" / "paired_differences.png").stat().st_size > 0


def test_arms_are_compared_with_the_first_one_seed_by_seed(finished):
    rows = read_rows(finished / "study.csv")
    acc = {(r["arm"], r["seed"], r["criterion"], r["target"], r["stage"]): float(r["acc"])
           for r in rows if r["acc"] != ""}
    diffs = [acc[("pcc", s, "l1", "0.500000", "finetuned")] - acc[("no_pcc", s, "l1", "0.500000",
                                                                    "finetuned")] for s in "01"]
    got = study_report.paired_differences(rows, "no_pcc")[("finetuned", "pcc", "adaptive", "l1",
                                                            0.5)]
    assert got.n == 2
    assert got.mean == pytest.approx(statistics.mean(diffs), rel=1e-12, abs=1e-15)
    assert got.sd == pytest.approx(statistics.stdev(diffs), rel=1e-12, abs=1e-15)
    assert not any(key[1] == "no_pcc" for key in study_report.paired_differences(rows, "no_pcc"))
    text = (finished / "study.md").read_text()
    part = text[text.index("## Each arm minus no_pcc, paired by seed"):]
    part = part[part.index("### After fine-tuning"):]
    row = next(line for line in part.splitlines() if line.startswith("| pcc / l1 | 50.0% |"))
    # the tiny models may sit at chance in both arms on some machines and thread counts: equal
    # per-seed differences then have no interval (tested on hand-made rows in test_study_design)
    interval = ("– (no spread)" if got.no_spread
                else f"[{100 * got.low:+.2f}, {100 * got.high:+.2f}]")
    assert f"| {100 * got.mean:+.2f} | {interval} |" in row
    assert text.index("## Primary endpoint") < text.index("## Each arm minus")


@pytest.mark.parametrize("change, message", [
    ({"study": {"targets": []}}, "non-empty list"),
    ({"study": {"targets": [0.5, 1.5]}}, r"fractions in \(0, 1\)"),
    ({"study": {"criteria": ["ci", "magic"]}}, "unknown criterion"),
    ({"study": {"finetune_targets": [0.7]}}, "not in study.targets"),
    ({"study": {"seeds": [0, 0]}}, "repeated"),
    ({"study": {"bogus": 1}}, "no key"),
    ({"arms": {}}, "at least one arm"),
    ({"arms": {"a b": {}}}, "arm name"),
    ({"arms": {"x": {"pcc": {"mode": "sideways"}}}}, r"\[arms.x\]"),
    ({"prune": {"bn_images": 0}}, "bn_images"),
])
def test_bad_study_configs_are_clear_errors(change, message):
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for section, values in change.items():
        if section == "arms":
            tree["arms"] = values
        else:
            tree[section] = {**tree[section], **values}
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(tree)


def test_cli_dry_run(tmp_path, capsys):
    from pccfast.cli import main

    config = tmp_path / "s.toml"
    config.write_text('[data]\nspec = "digits"\n[prune]\nbn_images = 64\n'
                      '[study]\ntargets = [0.5]\n[arms.pcc]\n')
    assert main(["study", "--config", str(config), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "pcc" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
    out = ["--out", str(tmp_path / "o"), "--dry-run"]
    assert main(["study", "--config", str(config), *out, "--arms", "pcc"]) == 0
    assert "pcc" in capsys.readouterr().out
    assert main(["study", "--config", str(config), *out, "--arms", "no_pcc"]) == 2
    assert "--arms: ['no_pcc'] names no arm of this study; its arms are ['pcc']" in \
        capsys.readouterr().err


def test_cli_report_rewrites_the_tables_from_the_record(finished, tmp_path, capsys):
    import shutil

    from pccfast.cli import main

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    (out / "study.md").unlink()
    config = tmp_path / "tiny.toml"
    config.write_text(_toml(TINY))
    assert main(["study", "--config", str(config), "--out", str(out), "--report"]) == 0
    assert (out / "study.md").read_text() == (finished / "study.md").read_text()
    assert main(["study", "--config", str(config), "--out", str(tmp_path / "none"),
                 "--report"]) == 2
    assert "nothing to report" in capsys.readouterr().err


def _toml(tree: dict) -> str:
    """A TOML text of the tiny study (tables of scalars and lists, arms as nested tables)."""
    import json

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = []
    for section, values in tree.items():
        if section == "arms":
            for arm, sections in values.items():
                lines.append(f"[arms.{arm}]")
                for sub, keys in sections.items():
                    lines.append(f"[arms.{arm}.{sub}]")
                    lines += [f"{k} = {value(v)}" for k, v in keys.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def test_an_interrupted_fine_tuning_leaves_one_row_per_key(tmp_path, monkeypatch):
    """Interrupted while fine-tuning a cell (its pruned rows already in the table), then resumed:
    the cell's rows appear once."""
    from pccfast.study import cells

    config = tiny(seeds=[0], criteria=["l1"], targets=[0.5])
    config.arms = config.arms[:1]
    real = cells.Cell.finetune

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cells.Cell, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path)
    assert ({r["stage"] for r in read_rows(tmp_path / "study.csv")}
            == {"pretrained", "pruned", "pruned_bn"})
    monkeypatch.setattr(cells.Cell, "finetune", real)
    run(config, tmp_path)
    with open(tmp_path / "study.csv", newline="") as f:
        keys = [(r["arm"], r["seed"], r["criterion"], r["target"], r["stage"])
                for r in csv.DictReader(f)]
    assert len(keys) == len(set(keys)) == 4
