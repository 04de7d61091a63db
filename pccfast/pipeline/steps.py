"""The method's steps as plain functions, shared by every caller.

A run (:mod:`pccfast.pipeline.stages`) and a study (:mod:`pccfast.study`) are different callers
of the same steps: build the model for the data, score its channels, prune to a budget,
re-estimate BatchNorm statistics, measure accuracy. Each takes its inputs as arguments and
returns values; the callers decide where files go and when a cached result may be reused.
Fine-tuning is :func:`pccfast.train.loop.fit` for both.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import torch

from .._modules import load_state_checked
from ..io import read_torch_file
from ..models._common import RECIPE_ATTRIBUTE, record_description
from ..train import distributed as dist_utils
from ..train.loop import evaluate

OLD_SCORES_FORMAT = "pccfast-ci-scores"  # run folders of pccfast before one score format


# ----------------------------------------------------------------------------- data, models
def load_configured_data(cfg, download: bool | None = None):
    """The dataset of ``cfg.data`` (subsets and validation split seeded by run.seed).
    download: override data.download (under DDP only rank 0 downloads)."""
    from ..data import load_data

    d = cfg.data
    return load_data(d.spec, train_limit=d.train_limit, test_limit=d.test_limit,
                     seed=cfg.run.seed, download=d.download if download is None else download,
                     augment=d.augment, pad=d.pad, crop=d.crop, val_images=d.val_images)


def build_model(cfg, num_classes: int, in_channels: int) -> torch.nn.Module:
    """A zoo model by name, or ``package.module:factory`` called as factory(num_classes=, width=,
    and in_channels= for images that are not RGB). in_channels: of the data's images (see
    :func:`model_for_data`, which reads both from the data)."""
    kwargs = {"num_classes": num_classes}
    if cfg.model.width is not None:
        kwargs["width"] = cfg.model.width
    name = cfg.model.name
    if ":" not in name:
        from .. import models

        return models.create(name, **kwargs, in_channels=in_channels)
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {name!r}: cannot import {attr} from {module_name} "
                         f"({exc})") from exc
    if in_channels == 3:
        model = factory(**kwargs)
    else:
        try:
            model = factory(**kwargs, in_channels=in_channels)
        except TypeError as exc:
            raise TypeError(f"model {name!r}: the data has {in_channels}-channel images, and "
                            f"{attr}(..., in_channels={in_channels}) failed ({exc})") from exc
        kwargs["in_channels"] = in_channels
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model {name!r}: {attr}() returned a {type(model).__name__}, "
                        "not a torch.nn.Module")
    if getattr(model, RECIPE_ATTRIBUTE, None) is None:  # saved as description + weights
        record_description(model, {"model": name, **kwargs})
    return model


def model_for_data(cfg, data) -> torch.nn.Module:
    """The configured model, its classes and input channels taken from ``data``."""
    return build_model(cfg, data.num_classes, data.input_size[1])


def load_init(model: torch.nn.Module, path: str) -> None:
    """Loads a state dict (a file holding one, or {"state_dict": ...}) into ``model``, strictly."""
    file = Path(path).expanduser()
    state = read_torch_file(file, "model.init state dict")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    load_state_checked(model, state, f"model.init {file}")


def initial_model(cfg, data) -> torch.nn.Module:
    """The model pre-training starts from: seeded by run.seed, then model.init if given (the
    same initial weights for every arm of a seed)."""
    torch.manual_seed(cfg.run.seed)
    model = model_for_data(cfg, data)
    if cfg.model.init:
        load_init(model, cfg.model.init)
    return model


def count(model: torch.nn.Module, input_size) -> dict:
    """:func:`pccfast.count` as plain ints, leaving the model on its device."""
    from ..prune.counting import count as count_model

    model_device = next(model.parameters()).device
    counted = count_model(model, input_size=tuple(input_size))
    model.to(model_device)
    return {k: int(v) for k, v in dict(counted).items()}


def removed(before: dict, after: dict, key: str) -> float:
    return 1.0 - after[key] / before[key] if before[key] else 0.0


# ----------------------------------------------------------------------------- scores
def score_model(model, data, criterion: str, *, images: int, batch_size: int, seed: int,
                env, channels_last: bool = False, workers: int = 0,
                progress: bool = False) -> tuple[dict, int]:
    """``layer -> (C,) float64`` scores of ``criterion`` on ``images`` calibration images, and
    the number of images seen (summed over DDP ranks: each rank scores its shard and the
    collector all-reduces the sums). ``model`` is scored in eval mode on ``env.device``."""
    from ..prune.scores import ScoreCollector

    model = model.to(env.device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = data.calibration_loader(images, batch_size, seed=seed, device=env.device,
                                     rank=env.rank, world_size=env.world_size,
                                     channels_last=channels_last, workers=workers)
    collector = ScoreCollector(model, criterion, max_images=images, progress=False,
                                       seed=seed)
    try:
        with torch.no_grad():  # (taylor turns gradients on for its own backward)
            for batch, labels in _bar(loader, "scores", progress and env.is_main):
                collector.update(batch, labels)
                if not collector.needs_data:
                    break  # l1, random: the first batch only tells the layers
        scores = {name: s.detach().double().cpu() for name, s in collector.scores().items()}
        seen = int(collector.images)
    finally:
        collector.remove()
    seen = int(dist_utils.all_reduce_sum(torch.tensor([seen], device=env.device)).item())
    return scores, seen


def save_scores(path, scores: dict, criterion: str, images: int, settings: dict | None = None):
    """The one score-file format (:func:`pccfast.prune.save_scores`), with what made it."""
    from ..prune.scores import save_scores as write

    write(scores, path, criterion=criterion, images=images, settings=settings or {})


def read_scores(path, criterion: str | None = None) -> tuple[dict, dict]:
    """(scores, meta) of a score file; ``criterion``: refuse scores of another criterion.
    Reads the score files of older run folders too."""
    from ..prune.scores import SCORES_FORMAT

    blob = read_torch_file(path, "scores")
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt == OLD_SCORES_FORMAT:
        meta = {"criterion": blob.get("criterion", "ci"), "images": blob.get("images")}
    elif fmt == SCORES_FORMAT and isinstance(blob.get("meta"), dict):
        meta = blob["meta"]
    else:
        raise ValueError(f"{path} is not a pccfast score file")
    found = meta.get("criterion", "ci")
    if criterion is not None and found != criterion:
        raise ValueError(f"{path} holds {found} scores, not {criterion} scores")
    return dict(blob["scores"]), meta


# ----------------------------------------------------------------------------- pruning
def prune_model(model, scores: dict, input_size, budget: dict, round_to: int = 1):
    """A pruned copy of ``model`` -> (pruned, plan, counts before, counts after).

    budget: the keyword arguments of :func:`pccfast.prune` that say how much to remove
    (``{"target_flops": 0.846}``, ``{"rates": "...", "target_flops": ...}``, ``{"tau": 0.6}``);
    round_to: every pruned group keeps a multiple of this many channels."""
    from ..prune.pruner import prune

    model = copy.deepcopy(model).cpu().eval()
    before = count(model, input_size)
    pruned, plan = prune(model, scores, input_size=tuple(input_size), round_to=round_to,
                         **budget)
    return pruned, plan, before, count(pruned, input_size)


def kept_text(plan) -> str:
    """Each pruned group's kept channel count, in plan order: ``"12-12-24-..."`` (the study
    records it so that anyone can check two rows kept the same counts)."""
    return "-".join(str(layer.width_after) for layer in plan.layers)


def reestimated(model, data, *, images: int, batch_size: int, seed: int, env,
                channels_last: bool = False, workers: int = 0):
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``images`` training
    images (seed: choose other images than the scores'), in eval mode."""
    from ..train import recalibrate_batchnorm

    model = copy.deepcopy(model).to(env.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = data.calibration_loader(images, batch_size, seed=seed, device=env.device,
                                     rank=env.rank, world_size=env.world_size,
                                     channels_last=channels_last, workers=workers)
    recalibrate_batchnorm(model, loader)
    return model


def accuracy(model, loader) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (summed over DDP ranks)."""
    return evaluate(model, loader)["acc"]


def _bar(iterable, desc: str, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                disable=not enabled, mininterval=0.1 if sys.stderr.isatty() else 10.0)
