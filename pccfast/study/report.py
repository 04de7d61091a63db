"""The study's tables and plots, from ``study.csv`` rows alone.

study.md: per stage, accuracy as mean +- standard deviation over seeds (n seeds), one row per
arm x criterion and one column per FLOPs target (removed as measured), the best mean of each
target in bold; then every arm against the first (the baseline) as per-seed paired differences.
plots/accuracy_vs_flops.png: accuracy vs FLOPs removed, one line per arm x criterion, after
pruning (BatchNorm re-estimated) and after fine-tuning, with the spread over seeds as a band;
plots/arms_by_criterion.png: the same lines, one panel per stage x criterion.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..atomic import atomic_write_text

STAGE_TITLES = {"pruned_bn": "after pruning, BatchNorm statistics re-estimated",
                "pruned": "right after pruning (BatchNorm statistics as pre-trained)",
                "finetuned": "after fine-tuning"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: list[dict]) -> dict:
    """(stage, arm, criterion, target) -> {"acc": (mean, std), "flops": (mean, std), "n": seeds}."""
    groups = defaultdict(list)
    for r in rows:
        if r["acc"] != "":  # unmeasured cells (their reason is in the note column)
            groups[(r["stage"], r["arm"], r["criterion"], float(r["target"]))].append(r)
    out = {}
    for key, rs in groups.items():
        accs = [float(r["acc"]) for r in rs]
        flops = [float(r["flops_removed"]) for r in rs if r["flops_removed"] != ""]
        out[key] = {"acc": mean_std(accs), "flops": mean_std(flops) if flops else (0.0, 0.0),
                    "n": len(rs)}
    return out


def _cell(stat) -> str:
    m, s = stat["acc"]
    return f"{100 * m:.2f} ± {100 * s:.2f} ({stat['n']})"


def paired_differences(rows: list[dict], base: str) -> dict:
    """(stage, arm, criterion, target) -> {"acc": (mean, std), "n": seeds} of the accuracy of
    ``arm`` minus that of ``base`` on the same seed (the same data subset and the same
    initialisation), over the seeds both have measured."""
    acc = {(r["stage"], r["arm"], r["criterion"], float(r["target"]), int(r["seed"])): float(r["acc"])
           for r in rows if r["acc"] != ""}
    groups = defaultdict(list)
    for (stage, arm, criterion, target, seed), value in acc.items():
        other = acc.get((stage, base, criterion, target, seed))
        if arm != base and other is not None:
            groups[(stage, arm, criterion, target)].append(value - other)
    return {key: {"acc": mean_std(values), "n": len(values)} for key, values in groups.items()}


def _signed(stat) -> str:
    m, s = stat["acc"]
    return f"{100 * m:+.2f} ± {100 * s:.2f} ({stat['n']})"


def markdown(rows: list[dict], config=None) -> str:
    stats = aggregate(rows)
    arms, criteria = _arms_and_criteria(rows, config)
    lines = ["# Study results", "",
             "Accuracy in % as mean ± standard deviation over seeds (number of seeds); the best "
             "mean of each target in bold. A difference smaller than the spread over seeds is "
             "not a difference.", ""]
    pre = [(a, stats.get(("pretrained", a, "-", 0.0))) for a in arms]
    lines += ["## Unpruned (pre-trained) accuracy", "", "| arm | accuracy |", "|---|---|"]
    lines += [f"| {a} | {_cell(s)} |" for a, s in pre if s]
    columns = [(a, c) for a in arms for c in criteria]
    for stage in ("pruned_bn", "finetuned", "pruned"):
        targets = sorted({float(r["target"]) for r in rows if r["stage"] == stage})
        if targets:
            lines += ["", f"## Accuracy {STAGE_TITLES[stage]}", ""]
            lines += _table(stage, targets, columns, stats, _cell, best=True)
    if len(arms) > 1:
        base = arms[0]
        diffs = paired_differences(rows, base)
        for stage in ("pruned_bn", "finetuned"):
            targets = sorted({k[3] for k in diffs if k[0] == stage})
            if targets:
                lines += ["", f"## Each arm minus {base}, same seed: {STAGE_TITLES[stage]}", "",
                          f"Accuracy points, mean ± standard deviation of the per-seed "
                          f"differences (seeds): positive means the arm beat {base}.", ""]
                lines += _table(stage, targets, [(a, c) for a in arms[1:] for c in criteria],
                                diffs, _signed, best=False)
    return "\n".join(lines) + "\n"


def _table(stage, targets, columns, stats, show, best: bool) -> list[str]:
    """One row per arm x criterion, one column per FLOPs target (as measured in a second row)."""
    found = {(col, t): stats.get((stage, *col, t)) for col in columns for t in targets}
    measured = []
    for t in targets:
        flops = [s["flops"][0] for (col, tt), s in found.items() if tt == t and s and "flops" in s]
        measured.append(f"{100 * sum(flops) / len(flops):.1f}%" if flops else "")
    lines = ["| arm / criterion | " + " | ".join(f"{100 * t:.1f}%" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    if any(measured):
        lines.append("| *FLOPs removed, measured* | " + " | ".join(measured) + " |")
    top = {t: max((s["acc"][0] for (col, tt), s in found.items() if tt == t and s), default=None)
           for t in targets}
    for col in columns:
        if not any(found[(col, t)] for t in targets):
            continue
        cells = []
        for t in targets:
            s = found[(col, t)]
            text = "" if s is None else show(s)
            cells.append(f"**{text}**" if best and s is not None and s["acc"][0] == top[t] else text)
        lines.append(f"| {col[0]} / {col[1]} | " + " | ".join(cells) + " |")
    return lines


def _ordered(names: set, preferred: list) -> list:
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def _arms_and_criteria(rows: list[dict], config) -> tuple[list, list]:
    """The arms and criteria present, in the config's order (then by name)."""
    arms = _ordered({r["arm"] for r in rows}, [a.name for a in config.arms] if config else [])
    criteria = _ordered({r["criterion"] for r in rows if r["criterion"] != "-"},
                        config.criteria if config else [])
    return arms, criteria


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(stats: dict, stage: str, arm: str, criterion: str):
    """x (FLOPs removed), mean accuracy and mean -/+ spread, in %, by FLOPs removed."""
    points = sorted((s["flops"][0], s["acc"][0], s["acc"][1]) for (st, a, c, _), s in stats.items()
                    if st == stage and a == arm and c == criterion)
    return ([100 * p[0] for p in points], [100 * p[1] for p in points],
            [100 * (p[1] - p[2]) for p in points], [100 * (p[1] + p[2]) for p in points])


def plot(rows: list[dict], path: Path, config=None) -> bool:
    """Accuracy vs FLOPs removed; False (no file) when matplotlib is missing or nothing to plot."""
    plt = _pyplot()
    stages = [s for s in ("pruned_bn", "finetuned") if any(r["stage"] == s for r in rows)]
    if plt is None or not stages:
        return False
    stats = aggregate(rows)
    arms, criteria = _arms_and_criteria(rows, config)
    fig, axes = plt.subplots(1, len(stages), figsize=(6.2 * len(stages), 4.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, stage in zip(axes[0], stages):
        for i, arm in enumerate(arms):
            for j, criterion in enumerate(criteria):
                x, y, low, high = _curve(stats, stage, arm, criterion)
                if x:
                    ax.plot(x, y, styles[i % len(styles)], marker="o", markersize=3,
                            color=f"C{j}", label=f"{arm} / {criterion}")
                    ax.fill_between(x, low, high, color=f"C{j}", alpha=0.15, linewidth=0)
        for arm in arms:
            base = stats.get(("pretrained", arm, "-", 0.0))
            if base:
                ax.axhline(100 * base["acc"][0], color="gray", linewidth=0.6, linestyle=":")
        ax.set(title=STAGE_TITLES[stage], xlabel="FLOPs removed (%)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_by_criterion(rows: list[dict], path: Path, config=None) -> bool:
    """One panel per stage (rows) x criterion (columns), one line per arm: the arms compared
    under each criterion, which the all-lines plot crowds. False when nothing was drawn."""
    plt = _pyplot()
    stages = [s for s in ("pruned_bn", "finetuned") if any(r["stage"] == s for r in rows)]
    arms, criteria = _arms_and_criteria(rows, config)
    if plt is None or not stages or not criteria:
        return False
    stats = aggregate(rows)
    fig, axes = plt.subplots(len(stages), len(criteria), sharey="row", squeeze=False,
                             figsize=(3.2 * len(criteria) + 0.8, 3.0 * len(stages)))
    for row, stage in enumerate(stages):
        for col, criterion in enumerate(criteria):
            ax = axes[row][col]
            for i, arm in enumerate(arms):
                x, y, low, high = _curve(stats, stage, arm, criterion)
                if x:
                    ax.plot(x, y, marker="o", markersize=3, color=f"C{i}", label=arm)
                    ax.fill_between(x, low, high, color=f"C{i}", alpha=0.15, linewidth=0)
            ax.set_title(f"{criterion}: {'fine-tuned' if stage == 'finetuned' else 'pruned, BN re-estimated'}",
                         fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(stages) - 1:
                ax.set_xlabel("FLOPs removed (%)")
            if col == 0:
                ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _save(fig, path: Path) -> None:
    """Atomically: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def write_study_report(out: Path, rows: list[dict], config=None) -> Path:
    out = Path(out)
    text = markdown(rows, config)
    if plot(rows, out / "plots" / "accuracy_vs_flops.png", config):
        text += "\n![accuracy vs FLOPs removed](plots/accuracy_vs_flops.png)\n"
        if plot_by_criterion(rows, out / "plots" / "arms_by_criterion.png", config):
            text += "\n![the arms under each criterion](plots/arms_by_criterion.png)\n"
    else:
        text += "\n(No plot: matplotlib is not installed.)\n"
    path = out / "study.md"
    atomic_write_text(path, text)
    return path
