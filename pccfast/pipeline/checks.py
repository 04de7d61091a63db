"""What a run checks before its first stage, so that nothing it could have known fails after
minutes or hours of training: the model against the data (channels, image size, classes), the
rate list against the model's prunable layers, a budget against what pruning can remove,
``model.init`` and resumed checkpoints against the model, batch sizes against the data, the PCC
backend against the device, and the optional plotting library of the report.

Everything here reads; nothing is written (the run folder is checked by the CLI after this).
"""

from __future__ import annotations

import torch

from .._modules import eval_mode, load_state_checked
from ..plotting import plots_missing

TRAINING_COMMANDS = ("run", "demo", "train")  # commands whose first stage is (pre-)training


def check_run(pipe, command: str, resume: bool = False) -> list[str]:
    """Raises ValueError (or FileNotFoundError/ImportError) for settings that cannot work;
    returns notes worth printing before the run (e.g. a report without plots)."""
    notes = []
    if command in ("run", "demo", "report"):
        missing = plots_missing()
        if missing:
            notes.append(f"note: report.md will have no plots: {missing}")
    if command not in TRAINING_COMMANDS:
        return notes
    from ..ops.backends import resolve
    from .steps import load_init, model_for_data

    cfg, data, env = pipe.cfg, pipe.data, pipe.env
    model = model_for_data(cfg, data)
    _check_forward(model, cfg.model.name, data)
    if cfg.model.init:
        load_init(model, cfg.model.init)
    if resume:
        for stage in (["baseline"] if cfg.run.baseline else []) + ["pretrain"]:
            _check_checkpoint(pipe, stage, model)
    if cfg.pcc.enabled:
        try:
            resolve("pcc", cfg.pcc.backend, env.device)
        except ValueError as exc:
            raise ValueError(f"pcc.backend: {exc}") from exc
    _check_batches("pretrain", cfg.pretrain, data, env, model)
    if command != "train":  # (`pccfast train` alone neither prunes nor fine-tunes)
        _check_batches("finetune", cfg.finetune, data, env, model)
        check_budget(model, data.input_size, cfg.prune.budget)
    return notes


def _check_forward(model, name: str, data) -> None:
    """One test-sized zero image through the model: it takes the data's channels and size and
    has one output per class."""
    size = tuple(data.input_size)
    shown = "x".join(str(s) for s in size[1:])
    try:
        with eval_mode(model), torch.no_grad():
            out = model(torch.zeros(size))
    except Exception as exc:  # any layer's complaint about the input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"model {name} cannot take the data's {shown} (C x H x W) images "
                         f"({type(exc).__name__}: {first})") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {name} gives {got} for one {shown} image; the data has "
                         f"{data.num_classes} classes, so it must give (1, {data.num_classes})")


def _check_checkpoint(pipe, stage: str, model) -> None:
    from ..train.checkpoint import load_checkpoint

    path = pipe.folder.checkpoint(stage)
    key = "baseline_acc" if stage == "baseline" else "pcc_acc"
    done = (pipe.folder.model_path(stage).is_file()
            and pipe.folder.read_summary().get(key) is not None)
    if done or not path.is_file():  # (what Pipeline.pretrain would resume from)
        return
    ckpt = load_checkpoint(path, stage=stage)
    load_state_checked(model, ckpt["model"], f"checkpoint {path}")


def _check_batches(name: str, train_cfg, data, env, model) -> None:
    """The loaders' own checks (batch size against the images and the processes), and
    BatchNorm's need for two images per process."""
    if train_cfg.epochs == 0:
        return
    try:
        data.train_loader(train_cfg.batch_size, device=env.device, rank=env.rank,
                          world_size=env.world_size, workers=0)
    except ValueError as exc:
        raise ValueError(f"{name}.batch_size: {exc}") from exc
    bn = (torch.nn.modules.batchnorm._BatchNorm,)
    per_process = train_cfg.batch_size // env.world_size
    if per_process < 2 and any(isinstance(m, bn) for m in model.modules()):
        raise ValueError(f"{name}.batch_size gives each process {per_process} image per step; "
                         "the model's BatchNorm layers need at least 2")


def check_budget(model, input_size, budget: dict) -> None:
    """A rate list of the model's length; a budget that pruning can reach (removing all but
    one channel of every prunable layer is the most it can do)."""
    from ..prune.graph import build_graph
    from ..prune.plan import BUDGET_TOLERANCE, keep_from_rates

    graph = build_graph(model, input_size)
    if "rates" in budget:
        try:
            keep_from_rates(graph, budget["rates"])
        except ValueError as exc:
            raise ValueError(f"prune.{exc}") from exc
    for metric in ("flops", "params"):
        target = budget.get(f"target_{metric}")
        if target is None:
            continue
        before = graph.cost({})[metric]
        most = 1.0 - graph.cost({g.name: 1 for g in graph.prunable})[metric] / before
        if target > most + BUDGET_TOLERANCE:
            raise ValueError(f"prune.target_{metric}={target} cannot be met: keeping one channel "
                             f"of every prunable layer of {type(model).__name__} removes "
                             f"{most:.4f} of its {metric}")
