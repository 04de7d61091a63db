"""The committed study reports say what their records say (issue 16: "every number in the prose
matches the tables").

Each committed study folder's study.md is rewritten from its study.csv / features.csv by the
current report and must be unchanged; every 95% interval quoted in README.md or RESULTS.md must
be one of those reports' intervals; every accuracy the paired-study section of RESULTS.md quotes
to two decimals must be a value of the pilot's or the paired study's record.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pccfast.pipeline.config import load_toml
from pccfast.study import StudyConfig
from pccfast.study import report as study_report
from pccfast.study.runner import read_features, read_rows

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ROOT / "benchmarks" / "accuracy"
# (config, output folder) of every committed study
STUDIES = [("study_cpu.toml", "."), ("study_cpu_long.toml", "long"), ("pilot.toml", "pilot"),
           ("paired.toml", "paired")]
PUBLISHED = {"92.75", "84.61", "93.40", "60.24", "58.40"}  # the paper's figures, quoted beside
INTERVAL = re.compile(r"\[[-+]\d+\.\d\d, [-+]\d+\.\d\d\]")


def committed(name: str, folder: str):
    out = ACCURACY / folder
    if not (out / "study.csv").is_file():
        return None
    return StudyConfig.from_dict(load_toml(ACCURACY / name)), out


def regenerated(config, out: Path) -> str:
    arms = {a.name for a in config.arms}
    rows = [r for r in read_rows(out / "study.csv") if r["arm"] in arms]
    path = out / "features.csv"
    present = {r["arm"] for r in rows}
    features = [f for f in read_features(path) if f["arm"] in present] if path.is_file() else []
    return study_report.markdown(rows, config, features)


def body(text: str) -> str:
    """study.md without the lines that link plots (the plots are not rebuilt here)."""
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith("![") and "No plots" not in line).rstrip()


def reports() -> dict[str, str]:
    found = {}
    for name, folder in STUDIES:
        study = committed(name, folder)
        if study is not None:
            found[folder] = (study[1] / "study.md").read_text()
    return found


@pytest.mark.parametrize("name,folder", STUDIES)
def test_each_committed_report_is_its_record_rewritten(name, folder):
    study = committed(name, folder)
    if study is None:
        pytest.skip(f"benchmarks/accuracy/{folder} has no record yet")
    config, out = study
    assert body((out / "study.md").read_text()) == body(regenerated(config, out)), (
        f"{out / 'study.md'} differs from what its record gives: run "
        f"`pccfast study --config benchmarks/accuracy/{name} --out {out} --report`")


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/RESULTS.md"])
def test_every_interval_in_the_prose_is_a_reported_one(doc):
    text = (ROOT / doc).read_text()
    known = "\n".join(reports().values())
    quoted = INTERVAL.findall(text)
    missing = [q for q in quoted if q not in known]
    assert not missing, f"{doc} quotes intervals no study report has: {missing}"


def record_values(folder: str) -> set[str]:
    """Every accuracy and fraction removed in a record, as percentages to two decimals."""
    path = ACCURACY / folder / "study.csv"
    if not path.is_file():
        return set()
    values = set()
    for row in read_rows(path):
        for column in ("acc", "val_acc", "params_removed", "flops_removed"):
            if row.get(column) not in ("", None):
                values.add(f"{100 * float(row[column]):.2f}")
    return values


def test_the_paired_study_prose_quotes_its_records():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    start = text.index("## Paired study (CPU)")
    end = text.index("\n## ", start + 1)
    section = text[start:end]
    known = record_values("pilot") | record_values("paired") | PUBLISHED
    quoted = re.findall(r"(?<![\d.])(\d+\.\d\d)%", section)
    assert quoted, "the paired-study section quotes no accuracy"
    missing = sorted(set(quoted) - known)
    assert not missing, f"RESULTS.md's paired-study section quotes {missing}, in no record"
