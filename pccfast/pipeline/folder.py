"""The run folder: where every stage reads its inputs and writes its outputs.

    DIR/config.json       the resolved settings (later stages in DIR start from them)
    DIR/metrics.jsonl     one JSON record per epoch of every training stage
    DIR/summary.json      accuracies, params/FLOPs removed, seconds per stage
    DIR/baseline.pt       pretrained without PCC (only with --baseline)
    DIR/pretrained.pt     pretrained with PCC
    DIR/scores.pt         the criterion's score per channel of every scored layer (float64)
    DIR/plan.json         per layer: width before/after and the kept channel indices
    DIR/pruned.pt         the physically pruned model, before fine-tuning
    DIR/finetuned.pt      after fine-tuning
    DIR/checkpoints/      one training checkpoint per stage (for --resume)
    DIR/stages.json       per finished stage: the settings its outputs were made with (records.py)
    DIR/report.md         the report, with its plots in DIR/plots/*.png
    DIR/.pccfast-files.json   the names above that pccfast claimed here (its files)

A fresh run (:meth:`RunFolder.clear`) removes only these files, never anything else in DIR. A
file of one of these names that pccfast did not claim (``--out .`` in a project with its own
``config.json``) is the user's: a command that would write or remove it refuses
(:meth:`RunFolder.claim`), naming it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import atomic_write_text, no_space
from .config import save_json
from .records import STAGES, downstream, fingerprint

SUMMARY_KEYS = ("baseline_acc", "pcc_acc", "pruned_acc", "pruned_bn_acc", "finetuned_acc",
                "params_removed", "flops_removed")
# what each stage writes: files and summary.json fields (its seconds and metrics too)
STAGE_FILES = {"baseline": ("baseline.pt",), "pretrain": ("pretrained.pt",),
               "scores": ("scores.pt",), "prune": ("pruned.pt", "plan.json"),
               "finetune": ("finetuned.pt",)}
STAGE_SUMMARY = {
    "baseline": ("baseline_acc",),
    "pretrain": ("pcc_acc", "pcc_weight", "params_before", "flops_before"),
    "scores": ("score_images", "score_layers", "score_criterion",
               "ci_images", "ci_layers", "ci_criterion"),  # (the second three: older runs)
    "prune": ("pruned_acc", "pruned_bn_acc", "params_removed", "flops_removed", "params_after",
              "flops_after", "budget", "criterion", "speedup_cpu", "speedup_cpu_q1",
              "speedup_cpu_q3", "speedup_cpu_batch", "speedup_cpu_threads", "latency_cpu_ms"),
    "finetune": ("finetuned_acc",),
}
REPORT_FILES = ("report.md", "plots/training_curves.png", "plots/score_distribution.png",
                "plots/channels_kept.png")
# what older pccfast wrote under other names (the scores stage was called ci): removed with
# their stage, never read
OLD_FILES = {"scores": ("ci_scores.pt",), "report": ("plots/ci_distribution.png",)}
OLD_STAGES = ("ci",)
MANIFEST = ".pccfast-files.json"
MANIFEST_FORMAT = "pccfast-run-folder"
# every name pccfast writes or removes in a run folder
OWNED_FILES = (("config.json", "summary.json", "metrics.jsonl", "stages.json")
               + tuple(name for s in STAGES for name in STAGE_FILES[s])
               + tuple(f"checkpoints/{s}.pt" for s in STAGES) + REPORT_FILES
               + tuple(name for names in OLD_FILES.values() for name in names))


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

    # ------------------------------------------------------------ whose files

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST

    def claimed(self) -> set[str]:
        """The names pccfast claimed here. A folder without a manifest whose config.json is a
        whole pccfast config was written before manifests existed: all its names are pccfast's."""
        if self.manifest_path.is_file():
            try:
                data = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.manifest_path} is not valid JSON ({exc})") from exc
            if not (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT
                    and isinstance(data.get("files"), list)):
                raise ValueError(f"{self.manifest_path} is not a pccfast run-folder manifest")
            return {str(name) for name in data["files"]}
        return set(OWNED_FILES) if _is_run_config(self.config_path) else set()

    def foreign(self, names=OWNED_FILES) -> list[str]:
        """Those of ``names`` that exist here and that pccfast did not claim (the user's)."""
        present = [n for n in names if self.path(n).exists()]
        if not present:
            return []
        mine = self.claimed()
        return [n for n in present if n not in mine]

    def refuse_foreign(self, names=OWNED_FILES) -> None:
        """Raises ValueError naming the first of ``names`` that exists here and is the user's."""
        theirs = self.foreign(names)
        if theirs:
            raise ValueError(
                f"--out {self.out}: {self.path(theirs[0])} is not a file pccfast wrote (no record "
                f"in {self.manifest_path}), and pccfast would overwrite or remove it; use another "
                f"--out (e.g. runs/NAME), or move {theirs[0]} away"
                + (f" (also: {', '.join(theirs[1:])})" if len(theirs) > 1 else ""))

    def claim(self, names=OWNED_FILES) -> None:
        """Records ``names`` as pccfast's (before they are written, so that a crash leaves none
        unclaimed); refuses, naming the file, when one of them exists and is the user's."""
        self.refuse_foreign(names)
        mine = self.claimed()
        if not set(names) <= mine or not self.manifest_path.is_file():
            save_json(self.manifest_path, {"format": MANIFEST_FORMAT,
                                           "files": sorted(mine | set(names))})

    # ------------------------------------------------------------ config and summary

    def read_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.config_path} is not valid JSON ({exc})") from exc

    def write_config(self, tree: dict) -> None:
        self.claim(("config.json",))
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
        self.claim(("summary.json",))
        save_json(self.summary_path, summary)
        return summary

    # ------------------------------------------------------------ metrics

    def log_metrics(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.claim(("metrics.jsonl",))
        line = json.dumps({**record, "time": round(time.time(), 3)})
        try:
            with open(self.metrics_path, "a") as f:
                f.write(line + "\n")
                f.flush()
        except OSError as exc:
            raise no_space(exc, self.metrics_path) or exc

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
        # an older pccfast's "ci" stage: its scores are redone as the scores stage (pre-training
        # is kept), so the stages after it are refused until then, naming `pccfast scores`
        return {k: v for k, v in records.items() if k not in OLD_STAGES}

    def write_record(self, stage: str, settings: dict) -> None:
        """Marks ``stage`` finished, made with ``settings`` (the last write of a stage)."""
        records = self.read_records()
        records[stage] = {"fingerprint": fingerprint(settings), "settings": settings}
        self.claim(("stages.json",))
        save_json(self.records_path, records)

    def invalidate(self, stage: str, keep_checkpoint: bool = False) -> None:
        """Removes the outputs of ``stage`` and of every stage reading from it, and the report.

        Their records go first: a crash half-way leaves files without a record, which no stage
        reads. keep_checkpoint: keep ``stage``'s checkpoint and metrics (it resumes). Claims
        the files it removes and the stages rewrite (refusing a user's file of their names)."""
        stages = downstream(stage)
        old = tuple(n for s in stages + ["report"] for n in OLD_FILES.get(s, ()))
        self.claim(("summary.json", "metrics.jsonl", "stages.json")
                   + tuple(n for s in stages for n in STAGE_FILES[s])
                   + tuple(f"checkpoints/{s}.pt" for s in stages) + REPORT_FILES + old)
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
        for name in REPORT_FILES + old:
            self.path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Removes every file pccfast writes here except config.json (a fresh run)."""
        self.claim()
        for stage in STAGES:
            self.invalidate(stage)
        for path in (self.summary_path, self.metrics_path, self.records_path):
            path.unlink(missing_ok=True)


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json as pccfast writes it: RunConfig sections only, among
    them the five every pccfast version wrote."""
    import dataclasses

    from .config import RunConfig

    if not path.is_file():
        return False
    try:
        tree = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    return (isinstance(tree, dict) and {"data", "model", "pretrain", "prune", "run"} <= set(tree)
            <= sections and all(isinstance(v, dict) for v in tree.values()))
