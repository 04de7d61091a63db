"""The run folder: where every stage reads its inputs and writes its outputs.

    DIR/config.json       the resolved settings (later stages in DIR start from them)
    DIR/metrics.jsonl     one JSON record per epoch of every training stage
    DIR/summary.json      accuracies, params/FLOPs removed, seconds per stage
    DIR/baseline.pt       pretrained without PCC (only with --baseline)
    DIR/pretrained.pt     pretrained with PCC
    DIR/ci_scores.pt      CI per scored layer (float64)
    DIR/plan.json         per layer: width before/after and the kept channel indices
    DIR/pruned.pt         the physically pruned model, before fine-tuning
    DIR/finetuned.pt      after fine-tuning
    DIR/checkpoints/      one training checkpoint per stage (for --resume)
    DIR/report.md         the report, with its plots in DIR/plots/*.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import atomic_write_text
from .config import save_json

SUMMARY_KEYS = ("baseline_acc", "pcc_acc", "pruned_acc", "pruned_bn_acc", "finetuned_acc",
                "params_removed", "flops_removed")


class RunFolder:
    def __init__(self, out: str | Path):
        self.out = Path(out)

    def path(self, name: str) -> Path:
        return self.out / name

    @property
    def config_path(self) -> Path:
        return self.out / "config.json"

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def checkpoint(self, stage: str) -> Path:
        return self.out / "checkpoints" / f"{stage}.pt"

    def model_path(self, stage: str) -> Path:
        return self.out / {"baseline": "baseline.pt", "pretrain": "pretrained.pt",
                           "prune": "pruned.pt", "finetune": "finetuned.pt"}[stage]

    # ------------------------------------------------------------ config and summary

    def read_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.config_path} is not valid JSON ({exc})") from exc

    def write_config(self, tree: dict) -> None:
        save_json(self.config_path, tree)

    def read_summary(self) -> dict:
        summary = {k: None for k in SUMMARY_KEYS}
        summary["seconds"] = {}
        if self.summary_path.is_file():
            try:
                summary.update(json.loads(self.summary_path.read_text()))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.summary_path} is not valid JSON ({exc})") from exc
        return summary

    def update_summary(self, seconds: dict | None = None, **fields) -> dict:
        summary = self.read_summary()
        summary.update(fields)
        if seconds:
            summary["seconds"] = {**summary.get("seconds", {}), **seconds}
        save_json(self.summary_path, summary)
        return summary

    # ------------------------------------------------------------ metrics

    def log_metrics(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**record, "time": round(time.time(), 3)})
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        """Every record, the last one kept per (stage, epoch) (a resumed epoch is logged twice)."""
        if not self.metrics_path.is_file():
            return []
        latest: dict = {}
        for line in self.metrics_path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            latest[(record.get("stage"), record.get("epoch"))] = record
        return list(latest.values())

    def reset_stage(self, stage: str) -> None:
        """Drops a stage's metrics and checkpoint before it starts afresh."""
        records = [r for r in self.read_metrics() if r.get("stage") != stage]
        if self.metrics_path.is_file():
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))
        ckpt = self.checkpoint(stage)
        if ckpt.is_file():
            ckpt.unlink()
