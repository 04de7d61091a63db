"""``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled to 3 x 32 x 32.

The 1,797 images ship inside scikit-learn, so the demo runs offline on a fresh machine. They are
upscaled bilinearly to 32 x 32 and repeated over 3 channels, the input every CIFAR-style model of
the zoo takes, and split 80/20 per class with a fixed seed (1,438 train / 359 test).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .arrays import ImageArrays, make_arrays

IMAGE_SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0
CLASSES = tuple(str(d) for d in range(10))


def load_digits_arrays(image_size: int = IMAGE_SIZE) -> tuple[ImageArrays, ImageArrays]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the vision extra
        raise ImportError(
            "the digits dataset needs scikit-learn (pip install 'pccfast[vision]')"
        ) from exc
    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    big = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    images = images.permute(0, 2, 3, 1).numpy()  # NHWC for make_arrays
    labels = bunch.target.astype(np.int64)
    rng = np.random.RandomState(SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: int(round(TEST_FRACTION * len(members)))]] = True
    train_set = make_arrays("digits train", images[~test], labels[~test], len(CLASSES))
    test_set = make_arrays("digits test", images[test], labels[test], len(CLASSES))
    return train_set, test_set
