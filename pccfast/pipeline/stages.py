"""The stages of the method, each reading and writing one run folder.

    pretrain   train with the PCC regulariser (and, with --baseline, the same without it)
    ci         channel independence (or ci.criterion's scores) of every scored layer
    prune      a per-layer plan from those scores, then physical removal of the channels
    finetune   train the pruned model (no PCC)
    evaluate   test accuracy, params and FLOPs of any saved model

Under torchrun the training stages run on every process; CI and pruning run on rank 0 while
the others wait, and every rank then loads what rank 0 wrote.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

from ..io import read_torch_file
from ..models._common import load_state_checked
from ..train import distributed as dist_utils
from ..train.checkpoint import atomic_torch_save
from ..train.distributed import DistEnv
from ..train.loop import evaluate, fit
from .config import RunConfig, save_json
from .folder import RunFolder


class StageError(RuntimeError):
    """A stage cannot start: an earlier stage's output is missing."""


def build_model(cfg: RunConfig, num_classes: int, in_channels: int = 3) -> torch.nn.Module:
    """A zoo model by name, or ``package.module:factory`` called as factory(num_classes=, width=,
    and in_channels= for images that are not RGB). in_channels: of the data's images."""
    kwargs = {"num_classes": num_classes}
    if cfg.model.width is not None:
        kwargs["width"] = cfg.model.width
    name = cfg.model.name
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model {name!r}: cannot import {attr} from {module_name} ({exc})") from exc
        if in_channels == 3:
            return factory(**kwargs)
        try:
            return factory(**kwargs, in_channels=in_channels)
        except TypeError as exc:
            raise TypeError(f"model {name!r}: the data has {in_channels}-channel images, and "
                            f"{attr}(..., in_channels={in_channels}) failed ({exc})") from exc
    kwargs["in_channels"] = in_channels
    from .. import models

    if hasattr(models, "create"):
        return models.create(name, **kwargs)
    if not hasattr(models, name):
        raise ValueError(f"model {name!r} is not in pccfast.models")
    return getattr(models, name)(**kwargs)


def load_init(model: torch.nn.Module, path: str) -> None:
    """Loads a state dict (a file holding one, or {"state_dict": ...}) into ``model``, strictly."""
    file = Path(path).expanduser()
    state = read_torch_file(file, "model.init state dict")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    load_state_checked(model, state, f"model.init {file}")


def save_model(model: torch.nn.Module, path: Path) -> None:
    import pccfast

    pccfast.save(model, path)


def load_model(path: Path, trusted: bool = True) -> torch.nn.Module:
    """A model written by pccfast.save. ``trusted``: the file may hold a pickled module (a model
    outside the zoo), as the run folder's own files do; unpickling runs code."""
    import pccfast

    return pccfast.load(path, allow_pickle=trusted)


def count(model: torch.nn.Module, input_size) -> dict:
    import pccfast

    model_device = next(model.parameters()).device
    counted = pccfast.count(model, input_size=tuple(input_size))
    model.to(model_device)
    return {k: int(v) for k, v in dict(counted).items()}


def removed(before: dict, after: dict, key: str) -> float:
    return 1.0 - after[key] / before[key] if before[key] else 0.0


class Pipeline:
    """One run: its settings, its folder, the process environment and the data (loaded once)."""

    def __init__(self, cfg: RunConfig, out, env: DistEnv | None = None, progress: bool = True,
                 echo=print):
        self.cfg = cfg
        self.folder = RunFolder(out)
        self.env = env or DistEnv()
        self.progress = progress
        self._echo = echo
        self._data = None

    def echo(self, text: str) -> None:
        if self.env.is_main and self._echo is not None:
            self._echo(text)

    @property
    def data(self):
        """The dataset, loaded once (under DDP rank 0 first, so that it alone downloads)."""
        if self._data is None:
            from ..data import load_data

            d = self.cfg.data

            def load():
                return load_data(d.spec, train_limit=d.train_limit, test_limit=d.test_limit,
                                 seed=self.cfg.run.seed, download=d.download and self.env.is_main,
                                 augment=d.augment, pad=d.pad, crop=d.crop)

            if self.env.is_main:
                self._data = load()
            dist_utils.barrier()
            if not self.env.is_main:
                self._data = load()
            self.echo(f"data   {self._data.describe()}")
        return self._data

    def _seconds(self, stage: str, started: float) -> float:
        return round(time.perf_counter() - started, 3)

    def _need(self, path: Path, stage_cmd: str) -> Path:
        if not path.is_file():
            raise StageError(f"{path} is missing: run `pccfast {stage_cmd} --out {self.folder.out}` first")
        return path

    def _train(self, stage: str, model, train_cfg, pcc, resume: bool):
        if not resume and self.env.is_main:
            self.folder.reset_stage(stage)
        dist_utils.barrier()
        return fit(model, self.data, train_cfg, env=self.env, pcc=pcc, stage=stage,
                   checkpoint=self.folder.checkpoint(stage), resume=resume,
                   log=self.folder.log_metrics, progress=self.progress, workers=self.cfg.data.workers)

    def _done(self, key: str, path: Path, resume: bool) -> bool:
        return resume and path.is_file() and self.folder.read_summary().get(key) is not None

    # ------------------------------------------------------------ stages

    def pretrain(self, resume: bool = False) -> dict:
        """Trains the baseline (with --baseline) and the PCC model from the same initial weights."""
        results = {}
        stages = (["baseline"] if self.cfg.run.baseline else []) + ["pretrain"]
        for stage in stages:
            key = "baseline_acc" if stage == "baseline" else "pcc_acc"
            path = self.folder.model_path(stage)
            if self._done(key, path, resume):
                results[key] = self.folder.read_summary()[key]
                self.echo(f"{stage:<9} done before ({100 * results[key]:.2f}%), skipped")
                continue
            started = time.perf_counter()
            torch.manual_seed(self.cfg.run.seed)
            model = build_model(self.cfg, self.data.num_classes, self.data.input_size[1])
            if self.cfg.model.init:
                load_init(model, self.cfg.model.init)
            pcc = None if stage == "baseline" else self.cfg.pcc
            result = self._train(stage, model, self.cfg.pretrain, pcc, resume)
            seconds = self._seconds(stage, started)
            if self.env.is_main:
                save_model(model.cpu(), path)
                fields = {key: result.test_acc}
                if stage == "pretrain":
                    counts = count(model, self.data.input_size)
                    fields.update(params_before=counts["params"], flops_before=counts["flops"],
                                  pcc_weight=self.cfg.pcc.weight)
                self.folder.update_summary(seconds={stage: seconds}, **fields)
            results[key] = result.test_acc
            label = "with PCC" if pcc is not None and pcc.enabled else "without PCC"
            self.echo(f"{stage:<9} {self.cfg.pretrain.epochs} epochs {label}: test accuracy "
                      f"{100 * result.test_acc:.2f}% ({seconds:.1f} s)")
            dist_utils.barrier()
        return results

    def ci(self) -> dict:
        """Scores of every scored layer of the pretrained model by ci.criterion (CI by default)
        -> ci_scores.pt.

        Under DDP each rank scores its shard of the calibration images and the collector
        all-reduces the sums; rank 0 writes the file."""
        import pccfast

        source = self._need(self.folder.model_path("pretrain"), "train")
        started = time.perf_counter()
        model = load_model(source).to(self.env.device).eval()
        channels_last = self.cfg.pretrain.channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        loader = self.data.calibration_loader(
            self.cfg.ci.images, self.cfg.ci.batch_size, seed=self.cfg.run.seed,
            device=self.env.device, rank=self.env.rank, world_size=self.env.world_size,
            channels_last=channels_last, workers=self.cfg.data.workers)
        criterion = self.cfg.ci.criterion
        collector = pccfast.ScoreCollector(model, criterion, max_images=self.cfg.ci.images,
                                           progress=False, seed=self.cfg.run.seed)
        try:
            with torch.no_grad():  # (taylor turns gradients on for its own backward)
                for batch, labels in _bar(loader, "ci", self.progress and self.env.is_main):
                    collector.update(batch, labels)
                    if not collector.needs_data:
                        break  # l1, random: the first batch only tells the layers
            scores = {name: s.detach().double().cpu() for name, s in collector.scores().items()}
            images = int(collector.images)
        finally:
            collector.remove()
        images = int(dist_utils.all_reduce_sum(torch.tensor([images], device=self.env.device)).item())
        seconds = self._seconds("ci", started)
        if self.env.is_main:
            atomic_torch_save({"format": "pccfast-ci-scores", "images": images, "scores": scores,
                               "criterion": criterion}, self.folder.path("ci_scores.pt"))
            self.folder.update_summary(seconds={"ci": seconds}, ci_images=images,
                                       ci_layers=len(scores), ci_criterion=criterion)
        self.echo(f"ci        {criterion}: {len(scores)} layers over {images} images ({seconds:.1f} s)")
        dist_utils.barrier()
        return scores

    def read_scores(self) -> dict:
        path = self._need(self.folder.path("ci_scores.pt"), "ci")
        blob = read_torch_file(path, "CI scores")
        if not isinstance(blob, dict) or blob.get("format") != "pccfast-ci-scores":
            raise ValueError(f"{path} is not a pccfast CI score file")
        found, wanted = blob.get("criterion", "ci"), self.cfg.ci.criterion
        if found != wanted:
            raise ValueError(f"{path} holds {found} scores, but ci.criterion is {wanted}: run "
                             f"`pccfast ci --criterion {wanted} --out {self.folder.out}` first")
        return blob["scores"]

    def prune(self) -> dict:
        """Plan from the CI scores and the criterion, remove channels -> pruned.pt, plan.json."""
        import pccfast

        source = self._need(self.folder.model_path("pretrain"), "train")
        criterion = self.cfg.prune.criterion
        if not criterion:
            raise ValueError("prune needs one of --rates, --tau, --target-flops, --target-params")
        started = time.perf_counter()
        if self.env.is_main:
            scores = self.read_scores()
            model = load_model(source).eval()
            size = self.data.input_size
            before = count(model, size)
            pruned, plan = pccfast.prune(model, scores, input_size=size, **criterion)
            after = count(pruned, size)
            save_model(pruned.cpu(), self.folder.model_path("prune"))
            save_json(self.folder.path("plan.json"),
                      {**_plan_json(plan), "criterion": self.cfg.ci.criterion})
        dist_utils.barrier()
        pruned = load_model(self.folder.model_path("prune")).to(self.env.device)
        acc = evaluate(pruned, self._test_loader())["acc"]
        out = {"pruned_acc": acc, "pruned_bn_acc": None}
        if self.cfg.prune.bn_images:
            out["pruned_bn_acc"] = self._accuracy_with_bn_recalibrated(pruned)
        seconds = self._seconds("prune", started)
        if self.env.is_main:
            out.update(params_removed=removed(before, after, "params"),
                       flops_removed=removed(before, after, "flops"),
                       params_before=before["params"], flops_before=before["flops"],
                       params_after=after["params"], flops_after=after["flops"],
                       criterion=criterion)
            self.folder.update_summary(seconds={"prune": seconds}, **out)
            bn = out["pruned_bn_acc"]
            bn_text = "" if bn is None else f", {100 * bn:.2f}% with BN statistics re-estimated"
            self.echo(f"prune     {self.cfg.ci.criterion} scores, {_criterion_text(criterion)}: "
                      f"{100 * out['params_removed']:.1f}% "
                      f"params, {100 * out['flops_removed']:.1f}% FLOPs removed; test accuracy "
                      f"{100 * acc:.2f}%{bn_text} ({seconds:.1f} s)")
        dist_utils.barrier()
        return out

    def _test_loader(self):
        return self.data.test_loader(self.cfg.finetune.batch_size, device=self.env.device,
                                     rank=self.env.rank, world_size=self.env.world_size,
                                     workers=self.cfg.data.workers)

    def _accuracy_with_bn_recalibrated(self, pruned) -> float:
        """Test accuracy of a copy of ``pruned`` whose BatchNorm statistics are re-estimated on
        prune.bn_images training images (other images than CI's: another seed)."""
        import copy

        from ..train import recalibrate_batchnorm

        model = copy.deepcopy(pruned)
        channels_last = self.cfg.pretrain.channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        loader = self.data.calibration_loader(
            self.cfg.prune.bn_images, self.cfg.ci.batch_size, seed=self.cfg.run.seed + 1,
            device=self.env.device, rank=self.env.rank, world_size=self.env.world_size,
            channels_last=channels_last, workers=self.cfg.data.workers)
        recalibrate_batchnorm(model, loader)
        return evaluate(model, self._test_loader())["acc"]

    def finetune(self, resume: bool = False) -> dict:
        source = self._need(self.folder.model_path("prune"), "prune")
        path = self.folder.model_path("finetune")
        if self._done("finetuned_acc", path, resume):
            acc = self.folder.read_summary()["finetuned_acc"]
            self.echo(f"finetune  done before ({100 * acc:.2f}%), skipped")
            return {"finetuned_acc": acc}
        started = time.perf_counter()
        model = load_model(source)
        result = self._train("finetune", model, self.cfg.finetune, None, resume)
        seconds = self._seconds("finetune", started)
        if self.env.is_main:
            save_model(model.cpu(), path)
            self.folder.update_summary(seconds={"finetune": seconds}, finetuned_acc=result.test_acc)
        self.echo(f"finetune  {self.cfg.finetune.epochs} epochs: test accuracy "
                  f"{100 * result.test_acc:.2f}% ({seconds:.1f} s)")
        dist_utils.barrier()
        return {"finetuned_acc": result.test_acc}

    def evaluate(self, path: Path | None = None, trusted: bool = False) -> dict:
        """Test accuracy, params and FLOPs of ``path`` (default: the latest model of the run).

        trusted: allow a file outside the run folder to hold a pickled module."""
        if path is not None:
            path = Path(path)
        else:
            trusted = True
            for stage in ("finetune", "prune", "pretrain"):
                if self.folder.model_path(stage).is_file():
                    path = self.folder.model_path(stage)
                    break
            else:
                raise StageError(f"{self.folder.out} holds no model yet: run `pccfast train` first")
        model = load_model(path, trusted).to(self.env.device)
        scores = evaluate(model, self.data.test_loader(self.cfg.finetune.batch_size,
                                                       device=self.env.device, rank=self.env.rank,
                                                       world_size=self.env.world_size,
                                                       workers=self.cfg.data.workers))
        counts = count(model, self.data.input_size)
        out = {"model": str(path), "acc": scores["acc"], "loss": scores["loss"],
               "images": scores["images"], **counts}
        self.echo(f"eval      {path}: test accuracy {100 * scores['acc']:.2f}% on "
                  f"{scores['images']} images, {counts['params'] / 1e6:.3f}M params, "
                  f"{counts['flops'] / 1e6:.2f}M FLOPs (MACs)")
        return out

    def report(self) -> Path | None:
        if not self.env.is_main:
            return None
        from ..report import write_report

        path = write_report(self.folder.out)
        self.echo(f"report    {path}")
        return path

    def check(self, command: str = "run", resume: bool = False) -> list[str]:
        """Checks the settings against the data and the model before any stage runs
        (:mod:`pccfast.pipeline.checks`); returns notes to print (e.g. no plots)."""
        from .checks import check_run

        notes = check_run(self, command, resume)
        self._checked = True
        return notes

    def run(self, resume: bool = False) -> dict:
        """Every stage in order; with ``resume``, finished stages are skipped and an interrupted
        training stage continues from its checkpoint."""
        if not getattr(self, "_checked", False):
            for note in self.check("run", resume):
                self.echo(note)
        self.pretrain(resume)
        summary = self.folder.read_summary()
        if not (resume and summary.get("pruned_acc") is not None
                and self.folder.model_path("prune").is_file()):
            self.ci()
            self.prune()
        else:
            self.echo("ci/prune  done before, skipped")
        self.finetune(resume)
        self.report()
        return self.folder.read_summary()


def _bar(iterable, desc: str, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                disable=not enabled, mininterval=0.1 if sys.stderr.isatty() else 10.0)


def _criterion_text(criterion: dict) -> str:
    (key, value), = criterion.items()
    return f"{key.replace('_', ' ')} {value}"


def _plan_json(plan):
    """The pruner's plan as JSON data (it offers to_dict/to_json, or is a dataclass or mapping)."""
    import dataclasses

    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    if hasattr(plan, "to_json"):
        import json

        text = plan.to_json()
        return json.loads(text) if isinstance(text, str) else text
    if dataclasses.is_dataclass(plan):
        return dataclasses.asdict(plan)
    return dict(plan)
