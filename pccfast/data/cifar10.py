"""``cifar10``: the standard python-pickle folder (``cifar-10-batches-py``), downloaded on request.

Reads ``data_batch_1..5`` and ``test_batch``; DIR may be that folder or its parent. With
``download=True`` a missing folder is fetched (and MD5-checked) by torchvision first.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .arrays import DataError, ImageArrays, make_arrays

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGES_PER_BATCH_FILE = 10000


def _folder(root: Path) -> Path:
    return root if (root / TRAIN_FILES[0]).exists() or root.name == FOLDER else root / FOLDER


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"cifar10: {path} is missing (expected the python version of CIFAR-10: "
            f"{', '.join(TRAIN_FILES + TEST_FILES)}); pass --download to fetch it"
        )
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (EOFError, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise DataError(f"cifar10: {path} is truncated or not a CIFAR pickle ({exc})") from exc
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise DataError(f"cifar10: {path} lacks the 'data' and 'labels' entries of a CIFAR batch")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"cifar10: {path} 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NHWC
    return images, np.asarray(entry["labels"])


def load_cifar10_arrays(root: str | Path,
                        download: bool = False) -> tuple[ImageArrays, ImageArrays]:
    root = Path(root).expanduser()
    folder = _folder(root)
    if download and not all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES):
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root if folder.parent == root else folder.parent), download=True)
        folder = _folder(root)
    splits = []
    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        parts = [_read_batch(folder / f) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([np.asarray(p[1]).reshape(-1) for p in parts]) if parts else None
        for (imgs, labs), f in zip(parts, files):
            if len(imgs) != len(labs):
                raise DataError(f"cifar10: {folder / f} holds {len(imgs)} images and "
                                f"{len(labs)} labels")
        splits.append(make_arrays(f"cifar10 {split}", images, labels, len(CLASSES)))
    return splits[0], splits[1]
