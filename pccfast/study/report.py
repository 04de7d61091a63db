"""The study's tables and plots, from ``study.csv`` rows alone.

study.md: per target and stage, accuracy as mean +- standard deviation over seeds (n seeds) for
every arm x criterion, the best mean of each target in bold; FLOPs removed as measured.
plots/accuracy_vs_flops.png: accuracy vs FLOPs removed, one line per arm x criterion, after
pruning (BatchNorm re-estimated) and after fine-tuning, with the spread over seeds as a band.
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


def markdown(rows: list[dict], config=None) -> str:
    stats = aggregate(rows)
    arms = _ordered({r["arm"] for r in rows}, [a.name for a in config.arms] if config else [])
    criteria = _ordered({r["criterion"] for r in rows if r["criterion"] != "-"},
                        config.criteria if config else [])
    lines = ["# Study results", "",
             "Accuracy in % as mean ± standard deviation over seeds (number of seeds); the best "
             "mean of each target in bold. A difference smaller than the spread over seeds is "
             "not a difference.", ""]
    pre = [(a, stats.get(("pretrained", a, "-", 0.0))) for a in arms]
    lines += ["## Unpruned (pre-trained) accuracy", "", "| arm | accuracy |", "|---|---|"]
    lines += [f"| {a} | {_cell(s)} |" for a, s in pre if s]
    for stage in ("pruned_bn", "finetuned", "pruned"):
        targets = sorted({float(r["target"]) for r in rows if r["stage"] == stage})
        if not targets:
            continue
        columns = [(a, c) for a in arms for c in criteria]
        lines += ["", f"## Accuracy {STAGE_TITLES[stage]}", "",
                  "| FLOPs target | measured removed | " + " | ".join(f"{a} / {c}" for a, c in columns)
                  + " |", "|---|---|" + "---|" * len(columns)]
        for t in targets:
            found = {col: stats.get((stage, *col, t)) for col in columns}
            best = max((s["acc"][0] for s in found.values() if s), default=None)
            measured = [s["flops"][0] for s in found.values() if s]
            cells = []
            for col in columns:
                s = found[col]
                text = "" if s is None else _cell(s)
                cells.append(f"**{text}**" if s is not None and s["acc"][0] == best else text)
            removed = f"{100 * sum(measured) / len(measured):.1f}%" if measured else ""
            lines.append(f"| {100 * t:.1f}% | {removed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ordered(names: set, preferred: list) -> list:
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def plot(rows: list[dict], path: Path, config=None) -> bool:
    """Accuracy vs FLOPs removed; False (no file) when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(rows)
    stages = [s for s in ("pruned_bn", "finetuned") if any(r["stage"] == s for r in rows)]
    if not stages:
        return False
    arms = _ordered({r["arm"] for r in rows}, [a.name for a in config.arms] if config else [])
    criteria = _ordered({r["criterion"] for r in rows if r["criterion"] != "-"},
                        config.criteria if config else [])
    fig, axes = plt.subplots(1, len(stages), figsize=(6.2 * len(stages), 4.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, stage in zip(axes[0], stages):
        for i, arm in enumerate(arms):
            for j, criterion in enumerate(criteria):
                points = sorted((s["flops"][0], s["acc"][0], s["acc"][1])
                                for (st, a, c, _), s in stats.items()
                                if st == stage and a == arm and c == criterion)
                if not points:
                    continue
                x = [100 * p[0] for p in points]
                y = [100 * p[1] for p in points]
                spread = [100 * p[2] for p in points]
                line, = ax.plot(x, y, styles[i % len(styles)], marker="o", markersize=3,
                                color=f"C{j}", label=f"{arm} / {criterion}")
                ax.fill_between(x, [a - b for a, b in zip(y, spread)],
                                [a + b for a, b in zip(y, spread)], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        for arm in arms:
            base = stats.get(("pretrained", arm, "-", 0.0))
            if base:
                ax.axhline(100 * base["acc"][0], color="gray", linewidth=0.6, linestyle=":")
        ax.set(title=STAGE_TITLES[stage], xlabel="FLOPs removed (%)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_study_report(out: Path, rows: list[dict], config=None) -> Path:
    out = Path(out)
    text = markdown(rows, config)
    if plot(rows, out / "plots" / "accuracy_vs_flops.png", config):
        text += "\n![accuracy vs FLOPs removed](plots/accuracy_vs_flops.png)\n"
    else:
        text += "\n(No plot: matplotlib is not installed.)\n"
    path = out / "study.md"
    atomic_write_text(path, text)
    return path
