"""``npz``: a NumPy archive in one of two layouts.

Arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test``, the images uint8 NHWC or NHW.
JPEG bytes (the layout of the shared CIFAR-10 copy): ``train_jpeg``/``test_jpeg`` (uint8, the
files concatenated), ``train_offsets``/``test_offsets`` (int64, n+1 each; image i is
``jpeg[offsets[i]:offsets[i+1]]``), ``train_labels``/``test_labels``. Either may carry
``classes`` (the class names). Labels number the classes 0..K-1, K = the classes present or
the length of ``classes``. Only the images asked for are decoded (``limit``).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .arrays import DataError, check_labels, make_arrays

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
JPEG_KEYS = ("train_jpeg", "train_offsets", "train_labels",
             "test_jpeg", "test_offsets", "test_labels")


def _decode_jpegs(name: str, blob: np.ndarray, offsets: np.ndarray,
                  indices: np.ndarray) -> np.ndarray:
    """The JPEGs at ``indices`` -> uint8 (n, H, W, 3)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if (offsets.ndim != 1 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0)
            or offsets[-1] > blob.size):
        raise DataError(
            f"npz {name}_offsets must rise from 0 to at most the {blob.size} bytes of {name}_jpeg "
            f"(got {offsets[:3].tolist()}...{offsets[-2:].tolist()}); the file may be truncated"
        )
    chunks = [blob[offsets[i]:offsets[i + 1]] for i in indices]
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg

            decoded = decode_jpeg(
                [torch.from_numpy(np.ascontiguousarray(c)) for c in chunks], mode=_rgb_mode())
        images = torch.stack(decoded).permute(0, 2, 3, 1).numpy()
    except ImportError:
        images = _decode_with_pillow(chunks)
    except RuntimeError as exc:
        images = _decode_with_pillow(chunks, name, indices, exc)
    return images


def _rgb_mode():
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB


def _decode_with_pillow(chunks, name="", indices=None, cause=None) -> np.ndarray:
    import io

    from PIL import Image

    out = []
    for k, chunk in enumerate(chunks):
        try:
            with Image.open(io.BytesIO(chunk.tobytes())) as im:
                out.append(np.asarray(im.convert("RGB")))
        except Exception as exc:
            where = f" image {indices[k]}" if indices is not None else ""
            raise DataError(f"npz {name}_jpeg{where} is not a readable JPEG ({exc})") \
                from (cause or exc)
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise DataError(f"npz {name}_jpeg images differ in size: {sorted(shapes)[:3]}")
    return np.stack(out)


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"npz: {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"npz: {path} is truncated or not a .npz archive ({exc})") from exc


def _read(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"npz: {path} array {key!r} is unreadable, the file may be truncated "
                        f"({exc})") from exc


def _class_names(archive, path: Path, train_labels: np.ndarray,
                 test_labels: np.ndarray) -> tuple[str, ...]:
    """The class names: the ``classes`` array, else "0".."K-1" for the K classes the labels use.

    Labels must number the classes 0..K-1: a stray label (say 100000 among ten classes) would
    otherwise silently build a 100001-way classifier. The check runs on the whole file, before
    any limit, so a random subset lacking a class is fine."""
    present = np.union1d(np.unique(train_labels), np.unique(test_labels))
    top = int(present[-1])
    if "classes" in archive.files:
        names = tuple(str(c) for c in _read(archive, "classes", path).reshape(-1))
        if top >= len(names):
            raise DataError(f"npz: {path} names {len(names)} classes but its labels use class "
                            f"index {top} (labels must be 0..{len(names) - 1})")
        return names
    count = len(present)
    if top != count - 1:
        gaps = np.setdiff1d(np.arange(min(top, count + 4) + 1), present)[:3].tolist()
        raise DataError(
            f"npz: {path} labels must number the classes 0..{count - 1} ({count} classes are "
            f"present), but they use class index {top} (no image has class {gaps}); renumber "
            "them, or add a 'classes' array naming every class"
        )
    only_test = np.setdiff1d(np.unique(test_labels), np.unique(train_labels))
    if only_test.size:
        raise DataError(
            f"npz: {path}: the test labels hold class {int(only_test[0])}, which no training "
            "image has (mislabelled data?); add a 'classes' array if that is intended"
        )
    return tuple(str(c) for c in range(count))


def load_npz_arrays(path: str | Path, limits: tuple[int | None, int | None] = (None, None),
                    seed: int = 0):
    """-> (train, test, class names). ``limits`` caps (train, test) at seeded random subsets."""
    path = Path(path).expanduser()
    archive = _open(path)
    with archive:
        keys = set(archive.files)
        if set(ARRAY_KEYS) <= keys:
            images = {split: _read(archive, f"x_{split}", path) for split in ("train", "test")}
            labels = {split: check_labels(f"npz y_{split}", _read(archive, f"y_{split}", path),
                                          len(images[split])) for split in ("train", "test")}
        elif set(JPEG_KEYS) <= keys:
            images = {}
            labels = {split: check_labels(f"npz {split}_labels",
                                          _read(archive, f"{split}_labels", path),
                                          len(_read(archive, f"{split}_offsets", path)) - 1)
                      for split in ("train", "test")}
        else:
            raise DataError(
                f"npz: {path} holds {sorted(keys)}; expected the arrays {', '.join(ARRAY_KEYS)} "
                f"or the JPEG layout {', '.join(JPEG_KEYS)}"
            )
        classes = _class_names(archive, path, labels["train"], labels["test"])
        loaded = []
        for split, limit in zip(("train", "test"), limits):
            keep = _pick(len(labels[split]), limit, seed)
            if images:
                x = images[split][keep]
            else:
                x = _decode_jpegs(split, _read(archive, f"{split}_jpeg", path),
                                  _read(archive, f"{split}_offsets", path), keep)
            loaded.append(make_arrays(f"npz {split}", x, labels[split][keep], len(classes)))
    return loaded[0], loaded[1], classes


def _pick(count: int, limit: int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded random sorted subset of ``limit`` (files are often class-sorted)."""
    if limit is None or limit >= count:
        return np.arange(count)
    if limit <= 0:
        raise ValueError(f"the image limit must be positive, got {limit}")
    g = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(count, generator=g)[:limit].numpy())
