"""``report.md`` of a run folder, with PNG plots: training curves, the CI distribution of every
scored layer, and the channels kept per layer.

    write_report("runs/vgg")  ->  runs/vgg/report.md, runs/vgg/plots/*.png

Everything is read back from the folder (summary.json, metrics.jsonl, plan.json, scores.pt,
config.json), so a report can be rebuilt at any time (``pccfast report --out DIR``). Without
matplotlib the report has its tables and no plots, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from .pipeline.folder import REPORT_FILES, RunFolder
from .plotting import plots_missing, pyplot

STAGE_ORDER = ("baseline", "pretrain", "finetune")
STAGE_LABEL = {"baseline": "baseline (no PCC)", "pretrain": "pre-training with PCC",
               "finetune": "fine-tuning (pruned)"}


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _secs(value) -> str:
    return "–" if value is None else f"{value:.1f} s"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The headline numbers as (label, text) rows, shared by the CLI's table and the report."""
    sec = summary.get("seconds") or {}
    rows = [
        ("baseline accuracy (no PCC)", _pct(summary.get("baseline_acc"))),
        ("PCC-pretrained accuracy" if summary.get("pcc_weight", 1) else
         "pretrained accuracy (PCC weight 0)", _pct(summary.get("pcc_acc"))),
        ("pruned accuracy (before fine-tuning)", _pct(summary.get("pruned_acc"))),
    ]
    if summary.get("pruned_bn_acc") is not None:
        rows.append(("pruned, BN statistics re-estimated", _pct(summary["pruned_bn_acc"])))
    rows += [
        ("fine-tuned accuracy", _pct(summary.get("finetuned_acc"))),
        ("params removed", _pct(summary.get("params_removed"))),
        ("FLOPs removed", _pct(summary.get("flops_removed"))),
    ]
    if summary.get("speedup_cpu") is not None:
        rows.append((f"measured CPU speed-up (batch {summary.get('speedup_cpu_batch')}, "
                     f"{summary.get('speedup_cpu_threads')} threads)",
                     f"{summary['speedup_cpu']:.2f}x ({summary.get('speedup_cpu_q1', 0):.2f}-"
                     f"{summary.get('speedup_cpu_q3', 0):.2f})"))
    if summary.get("params_before") and summary.get("params_after"):
        rows.append(("params before -> after",
                     f"{summary['params_before'] / 1e6:.3f}M -> "
                     f"{summary['params_after'] / 1e6:.3f}M"))
    if summary.get("flops_before") and summary.get("flops_after"):
        rows.append(("FLOPs (MACs) before -> after",
                     f"{summary['flops_before'] / 1e6:.2f}M -> "
                     f"{summary['flops_after'] / 1e6:.2f}M"))
    for stage in ("baseline", "pretrain", "scores", "ci", "prune", "finetune"):
        if stage in sec:
            rows.append((f"time: {stage}", _secs(sec[stage])))
    if sec:
        rows.append(("time: total", _secs(sum(sec.values()))))
    return rows


def format_table(summary: dict) -> str:
    rows = summary_rows(summary)
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(value) for _, value in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [line]
    out += [f"| {label:<{width}} | {value:>{vwidth}} |" for label, value in rows]
    out.append(line)
    return "\n".join(out)


def layer_widths(plan) -> list[tuple[str, int, int]]:
    """(layer, channels before, channels after) for every layer of a plan.json."""
    if isinstance(plan, dict):
        layers = plan.get("layers", plan.get("groups", plan))
    else:
        layers = plan
    if isinstance(layers, dict):
        layers = [dict(v, name=k) if isinstance(v, dict) else {"name": k, **_widths(v)}
                  for k, v in layers.items()]
    rows = []
    for entry in layers or []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("layer") or entry.get("site") or "?"
        before = _first(entry, ("width_before", "before", "channels_before", "width", "in_width"))
        after = _first(entry, ("width_after", "after", "channels_after", "keep", "kept"))
        if isinstance(after, list):
            after = len(after)
        if after is None and isinstance(entry.get("kept_indices"), list):
            after = len(entry["kept_indices"])
        if before is None or after is None:
            continue
        rows.append((str(name), int(before), int(after)))
    return rows


def _widths(value) -> dict:
    return {"before": value[0], "after": value[1]} if isinstance(value, (list, tuple)) else {}


def _first(entry: dict, keys):
    for k in keys:
        if entry.get(k) is not None:
            return entry[k]
    return None


def _plot_curves(records: list[dict], path: Path) -> bool:
    plt = pyplot()

    stages = [s for s in STAGE_ORDER if any(r.get("stage") == s for r in records)]
    stages += sorted({r.get("stage") for r in records} - set(stages) - {None})
    if not stages:
        return False
    has_pcc = any("pcc" in r for r in records)
    fig, axes = plt.subplots(1, 3 if has_pcc else 2, figsize=(13 if has_pcc else 9, 3.6))
    for stage in stages:
        rs = sorted((r for r in records if r.get("stage") == stage), key=lambda r: r["epoch"])
        ep = [r["epoch"] for r in rs]
        label = STAGE_LABEL.get(stage, stage)
        axes[0].plot(ep, [r["train_loss"] for r in rs], marker=".", label=label)
        test = [(r["epoch"], 100 * r["test_acc"]) for r in rs if r.get("test_acc") is not None]
        if test:
            axes[1].plot(*zip(*test), marker=".", label=label)
        if has_pcc and any("pcc" in r for r in rs):
            axes[2].plot(ep, [r.get("pcc") for r in rs], marker=".", label=label)
    axes[0].set(title="training loss (cross-entropy)", xlabel="epoch")
    axes[1].set(title="test accuracy (%)", xlabel="epoch")
    if has_pcc:
        axes[2].set(title="mean PCC score S over scored layers", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _short(name: str) -> str:
    return name if len(name) <= 18 else "…" + name[-17:]


def _plot_ci(scores: dict, path: Path) -> bool:
    plt = pyplot()
    import numpy as np

    if not scores:
        return False
    names = list(scores)
    values = [np.asarray(scores[n], dtype=np.float64) for n in names]
    positive = np.concatenate([v[v > 0] for v in values] or [np.ones(1)])
    floor = positive.min() if positive.size else 1e-12
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) + 2), 4))
    ax.boxplot([np.maximum(v, floor) for v in values], showfliers=True,
               flierprops={"markersize": 2})
    ax.set_yscale("log")
    ax.set_xticks(range(1, len(names) + 1), [_short(n) for n in names], rotation=60, ha="right",
                  fontsize=7)
    ax.set(title="channel independence (CI) per scored layer", ylabel="CI (mean over images)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_kept(rows: list[tuple[str, int, int]], path: Path) -> bool:
    plt = pyplot()

    if not rows:
        return False
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows) + 2), 4))
    ax.bar(x, [b for _, b, _ in rows], color="#c8d6e5", label="before")
    ax.bar(x, [a for _, _, a in rows], color="#1f77b4", label="kept")
    ax.set_xticks(list(x), [_short(n) for n, _, _ in rows], rotation=60, ha="right", fontsize=7)
    ax.set(title="channels kept per layer", ylabel="channels")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _read_scores(folder: RunFolder) -> dict:
    from .pipeline.steps import read_scores

    path = folder.path("scores.pt")
    if not path.is_file():
        return {}
    try:
        return {k: v.numpy() for k, v in read_scores(path)[0].items()}
    except ValueError:  # not a score file: the report goes without its plot
        return {}


def _scores_label(summary: dict, config: dict) -> str:
    criterion = summary.get("score_criterion", summary.get("ci_criterion",
                            config.get("ci", {}).get("criterion", "ci")))
    from .prune.criteria import scores_label

    return scores_label(criterion)


def write_report(out) -> Path:
    """Writes DIR/report.md and DIR/plots/*.png from what the run folder holds; returns the path."""
    folder = RunFolder(out)
    if not folder.out.is_dir():
        raise FileNotFoundError(f"run folder {folder.out} does not exist")
    folder.refuse_foreign(("config.json", "summary.json", "metrics.jsonl") + REPORT_FILES)
    if not any(folder.path(n).is_file() for n in ("config.json", "summary.json", "metrics.jsonl")):
        raise ValueError(f"{folder.out} holds no pccfast run (no config.json, summary.json or "
                         f"metrics.jsonl): run `pccfast run --out {folder.out}` first")
    folder.claim(REPORT_FILES)
    summary = folder.read_summary()
    config = folder.read_config() or {}
    records = folder.read_metrics()
    plan_path = folder.path("plan.json")
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    widths = layer_widths(plan) if plan is not None else []
    scores = _read_scores(folder)
    no_plots = plots_missing()  # the report is still written, without its figures
    if no_plots is None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            no_plots = f"matplotlib does not import ({exc})"
    plots = folder.out / "plots"
    if no_plots is None:
        plots.mkdir(exist_ok=True)
        made = {
            "training_curves.png": _plot_curves(records, plots / "training_curves.png"),
            "score_distribution.png": _plot_ci(scores, plots / "score_distribution.png"),
            "channels_kept.png": _plot_kept(widths, plots / "channels_kept.png"),
        }
    else:
        made = dict.fromkeys(("training_curves.png", "score_distribution.png", "channels_kept.png"),
                             False)
    model = config.get("model", {})
    data = config.get("data", {})
    lines = [f"# pccfast run: {model.get('name', '?')}"
             + (f" (width {model['width']})" if model.get("width") is not None else "")
             + f" on {data.get('spec', '?')}", ""]
    pre, fin, prune = (config.get("pretrain", {}), config.get("finetune", {}),
                       config.get("prune", {}))
    crit = {k: v for k, v in prune.items() if v is not None}
    if config:
        lines += [
            f"- pre-training: {pre.get('epochs')} epochs, batch {pre.get('batch_size')}, lr "
            f"{pre.get('lr')}, PCC weight {config.get('pcc', {}).get('weight')} "
            f"({config.get('pcc', {}).get('mode')})",
            f"- {_scores_label(summary, config)}: "
            f"{summary.get('score_images', config.get('ci', {}).get('images'))} calibration images"
            f"; pruning: {', '.join(f'{k} = {v}' for k, v in crit.items()) or '–'}",
            f"- fine-tuning: {fin.get('epochs')} epochs, batch {fin.get('batch_size')}, "
            f"lr {fin.get('lr')}",
            "",
        ]
    if no_plots is not None:
        lines += [f"(No plots: {no_plots}.)", ""]
    lines += ["## Results", "", "| | |", "|---|---:|"]
    lines += [f"| {label} | {value} |" for label, value in summary_rows(summary)]
    lines.append("")
    if made["training_curves.png"]:
        lines += ["## Training curves", "", "![training curves](plots/training_curves.png)", ""]
    if made["score_distribution.png"]:
        label = _scores_label(summary, config)
        lines += [f"## Channel scores: {label}", "",
                  f"{label} of every channel (mean over the calibration images where the "
                  "criterion uses them), per scored layer; the lowest go first.", "",
                  "![score distribution](plots/score_distribution.png)", ""]
    if widths:
        lines += ["## Channels kept", ""]
        if made["channels_kept.png"]:
            lines += ["![channels kept](plots/channels_kept.png)", ""]
        lines += ["| layer | before | after | kept |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {b} | {a} | {100 * a / b:.0f}% |" for n, b, a in widths if b]
        lines.append("")
    path = folder.out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
