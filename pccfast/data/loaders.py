"""Batches for training and evaluation, single process or one shard per DDP rank.

``ArrayLoader`` serves an in-memory uint8 image set: each epoch one seeded permutation and one
set of random crops/flips is drawn for the *global* batch, and rank ``r`` of ``w`` takes the
``r``-th slice of every global batch. With a mean-reduced loss, the gradient averaged by DDP is
then exactly the gradient of one process on the whole batch (the DDP test checks this), and a
resumed run draws the same batches as an uninterrupted one.

``FolderLoader`` wraps a torch DataLoader (with a DistributedSampler under DDP) for datasets
that do not fit in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .arrays import ImageArrays

# Epoch seeds are spread apart so that (seed, epoch) pairs do not collide.
_EPOCH_STRIDE = 1_000_003


class ArrayLoader:
    """Yields ``(images, labels)`` on ``device``: images (b, C, H, W) float32, normalised.

    batch_size is the global batch; each of ``world_size`` ranks gets ``batch_size //
    world_size`` images. Training (``train=True``) shuffles, pads by ``pad`` pixels (zeros)
    and crops back at a random offset, flips horizontally when ``flip``, and drops the last
    partial global batch; evaluation keeps the order and every image, each rank taking a
    contiguous shard.
    """

    def __init__(self, arrays: ImageArrays, batch_size: int, *, train: bool, mean, std,
                 pad: int = 0, flip: bool = False, seed: int = 0, device="cpu", rank: int = 0,
                 world_size: int = 1, channels_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes "
                f"({world_size})"
            )
        if train and len(arrays) < batch_size:
            raise ValueError(
                f"batch_size ({batch_size}) exceeds the {len(arrays)} training images; "
                "lower --batch-size"
            )
        self.arrays = arrays
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.train = train
        self.pad = int(pad)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.epoch = 0
        c = arrays.images.shape[1]
        self._mean = torch.tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).reshape(1, c, 1, 1)
        self._images = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.train:
            return len(self.arrays) // self.batch_size
        return math.ceil(self._shard()[1] / self.local_batch) if self._shard()[1] else 0

    @property
    def images_per_epoch(self) -> int:
        """Images seen by all ranks together in one pass."""
        return len(self) * self.batch_size if self.train else len(self.arrays)

    def _shard(self) -> tuple[int, int]:
        n = len(self.arrays)
        start = n * self.rank // self.world_size
        return start, n * (self.rank + 1) // self.world_size - start

    def _on_device(self):
        if self._images is None:
            self._images = self.arrays.images.to(self.device)
            self._labels = self.arrays.labels.to(self.device)
            self._mean = self._mean.to(self.device)
            self._std = self._std.to(self.device)
        return self._images, self._labels

    def __iter__(self):
        images, labels = self._on_device()
        if not self.train:
            start, count = self._shard()
            for i in range(0, count, self.local_batch):
                idx = torch.arange(start + i, start + min(i + self.local_batch, count),
                                   device=self.device)
                yield self._finish(images[idx].float()), labels[idx]
            return
        g = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
        n, b = len(self.arrays), self.batch_size
        order = torch.randperm(n, generator=g)
        steps = n // b
        offsets = torch.randint(0, 2 * self.pad + 1, (steps * b, 2), generator=g)
        flips = (torch.rand(steps * b, generator=g) < 0.5 if self.flip
                 else torch.zeros(steps * b, dtype=torch.bool))
        order, offsets, flips = (t.to(self.device) for t in (order, offsets, flips))
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for s in range(steps):
            part = slice(s * b + lo, s * b + hi)
            idx = order[part]
            yield self._finish(self._augment(images[idx], offsets[part], flips[part])), labels[idx]

    def _augment(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """x: (b, C, H, W) uint8 -> (b, C, H, W) float, padded+cropped and flipped per image."""
        b, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x.float(), (p, p, p, p)) if p else x.float()
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        rows = offsets[:, :1] + ar_h  # (b, H)
        cols = torch.where(flips[:, None], offsets[:, 1:] + (w - 1 - ar_w), offsets[:, 1:] + ar_w)
        n = torch.arange(b, device=x.device)[:, None, None]
        out = padded[n, :, rows[:, :, None], cols[:, None, :]]  # (b, H, W, C): channels_last order
        return out.permute(0, 3, 1, 2)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x / 255.0 - self._mean) / self._std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


class FolderLoader:
    """A DataLoader over a torchvision dataset that yields batches already on ``device``."""

    def __init__(self, dataset, batch_size: int, *, train: bool, seed: int = 0, device="cpu",
                 rank: int = 0, world_size: int = 1, channels_last: bool = False, workers: int = 4):
        from torch.utils.data import (DataLoader, DistributedSampler, RandomSampler,
                                      SequentialSampler)

        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by the number of processes "
                f"({world_size})"
            )
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.batch_size = batch_size
        if not train and world_size > 1:  # a contiguous shard: every image counted once
            from torch.utils.data import Subset

            n = len(dataset)
            dataset = Subset(dataset, range(n * rank // world_size, n * (rank + 1) // world_size))
            self.sampler = SequentialSampler(dataset)
        elif world_size > 1:
            self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed,
                                              drop_last=True)
        elif train:
            self.sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        else:
            self.sampler = SequentialSampler(dataset)
        self.seed = seed
        self.loader = DataLoader(dataset, batch_size=batch_size // world_size, sampler=self.sampler,
                                 num_workers=workers, pin_memory=self.device.type == "cuda",
                                 drop_last=train, persistent_workers=workers > 0)
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        elif hasattr(self.sampler, "generator") and self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self.seed * _EPOCH_STRIDE + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def images_per_epoch(self) -> int:
        return len(self.loader) * self.batch_size if self.loader.drop_last else len(self.dataset)

    def __iter__(self):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
            yield x, y.to(self.device, non_blocking=True)
