"""Runs a study cell by cell, resumably, and keeps ``study.csv`` as the record of what is done.

    DIR/study.csv                  one row per arm x seed x criterion x target x stage (the record)
    DIR/study.md, DIR/plots/*.png  the tables and curves, rewritten after every arm x seed
    DIR/study.json                 the study's resolved settings
    DIR/work/ARM-seedS/            pretrained.pt, checkpoints/, scores-CRITERION.pt, cells/
                                   (intermediate files: needed only while that arm x seed runs)

A row is written once its cell has finished, and a row in ``study.csv`` is never recomputed
(a cell that cannot be measured, e.g. a FLOPs target the model cannot meet, gets rows with an
empty ``acc`` and the reason in ``note``):
a stopped study resumes where it stopped (an interrupted training continues from its
checkpoint), and a study continued on another machine from the committed ``study.csv`` alone
redoes only the arm x seed pairs that were not complete, from their pre-training (all rows of
one arm x seed always come from one pre-trained model). Every row carries the hash of its arm's
settings; rows made with other settings are refused, never mixed in.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from .config import Arm, StudyConfig, non_default, settings_hash

COLUMNS = ("arm", "seed", "criterion", "target", "stage", "acc", "flops_removed",
           "params_removed", "seconds", "arm_hash", "note")
STAGES = ("pretrained", "pruned", "pruned_bn", "finetuned")


@dataclass(frozen=True)
class Key:
    arm: str
    seed: int
    criterion: str  # "-" for the pretrained row
    target: float   # 0.0 for the pretrained row
    stage: str

    @classmethod
    def of(cls, row: dict) -> "Key":
        return cls(row["arm"], int(row["seed"]), row["criterion"], float(row["target"]),
                   row["stage"])


class StudyError(ValueError):
    """The folder holds results that do not belong to this study's settings."""


def arm_hash(arm: Arm) -> str:
    return settings_hash(non_default(arm.config.to_dict()))


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise StudyError(f"{path} is not a pccfast study table (columns {missing} missing)")
    return unique(rows)


def unique(rows: list[dict]) -> list[dict]:
    """One row per key (the last), whatever an interrupted sitting left behind."""
    return list({Key.of(r): r for r in rows}.values())


def write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    order = {s: i for i, s in enumerate(STAGES)}
    for row in sorted(unique(rows), key=lambda r: (r["arm"], int(r["seed"]), r["criterion"],
                                           float(r["target"]), order.get(r["stage"], 9))):
        writer.writerow({c: row[c] for c in COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def _pretrain_units(cfg) -> float:
    """Pre-training in training-image equivalents (PCC costs about 20% more)."""
    return cfg.pretrain.epochs * (cfg.data.train_limit or 50000) * (1.2 if cfg.pcc.enabled else 1.0)


def _prune_units(cfg, target: float) -> float:
    """Pruning a cell and measuring it: BN re-estimation and testing of the smaller model, in
    forward passes (about a third of a training step each)."""
    return (cfg.prune.bn_images + (cfg.data.test_limit or 10000)) * (1.0 - target) / 3


def _finetune_units(cfg, target: float) -> float:
    return cfg.finetune.epochs * (cfg.data.train_limit or 50000) * (1.0 - target)


def _fmt(value) -> str:
    return "" if value is None else (f"{value:.6f}" if isinstance(value, float) else str(value))


class Study:
    """One study folder. ``run()`` does every cell not yet in ``study.csv``."""

    def __init__(self, config: StudyConfig, out, *, device: str | None = None,
                 progress: bool = True, echo=print):
        self.config = config
        self.out = Path(out)
        self.device = device
        self.progress = progress
        self.echo = echo or (lambda text: None)
        self.csv_path = self.out / "study.csv"
        self._data: dict = {}

    # ------------------------------------------------------------------ bookkeeping
    def keys(self, arm: Arm, seed: int) -> list[Key]:
        """Every row one arm x seed contributes."""
        c = self.config
        keys = [Key(arm.name, seed, "-", 0.0, "pretrained")]
        for criterion in c.criteria:
            for target in c.targets:
                keys += [Key(arm.name, seed, criterion, target, "pruned"),
                         Key(arm.name, seed, criterion, target, "pruned_bn")]
                if target in c.finetune_targets:
                    keys.append(Key(arm.name, seed, criterion, target, "finetuned"))
        return keys

    def _load_rows(self) -> list[dict]:
        rows = read_rows(self.csv_path)
        hashes = {a.name: arm_hash(a) for a in self.config.arms}
        stale = sorted({r["arm"] for r in rows if r["arm"] in hashes
                        and r["arm_hash"] != hashes[r["arm"]]})
        if stale:
            raise StudyError(
                f"{self.csv_path} holds results of arm(s) {stale} made with other settings "
                f"(arm_hash differs): study into another --out, or delete those rows to redo them")
        return rows

    def pairs(self):
        """(arm, seed) in the order they run: seed-major, so early results span every arm."""
        return [(arm, seed) for seed in self.config.seeds for arm in self.config.arms]

    def work_dir(self, arm: Arm, seed: int) -> Path:
        return self.out / "work" / f"{arm.name}-seed{seed}"

    def describe(self) -> str:
        """The cells, what is done already and the work left (for --dry-run)."""
        done = {Key.of(r) for r in self._load_rows()}
        c = self.config
        lines = [f"study  {self.out}: {len(c.arms)} arm(s) x {len(c.seeds)} seed(s) x "
                 f"{len(c.criteria)} criteria x {len(c.targets)} targets "
                 f"({len(c.finetune_targets)} fine-tuned)"]
        for arm, seed in self.pairs():
            keys = self.keys(arm, seed)
            have = sum(k in done for k in keys)
            lines.append(f"  {arm.name:<16} seed {seed}: {have}/{len(keys)} rows done, "
                         f"about {self._units(arm, seed, done) / 1e6:.2f}M training-image "
                         "equivalents left")
        return "\n".join(lines)

    # ------------------------------------------------------------------ running
    def run(self) -> Path:
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "study.json",
                          json.dumps(self.config.to_dict(), indent=1, sort_keys=True) + "\n")
        rows = self._load_rows()
        done = {Key.of(r) for r in rows}
        todo = [(arm, seed) for arm, seed in self.pairs()
                if not set(self.keys(arm, seed)) <= done]
        units = {(a.name, s): self._units(a, s, done) for a, s in todo}
        bar = tqdm(total=sum(units.values()), unit="img", unit_scale=True, desc="study",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for arm, seed in todo:
                self._run_pair(arm, seed, rows, bar)
                self.write_outputs(rows)
        finally:  # also when interrupted: the tables show every finished cell
            bar.close()
            self.write_outputs(rows)
        return self.csv_path

    def write_outputs(self, rows: list[dict]) -> None:
        from .report import write_study_report

        write_rows(self.csv_path, rows)
        write_study_report(self.out, rows, self.config)

    def write_report(self) -> Path:
        """study.md and the plot from ``study.csv`` as it stands; runs nothing."""
        from .report import write_study_report

        if not self.csv_path.is_file():
            raise StudyError(f"{self.csv_path} does not exist yet: nothing to report")
        return write_study_report(self.out, self._load_rows(), self.config)

    def _units(self, arm: Arm, seed: int, done: set | None = None) -> float:
        """Rough work left of one arm x seed in training-image equivalents (for the ETA):
        pre-training unless its model is in the work folder, and the cells not in ``done``."""
        cfg = arm.config
        done = done or set()
        total = 0.0
        if not (self.work_dir(arm, seed) / "pretrained.pt").is_file():
            total += _pretrain_units(cfg)
        for criterion in self.config.criteria:
            for target in self.config.targets:
                if Key(arm.name, seed, criterion, target, "pruned_bn") not in done:
                    total += _prune_units(cfg, target)
                if (target in self.config.finetune_targets
                        and Key(arm.name, seed, criterion, target, "finetuned") not in done):
                    total += _finetune_units(cfg, target)
        return total

    def _data_for(self, cfg):
        from ..data import load_data

        d = cfg.data
        key = (d.spec, d.train_limit, d.test_limit, cfg.run.seed, d.augment, d.pad, d.crop)
        if key not in self._data:
            self._data[key] = load_data(d.spec, train_limit=d.train_limit,
                                        test_limit=d.test_limit, seed=cfg.run.seed,
                                        download=d.download, augment=d.augment, pad=d.pad,
                                        crop=d.crop)
        return self._data[key]

    def _env(self, cfg):
        from ..train.distributed import DistEnv, pick_device

        return DistEnv(device=pick_device(self.device or cfg.run.device))

    def _run_pair(self, arm: Arm, seed: int, rows: list[dict], bar) -> None:
        """Every missing row of one arm x seed, appended to ``rows`` (changed in place)."""
        from . import cells

        cfg = self.config.arm_config(arm, seed)
        h = arm_hash(arm)
        done = {Key.of(r) for r in rows}
        work = self.work_dir(arm, seed)
        data = self._data_for(cfg)
        env = self._env(cfg)
        pretrained = cells.pretrained_model(work, cfg, data, env, self.progress)
        if pretrained.retrained:
            # every row of one arm x seed must come from one pre-trained model
            stale = [r for r in rows if r["arm"] == arm.name and int(r["seed"]) == seed]
            if stale:
                self.echo(f"study  {arm.name} seed {seed}: its pre-trained model is gone, so its "
                          f"{len(stale)} earlier rows are redone from a new pre-training")
                rows[:] = [r for r in rows if r not in stale]
                done = {Key.of(r) for r in rows}
            bar.update(_pretrain_units(cfg))

        def add(key: Key, acc, flops=None, params=None, seconds=None, note=""):
            if key in done:  # a cell redone after its fine-tuning was interrupted
                return
            rows.append({"arm": key.arm, "seed": key.seed, "criterion": key.criterion,
                         "target": _fmt(key.target), "stage": key.stage, "acc": _fmt(acc),
                         "flops_removed": _fmt(flops), "params_removed": _fmt(params),
                         "seconds": _fmt(seconds), "arm_hash": h, "note": note})
            done.add(key)

        first = Key(arm.name, seed, "-", 0.0, "pretrained")
        if first not in done:
            add(first, pretrained.acc, 0.0, 0.0, pretrained.seconds)
        for criterion in self.config.criteria:
            needed = [k for k in self.keys(arm, seed) if k.criterion == criterion]
            if set(needed) <= done:
                continue
            scores = cells.scores(work, criterion, pretrained.model, cfg, data, env, seed)
            for target in self.config.targets:
                fine = target in self.config.finetune_targets
                want = [Key(arm.name, seed, criterion, target, s)
                        for s in ("pruned", "pruned_bn") + (("finetuned",) if fine else ())]
                if set(want) <= done:
                    continue
                cell = cells.Cell(work / "cells" / f"{criterion}-{target:g}", criterion, target)
                try:
                    result = cell.prune(pretrained.model, scores, cfg, data, env)
                except ValueError as exc:  # e.g. a target this model's layers cannot meet
                    for key in want:
                        add(key, None, note=str(exc))
                    self.echo(f"study  {arm.name} seed {seed} {criterion} {100 * target:.1f}%: "
                              f"not measured: {exc}")
                    write_rows(self.csv_path, rows)
                    continue
                for stage in ("pruned", "pruned_bn"):
                    add(Key(arm.name, seed, criterion, target, stage), result[f"{stage}_acc"],
                        result["flops_removed"], result["params_removed"], result["seconds"])
                bar.update(_prune_units(cfg, target))
                if fine:
                    tuned = cell.finetune(cfg, data, env, self.progress)
                    add(Key(arm.name, seed, criterion, target, "finetuned"), tuned["acc"],
                        result["flops_removed"], result["params_removed"], tuned["seconds"])
                    bar.update(_finetune_units(cfg, target))
                write_rows(self.csv_path, rows)  # the record grows cell by cell
                self.echo(f"study  {arm.name} seed {seed} {criterion} {100 * target:.1f}%: "
                          f"{100 * result['flops_removed']:.1f}% FLOPs removed, "
                          f"{100 * result['pruned_bn_acc']:.2f}% after BN re-estimation"
                          + (f", {100 * tuned['acc']:.2f}% fine-tuned" if fine else ""))
