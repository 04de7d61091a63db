"""``imagefolder``: the ImageNet layout, ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*``.

Read by torchvision's ImageFolder with the usual augmentations (RandomResizedCrop + flip for
training; resize to 256/224 of the crop size and a centre crop for evaluation).
"""

from __future__ import annotations

from pathlib import Path

from .arrays import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_NAMES = ("val", "validation", "test")


def _split_dirs(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} is not a directory")
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} has no train/ folder "
                                "(expected DIR/train/<class>/...)")
    for name in VAL_NAMES:
        if (root / name).is_dir():
            return train, root / name
    raise FileNotFoundError(f"imagefolder: {root} has no val/ folder "
                            "(expected DIR/val/<class>/...)")


def transforms_for(crop: int, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(round(crop * 256 / 224))), T.CenterCrop(crop)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def load_imagefolder(root: str | Path, crop: int = 224):
    """-> (train dataset, eval-transform train dataset, val dataset, class names)."""
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = _split_dirs(Path(root).expanduser())
    try:
        train = ImageFolder(str(train_dir), transform=transforms_for(crop, True))
        train_plain = ImageFolder(str(train_dir), transform=transforms_for(crop, False))
        val = ImageFolder(str(val_dir), transform=transforms_for(crop, False))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"imagefolder: {exc}") from exc
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DataError(
            f"imagefolder: {train_dir} and {val_dir} name different classes "
            f"(only in train: {only_train}, only in val: {only_val})"
        )
    return train, train_plain, val, tuple(train.classes)
