"""Runs a study cell by cell, resumably, and keeps ``study.csv`` as the record of what is done.

    DIR/study.csv                  one row per arm x seed x allocation x criterion x target x
                                   stage (the record)
    DIR/features.csv               one row per arm x seed x scored layer: what pre-training did
                                   to the features (PCC both ways, CI share)
    DIR/study.md, DIR/plots/*.png  the tables and plots, rewritten after every arm x seed
    DIR/study.json                 the study's resolved settings
    DIR/work/ARM-seedS/            pretrained.pt, checkpoints/, scores-CRITERION.pt, cells/
                                   (intermediate files: needed only while that arm x seed runs)

A row is written once its cell has finished, and a row in ``study.csv`` is never recomputed
(a cell whose FLOPs target the model cannot meet gets rows with an empty ``acc`` and the reason
in ``note``): a stopped study resumes where it stopped (an interrupted training continues from
its checkpoint), and a study continued on another machine from the committed ``study.csv``
alone redoes only the arm x seed pairs that were not complete, from their pre-training (all rows
of one arm x seed always come from one pre-trained model). Every row carries the hash of its
arm's settings; rows made with other settings are refused, never mixed in. Every cached file in
``work/`` carries the settings it was made with and is reused only under the same ones.

Several processes may run the same study in one folder and share its work: each arm x seed is
run by whichever process locks it first (``work/.ARM-seedS.lock``), and each writes only its own
pairs' rows into the record, merged under a short lock (``.record.lock``). A process with other
settings is refused while the study runs (``.study.lock``). On a small CPU, two processes with
one thread each can do more than one with two (README, "Accuracy studies").
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from .config import ALLOCATIONS, MAX_SEED, Arm, StudyConfig, non_default, settings_hash

COLUMNS = ("arm", "seed", "allocation", "criterion", "target", "stage", "acc", "val_acc",
           "flops_removed", "params_removed", "kept", "seconds", "arm_hash", "note")
# columns an older record lacks, and what they mean there
OLDER = {"allocation": "adaptive", "val_acc": "", "kept": ""}
STAGES = ("pretrained", "pruned", "pruned_bn", "finetuned")
FEATURE_COLUMNS = ("arm", "seed", "layer", "channels", "pixels", "pcc_channel", "pcc_pixel",
                   "ci_share", "ci_mean", "nuclear_mean", "images", "arm_hash")
# Pre-training with the PCC regulariser costs this many plain steps: measured on 2 cores
# (RESULTS.md, "How it runs on 2 cores"), VGG-16-CIFAR width 0.25 at 623 images/s with PCC
# against 783 without in one-thread processes (1.26x), 501 against 652 in one two-thread process
# (1.30x); the kernels before -fopenmp gave 1.33x and 3.4x, and the 2026-12 studies 1.7-2.3x
PCC_STEP_COST = 1.3


@dataclass(frozen=True)
class Key:
    arm: str
    seed: int
    allocation: str  # "-" for the pretrained row
    criterion: str   # "-" for the pretrained row
    target: float    # 0.0 for the pretrained row; 6 decimals, as recorded
    stage: str

    @classmethod
    def of(cls, row: dict) -> "Key":
        allocation = row.get("allocation") or ("-" if row["stage"] == "pretrained" else "adaptive")
        return cls(row["arm"], int(row["seed"]), allocation, row["criterion"],
                   round(float(row["target"]), 6), row["stage"])


class StudyError(ValueError):
    """The folder holds results that do not belong to this study's settings, or cannot be read."""


def arm_hash(arm: Arm, profile: str | None = None) -> str:
    settings = non_default(arm.config.to_dict())
    return settings_hash({**settings, "study.profile": profile} if profile else settings)


def _fraction(value: str, name: str, where: str, empty: bool = True) -> None:
    if value == "" and empty:
        return
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise StudyError(f"{where}: {name} {value!r} is not a fraction in [0, 1]")


def _check_row(row: dict, where: str) -> None:
    """The record holds only numbers that can have been measured (else: file and line)."""
    try:
        seed = int(row["seed"])
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise StudyError(f"{where}: seed {row['seed']!r} is not an integer in [0, 2**63 - 1]")
    if row["stage"] not in STAGES:
        raise StudyError(f"{where}: stage {row['stage']!r} is not one of {list(STAGES)}")
    if row["allocation"] not in ALLOCATIONS + ("-",):
        raise StudyError(f"{where}: allocation {row['allocation']!r} is not one of "
                         f"{list(ALLOCATIONS)}")
    _fraction(row["target"], "target", where, empty=False)
    for name in ("acc", "val_acc", "flops_removed", "params_removed"):
        _fraction(row[name], name, where)


def read_rows(path: Path) -> list[dict]:
    """The record's rows, checked (a value out of range names the file and line)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            missing = [c for c in COLUMNS if c not in row and c not in OLDER]
            if missing:
                raise StudyError(f"{path} is not a pccfast study table (columns {missing} "
                                 "missing)")
            for column, value in OLDER.items():
                if row.get(column) is None:
                    row[column] = "-" if column == "allocation" and row["stage"] == "pretrained" \
                        else value
            _check_row(row, f"{path} line {reader.line_num}")
            rows.append(row)
    return unique(rows)


def unique(rows: list[dict]) -> list[dict]:
    """One row per key (the last), whatever an interrupted sitting left behind."""
    return list({Key.of(r): r for r in rows}.values())


def write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    order = {s: i for i, s in enumerate(STAGES)}
    for row in sorted(unique(rows), key=lambda r: (r["arm"], int(r["seed"]), r["allocation"],
                                                   r["criterion"], float(r["target"]),
                                                   order.get(r["stage"], 9))):
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def read_features(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_features(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FEATURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r["arm"], int(r["seed"]))):
        writer.writerow({c: _fmt(row.get(c)) for c in FEATURE_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def _pretrain_units(cfg) -> float:
    """Pre-training in training-image equivalents."""
    images = (cfg.data.train_limit or 50000) - cfg.data.val_images
    return cfg.pretrain.epochs * images * (PCC_STEP_COST if cfg.pcc.enabled else 1.0)


def _prune_units(cfg, target: float) -> float:
    """Pruning a cell and measuring it: BN re-estimation and testing of the smaller model, in
    forward passes (about a third of a training step each)."""
    return (cfg.prune.bn_images + (cfg.data.test_limit or 10000)) * (1.0 - target) / 3


def _finetune_units(cfg, target: float) -> float:
    images = (cfg.data.train_limit or 50000) - cfg.data.val_images
    return cfg.finetune.epochs * images * (1.0 - target)


def _fmt(value) -> str:
    return "" if value is None else (f"{value:.6f}" if isinstance(value, float) else str(value))


def _flock_holder(path: Path) -> int | None:
    """The pid holding a ``flock`` on ``path`` (from /proc/locks), or None: unlocked, or no
    /proc/locks to read (then --dry-run just does not say who runs a pair)."""
    try:
        st = path.stat()
        with open("/proc/locks") as f:
            table = f.read().splitlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1656 00:1a:123456 0 EOF" (blocked waiters read "1: -> ...")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4]) if fields[4].lstrip("-").isdigit() else None
    return None


class _FileLock:
    """``flock`` on one file (the OS releases it if the process dies)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def acquire(self, exclusive: bool = True, blocking: bool = True) -> bool:
        import fcntl

        if self.file is None:
            self.file = open(self.path, "a+")
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else
                                                                  fcntl.LOCK_NB)
        try:
            fcntl.flock(self.file, flags)
        except BlockingIOError:
            return False
        return True

    def holder(self) -> str:
        """What the holder wrote (its pid), for messages."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def sign(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class Study:
    """One study folder. ``run()`` does every cell not yet in ``study.csv``."""

    def __init__(self, config: StudyConfig, out, *, device: str | None = None,
                 progress: bool = True, echo=print, only: list[str] | None = None):
        names = [a.name for a in config.arms]
        if only is not None:
            unknown = [a for a in only if a not in names]
            if not only or unknown:
                raise ValueError(f"--arms: {unknown or only!r} names no arm of this study; its "
                                 f"arms are {names}")
        self.only = only
        self.config = config
        self.out = Path(out)
        self.device = device
        self.progress = progress
        self.echo = echo or (lambda text: None)
        self.csv_path = self.out / "study.csv"
        self.features_path = self.out / "features.csv"
        self._data: dict = {}
        if device is not None:
            from ..train.distributed import pick_device

            try:
                pick_device(device)
            except (ValueError, RuntimeError) as exc:
                raise ValueError(f"--device {device!r}: {exc}") from exc

    # ------------------------------------------------------------------ bookkeeping
    def hash_of(self, arm: Arm) -> str:
        return arm_hash(arm, self.config.profile)

    def keys(self, arm: Arm, seed: int) -> list[Key]:
        """Every row one arm x seed contributes."""
        c = self.config
        keys = [Key(arm.name, seed, "-", "-", 0.0, "pretrained")]
        for allocation in c.allocations:
            for criterion in c.criteria:
                for target in c.targets:
                    keys += [Key(arm.name, seed, allocation, criterion, target, "pruned"),
                             Key(arm.name, seed, allocation, criterion, target, "pruned_bn")]
                    if target in c.finetune_targets:
                        keys.append(Key(arm.name, seed, allocation, criterion, target,
                                        "finetuned"))
        return keys

    def _load_rows(self, refuse_stale: bool = True) -> list[dict]:
        rows = read_rows(self.csv_path)
        hashes = {a.name: self.hash_of(a) for a in self.config.arms}
        stale = sorted({r["arm"] for r in rows if r["arm"] in hashes
                        and r["arm_hash"] != hashes[r["arm"]]})
        if stale and refuse_stale:
            raise StudyError(
                f"{self.csv_path} holds results of arm(s) {stale} made with other settings "
                f"(arm_hash differs): study into another --out, or delete those rows to redo them")
        return rows

    def _reported(self, rows: list[dict]) -> list[dict]:
        """The rows of this study's arms (a record may hold rows of arms since removed)."""
        arms = {a.name for a in self.config.arms}
        others = sorted({r["arm"] for r in rows} - arms)
        if others:
            self.echo(f"study  {self.csv_path} holds rows of arm(s) {others}, which the config "
                      "no longer has: kept in the record, left out of the report")
        return [r for r in rows if r["arm"] in arms]

    def pairs(self):
        """(arm, seed) in the order they run: seed-major, so early results span every arm
        (only the arms asked for, if any)."""
        return [(arm, seed) for seed in self.config.seeds for arm in self.config.arms
                if self.only is None or arm.name in self.only]

    def work_dir(self, arm: Arm, seed: int) -> Path:
        return self.out / "work" / f"{arm.name}-seed{seed}"

    def describe(self) -> str:
        """The cells, what is done already and the work left (for --dry-run)."""
        done = {Key.of(r) for r in self._load_rows()}
        c = self.config
        lines = [f"study  {self.out}: {len(c.arms)} arm(s) x {len(c.seeds)} seed(s) x "
                 f"{len(c.allocations)} allocation(s) x {len(c.criteria)} criteria x "
                 f"{len(c.targets)} targets ({len(c.finetune_targets)} fine-tuned)"]
        for arm, seed in self.pairs():
            keys = self.keys(arm, seed)
            have = sum(k in done for k in keys)
            line = f"  {arm.name:<16} seed {seed}: {have}/{len(keys)} rows done, "
            epochs = self._pretrain_progress(arm, seed)
            if have < len(keys) and 0 < epochs < arm.config.pretrain.epochs:
                line += f"pre-training {epochs}/{arm.config.pretrain.epochs} epochs, "
            line += f"about {self._units(arm, seed, done) / 1e6:.2f}M training-image " \
                    "equivalents left"
            pid = _flock_holder(self.out / "work" / f".{arm.name}-seed{seed}.lock")
            if pid is not None and have < len(keys):
                line += f", running in pid {pid}"
            lines.append(line)
        return "\n".join(lines)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """What can be known before any training: each arm's model takes the data, its batch
        sizes fit, and every allocation x target is a budget its layers can reach."""
        from ..pipeline import checks, steps
        from ..prune.graph import build_graph

        for arm in self.config.arms:
            cfg = self.config.arm_config(arm, self.config.seeds[0])
            data = self._data_for(cfg)
            model = steps.model_for_data(cfg, data)
            try:
                checks._check_forward(model, cfg.model.name, data)
                env = self._env(cfg)
                checks._check_batches("pretrain", cfg.pretrain, data, env, model)
                checks._check_batches("finetune", cfg.finetune, data, env, model)
                if not build_graph(model, data.input_size).prunable:
                    raise ValueError(f"{cfg.model.name} has no prunable layer at these settings")
                for allocation in self.config.allocations:
                    for target in self.config.targets:
                        checks.check_budget(model, data.input_size,
                                                self.config.budget(allocation, target))
            except ValueError as exc:
                raise ValueError(f"[arms.{arm.name}]: {exc}") from exc

    # ------------------------------------------------------------------ running
    def run(self) -> Path:
        """Every arm x seed not yet in the record that no other process is running."""
        from tqdm.auto import tqdm

        (self.out / "work").mkdir(parents=True, exist_ok=True)
        with self._joined():
            self.check()
            rows, features = self._read_record()
            done = {Key.of(r) for r in rows}
            todo = [(arm, seed) for arm, seed in self.pairs()
                    if not self._complete(arm, seed, done, features)]
            units = {(a.name, s): self._units(a, s, done) for a, s in todo}
            bar = tqdm(total=sum(units.values()), unit="img", unit_scale=True, desc="study",
                       disable=not self.progress, dynamic_ncols=True)
            try:
                for arm, seed in todo:
                    lock = _FileLock(self.out / "work" / f".{arm.name}-seed{seed}.lock")
                    if not lock.acquire(blocking=False):
                        self.echo(f"study  {arm.name} seed {seed}: run by {lock.holder()}, "
                                  "left to it")
                        bar.total -= units[(arm.name, seed)]
                        lock.release()
                        continue
                    try:
                        lock.sign()
                        rows, features = self._read_record()  # another process may be done
                        if self._complete(arm, seed, {Key.of(r) for r in rows}, features):
                            bar.update(units[(arm.name, seed)])
                            continue
                        try:
                            self._run_pair(arm, seed, rows, features, bar)
                        finally:  # also when interrupted: the record keeps every finished cell
                            rows, features = self._save(arm, seed, rows, features)
                        self._report(rows, features)
                    finally:
                        lock.release()
            finally:
                bar.close()
            rows, features = self._read_record()
            self._report(rows, features)
        return self.csv_path

    @contextmanager
    def _joined(self):
        """Membership of the folder's study for the whole run: the first process writes
        study.json; others join if their settings are the same and are refused if not."""
        member = _FileLock(self.out / ".study.lock")
        try:
            with self._record_lock():
                settings = json.dumps(self.config.to_dict(), indent=1, sort_keys=True) + "\n"
                path = self.out / "study.json"
                if member.acquire(exclusive=True, blocking=False):  # no one else runs
                    atomic_write_text(path, settings)
                elif not path.is_file() or path.read_text() != settings:
                    raise StudyError(
                        f"another pccfast study with other settings is running in "
                        f"{self.out}: wait for it to finish, or study into another --out")
                member.acquire(exclusive=False)  # shared while running
            yield
        finally:
            member.release()

    def _record_lock(self) -> _FileLock:
        return _FileLock(self.out / ".record.lock")

    def _read_record(self) -> tuple[list[dict], list[dict]]:
        with self._record_lock():
            return self._load_rows(), read_features(self.features_path)

    def _save(self, arm: Arm, seed: int, rows: list[dict], features: list[dict] | None = None
              ) -> tuple[list[dict], list[dict]]:
        """Write this process's rows (and features) of one arm x seed into the record as it is
        on disk now, whatever other processes wrote meanwhile; returns the merged record."""
        def ours(r):
            return r["arm"] == arm.name and int(r["seed"]) == seed

        with self._record_lock():
            merged = [r for r in read_rows(self.csv_path) if not ours(r)]
            merged += [r for r in rows if ours(r)]
            write_rows(self.csv_path, merged)
            record = read_features(self.features_path)
            if features is not None:
                record = [f for f in record if not ours(f)] + [f for f in features if ours(f)]
                write_features(self.features_path, record)
        return merged, record

    def _complete(self, arm: Arm, seed: int, done: set, features: list[dict]) -> bool:
        return set(self.keys(arm, seed)) <= done and not self._features_missing(
            features, arm, seed)

    def _features_missing(self, features, arm: Arm, seed: int) -> bool:
        if not self.config.feature_images:
            return False
        return not any(f["arm"] == arm.name and int(f["seed"]) == seed
                       and f["arm_hash"] == self.hash_of(arm) for f in features)

    def _report(self, rows, features) -> Path:
        from .report import write_study_report

        shown = self._reported(rows)
        arms = {r["arm"] for r in shown}
        classes = self._classes()
        return write_study_report(self.out, shown, self.config,
                                  [f for f in features if f["arm"] in arms],
                                  chance=1.0 / classes if classes else None)

    def _classes(self) -> int | None:
        for data in self._data.values():
            return data.num_classes
        return None

    def write_report(self) -> Path:
        """study.md and the plots from ``study.csv`` as it stands; runs nothing."""
        if not self.csv_path.is_file():
            raise StudyError(f"{self.csv_path} does not exist yet: nothing to report")
        return self._report(self._load_rows(refuse_stale=False),
                            read_features(self.features_path))

    def _units(self, arm: Arm, seed: int, done: set | None = None) -> float:
        """Rough work left of one arm x seed in training-image equivalents (for the ETA):
        the pre-training epochs its work folder does not hold yet, and the cells not in ``done``."""
        cfg = arm.config
        done = done or set()
        if set(self.keys(arm, seed)) <= done:
            return 0.0
        total = self._pretrain_left(arm, seed)
        for allocation in self.config.allocations:
            for criterion in self.config.criteria:
                for target in self.config.targets:
                    key = Key(arm.name, seed, allocation, criterion, target, "pruned_bn")
                    if key not in done:
                        total += _prune_units(cfg, target)
                    if (target in self.config.finetune_targets
                            and Key(arm.name, seed, allocation, criterion, target,
                                    "finetuned") not in done):
                        total += _finetune_units(cfg, target)
        return total

    def _pretrain_progress(self, arm: Arm, seed: int) -> int:
        """Pre-training epochs of this arm x seed already done in its work folder."""
        from . import cells

        return cells.pretrain_progress(self.work_dir(arm, seed),
                                       self.config.arm_config(arm, seed)) or 0

    def _pretrain_left(self, arm: Arm, seed: int) -> float:
        epochs = arm.config.pretrain.epochs
        done = self._pretrain_progress(arm, seed)
        return _pretrain_units(arm.config) * (epochs - done) / epochs

    def _data_for(self, cfg):
        from ..pipeline import steps

        d = cfg.data
        key = (d.spec, d.train_limit, d.test_limit, d.val_images, cfg.run.seed, d.augment, d.pad,
               d.crop)
        if key not in self._data:
            self._data[key] = steps.load_configured_data(cfg)
        return self._data[key]

    def _env(self, cfg):
        from ..train.distributed import DistEnv, pick_device

        return DistEnv(device=pick_device(self.device or cfg.run.device))

    def _run_pair(self, arm: Arm, seed: int, rows: list[dict], features: list[dict],
                  bar) -> None:
        """Every missing row of one arm x seed, appended to ``rows`` (changed in place)."""
        from . import cells

        cfg = self.config.arm_config(arm, seed)
        h = self.hash_of(arm)
        done = {Key.of(r) for r in rows}
        work = self.work_dir(arm, seed)
        data = self._data_for(cfg)
        env = self._env(cfg)
        pretrain_left = self._pretrain_left(arm, seed)
        pretrained = cells.pretrained_model(work, cfg, data, env, self.progress)
        if pretrained.retrained:
            # every row of one arm x seed must come from one pre-trained model
            stale = [r for r in rows if r["arm"] == arm.name and int(r["seed"]) == seed]
            if stale:
                self.echo(f"study  {arm.name} seed {seed}: its pre-trained model is gone, so its "
                          f"{len(stale)} earlier rows are redone from a new pre-training")
                rows[:] = [r for r in rows if r not in stale]
                done = {Key.of(r) for r in rows}
            features[:] = [f for f in features
                           if not (f["arm"] == arm.name and int(f["seed"]) == seed)]
            bar.update(pretrain_left)

        def add(key: Key, acc, val=None, flops=None, params=None, kept="", seconds=None,
                note=""):
            if key in done:  # a cell redone after its fine-tuning was interrupted
                return
            rows.append({"arm": key.arm, "seed": key.seed, "allocation": key.allocation,
                         "criterion": key.criterion, "target": _fmt(key.target),
                         "stage": key.stage, "acc": _fmt(acc), "val_acc": _fmt(val),
                         "flops_removed": _fmt(flops), "params_removed": _fmt(params),
                         "kept": kept, "seconds": _fmt(seconds), "arm_hash": h, "note": note})
            done.add(key)

        first = Key(arm.name, seed, "-", "-", 0.0, "pretrained")
        if first not in done:
            add(first, pretrained.acc, pretrained.val_acc, 0.0, 0.0, seconds=pretrained.seconds)
        if self._features_missing(features, arm, seed):
            for row in cells.features(work, pretrained.model, cfg, data, env,
                                      self.config.feature_images):
                features.append({"arm": arm.name, "seed": seed, **row, "arm_hash": h})
        for allocation in self.config.allocations:
            for criterion in self.config.criteria:
                needed = [k for k in self.keys(arm, seed)
                          if k.criterion == criterion and k.allocation == allocation]
                if set(needed) <= done:
                    continue
                scores = cells.scores(work, criterion, pretrained.model, cfg, data, env)
                for target in self.config.targets:
                    cell = _CellRun(arm, seed, allocation, criterion, target, pretrained.model,
                                    scores, work)
                    self._run_cell(cell, cfg, data, env, rows, add, done, bar)

    def _run_cell(self, c: "_CellRun", cfg, data, env, rows, add, done, bar) -> None:
        from ..prune.plan import BudgetError
        from . import cells

        arm, seed, allocation, criterion, target = c.arm, c.seed, c.allocation, c.criterion, \
            c.target
        fine = target in self.config.finetune_targets
        stages = ("pruned", "pruned_bn") + (("finetuned",) if fine else ())
        want = [Key(arm.name, seed, allocation, criterion, target, s) for s in stages]
        if set(want) <= done:
            return
        folder = c.work / "cells" / f"{allocation}-{criterion}-{target:.6f}"
        cell = cells.Cell(folder, criterion, target, self.config.budget(allocation, target))
        label = f"study  {arm.name} seed {seed} {allocation} {criterion} {100 * target:.1f}%"
        try:
            result = cell.prune(c.model, c.scores, cfg, data, env)
        except BudgetError as exc:  # a target this model's layers cannot meet
            for key in want:
                add(key, None, note=str(exc))
            self.echo(f"{label}: not measured: {exc}")
            self._save(arm, seed, rows)
            return
        for stage in ("pruned", "pruned_bn"):
            measured = result[stage]
            add(Key(arm.name, seed, allocation, criterion, target, stage), measured["acc"],
                measured.get("val_acc"), result["flops_removed"], result["params_removed"],
                result["kept"], result["seconds"])
        bar.update(_prune_units(cfg, target))
        tuned = None
        if fine:
            tuned = cell.finetune(cfg, data, env, self.progress)
            add(Key(arm.name, seed, allocation, criterion, target, "finetuned"), tuned["acc"],
                tuned.get("val_acc"), result["flops_removed"], result["params_removed"],
                result["kept"], tuned["seconds"])
            bar.update(_finetune_units(cfg, target))
        self._save(arm, seed, rows)  # the record grows cell by cell
        self.echo(f"{label}: {100 * result['flops_removed']:.1f}% FLOPs removed, "
                  f"{100 * result['pruned_bn']['acc']:.2f}% after BN re-estimation"
                  + (f", {100 * tuned['acc']:.2f}% fine-tuned" if tuned else ""))


@dataclass
class _CellRun:
    """What one cell of an arm x seed works on."""

    arm: Arm
    seed: int
    allocation: str
    criterion: str
    target: float
    model: object
    scores: dict
    work: Path
