"""Shared benchmark plumbing: a table of ratios against the baseline timed in the same run.

Each benchmark records its per-item time (and memory) under a row key and a role
("baseline" or "candidate"); at the end of the session the rows are printed as one markdown
table per suite and written to benchmarks/last_run.md, ready to paste into RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections import defaultdict

import pytest

# Before torch loads libgomp: threads that sleep after a region, as pccfast's CLI and the
# Makefile run (README, "Threads on a shared machine"); a value in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import torch  # noqa: E402

_TABLES: dict[str, dict] = defaultdict(lambda: {"columns": None, "rows": defaultdict(dict)})
_TOTALS: dict[str, dict] = {}


def add_total_row(suite: str, row: str, sums=(), maxes=(), ratios=()):
    """Declares a last row of `suite`: column sums, column maxima and ratios of two sums
    (ratios: (name, numerator column, denominator column)); added when every row has them."""
    _TOTALS[suite] = dict(row=row, sums=sums, maxes=maxes, ratios=ratios)


def _append_total(suite: str, table: dict) -> None:
    spec = _TOTALS.get(suite)
    rows = list(table["rows"].values())
    needed = list(spec["sums"]) + list(spec["maxes"]) if spec else []
    if not spec or not rows or not all(all(c in r for c in needed) for r in rows):
        return
    total = {c: sum(r[c] for r in rows) for c in spec["sums"]}
    total.update({c: max(r[c] for r in rows) for c in spec["maxes"]})
    total.update({name: total[num] / total[den] for name, num, den in spec["ratios"]})
    table["rows"][spec["row"]] = total


@pytest.fixture
def record():
    """record(suite, row, **values): one cell group of the summary table."""

    def add(suite: str, row: str, **values):
        _TABLES[suite]["rows"][row].update(values)

    return add


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def _format(suite: str, table: dict) -> str:
    rows = table["rows"]
    columns = []
    for values in rows.values():
        columns += [c for c in values if c not in columns]
    lines = [f"### {suite}", "", "| case | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row, values in rows.items():
        cells = [values.get(c, "") for c in columns]
        lines.append(f"| {row} | " + " | ".join(_cell(v) for v in cells) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def pytest_terminal_summary(terminalreporter):
    if not _TABLES:
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = [f"Measured {stamp} on {machine()}", ""]
    for suite, table in _TABLES.items():
        _append_total(suite, table)
        text += [_format(suite, table), ""]
    report = "\n".join(text)
    terminalreporter.write_sep("=", "pccfast benchmark summary")
    terminalreporter.write_line(report)
    with open(os.path.join(os.path.dirname(__file__), "last_run.md"), "w") as f:
        f.write(report + "\n")
