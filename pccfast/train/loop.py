"""The training loop shared by pre-training (with the PCC regulariser) and fine-tuning.

    result = fit(model, data, TrainConfig(epochs=3), pcc=PCCConfig(weight=0.05),
                 checkpoint="run/checkpoints/pretrain.pt", log=metrics.write)

One process or DDP under torchrun (the model is wrapped here; ``model`` itself is trained in
place and stays unwrapped). Each epoch ends with an evaluation, one metrics record (passed to
``log``) and an atomic checkpoint; ``resume=True`` continues from the checkpoint exactly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import load_state_checked
from . import distributed as dist_utils
from .checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .config import PCCConfig, TrainConfig
from .distributed import DistEnv
from .schedule import lr_at

# How often (in steps) the progress bar reads the running loss back from the device.
PROGRESS_EVERY = 10


@dataclass
class FitResult:
    history: list = field(default_factory=list)  # one metrics record per epoch
    test_acc: float | None = None
    seconds: float = 0.0  # wall time of the epochs run in this call


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device=None, amp: str = "none") -> dict:
    """Top-1 accuracy and mean cross-entropy over ``loader`` (summed over DDP ranks).

    -> {"acc": fraction in [0, 1], "loss": float, "images": int}
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images)
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += labels.numel()
    dist_utils.all_reduce_sum(sums)
    model.train(was_training)
    count = max(1.0, float(sums[2]))
    return {"acc": float(sums[1]) / count, "loss": float(sums[0]) / count, "images": int(sums[2])}


def _prepare(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels
    model.to(env.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _wrap(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    wrapped = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _regularizer(model: nn.Module, pcc: PCCConfig | None):
    if pcc is None or not pcc.enabled:
        return None
    from ..regularizer import PCCRegularizer

    return PCCRegularizer(model, weight=pcc.weight, mode=pcc.mode, options=pcc.options,
                          backend=pcc.backend, check_finite=False)


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar (loss, accuracy, images/s); redrawn every 10 s when stderr is no terminal."""
    import sys

    from tqdm.auto import tqdm

    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False,
                disable=not enabled, mininterval=interval)


def fit(model: nn.Module, data, cfg: TrainConfig, *, env: DistEnv | None = None,
        pcc: PCCConfig | None = None, stage: str = "train", checkpoint=None, resume: bool = False,
        log=None, progress: bool = True, workers: int = 0, origin: dict | None = None) -> FitResult:
    """Trains ``model`` in place for ``cfg.epochs`` epochs on ``data`` (an
    ArraySplits/FolderSplits).

    checkpoint: path of the stage's checkpoint, rewritten atomically after every epoch (rank 0).
    resume: continue from that checkpoint when it exists (model, optimiser, scaler, epoch,
    history, RNG), else start afresh. log: called with each epoch's metrics record on rank 0.
    origin: stored in the checkpoint ({"fingerprint": ..., ...}); resume refuses a checkpoint
    whose fingerprint differs (one left by a run with other settings).
    """
    env = env or DistEnv()
    if cfg.sync_bn and env.distributed:
        if env.device.type != "cuda":
            raise ValueError("sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = _prepare(model, cfg, env)
    reg = _regularizer(model, pcc)
    base_lr = cfg.scaled_lr
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0,
                                weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type) if cfg.amp == "fp16" else None
    history: list = []
    start_epoch = 0
    if resume and checkpoint is not None and _exists(checkpoint):
        ckpt = load_checkpoint(checkpoint, stage=stage,
                               fingerprint=(origin or {}).get("fingerprint"))
        load_state_checked(model, ckpt["model"], f"checkpoint {checkpoint}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
        set_rng_state(ckpt["rng"])
    wrapped = _wrap(model, cfg, env)
    train_loader = data.train_loader(cfg.batch_size, seed=cfg.seed, device=env.device,
                                     rank=env.rank, world_size=env.world_size,
                                     channels_last=cfg.channels_last, workers=workers)
    test_loader = data.test_loader(cfg.batch_size, device=env.device, rank=env.rank,
                                   world_size=env.world_size, channels_last=cfg.channels_last,
                                   workers=workers)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    result = FitResult(history=history)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            record = _train_epoch(wrapped, model, reg, optimizer, scaler, train_loader, cfg, env,
                                  epoch, steps_per_epoch, total_steps, warmup_steps, base_lr,
                                  stage, progress)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                scores = evaluate(model, test_loader, device=env.device, amp=cfg.amp)
                record.update(test_acc=scores["acc"], test_loss=scores["loss"])
            history.append(record)
            if env.is_main:
                if log is not None:
                    log(record)
                if checkpoint is not None:
                    save_checkpoint(checkpoint, stage=stage, epoch=epoch + 1, model=model,
                                    optimizer=optimizer, scaler=scaler, history=history,
                                    config=asdict(cfg), origin=origin)
            dist_utils.barrier()
    finally:
        if reg is not None:
            reg.remove()
        if cfg.sync_bn and env.distributed:
            _revert_sync_bn(model)
    result.seconds = time.perf_counter() - started
    last = [h["test_acc"] for h in history if h.get("test_acc") is not None]
    if last and cfg.epochs > 0:
        result.test_acc = last[-1]
    else:
        result.test_acc = evaluate(model, test_loader, device=env.device, amp=cfg.amp)["acc"]
    return result


def _revert_sync_bn(model: nn.Module) -> None:
    """SyncBatchNorm layers back to BatchNorm2d (same state) so the model saves and prunes."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.SyncBatchNorm):
                bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device)
                bn.load_state_dict(child.state_dict())
                setattr(parent, name, bn)


def _exists(path) -> bool:
    from pathlib import Path

    return Path(path).is_file()


def _train_epoch(wrapped, model, reg, optimizer, scaler, loader, cfg, env, epoch, steps_per_epoch,
                 total_steps, warmup_steps, base_lr, stage, progress) -> dict:
    device = env.device
    loader.set_epoch(epoch)
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce sum, correct, count, pcc sum
    bar = _progress(steps_per_epoch, f"{stage} {epoch + 1}/{cfg.epochs}", progress and env.is_main)
    t0 = time.perf_counter()
    lr = base_lr
    seen = 0
    for i, (images, labels) in enumerate(loader):
        step = epoch * steps_per_epoch + i
        lr = lr_at(step, total_steps, base_lr, warmup_steps, cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, cfg.amp):
            logits = wrapped(images)
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            loss = ce
            if reg is not None:
                term = reg.loss()
                loss = ce + term.float()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        n = labels.numel()
        with torch.no_grad():
            sums[0] += ce.detach().double() * n
            sums[1] += (logits.detach().argmax(1) == labels).sum()
            sums[2] += n
            if reg is not None:
                sums[3] += reg.mean_score.double() * n
        seen += n * env.world_size
        bar.update(1)
        if bar.disable is False and (i % PROGRESS_EVERY == 0 or i + 1 == steps_per_epoch):
            local = sums.tolist()
            elapsed = max(time.perf_counter() - t0, 1e-9)
            post = {"loss": f"{local[0] / max(local[2], 1):.3f}",
                    "acc": f"{local[1] / max(local[2], 1):.3f}",
                    "img/s": f"{seen / elapsed:.0f}"}
            if reg is not None:
                post["pcc"] = f"{local[3] / max(local[2], 1):.3f}"
            bar.set_postfix(post, refresh=False)
    bar.close()
    dist_utils.all_reduce_sum(sums)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    count = max(1.0, float(sums[2]))
    record = {
        "stage": stage,
        "epoch": epoch + 1,
        "epochs": cfg.epochs,
        "lr": lr,
        "train_loss": float(sums[0]) / count,
        "train_acc": float(sums[1]) / count,
        "images_per_s": float(sums[2]) / max(seconds, 1e-9),
        "seconds": seconds,
    }
    if reg is not None:
        record["pcc"] = float(sums[3]) / count
    return record
