"""In-memory image sets: uint8 ``(N, C, H, W)`` images with int64 labels, checked once on load.

Small datasets (digits, CIFAR-10, npz files) live whole in memory, and on the GPU when training
there, so a batch is an index, a crop and a flip on the device instead of a worker pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """The data on disk is malformed: truncated, mislabelled, of the wrong shape or type."""


@dataclass
class ImageArrays:
    """images: (N, C, H, W) uint8, labels: (N,) int64 in 0..num_classes-1."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices) -> "ImageArrays":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageArrays(self.images[indices], self.labels[indices])


def to_nchw(name: str, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC (C in 1, 3, 4) or NHW -> uint8 NCHW. ``name`` names the array in errors."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"{name} must be uint8 images (0..255), got dtype {images.dtype}")
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(
        f"{name} must have shape (N, H, W) or (N, H, W, C) with C in 1, 3 or 4, got {images.shape}"
    )


def check_labels(name: str, labels, count: int, num_classes: int | None = None) -> np.ndarray:
    """Integer labels, one per image, in 0..num_classes-1 -> int64 array."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{name} must be a 1-d array of class indices, got shape {labels.shape}")
    if labels.shape[0] != count:
        raise DataError(f"{name} has {labels.shape[0]} labels for {count} images")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise DataError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if count and labels.min() < 0:
        raise DataError(f"{name} holds a negative class index ({int(labels.min())})")
    if num_classes is not None and count and labels.max() >= num_classes:
        raise DataError(
            f"{name} holds class index {int(labels.max())}, but there are only {num_classes} "
            "classes"
        )
    return labels.astype(np.int64)


def make_arrays(name: str, images: np.ndarray, labels,
                num_classes: int | None = None) -> ImageArrays:
    """Checked ImageArrays from uint8 NHWC/NHW/NCHW-ready images and integer labels."""
    nchw = to_nchw(f"{name} images", images)
    if nchw.shape[0] == 0:
        raise DataError(f"{name} holds no images")
    checked = check_labels(f"{name} labels", labels, nchw.shape[0], num_classes)
    return ImageArrays(torch.from_numpy(np.ascontiguousarray(nchw)), torch.from_numpy(checked))


def check_pair(train: ImageArrays, test: ImageArrays, num_classes: int | None = None) -> int:
    """The train and test sets agree in image shape and classes; returns the class count."""
    if tuple(train.images.shape[1:]) != tuple(test.images.shape[1:]):
        raise DataError(
            f"train images are {tuple(train.images.shape[1:])} (C, H, W) but test images are "
            f"{tuple(test.images.shape[1:])}"
        )
    seen = int(train.labels.max()) + 1
    if num_classes is None:
        num_classes = seen
    if int(test.labels.max()) >= num_classes:
        raise DataError(
            f"the test labels hold class {int(test.labels.max())}, which the {num_classes} "
            "training classes lack (mislabelled data?)"
        )
    return num_classes


def channel_stats(images: torch.Tensor, max_images: int = 10000) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images on the 0..1 scale (over at most max_images,
    evenly strided: files are often sorted by class)."""
    stride = max(1, -(-images.shape[0] // max_images))
    sample = images[::stride].to(torch.float64) / 255.0
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def random_subset(arrays: ImageArrays, limit: int | None, seed: int) -> ImageArrays:
    """A seeded random subset of ``limit`` images (files sorted by class need a random slice)."""
    if limit is None or limit >= len(arrays):
        return arrays
    if limit <= 0:
        raise ValueError(f"the image limit must be positive, got {limit}")
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(arrays), generator=g)[:limit].sort().values
    return arrays.subset(keep)
