"""The work of one arm x seed: its pre-trained model, its scores per criterion, its cells.

Each piece lives in the arm x seed's work folder and is reused when it is there with the same
settings (a settings hash is written before any of it), so an interrupted study loses at most
the epoch or the cell it was in.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..io import read_torch_file
from ..train.checkpoint import atomic_torch_save
from .config import non_default, settings_hash

SCORES_FORMAT = "pccfast-study-scores"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pretrain_settings(cfg) -> dict:
    """What the pre-trained model depends on."""
    tree = non_default(cfg.to_dict())
    return {k: tree.get(k, {}) for k in ("data", "model", "pretrain", "pcc")} | {"seed": cfg.run.seed}


@dataclass
class Pretrained:
    model: torch.nn.Module
    acc: float
    seconds: float
    retrained: bool  # False when an earlier sitting's model was reused


def pretrained_model(work: Path, cfg, data, env, progress: bool) -> Pretrained:
    """The arm x seed's pre-trained model: reused from ``work`` when its settings match, else
    trained (continuing from a checkpoint of the same settings)."""
    import pccfast

    from ..pipeline.stages import build_model, load_init
    from ..train.loop import fit

    h = settings_hash(pretrain_settings(cfg))
    marker = _read_json(work / "settings.json")
    if marker is not None and marker.get("hash") != h:
        shutil.rmtree(work)  # another study's intermediate files: nothing of it is reusable
    done = _read_json(work / "pretrain.json")
    if done is not None and (work / "pretrained.pt").is_file():
        return Pretrained(pccfast.load(work / "pretrained.pt"), done["acc"], done["seconds"], False)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "settings.json", {"hash": h, "settings": pretrain_settings(cfg)})
    started = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, data.num_classes)
    if cfg.model.init:
        load_init(model, cfg.model.init)
    metrics = work / "metrics.jsonl"

    def log(record):
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    result = fit(model, data, cfg.pretrain, env=env, pcc=cfg.pcc if cfg.pcc.enabled else None,
                 stage="pretrain", checkpoint=work / "checkpoints" / "pretrain.pt", resume=True,
                 log=log, progress=progress, workers=cfg.data.workers)
    model = model.cpu().eval()
    pccfast.save(model, work / "pretrained.pt")
    seconds = round(time.perf_counter() - started, 3)
    atomic_write_json(work / "pretrain.json", {"acc": result.test_acc, "seconds": seconds})
    return Pretrained(model, result.test_acc, seconds, True)


def scores(work: Path, criterion: str, model, cfg, data, env, seed: int) -> dict:
    """layer -> (C,) float64 scores of ``criterion``, cached in ``work``."""
    from ..prune.scores import collect_scores

    path = work / f"scores-{criterion}.pt"
    if path.is_file():
        blob = read_torch_file(path, "study scores")
        if isinstance(blob, dict) and blob.get("format") == SCORES_FORMAT:
            return blob["scores"]
    loader = data.calibration_loader(cfg.ci.images, cfg.ci.batch_size, seed=seed,
                                     device=env.device, workers=cfg.data.workers)
    found = collect_scores(copy.deepcopy(model).to(env.device), loader, criterion,
                           max_images=cfg.ci.images, seed=seed)
    found = {name: s.detach().to("cpu", torch.float64) for name, s in found.items()}
    atomic_torch_save({"format": SCORES_FORMAT, "criterion": criterion, "scores": found}, path)
    return found


class Cell:
    """One criterion x target of an arm x seed: prune, measure, and (if marked) fine-tune."""

    def __init__(self, folder: Path, criterion: str, target: float):
        self.folder = Path(folder)
        self.criterion = criterion
        self.target = target

    def _test_loader(self, cfg, data, env):
        return data.test_loader(cfg.finetune.batch_size, device=env.device,
                                workers=cfg.data.workers)

    def prune(self, model, scores: dict, cfg, data, env) -> dict:
        """-> pruned/pruned_bn accuracies, FLOPs and params removed (result.json)."""
        import pccfast

        from ..train import recalibrate_batchnorm
        from ..train.loop import evaluate

        done = _read_json(self.folder / "result.json")
        if done is not None and (self.folder / "pruned.pt").is_file():
            return done
        started = time.perf_counter()
        size = data.input_size
        before = pccfast.count(model, size)
        pruned, plan = pccfast.prune(copy.deepcopy(model).eval(), scores, input_size=size,
                                     target_flops=self.target)
        after = pccfast.count(pruned, size)
        self.folder.mkdir(parents=True, exist_ok=True)
        pccfast.save(pruned, self.folder / "pruned.pt")
        atomic_write_json(self.folder / "plan.json", plan.to_dict())
        pruned = pruned.to(env.device)
        raw = evaluate(pruned, self._test_loader(cfg, data, env))["acc"]
        recalibrated = copy.deepcopy(pruned)
        loader = data.calibration_loader(cfg.prune.bn_images, cfg.ci.batch_size,
                                         seed=cfg.run.seed + 1, device=env.device,
                                         workers=cfg.data.workers)
        recalibrate_batchnorm(recalibrated, loader)
        bn = evaluate(recalibrated, self._test_loader(cfg, data, env))["acc"]
        result = {"pruned_acc": raw, "pruned_bn_acc": bn,
                  "flops_removed": 1.0 - after["flops"] / before["flops"],
                  "params_removed": 1.0 - after["params"] / before["params"],
                  "seconds": round(time.perf_counter() - started, 3)}
        atomic_write_json(self.folder / "result.json", result)
        return result

    def finetune(self, cfg, data, env, progress: bool) -> dict:
        """Fine-tunes the cell's pruned model (no PCC) -> {"acc", "seconds"} (finetune.json)."""
        import pccfast

        from ..train.loop import fit

        done = _read_json(self.folder / "finetune.json")
        if done is not None:
            return done
        started = time.perf_counter()
        model = pccfast.load(self.folder / "pruned.pt")
        result = fit(model, data, cfg.finetune, env=env, pcc=None, stage="finetune",
                     checkpoint=self.folder / "checkpoints" / "finetune.pt", resume=True,
                     progress=progress, workers=cfg.data.workers)
        out = {"acc": result.test_acc, "seconds": round(time.perf_counter() - started, 3)}
        atomic_write_json(self.folder / "finetune.json", out)
        return out
