"""Datasets for the pipeline, named by a spec string.

    digits              scikit-learn's bundled 8x8 digits upscaled to 3x32x32 (offline)
    cifar10:DIR         the CIFAR-10 python-pickle folder (download=True fetches it)
    npz:FILE            x_train/y_train/x_test/y_test arrays, or the JPEG-bytes layout
    imagefolder:DIR     DIR/train/<class>/..., DIR/val/<class>/... (ImageNet layout)

    data = load_data("npz:cifar10.npz", train_limit=5000)
    loader = data.train_loader(batch_size=128, device="cuda")
    for images, labels in loader: ...      # (b, C, H, W) float32 normalised, (b,) int64
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arrays import DataError, ImageArrays, channel_stats, check_pair, random_subset
from .loaders import ArrayLoader, FolderLoader

KINDS = ("digits", "cifar10", "npz", "imagefolder")
AUGMENTS = ("auto", "none", "crop", "crop+flip")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"npz:FILE"`` -> ("npz", "FILE"); ``"digits"`` -> ("digits", None)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data must be a spec such as 'digits' or 'npz:FILE', got {spec!r}")
    kind, sep, path = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"data kind must be one of {KINDS} (as 'kind' or 'kind:PATH'), "
                         f"got {spec!r}")
    if kind == "digits":
        if sep:
            raise ValueError(f"data 'digits' takes no path, got {spec!r}")
        return kind, None
    if not path:
        raise ValueError(f"data {kind!r} needs a path: '{kind}:PATH', got {spec!r}")
    return kind, path


@dataclass
class ArraySplits:
    """An in-memory dataset: train and test ImageArrays plus what the model and loaders need."""

    name: str
    train: ImageArrays
    test: ImageArrays
    num_classes: int
    classes: tuple[str, ...]
    pad: int
    flip: bool
    mean: tuple = field(default=())
    std: tuple = field(default=())
    val: ImageArrays | None = None  # held-out training images (load_data's val_images)

    def __post_init__(self):
        if not self.mean:
            self.mean, self.std = channel_stats(self.train.images)

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        """(1, C, H, W) of one test image."""
        return (1,) + tuple(self.test.images.shape[1:])

    def train_loader(self, batch_size, *, seed=0, device="cpu", rank=0, world_size=1,
                     channels_last=False, workers=0):
        return ArrayLoader(self.train, batch_size, train=True, mean=self.mean, std=self.std,
                           pad=self.pad, flip=self.flip, seed=seed, device=device, rank=rank,
                           world_size=world_size, channels_last=channels_last)

    def test_loader(self, batch_size, *, device="cpu", rank=0, world_size=1, channels_last=False,
                    workers=0):
        return ArrayLoader(self.test, batch_size, train=False, mean=self.mean, std=self.std,
                           device=device, rank=rank, world_size=world_size,
                           channels_last=channels_last)

    def val_loader(self, batch_size, *, device="cpu", rank=0, world_size=1, channels_last=False,
                   workers=0):
        """The held-out training images (``val_images`` of load_data), without augmentation."""
        if self.val is None:
            raise ValueError("this dataset has no validation split: load it with val_images=N "
                             "(config: [data] val_images)")
        return ArrayLoader(self.val, batch_size, train=False, mean=self.mean, std=self.std,
                           device=device, rank=rank, world_size=world_size,
                           channels_last=channels_last)

    def calibration_loader(self, images, batch_size, *, seed=0, device="cpu", rank=0,
                           world_size=1, channels_last=False, workers=0):
        """``images`` seeded-random training images without augmentation, in a fixed order
        (each DDP rank takes a contiguous shard of them)."""
        subset = random_subset(self.train, images, seed)
        per_rank = min(batch_size, max(1, len(subset) // world_size))
        return ArrayLoader(subset, per_rank * world_size, train=False, mean=self.mean,
                           std=self.std, device=device, rank=rank, world_size=world_size,
                           channels_last=channels_last)

    def describe(self) -> str:
        c, h, w = self.train.images.shape[1:]
        val = f" / {len(self.val)} validation" if self.val is not None else ""
        return (f"{self.name}: {len(self.train)} train{val} / {len(self.test)} test images of "
                f"{c}x{h}x{w}, {self.num_classes} classes")


@dataclass
class FolderSplits:
    """A dataset read from image files by torchvision (too large for memory)."""

    name: str
    train: object
    train_plain: object
    test: object
    num_classes: int
    classes: tuple[str, ...]
    crop: int

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        return (1, 3, self.crop, self.crop)

    def train_loader(self, batch_size, *, seed=0, device="cpu", rank=0, world_size=1,
                     channels_last=False, workers=4):
        return FolderLoader(self.train, batch_size, train=True, seed=seed, device=device, rank=rank,
                            world_size=world_size, channels_last=channels_last, workers=workers)

    def test_loader(self, batch_size, *, device="cpu", rank=0, world_size=1, channels_last=False,
                    workers=4):
        return FolderLoader(self.test, batch_size, train=False, device=device, rank=rank,
                            world_size=world_size, channels_last=channels_last, workers=workers)

    def calibration_loader(self, images, batch_size, *, seed=0, device="cpu", rank=0,
                           world_size=1, channels_last=False, workers=4):
        import torch
        from torch.utils.data import Subset

        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(self.train_plain), generator=g)[:images].sort().values.tolist()
        subset = Subset(self.train_plain, keep)
        per_rank = min(batch_size, max(1, len(subset) // world_size))
        return FolderLoader(subset, per_rank * world_size, train=False, device=device, rank=rank,
                            world_size=world_size, channels_last=channels_last, workers=workers)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train)} train / {len(self.test)} val images, crop "
                f"{self.crop}, {self.num_classes} classes")


def _augment_settings(augment: str, default_pad: int, default_flip: bool, pad: int | None):
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if augment == "auto":
        return (default_pad if pad is None else pad), default_flip
    if augment == "none":
        return 0, False
    return (default_pad if pad is None else pad), augment == "crop+flip"


def load_data(spec: str, *, train_limit: int | None = None, test_limit: int | None = None,
              seed: int = 0, download: bool = False, augment: str = "auto", pad: int | None = None,
              crop: int = 224, val_images: int = 0):
    """Loads the dataset ``spec`` names (see the module docstring).

    train_limit / test_limit keep a seeded random subset of that many images (for quick runs
    on class-sorted files); val_images then holds out a seeded random subset of the remaining
    training images as a validation split (``.val``, ``val_loader``). augment: "auto" (the
    dataset's usual: crop for digits, crop+flip for colour images), "none", "crop" or
    "crop+flip"; pad: the crop padding in pixels.
    Raises FileNotFoundError for missing data and DataError (a ValueError) for malformed data.
    """
    kind, path = parse_spec(spec)
    if isinstance(val_images, bool) or not isinstance(val_images, int) or val_images < 0:
        raise ValueError(f"val_images must be a non-negative integer, got {val_images!r}")
    for name, value in (("train_limit", train_limit), ("test_limit", test_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if kind == "imagefolder":
        from .imagefolder import load_imagefolder

        if val_images:
            raise ValueError("val_images: a validation split is supported for array datasets "
                             "(digits, cifar10, npz), not for imagefolder data (give it its own "
                             "val folder)")
        if augment not in ("auto", "crop+flip"):
            raise ValueError("imagefolder data uses RandomResizedCrop + flip; augment must be "
                             "'auto'")
        train, plain, test, classes = load_imagefolder(path, crop)
        if train_limit or test_limit:
            from torch.utils.data import Subset
            import torch

            g = torch.Generator().manual_seed(seed)
            if train_limit and train_limit < len(train):
                keep = torch.randperm(len(train), generator=g)[:train_limit].sort().values.tolist()
                train, plain = Subset(train, keep), Subset(plain, keep)
            if test_limit and test_limit < len(test):
                keep = torch.randperm(len(test), generator=g)[:test_limit].sort().values.tolist()
                test = Subset(test, keep)
        return FolderSplits(f"imagefolder:{path}", train, plain, test, len(classes), classes, crop)

    if kind == "digits":
        from .digits import CLASSES, load_digits_arrays

        train, test = load_digits_arrays()
        classes, default_pad, default_flip = CLASSES, 2, False
        train, test = random_subset(train, train_limit, seed), random_subset(test, test_limit, seed)
    elif kind == "cifar10":
        from .cifar10 import CLASSES, load_cifar10_arrays

        train, test = load_cifar10_arrays(path, download=download)
        classes, default_pad, default_flip = CLASSES, 4, True
        train, test = random_subset(train, train_limit, seed), random_subset(test, test_limit, seed)
    else:
        from .npz import load_npz_arrays

        train, test, classes = load_npz_arrays(path, (train_limit, test_limit), seed)
        h = int(train.images.shape[2])
        default_pad, default_flip = max(1, h // 8), int(train.images.shape[1]) == 3
    num_classes = check_pair(train, test, len(classes) if classes else None)
    val = None
    if val_images:
        train, val = _split(train, val_images, seed)
    if not classes:
        classes = tuple(str(c) for c in range(num_classes))
    pad, flip = _augment_settings(augment, default_pad, default_flip, pad)
    name = kind if path is None else f"{kind}:{path}"
    return ArraySplits(name, train, test, num_classes, tuple(classes), pad, flip, val=val)


def _split(train, val_images: int, seed: int):
    """(the rest, ``val_images`` seeded-random images of ``train``), each in file order."""
    import torch

    if val_images >= len(train):
        raise ValueError(f"val_images={val_images} leaves no training images (the training set "
                         f"has {len(train)})")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    return (train.subset(order[val_images:].sort().values),
            train.subset(order[:val_images].sort().values))


__all__ = ["ArrayLoader", "ArraySplits", "DataError", "FolderLoader", "FolderSplits",
           "ImageArrays", "KINDS", "load_data", "parse_spec"]
