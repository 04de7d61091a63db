"""The stages of the method, each reading and writing one run folder.

    pretrain   train with the PCC regulariser (and, with --baseline, the same without it)
    scores     every scored layer's channels by ci.criterion (channel independence by default)
    prune      a per-layer plan from those scores, then physical removal of the channels
    finetune   train the pruned model (no PCC)
    evaluate   test accuracy, params and FLOPs of any saved model

Under torchrun the training stages run on every process; CI and pruning run on rank 0 while
the others wait, and every rank then loads what rank 0 wrote.

Every stage reads earlier outputs only when they were made with the current settings, and
records its own (records.py); models are stored as an architecture description and a state
dict, read with ``weights_only=True``, so nothing in a run folder is unpickled.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..models._common import RECIPE_ATTRIBUTE
from ..speed import speedup_summary
from ..train import distributed as dist_utils
from ..train.checkpoint import load_checkpoint
from ..train.distributed import DistEnv
from ..train.loop import fit
from . import steps
from .config import RunConfig, save_json
from .folder import STAGE_FILES, RunFolder
from .records import (COMMAND, STAGES, chain, differences, downstream, file_digest,
                      fingerprint, stage_settings)
from .steps import build_model, count, initial_model, load_init, removed  # noqa: F401 (API)

TRAINED = ("baseline", "pretrain", "finetune")  # the stages with checkpoints
NEEDS = {"scores": ("pretrain",), "prune": ("pretrain", "scores"), "finetune": ("prune",)}


class StageError(RuntimeError):
    """A stage cannot start: an earlier stage's output is missing."""


def save_model(model: torch.nn.Module, path: Path) -> None:
    import pccfast

    pccfast.save(model, path)


def load_model(path: Path, build=None, allow_pickle: bool = False) -> torch.nn.Module:
    """A model written by pccfast.save. build: rebuilds a model saved with a description (a
    ``package.module:factory`` model). allow_pickle: only for a user's own file (--trust-pickle),
    never for a run folder's: unpickling runs code."""
    import pccfast

    return pccfast.load(path, allow_pickle=allow_pickle, build=build)


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
        self._digest = None  # (model.init path, its SHA-256)

    def echo(self, text: str) -> None:
        if self.env.is_main and self._echo is not None:
            self._echo(text)

    @property
    def data(self):
        """The dataset, loaded once (under DDP rank 0 first, so that it alone downloads)."""
        if self._data is None:
            def load():
                return steps.load_configured_data(self.cfg, self.cfg.data.download
                                                  and self.env.is_main)

            if self.env.is_main:
                self._data = load()
            dist_utils.barrier()
            if not self.env.is_main:
                self._data = load()
            self.echo(f"data   {self._data.describe()}")
        return self._data

    def _seconds(self, stage: str, started: float) -> float:
        return round(time.perf_counter() - started, 3)

    # ------------------------------------------------------------ settings records

    def settings(self, stage: str) -> dict:
        """The settings ``stage``'s outputs depend on (records.py), from this run's config."""
        return stage_settings(self.cfg.to_dict(), stage, self._init_digest(), self._data_stamps())

    def _data_stamps(self) -> dict:
        """The data files' stamps, taken once the data is loaded (a download comes first)."""
        if getattr(self, "_stamps", None) is None:
            from ..data.stamps import data_stamps

            stamps = data_stamps(self.cfg.data.spec)
            if self._data is None:
                return stamps
            self._stamps = stamps
        return self._stamps

    def _init_digest(self) -> str | None:
        if not self.cfg.model.init:
            return None
        path = Path(self.cfg.model.init).expanduser()
        if not path.is_file():
            return None
        if self._digest is None or self._digest[0] != str(path):
            self._digest = (str(path), file_digest(path))
        return self._digest[1]

    def _mismatch(self, stage: str) -> list | None:
        """None: ``stage`` has no record; else how its record differs from these settings."""
        record = self.folder.read_records().get(stage)
        if not isinstance(record, dict):
            return None
        return differences(record.get("settings") or {}, self.settings(stage))

    def _require(self, stage: str) -> Path:
        """The output of an earlier stage, made with these settings; else a clear error."""
        path = self.folder.path(STAGE_FILES[stage][0])
        cmd = f"pccfast {COMMAND[stage]} --out {self.folder.out}"
        if not all(self.folder.path(name).is_file() for name in STAGE_FILES[stage]):
            raise StageError(f"{path} is missing: run `{cmd}` first")
        diff = self._mismatch(stage)
        if diff is None:
            raise StageError(f"{path} has no record in {self.folder.records_path} of the settings "
                             f"it was made with (left by an interrupted or older run): run "
                             f"`{cmd}` again")
        if diff:
            recorded = self.folder.read_records()[stage].get("settings") or {}
            for first in chain(stage):  # the earliest stage whose settings changed
                now = self.settings(first)
                if differences({k: recorded.get(k) for k in now}, now):
                    break
            raise ValueError(f"{path} was made with other settings: {', '.join(diff)}; run "
                             f"`pccfast {COMMAND[first]} --out {self.folder.out}` (and the stages "
                             f"after it) with these settings first, or drop what changes them")
        return path

    def _finished(self, stage: str, resume: bool) -> bool:
        """Whether ``--resume`` skips ``stage`` (it finished with these settings). Refuses when
        its outputs or its checkpoint were made with other settings."""
        if not resume:
            return False
        diff = self._mismatch(stage)
        if diff:
            raise ValueError(self._refusal(self.folder.path(STAGE_FILES[stage][0]), diff))
        if diff is not None and all(self.folder.path(n).is_file() for n in STAGE_FILES[stage]):
            return True
        ckpt = self.folder.checkpoint(stage)
        if stage in TRAINED and ckpt.is_file():
            origin = load_checkpoint(ckpt, stage=stage).get("origin") or {}
            diff = differences(origin.get("settings") or {}, self.settings(stage))
            if diff:
                raise ValueError(self._refusal(ckpt, diff))
        return False

    def _refusal(self, path: Path, diff: list) -> str:
        epochs = any(d.split("=")[0].endswith(".epochs") for d in diff)
        why = " (more epochs are a new run: the learning-rate schedule spans them all)" \
            if epochs else ""
        return (f"cannot resume: {path} was made with other settings: {', '.join(diff)}; "
                f"--resume continues a run with its own settings{why}, so drop what changes "
                f"them, or start over: a new --out, or --out {self.folder.out} without --resume "
                "(replaces its results)")

    def prepare(self, command: str, resume: bool = False) -> None:
        """What the CLI does before it writes config.json: refuses what ``command`` cannot do
        with these settings (missing or other-settings inputs, a resume that would reuse
        outputs made with other settings), then (rank 0) clears the folder for a fresh run, or
        removes outputs made with other settings that the command neither reuses nor redoes."""
        fresh = command in ("run", "demo") and not resume
        for stage in () if fresh else NEEDS.get(command, ()):
            self._require(stage)
        redone: list = []
        if resume:
            reused = {"run": STAGES, "demo": STAGES, "train": ("baseline", "pretrain"),
                      "finetune": ("finetune",)}.get(command, ())
            for stage in reused:
                if stage == "baseline":
                    if self.cfg.run.baseline:
                        self._finished(stage, True)
                elif not self._finished(stage, True):
                    break  # it and the stages after it are redone
        elif command == "train":
            redone = downstream("pretrain") + (["baseline"] if self.cfg.run.baseline else [])
        elif command in NEEDS:
            redone = downstream(command)
        if self.env.is_main:
            if fresh:
                self.folder.clear()
            else:
                for stage in STAGES:
                    diff = None if stage in redone else self._mismatch(stage)
                    if diff:
                        self.echo(f"{stage:<9} was made with other settings ({', '.join(diff)}): "
                                  "its outputs are removed")
                        self.folder.invalidate(stage)
        dist_utils.barrier()

    def _origin(self, stage: str) -> dict:
        settings = self.settings(stage)
        return {"fingerprint": fingerprint(settings), "settings": settings}

    def _record(self, stage: str) -> None:
        """Marks ``stage`` finished with these settings (rank 0; after all its outputs)."""
        if self.env.is_main:
            self.folder.write_record(stage, self.settings(stage))

    def _load(self, path: Path, allow_pickle: bool = False) -> torch.nn.Module:
        return load_model(path, build=self._build_described, allow_pickle=allow_pickle)

    def _build_described(self, description) -> torch.nn.Module:
        """The unpruned model of a file saved with a description, built from these settings
        (the trusted config names the code, never the file)."""
        model = steps.model_for_data(self.cfg, self.data)
        expected = (getattr(model, RECIPE_ATTRIBUTE, None) or {}).get("external")
        if description != expected:
            raise ValueError(f"the model file was built as {description}, these settings build "
                             f"{expected or self.cfg.model.name}")
        return model

    def _train(self, stage: str, model, train_cfg, pcc, resume: bool):
        if self.env.is_main:
            self.folder.invalidate(stage, keep_checkpoint=resume)
        dist_utils.barrier()
        return fit(model, self.data, train_cfg, env=self.env, pcc=pcc, stage=stage,
                   checkpoint=self.folder.checkpoint(stage), resume=resume,
                   log=self.folder.log_metrics, progress=self.progress,
                   workers=self.cfg.data.workers, origin=self._origin(stage))

    # ------------------------------------------------------------ stages

    def pretrain(self, resume: bool = False) -> dict:
        """Trains the baseline (with --baseline) and the PCC model from the same initial weights."""
        results = {}
        stages = (["baseline"] if self.cfg.run.baseline else []) + ["pretrain"]
        for stage in stages:
            key = "baseline_acc" if stage == "baseline" else "pcc_acc"
            path = self.folder.model_path(stage)
            if self._finished(stage, resume):
                results[key] = self.folder.read_summary()[key]
                self.echo(f"{stage:<9} done before ({100 * results[key]:.2f}%), skipped")
                continue
            started = time.perf_counter()
            model = initial_model(self.cfg, self.data)
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
                self._record(stage)
            results[key] = result.test_acc
            label = "with PCC" if pcc is not None and pcc.enabled else "without PCC"
            self.echo(f"{stage:<9} {self.cfg.pretrain.epochs} epochs {label}: test accuracy "
                      f"{100 * result.test_acc:.2f}% ({seconds:.1f} s)")
            dist_utils.barrier()
        return results

    def scores(self) -> dict:
        """Scores of every scored layer of the pretrained model by ci.criterion (CI by default)
        -> scores.pt.

        Under DDP each rank scores its shard of the calibration images and the collector
        all-reduces the sums; rank 0 writes the file."""
        source = self._require("pretrain")
        if self.env.is_main:
            self.folder.invalidate("scores")
        started = time.perf_counter()
        criterion = self.cfg.ci.criterion
        scores, images = steps.score_model(
            self._load(source), self.data, criterion, images=self.cfg.ci.images,
            batch_size=self.cfg.ci.batch_size, seed=self.cfg.run.seed, env=self.env,
            channels_last=self.cfg.pretrain.channels_last, workers=self.cfg.data.workers,
            progress=self.progress)
        seconds = self._seconds("scores", started)
        if self.env.is_main:
            steps.save_scores(self.folder.path("scores.pt"), scores, criterion, images,
                              self.settings("scores"))
            self.folder.update_summary(seconds={"scores": seconds}, score_images=images,
                                       score_layers=len(scores), score_criterion=criterion)
            self._record("scores")
        self.echo(f"scores    {criterion}: {len(scores)} layers over {images} images "
                  f"({seconds:.1f} s)")
        dist_utils.barrier()
        return scores

    ci = scores  # the stage's name before it scored by any criterion

    def read_scores(self) -> dict:
        path = self._require("scores")
        wanted = self.cfg.ci.criterion
        scores, meta = steps.read_scores(path)
        if meta.get("criterion", "ci") != wanted:
            raise ValueError(f"{path} holds {meta.get('criterion')} scores, but ci.criterion is "
                             f"{wanted}: run `pccfast scores --criterion {wanted} --out "
                             f"{self.folder.out}` first")
        return scores

    def prune(self) -> dict:
        """A plan from the scores (ci.criterion) and the budget (prune.rates / tau / target_*),
        then removal of the channels -> pruned.pt, plan.json."""
        source = self._require("pretrain")
        self._require("scores")
        budget = self.cfg.prune.budget
        if not budget:
            raise ValueError("prune needs one of --rates, --tau, --target-flops, --target-params")
        started = time.perf_counter()
        if self.env.is_main:
            self.folder.invalidate("prune")
            scores = self.read_scores()
            model = self._load(source)
            pruned, plan, before, after = steps.prune_model(
                model, scores, self.data.input_size, budget, round_to=self.cfg.prune.round_to)
            speed = (speedup_summary(model, pruned, self.data.input_size)
                     if self.cfg.prune.speed else {})
            save_model(pruned.cpu(), self.folder.model_path("prune"))
            save_json(self.folder.path("plan.json"),
                      {**_plan_json(plan), "criterion": self.cfg.ci.criterion})
        dist_utils.barrier()
        pruned = self._load(self.folder.model_path("prune")).to(self.env.device)
        acc = steps.accuracy(pruned, self._test_loader())
        out = {"pruned_acc": acc, "pruned_bn_acc": None}
        if self.cfg.prune.bn_images:
            out["pruned_bn_acc"] = self._accuracy_with_bn_recalibrated(pruned)
        seconds = self._seconds("prune", started)
        if self.env.is_main:
            out.update(params_removed=removed(before, after, "params"),
                       flops_removed=removed(before, after, "flops"),
                       params_before=before["params"], flops_before=before["flops"],
                       params_after=after["params"], flops_after=after["flops"],
                       budget=budget, **speed)
            self.folder.update_summary(seconds={"prune": seconds}, **out)
            self._record("prune")
            bn = out["pruned_bn_acc"]
            bn_text = "" if bn is None else f", {100 * bn:.2f}% with BN statistics re-estimated"
            self.echo(f"prune     {self.cfg.ci.criterion} scores, {_budget_text(budget)}: "
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
        model = steps.reestimated(
            pruned, self.data, images=self.cfg.prune.bn_images, batch_size=self.cfg.ci.batch_size,
            seed=self.cfg.run.seed + 1, env=self.env,
            channels_last=self.cfg.pretrain.channels_last, workers=self.cfg.data.workers)
        return steps.accuracy(model, self._test_loader())

    def finetune(self, resume: bool = False) -> dict:
        source = self._require("prune")
        path = self.folder.model_path("finetune")
        if self._finished("finetune", resume):
            acc = self.folder.read_summary()["finetuned_acc"]
            self.echo(f"finetune  done before ({100 * acc:.2f}%), skipped")
            return {"finetuned_acc": acc}
        started = time.perf_counter()
        model = self._load(source)
        result = self._train("finetune", model, self.cfg.finetune, None, resume)
        seconds = self._seconds("finetune", started)
        if self.env.is_main:
            save_model(model.cpu(), path)
            self.folder.update_summary(seconds={"finetune": seconds}, finetuned_acc=result.test_acc)
            self._record("finetune")
        self.echo(f"finetune  {self.cfg.finetune.epochs} epochs: test accuracy "
                  f"{100 * result.test_acc:.2f}% ({seconds:.1f} s)")
        dist_utils.barrier()
        return {"finetuned_acc": result.test_acc}

    def evaluate(self, path: Path | None = None, trusted: bool = False) -> dict:
        """Test accuracy, params and FLOPs of ``path`` (default: the latest model of the run,
        which must have been made with these settings).

        trusted: allow ``path`` (a user's own file, never the run folder's) to hold a pickled
        module."""
        if path is not None:
            path = Path(path)
        else:
            trusted = False
            for stage in ("finetune", "prune", "pretrain"):
                if self.folder.model_path(stage).is_file():
                    path = self._require(stage)
                    break
            else:
                raise StageError(f"{self.folder.out} holds no model yet: run `pccfast train` first")
        model = self._load(path, allow_pickle=trusted).to(self.env.device)
        from ..train.loop import evaluate

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
        """Every stage in order; with ``resume``, stages finished with these settings are skipped
        and an interrupted training stage continues from its checkpoint (outputs or checkpoints
        made with other settings are refused)."""
        if not getattr(self, "_checked", False):
            for note in self.check("run", resume):
                self.echo(note)
        self.pretrain(resume)
        for stage in ("scores", "prune"):
            if self._finished(stage, resume):
                self.echo(f"{stage:<9} done before, skipped")
            else:
                getattr(self, stage)()
        self.finetune(resume)
        self.report()
        return self.folder.read_summary()


def _budget_text(budget: dict) -> str:
    (key, value), = budget.items()
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
