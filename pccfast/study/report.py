"""The study's tables and plots, from ``study.csv`` (and ``features.csv``) rows alone.

study.md opens with the primary endpoint (the second arm minus the first, seed by seed, of the
first criterion under the first allocation, after fine-tuning at ``primary_target``) with its
95% t-interval, p-value and n; then every paired comparison (each arm minus the first, per
stage x allocation x criterion x target), the interaction arm x (first criterion - random),
unpruned accuracy, the feature record, and accuracy tables (mean ± standard deviation over
seeds). Plots: accuracy vs FLOPs removed (bands: ± 1 standard deviation over the seeds, n in
the title, chance marked), the paired differences with their intervals, the feature record.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..atomic import atomic_write, atomic_write_text
from ..plotting import pyplot
from . import stats as st

STAGE_TITLES = {"pruned_bn": "after pruning, BatchNorm statistics re-estimated",
                "pruned": "right after pruning (BatchNorm statistics as pre-trained)",
                "finetuned": "after fine-tuning"}
SHORT = {"pruned_bn": "pruned, BN re-estimated", "finetuned": "fine-tuned", "pruned": "pruned"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _key(r: dict) -> tuple:
    """(stage, arm, allocation, criterion, target) of a row."""
    allocation = r.get("allocation") or ("-" if r["stage"] == "pretrained" else "adaptive")
    return r["stage"], r["arm"], allocation, r["criterion"], round(float(r["target"]), 6)


def aggregate(rows: list[dict], column: str = "acc") -> dict:
    """(stage, arm, allocation, criterion, target) -> {"acc": (mean, std), "flops": (mean, std),
    "n": seeds} of ``column`` (``acc``: test, ``val_acc``: validation)."""
    groups = defaultdict(list)
    for r in rows:
        if r.get(column, "") != "":  # unmeasured cells (their reason is in the note column)
            groups[_key(r)].append(r)
    out = {}
    for key, rs in groups.items():
        accs = [float(r[column]) for r in rs]
        flops = [float(r["flops_removed"]) for r in rs if r["flops_removed"] != ""]
        out[key] = {"acc": mean_std(accs), "flops": mean_std(flops) if flops else (0.0, 0.0),
                    "n": len(rs)}
    return out


def by_seed(rows: list[dict], column: str = "acc") -> dict:
    """(stage, arm, allocation, criterion, target) -> {seed: value}."""
    out: dict = defaultdict(dict)
    for r in rows:
        if r.get(column, "") != "":
            out[_key(r)][int(r["seed"])] = float(r[column])
    return out


def paired_differences(rows: list[dict], base: str, column: str = "acc") -> dict:
    """(stage, arm, allocation, criterion, target) -> :class:`stats.Paired` of ``arm`` minus
    ``base`` on the same seed (the same data, validation split and initial weights)."""
    values = by_seed(rows, column)
    out = {}
    for key, seeds in values.items():
        stage, arm, allocation, criterion, target = key
        other = values.get((stage, base, allocation, criterion, target))
        if arm != base and other:
            diffs = st.pair_by_seed(seeds, other)
            if diffs:
                out[key] = st.paired(diffs)
    return out


def interaction(rows: list[dict], base: str, arm: str, criterion: str, control: str = "random",
                column: str = "acc") -> dict:
    """(stage, allocation, target) -> Paired of ``(arm_c - arm_ctl) - (base_c - base_ctl)``
    per seed: whether the arm helps ``criterion`` more than it helps the ``control``."""
    values = by_seed(rows, column)
    out = {}
    cells = {(k[0], k[2], k[4]) for k in values if k[1] == arm and k[3] == criterion}
    for stage, allocation, target in sorted(cells):
        parts = [values.get((stage, a, allocation, c, target), {})
                 for a in (arm, base) for c in (criterion, control)]
        seeds = sorted(set.intersection(*(set(p) for p in parts)))
        if seeds:
            diffs = [(parts[0][s] - parts[1][s]) - (parts[2][s] - parts[3][s]) for s in seeds]
            out[(stage, allocation, target)] = st.paired(diffs)
    return out


def _cell(stat) -> str:
    m, s = stat["acc"]
    return f"{100 * m:.2f} ± {100 * s:.2f} ({stat['n']})"


def _interval(p: st.Paired, adjusted: str = "–") -> str:
    """Table cells: mean | 95% interval | p | Holm p (``adjusted``, already formatted) | n."""
    if p.n < 2:
        return f"{100 * p.mean:+.2f} | – | – | – | {p.n}"
    if p.no_spread:  # every seed the same difference: nothing to test (footnoted)
        return f"{100 * p.mean:+.2f} | – (no spread) | – | – | {p.n}"
    return (f"{100 * p.mean:+.2f} | [{100 * p.low:+.2f}, {100 * p.high:+.2f}] | {p.p:.3g} | "
            f"{adjusted} | {p.n}")


def _no_spread_note(stats) -> list[str]:
    if not any(p.no_spread for p in stats):
        return []
    return ["", "– (no spread): every seed gave the same difference (e.g. every cell at the same "
            "accuracy, as at chance), so there is no interval and nothing to test."]


def _names(rows: list[dict], config) -> tuple[list, list, list]:
    """The arms, allocations and criteria present, in the config's order (then by name)."""
    arms = _ordered({r["arm"] for r in rows}, [a.name for a in config.arms] if config else [])
    allocations = _ordered({r.get("allocation") or "adaptive" for r in rows
                            if r["stage"] != "pretrained"},
                           config.allocations if config else [])
    criteria = _ordered({r["criterion"] for r in rows if r["criterion"] != "-"},
                        config.criteria if config else [])
    return arms, allocations, criteria


def _label(arm, allocation, criterion, allocations) -> str:
    return f"{arm} / {criterion}" + (f" ({allocation})" if len(allocations) > 1 else "")


def primary_key(rows: list[dict], config) -> tuple[str, tuple] | None:
    """The primary endpoint: its base arm and its paired-difference key (stage, arm,
    allocation, criterion, target), or None when there is no second arm."""
    arms, allocations, criteria = _names(rows, config)
    if config is not None and len(config.arms) > 1:
        base, arm = config.arms[0].name, config.arms[1].name
        allocation, criterion = config.allocations[0], config.criteria[0]
        target = config.primary_target
        stage = "finetuned" if target in config.finetune_targets else "pruned_bn"
    elif len(arms) > 1 and criteria and allocations:
        base, arm, allocation, criterion = arms[0], arms[1], allocations[0], criteria[0]
        stage, target = "finetuned", max((float(r["target"]) for r in rows
                                          if r["stage"] == "finetuned"), default=0.0)
    else:
        return None
    return base, (stage, arm, allocation, criterion, round(target, 6))


def primary(rows: list[dict], found: tuple[str, tuple] | None) -> tuple[str, st.Paired | None]:
    """The primary endpoint's description and statistics (None: not measured yet), from
    :func:`primary_key`'s answer."""
    if found is None:
        return "", None
    base, key = found
    stage, arm, allocation, criterion, target = key
    what = (f"{arm} − {base}, {criterion} scores, {allocation} allocation, "
            f"{100 * target:.1f}% FLOPs removed, {SHORT[stage]}, test accuracy")
    return what, paired_differences(rows, base).get(key)


def markdown(rows: list[dict], config=None, features: list[dict] | None = None) -> str:
    stats = aggregate(rows)
    arms, allocations, criteria = _names(rows, config)
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = ["# Study results", "",
             f"{len(arms)} arm(s) ({', '.join(arms)}), {len(seeds)} seed(s), criteria "
             f"{', '.join(criteria)}, allocation {', '.join(allocations)}. Every comparison is "
             "paired by seed (the same data, validation split and initial weights); intervals "
             "are 95% Student-t intervals of the mean per-seed difference, in accuracy points.",
             ""]
    missing = st.scipy_missing()
    endpoint = primary_key(rows, config)
    what, found = primary(rows, endpoint)
    if what:
        lines += ["## Primary endpoint", "", f"{what}."]
        if found is None:
            lines += ["", "Not measured yet."]
        elif missing and found.n > 1:
            lines += ["", f"No interval: {missing}."]
        else:
            lines += ["", st.reading(found, "Paired difference")]
        lines.append("")
    if len(arms) > 1 and not missing:
        lines += _comparisons(rows, arms, allocations, criteria,
                              endpoint[1] if endpoint else None)
    pre = [(a, stats.get(("pretrained", a, "-", "-", 0.0))) for a in arms]
    lines += ["## Unpruned (pre-trained) accuracy", "", "| arm | accuracy (n) |", "|---|---|"]
    lines += [f"| {a} | {_cell(s)} |" for a, s in pre if s]
    if features:
        lines += [""] + feature_table(features, arms)
    columns = [(a, al, c) for a in arms for al in allocations for c in criteria]
    for column, title in (("acc", "test"), ("val_acc", "validation")):
        stats = aggregate(rows, column)
        if column == "val_acc" and not any(k[0] != "pretrained" for k in stats):
            continue
        for stage in ("pruned_bn", "finetuned", "pruned"):
            targets = sorted({k[4] for k in stats if k[0] == stage})
            if targets:
                lines += ["", f"## {title.capitalize()} accuracy {STAGE_TITLES[stage]}", "",
                          "Mean ± standard deviation over seeds (n); the best mean of each "
                          "target in bold where no other row ties it.", ""]
                lines += _table(stage, targets, columns, stats, allocations)
    return "\n".join(lines) + "\n"


def _comparisons(rows, arms, allocations, criteria, primary=None) -> list[str]:
    base = arms[0]
    diffs = paired_differences(rows, base)
    interactions = ({arm: interaction(rows, base, arm, criteria[0]) for arm in arms[1:]}
                    if "random" in criteria and criteria[0] != "random" else {})
    shown = ("pretrained", "finetuned", "pruned_bn")  # the stages this section prints
    # Holm's family: every comparison below with a p-value, the primary endpoint left out
    family = [(("diff", k), p) for k, p in diffs.items()
              if k[0] in shown and k != primary and p.tested]
    family += [(("interaction", arm, k), p) for arm, found in interactions.items()
               for k, p in found.items() if p.tested]
    holm = dict(zip((member for member, _ in family), st.holm([p.p for _, p in family])))

    def adjusted(member) -> str:
        if member == ("diff", primary):
            return "(primary)"
        return f"{holm[member]:.3g}" if member in holm else "–"

    lines = [f"## Each arm minus {base}, paired by seed", "",
             "Accuracy points: mean difference, its 95% interval, the two-sided p-value of no "
             f"difference, Holm's adjusted p-value over the {len(family)} secondary comparisons "
             "of this section (every one with a p-value, the primary endpoint left out; those "
             "under 0.05 hold together at a 5% family-wise error rate), and n seeds; positive "
             f"means the arm beat {base}.", ""]
    for key, p in diffs.items():
        if key[0] == "pretrained":
            text = st.reading(p, f"Unpruned accuracy, {key[1]} − {base}")
            if ("diff", key) in holm:
                text += f" Holm-adjusted p = {adjusted(('diff', key))}."
            lines += [text, ""]
    for stage in ("finetuned", "pruned_bn"):
        keys = sorted(k for k in diffs if k[0] == stage)
        if not keys:
            continue
        lines += [f"### {STAGE_TITLES[stage][0].upper()}{STAGE_TITLES[stage][1:]}", "",
                  "| arm / criterion | FLOPs target | mean | 95% interval | p | Holm p | n |",
                  "|---|---|---|---|---|---|---|"]
        for arm in arms[1:]:
            for allocation in allocations:
                for criterion in criteria:
                    for k in keys:
                        if k[1:4] == (arm, allocation, criterion):
                            label = _label(arm, allocation, criterion, allocations)
                            cells = _interval(diffs[k], adjusted(("diff", k)))
                            lines.append(f"| {label} | {100 * k[4]:.1f}% | {cells} |")
        lines += _no_spread_note(diffs[k] for k in keys)
        lines.append("")
    for arm, found in interactions.items():
        if found:
            lines += [f"### Interaction: ({arm} − {base}) of ({criteria[0]} − random)", "",
                      f"Whether {arm} helps {criteria[0]} pruning more than it helps random "
                      "pruning (which it would if it only made the model more robust to "
                      "pruning).", "",
                      "| stage | allocation | FLOPs target | mean | 95% interval | p | Holm p "
                      "| n |",
                      "|---|---|---|---|---|---|---|---|"]
            for key, p in sorted(found.items()):
                stage, allocation, target = key
                lines.append(f"| {SHORT[stage]} | {allocation} | {100 * target:.1f}% | "
                             f"{_interval(p, adjusted(('interaction', arm, key)))} |")
            lines += _no_spread_note(found.values())
            lines.append("")
    return lines


def feature_table(features: list[dict], arms: list[str]) -> list[str]:
    """Per layer, per arm: PCC (channel, pixel) and the CI share, mean over seeds."""
    layers = list(dict.fromkeys(r["layer"] for r in features))
    values: dict = defaultdict(list)
    for r in features:
        for column in ("pcc_channel", "pcc_pixel", "ci_share"):
            if r.get(column) not in ("", None):
                values[(r["arm"], r["layer"], column)].append(float(r[column]))
    present = [a for a in arms if any(k[0] == a for k in values)]
    n = {a: len({r["seed"] for r in features if r["arm"] == a}) for a in present}
    lines = ["## What pre-training did to the features", "",
             "Per scored layer, on held images, mean over seeds (n per arm: " +
             ", ".join(f"{a} {n[a]}" for a in present) + "): the PCC score S with rows = "
             "channels and with rows = pixels (mean |correlation|), and the CI share "
             "(sum of CI over channels / nuclear norm: 1 for orthogonal channels, lower the more "
             "linearly redundant they are).", "",
             "| layer | " + " | ".join(f"{a}: PCC ch / px / CI share" for a in present) + " |",
             "|---|" + "---|" * len(present)]

    def mean(key):
        v = values.get(key)
        return f"{sum(v) / len(v):.3f}" if v else "–"

    for layer in layers:
        cells = [" / ".join(mean((a, layer, c)) for c in ("pcc_channel", "pcc_pixel", "ci_share"))
                 for a in present]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


def _table(stage, targets, columns, stats, allocations) -> list[str]:
    """One row per arm x allocation x criterion, one column per FLOPs target."""
    found = {(col, t): stats.get((stage, *col, t)) for col in columns for t in targets}
    measured = []
    for t in targets:
        flops = [s["flops"][0] for (col, tt), s in found.items() if tt == t and s]
        measured.append(f"{100 * sum(flops) / len(flops):.1f}%" if flops else "")
    lines = ["| arm / criterion | " + " | ".join(f"{100 * t:.1f}%" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    if any(measured):
        lines.append("| *FLOPs removed, measured* | " + " | ".join(measured) + " |")
    top = {t: max((s["acc"][0] for (col, tt), s in found.items() if tt == t and s), default=None)
           for t in targets}
    # a best shared by several rows (all at chance right after deep pruning) marks none
    ties = {t: sum(1 for (col, tt), s in found.items() if tt == t and s and s["acc"][0] == top[t])
            for t in targets}
    for col in columns:
        if not any(found[(col, t)] for t in targets):
            continue
        cells = []
        for t in targets:
            s = found[(col, t)]
            text = "" if s is None else _cell(s)
            cells.append(f"**{text}**" if s is not None and s["acc"][0] == top[t]
                         and ties[t] == 1 else text)
        lines.append(f"| {_label(col[0], col[1], col[2], allocations)} | " + " | ".join(cells)
                     + " |")
    return lines


def _ordered(names: set, preferred: list) -> list:
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


# ----------------------------------------------------------------------------- plots
def _curve(stats: dict, stage: str, arm: str, allocation: str, criterion: str):
    """x (FLOPs removed), mean accuracy and mean -/+ standard deviation, in %."""
    points = sorted((s["flops"][0], s["acc"][0], s["acc"][1])
                    for (sg, a, al, c, _), s in stats.items()
                    if sg == stage and a == arm and al == allocation and c == criterion)
    return ([100 * p[0] for p in points], [100 * p[1] for p in points],
            [100 * (p[1] - p[2]) for p in points], [100 * (p[1] + p[2]) for p in points])


def _seeds(rows) -> int:
    return len({int(r["seed"]) for r in rows})


def plot(rows: list[dict], path: Path, config=None, chance: float | None = None) -> bool:
    """Accuracy vs FLOPs removed, one panel per stage x allocation, one line per arm x
    criterion, bands ± 1 standard deviation over seeds; False when nothing was drawn."""
    plt = pyplot()
    stages = [s for s in ("pruned_bn", "finetuned") if any(r["stage"] == s for r in rows)]
    if plt is None or not stages:
        return False
    stats = aggregate(rows)
    arms, allocations, criteria = _names(rows, config)
    panels = [(s, al) for s in stages for al in allocations]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (stage, allocation) in zip(axes[0], panels):
        for i, arm in enumerate(arms):
            for j, criterion in enumerate(criteria):
                x, y, low, high = _curve(stats, stage, arm, allocation, criterion)
                if x:
                    ax.plot(x, y, styles[i % len(styles)], marker="o", markersize=3,
                            color=f"C{j}", label=f"{arm} / {criterion}")
                    ax.fill_between(x, low, high, color=f"C{j}", alpha=0.15, linewidth=0)
        for arm in arms:
            base = stats.get(("pretrained", arm, "-", "-", 0.0))
            if base:
                ax.axhline(100 * base["acc"][0], color="gray", linewidth=0.6, linestyle=":")
        if chance:
            ax.axhline(100 * chance, color="red", linewidth=0.8, linestyle="--",
                       label=f"chance ({100 * chance:.0f}%)")
        ax.set(title=f"{STAGE_TITLES[stage]}\n{allocation} allocation, n = {_seeds(rows)} "
                     "seeds (band: ± 1 sd)", xlabel="FLOPs removed (%)",
               ylabel="test accuracy (%)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_differences(rows: list[dict], path: Path, config=None) -> bool:
    """Each arm minus the first, paired by seed: mean and 95% interval per target, one panel
    per stage x criterion (first allocation); False when nothing was drawn."""
    plt = pyplot()
    arms, allocations, criteria = _names(rows, config)
    if plt is None or len(arms) < 2 or not criteria or st.scipy_missing():
        return False
    diffs = paired_differences(rows, arms[0])
    stages = [s for s in ("pruned_bn", "finetuned") if any(k[0] == s for k in diffs)]
    if not stages:
        return False
    allocation = allocations[0]
    fig, axes = plt.subplots(len(stages), len(criteria), sharey="row", squeeze=False,
                             figsize=(3.4 * len(criteria) + 0.8, 3.1 * len(stages)))
    for row, stage in enumerate(stages):
        for col, criterion in enumerate(criteria):
            ax = axes[row][col]
            ax.axhline(0, color="black", linewidth=0.7)
            for i, arm in enumerate(arms[1:]):
                points = sorted((k[4], p) for k, p in diffs.items()
                                if k[:4] == (stage, arm, allocation, criterion))
                if not points:
                    continue
                x = [100 * t + 0.6 * i for t, _ in points]
                y = [100 * p.mean for _, p in points]
                err = [[100 * (p.mean - p.low) if p.n > 1 else 0 for _, p in points],
                       [100 * (p.high - p.mean) if p.n > 1 else 0 for _, p in points]]
                n = max(p.n for _, p in points)
                ax.errorbar(x, y, yerr=err, fmt="o", markersize=3, capsize=2, color=f"C{i}",
                            label=f"{arm} − {arms[0]} (n = {n})")
            ax.set_title(f"{criterion}, {SHORT[stage]}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(stages) - 1:
                ax.set_xlabel("FLOPs removed target (%)")
            if col == 0:
                ax.set_ylabel("paired difference (points)\nmean, 95% interval")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)
    return True


def plot_features(features: list[dict], path: Path, arms: list[str]) -> bool:
    """Per layer: PCC (channel, pixel) and the CI share, one line per arm (mean over seeds,
    thin lines: single seeds)."""
    plt = pyplot()
    if plt is None or not features:
        return False
    layers = list(dict.fromkeys(r["layer"] for r in features))
    columns = [("pcc_channel", "PCC score, rows = channels"),
               ("pcc_pixel", "PCC score, rows = pixels"),
               ("ci_share", "CI share (sum CI / nuclear norm)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), squeeze=False)
    present = [a for a in arms if any(r["arm"] == a for r in features)]
    for ax, (column, title) in zip(axes[0], columns):
        for i, arm in enumerate(present):
            per_seed: dict = defaultdict(dict)
            for r in features:
                if r["arm"] == arm and r.get(column) not in ("", None):
                    per_seed[r["seed"]][r["layer"]] = float(r[column])
            for values in per_seed.values():
                ax.plot([layers.index(k) for k in values], list(values.values()),
                        color=f"C{i}", alpha=0.25, linewidth=0.7)
            means = [(j, sum(v[name] for v in per_seed.values() if name in v)
                      / max(1, sum(name in v for v in per_seed.values())))
                     for j, name in enumerate(layers) if any(name in v for v in per_seed.values())]
            if means:
                ax.plot(*zip(*means), color=f"C{i}", marker="o", markersize=3,
                        label=f"{arm} (n = {len(per_seed)})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("scored layer (forward order)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    """Lay out, write atomically (a reader never sees half a PNG) and free the figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        pyplot().close(fig)


def write_study_report(out: Path, rows: list[dict], config=None,
                       features: list[dict] | None = None, chance: float | None = None) -> Path:
    out = Path(out)
    arms = _names(rows, config)[0]
    text = markdown(rows, config, features)
    figures = [
        (plot(rows, out / "plots" / "accuracy_vs_flops.png", config, chance),
         "accuracy vs FLOPs removed", "accuracy_vs_flops.png"),
        (plot_differences(rows, out / "plots" / "paired_differences.png", config),
         "paired differences with 95% intervals", "paired_differences.png"),
        (plot_features(features or [], out / "plots" / "features.png", arms),
         "what pre-training did to the features", "features.png"),
    ]
    if pyplot() is None:
        text += "\n(No plots: matplotlib is not installed.)\n"
    for made, title, name in figures:
        if made:
            text += f"\n![{title}](plots/{name})\n"
    path = out / "study.md"
    atomic_write_text(path, text)
    return path
