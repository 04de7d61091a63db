"""The work of one arm x seed: its pre-trained model, its scores per criterion, its cells.

Every step is the pipeline's own (:mod:`pccfast.pipeline.steps`); this module only decides
where an arm x seed keeps its files and when one may be reused. Each cached file carries the
settings it was made with (the run folders' rule: :func:`pccfast.pipeline.records
.stage_settings`, plus the cell's budget) and is reused only when they equal the current ones,
so an interrupted study loses at most the epoch or the cell it was in, and a changed setting
never reuses a stale number.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..io import load as load_model
from ..io import save as save_model
from ..pipeline import steps
from ..pipeline.config import RunConfig
from ..pipeline.records import file_digest, fingerprint, stage_settings


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _same(record, settings: dict) -> bool:
    """Whether a cached record was made with ``settings`` (JSON round trip: tuples as lists)."""
    return isinstance(record, dict) and record.get("settings") == json.loads(json.dumps(settings))


def settings_of(cfg: RunConfig, stage: str) -> dict:
    """What ``stage``'s outputs depend on, as a run folder records it: the settings, the data
    files' stamps and model.init's digest (a file replaced under a study is never reused)."""
    from ..data.stamps import data_stamps

    init = Path(cfg.model.init).expanduser() if cfg.model.init else None
    digest = file_digest(init) if init is not None and init.is_file() else None
    return stage_settings(cfg.to_dict(), stage, digest, data_stamps(cfg.data.spec))


def pretrain_settings(cfg: RunConfig) -> dict:
    """What the pre-trained model depends on (data, model, run.seed, pretrain, pcc)."""
    return settings_of(cfg, "pretrain")


def with_criterion(cfg: RunConfig, criterion: str) -> RunConfig:
    return RunConfig.from_dict({"ci": {"criterion": criterion}}, base=cfg)


@dataclass
class Pretrained:
    model: torch.nn.Module
    acc: float
    val_acc: float | None
    seconds: float
    retrained: bool  # False when an earlier sitting's model was reused


def _val_acc(model, cfg, data, env) -> float | None:
    if getattr(data, "val", None) is None:
        return None
    return steps.accuracy(model, data.val_loader(cfg.finetune.batch_size, device=env.device))


def pretrained_model(work: Path, cfg: RunConfig, data, env, progress: bool) -> Pretrained:
    """The arm x seed's pre-trained model: reused from ``work`` when its settings match, else
    trained (continuing from a checkpoint of the same settings)."""
    from ..train.loop import fit

    settings = pretrain_settings(cfg)
    marker = _read_json(work / "settings.json")
    if marker is not None and not _same(marker, settings):
        shutil.rmtree(work)  # another study's intermediate files: nothing of it is reusable
    done = _read_json(work / "pretrain.json")
    if done is not None and (work / "pretrained.pt").is_file():
        return Pretrained(load_model(work / "pretrained.pt"), done["acc"], done.get("val_acc"),
                          done["seconds"], False)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "settings.json", {"settings": settings})
    started = time.perf_counter()
    model = steps.initial_model(cfg, data)
    metrics = work / "metrics.jsonl"

    def log(record):
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    result = fit(model, data, cfg.pretrain, env=env, pcc=cfg.pcc if cfg.pcc.enabled else None,
                 stage="pretrain", checkpoint=work / "checkpoints" / "pretrain.pt", resume=True,
                 log=log, progress=progress, workers=cfg.data.workers,
                 origin={"fingerprint": fingerprint(settings), "settings": settings})
    val = _val_acc(model, cfg, data, env)
    model = model.cpu().eval()
    save_model(model, work / "pretrained.pt")
    seconds = round(time.perf_counter() - started, 3)
    atomic_write_json(work / "pretrain.json", {"acc": result.test_acc, "val_acc": val,
                                               "seconds": seconds})
    return Pretrained(model, result.test_acc, val, seconds, True)


def pretrain_progress(work: Path, cfg: RunConfig) -> int | None:
    """Pre-training epochs done in ``work`` under ``cfg``'s settings (``cfg.pretrain.epochs``
    once the model is saved), or None when nothing there is reusable (for --dry-run)."""
    if not _same(_read_json(work / "settings.json"), pretrain_settings(cfg)):
        return None
    if (work / "pretrained.pt").is_file() and (work / "pretrain.json").is_file():
        return cfg.pretrain.epochs
    if not (work / "checkpoints" / "pretrain.pt").is_file():
        return 0
    epochs = set()
    try:
        with open(work / "metrics.jsonl") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(record, dict) and record.get("stage") == "pretrain":
                    epochs.add(record.get("epoch"))
    except OSError:
        return 0
    return min(len(epochs), cfg.pretrain.epochs)


def features(work: Path, model, cfg: RunConfig, data, env, images: int) -> list[dict]:
    """The feature record (:mod:`.features`) of the pre-trained model on ``images`` held images
    (the validation split when there is one, else training images other than the scores'),
    cached in ``work``."""
    from .features import feature_record

    settings = {**pretrain_settings(cfg), "study.feature_images": images}
    path = work / "features.json"
    done = _read_json(path)
    if _same(done, settings):
        return done["rows"]
    if getattr(data, "val", None) is not None:
        loader = data.val_loader(64, device=env.device)
    else:
        loader = data.calibration_loader(images, 64, seed=cfg.run.seed + 2, device=env.device)
    import copy

    rows = feature_record(copy.deepcopy(model).to(env.device), loader, images)
    atomic_write_json(path, {"settings": settings, "rows": rows})
    return rows


def scores(work: Path, criterion: str, model, cfg: RunConfig, data, env) -> dict:
    """layer -> (C,) float64 scores of ``criterion``, cached in ``work`` with their settings."""
    cfg = with_criterion(cfg, criterion)
    settings = settings_of(cfg, "scores")
    path = work / f"scores-{criterion}.pt"
    if path.is_file():
        try:
            found, meta = steps.read_scores(path, criterion)
        except ValueError:
            found, meta = None, {}
        if found is not None and _same(meta, settings):
            return found
    import copy

    found, images = steps.score_model(
        copy.deepcopy(model), data, criterion, images=cfg.ci.images,
        batch_size=cfg.ci.batch_size, seed=cfg.run.seed, env=env,
        channels_last=cfg.pretrain.channels_last, workers=cfg.data.workers)
    steps.save_scores(path, found, criterion, images, settings)
    return found


class Cell:
    """One allocation x criterion x target of an arm x seed: prune, measure, fine-tune."""

    def __init__(self, folder: Path, criterion: str, target: float, budget: dict):
        self.folder = Path(folder)
        self.criterion = criterion
        self.target = target
        self.budget = budget

    def _settings(self, cfg: RunConfig, stage: str) -> dict:
        return {**settings_of(with_criterion(cfg, self.criterion), stage),
                "study.budget": self.budget}

    def _loaders(self, cfg, data, env) -> dict:
        out = {"acc": data.test_loader(cfg.finetune.batch_size, device=env.device,
                                       workers=cfg.data.workers)}
        if getattr(data, "val", None) is not None:
            out["val_acc"] = data.val_loader(cfg.finetune.batch_size, device=env.device)
        return out

    def _measure(self, model, cfg, data, env) -> dict:
        return {key: steps.accuracy(model, loader)
                for key, loader in self._loaders(cfg, data, env).items()}

    def prune(self, model, scores: dict, cfg: RunConfig, data, env) -> dict:
        """-> accuracies right after pruning and with BatchNorm re-estimated (test, and the
        validation split when there is one), FLOPs and params removed, the kept counts
        (result.json, reused only when made with these settings)."""
        settings = self._settings(cfg, "prune")
        done = _read_json(self.folder / "result.json")
        if _same(done, settings) and (self.folder / "pruned.pt").is_file():
            return done["result"]
        if self.folder.exists():
            shutil.rmtree(self.folder)  # made with other settings: nothing of it is reusable
        started = time.perf_counter()
        pruned, plan, before, after = steps.prune_model(model, scores, data.input_size,
                                                        self.budget)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_model(pruned, self.folder / "pruned.pt")
        atomic_write_json(self.folder / "plan.json", plan.to_dict())
        pruned = pruned.to(env.device)
        raw = self._measure(pruned, cfg, data, env)
        recalibrated = steps.reestimated(
            pruned, data, images=cfg.prune.bn_images, batch_size=cfg.ci.batch_size,
            seed=cfg.run.seed + 1, env=env, channels_last=cfg.pretrain.channels_last,
            workers=cfg.data.workers)
        bn = self._measure(recalibrated, cfg, data, env)
        result = {"pruned": raw, "pruned_bn": bn,
                  "flops_removed": steps.removed(before, after, "flops"),
                  "params_removed": steps.removed(before, after, "params"),
                  "kept": steps.kept_text(plan),
                  "seconds": round(time.perf_counter() - started, 3)}
        atomic_write_json(self.folder / "result.json", {"settings": settings, "result": result})
        return result

    def finetune(self, cfg: RunConfig, data, env, progress: bool) -> dict:
        """Fine-tunes the cell's pruned model (no PCC) -> {"acc", "val_acc"?, "seconds"}
        (finetune.json, reused only when made with these settings)."""
        from ..train.loop import fit

        settings = self._settings(cfg, "finetune")
        done = _read_json(self.folder / "finetune.json")
        if _same(done, settings):
            return done["result"]
        started = time.perf_counter()
        model = load_model(self.folder / "pruned.pt")
        checkpoint = self.folder / "checkpoints" / "finetune.pt"
        origin = {"fingerprint": fingerprint(settings), "settings": settings}
        if checkpoint.is_file() and not _same(_read_json(checkpoint.with_suffix(".json")),
                                              settings):
            checkpoint.unlink()  # a fine-tuning of other settings: start afresh
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(checkpoint.with_suffix(".json"), {"settings": settings})
        fit(model, data, cfg.finetune, env=env, pcc=None, stage="finetune",
            checkpoint=checkpoint, resume=True, progress=progress, workers=cfg.data.workers,
            origin=origin)
        out = {**self._measure(model.to(env.device), cfg, data, env),
               "seconds": round(time.perf_counter() - started, 3)}
        atomic_write_json(self.folder / "finetune.json", {"settings": settings, "result": out})
        return out
