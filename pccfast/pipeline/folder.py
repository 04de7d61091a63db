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
    DIR/stages.json       per finished stage: the settings its outputs were made with (records.py)
    DIR/report.md         the report, with its plots in DIR/plots/*.png

A fresh run (:meth:`RunFolder.clear`) removes only these files, never anything else in DIR.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import atomic_write_text
from .config import save_json
from .records import STAGES, downstream, fingerprint

SUMMARY_KEYS = ("baseline_acc", "pcc_acc", "pruned_acc", "pruned_bn_acc", "finetuned_acc",
                "params_removed", "flops_removed")
# what each stage writes: files and summary.json fields (its seconds and metrics too)
STAGE_FILES = {"baseline": ("baseline.pt",), "pretrain": ("pretrained.pt",),
               "ci": ("ci_scores.pt",), "prune": ("pruned.pt", "plan.json"),
               "finetune": ("finetuned.pt",)}
STAGE_SUMMARY = {
    "baseline": ("baseline_acc",),
    "pretrain": ("pcc_acc", "pcc_weight", "params_before", "flops_before"),
    "ci": ("ci_images", "ci_layers"),
    "prune": ("pruned_acc", "pruned_bn_acc", "params_removed", "flops_removed", "params_after",
              "flops_after", "criterion", "speedup_cpu", "speedup_cpu_q1", "speedup_cpu_q3",
              "speedup_cpu_batch", "speedup_cpu_threads", "latency_cpu_ms"),
    "finetune": ("finetuned_acc",),
}
REPORT_FILES = ("report.md", "plots/training_curves.png", "plots/ci_distribution.png",
                "plots/channels_kept.png")


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

    @property
    def records_path(self) -> Path:
        return self.out / "stages.json"

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

    def _drop_metrics(self, stages: set) -> None:
        if not self.metrics_path.is_file():
            return
        records = [r for r in self.read_metrics() if r.get("stage") not in stages]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    # ------------------------------------------------------------ stage records

    def read_records(self) -> dict:
        """stage -> {"fingerprint", "settings"} of every finished stage (DIR/stages.json)."""
        if not self.records_path.is_file():
            return {}
        try:
            records = json.loads(self.records_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.records_path} is not valid JSON ({exc})") from exc
        if not isinstance(records, dict):
            raise ValueError(f"{self.records_path} is not a table of stages")
        return records

    def write_record(self, stage: str, settings: dict) -> None:
        """Marks ``stage`` finished, made with ``settings`` (the last write of a stage)."""
        records = self.read_records()
        records[stage] = {"fingerprint": fingerprint(settings), "settings": settings}
        save_json(self.records_path, records)

    def invalidate(self, stage: str, keep_checkpoint: bool = False) -> None:
        """Removes the outputs of ``stage`` and of every stage reading from it, and the report.

        Their records go first: a crash half-way leaves files without a record, which no stage
        reads. keep_checkpoint: keep ``stage``'s checkpoint and metrics (it resumes)."""
        stages = downstream(stage)
        records = self.read_records()
        if any(s in records for s in stages):
            save_json(self.records_path, {k: v for k, v in records.items() if k not in stages})
        for s in stages:
            for name in STAGE_FILES[s]:
                self.path(name).unlink(missing_ok=True)
            if not (keep_checkpoint and s == stage):
                self.checkpoint(s).unlink(missing_ok=True)
        self._drop_metrics(set(stages) - ({stage} if keep_checkpoint else set()))
        if self.summary_path.is_file():
            summary = self.read_summary()
            for s in stages:
                for key in STAGE_SUMMARY[s]:
                    summary.pop(key, None)
                summary.get("seconds", {}).pop(s, None)
            save_json(self.summary_path, summary)
        for name in REPORT_FILES:
            self.path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Removes every file pccfast writes here except config.json (a fresh run)."""
        for stage in STAGES:
            self.invalidate(stage)
        for path in (self.summary_path, self.metrics_path, self.records_path):
            path.unlink(missing_ok=True)
