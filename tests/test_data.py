"""Datasets and loaders: every layout loads the right pixels and labels, bad data fails clearly,
and the DDP shards of a global batch are exactly the single-process batch."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pccfast.data import ArrayLoader, DataError, ImageArrays, load_data, parse_spec
from pccfast.data.arrays import channel_stats

SHARED_CIFAR = Path("/work/shared/data/cifar10_jpeg.npz")


def _rng(seed=0):
    return np.random.RandomState(seed)


def _write_arrays_npz(path, n_train=37, n_test=11, shape=(9, 7, 3), classes=4, seed=0, **extra):
    rng = _rng(seed)
    arrays = {
        "x_train": rng.randint(0, 256, (n_train,) + shape).astype(np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.randint(0, 256, (n_test,) + shape).astype(np.uint8),
        "y_test": rng.randint(0, classes, n_test),
    }
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


# ---------------------------------------------------------------- specs and digits

def test_parse_spec():
    assert parse_spec("digits") == ("digits", None)
    assert parse_spec("npz:/a/b:c.npz") == ("npz", "/a/b:c.npz")
    with pytest.raises(ValueError, match="kind must be one of"):
        parse_spec("mnist:/x")
    with pytest.raises(ValueError, match="needs a path"):
        parse_spec("npz")
    with pytest.raises(ValueError, match="takes no path"):
        parse_spec("digits:/x")


def test_digits_split_is_fixed_balanced_and_upscaled():
    data = load_data("digits")
    assert data.train.images.shape == (1438, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (359, 3, 32, 32)
    assert data.num_classes == 10 and data.input_size == (1, 3, 32, 32)
    counts = torch.bincount(data.test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # 20% of each class (174..183 images)
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2])  # grey over 3 channels
    assert data.train.images.max() > 200 and data.train.images.min() == 0
    again = load_data("digits")
    assert torch.equal(again.test.labels, data.test.labels)
    assert data.pad == 2 and data.flip is False  # no mirror images of digits


# ---------------------------------------------------------------- npz, arrays layout

@pytest.mark.parametrize("shape", [(9, 7, 3), (9, 7), (9, 7, 1)])
def test_npz_arrays_layout_keeps_pixels(tmp_path, shape):
    arrays = _write_arrays_npz(tmp_path / "d.npz", shape=shape)
    data = load_data(f"npz:{tmp_path / 'd.npz'}")
    c = shape[2] if len(shape) == 3 else 1
    assert data.train.images.shape == (37, c, 9, 7)
    x = arrays["x_train"].reshape(37, 9, 7, c)
    assert np.array_equal(data.train.images.permute(0, 2, 3, 1).numpy(), x)
    assert np.array_equal(data.test.labels.numpy(), arrays["y_test"])
    assert data.num_classes == 4 and data.classes == ("0", "1", "2", "3")
    assert data.flip is (c == 3)


def test_npz_limits_pick_a_random_subset(tmp_path):
    arrays = _write_arrays_npz(tmp_path / "d.npz", n_train=40, classes=4)
    arrays_sorted = dict(arrays, y_train=np.sort(arrays["y_train"]))  # class-sorted like the copy
    np.savez(tmp_path / "s.npz", **arrays_sorted)
    data = load_data(f"npz:{tmp_path / 's.npz'}", train_limit=12, test_limit=5, seed=3)
    assert len(data.train) == 12 and len(data.test) == 5
    assert len(torch.unique(data.train.labels)) >= 3  # not the first 12 (all class 0)
    same = load_data(f"npz:{tmp_path / 's.npz'}", train_limit=12, test_limit=5, seed=3)
    assert torch.equal(same.train.images, data.train.images)


@pytest.mark.parametrize("change, message", [
    (dict(y_train=np.arange(36) % 4), "36 labels for 37 images"),
    (dict(y_test=np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1])), "mislabelled"),
    (dict(y_train=-(np.arange(37) % 4)), "negative class"),
    (dict(y_train=np.arange(37) % 4 + 0.5), "integer class"),
    (dict(x_train=np.zeros((37, 9, 7, 3), np.float32)), "uint8"),
    (dict(x_test=np.zeros((11, 9, 7, 3), np.uint8) + 1, x_train=np.zeros((37, 8, 7, 3), np.uint8)),
     "train images are"),
    (dict(x_train=np.zeros((37, 9, 7, 5), np.uint8)), r"\(N, H, W, C\)"),
])
def test_npz_bad_arrays_are_clear_errors(tmp_path, change, message):
    _write_arrays_npz(tmp_path / "d.npz", **change)
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


@pytest.mark.parametrize("layout", ["arrays", "jpeg", "jpeg+classes"])
def test_npz_labels_must_number_the_classes_present(tmp_path, layout):
    """A stray label (100000 among the classes) is an error, not a 100001-way classifier."""
    if layout == "arrays":
        y = np.arange(37) % 4
        y[5] = 100000
        _write_arrays_npz(tmp_path / "d.npz", y_train=y)
        message = (r"labels must number the classes 0\.\.4 \(5 classes are present\), but they use "
                   r"class index 100000")
    else:
        _jpeg_npz(tmp_path / "j.npz")
        arrays = dict(np.load(tmp_path / "j.npz"))
        arrays["train_labels"] = arrays["train_labels"].copy()
        arrays["train_labels"][5] = 100000
        if layout == "jpeg":
            del arrays["classes"]
            message = r"classes 0\.\.3 \(4 classes are present\), but they use class index 100000"
        else:
            message = "names 3 classes but its labels use class index 100000"
        np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_npz_class_count_comes_from_the_whole_file(tmp_path):
    """Gaps in the labels need a 'classes' array; a limited subset that lacks a class still
    gets every class (the count is taken before the limit)."""
    _write_arrays_npz(tmp_path / "g.npz", y_train=(np.arange(37) % 2) * 2, y_test=np.full(11, 2))
    with pytest.raises(DataError, match=r"no image has class \[1\]"):
        load_data(f"npz:{tmp_path / 'g.npz'}")
    np.savez(tmp_path / "n.npz", **np.load(tmp_path / "g.npz"), classes=np.array(["a", "b", "c"]))
    data = load_data(f"npz:{tmp_path / 'n.npz'}")
    assert data.num_classes == 3 and data.classes == ("a", "b", "c")
    y = np.zeros(37, dtype=np.int64)
    y[-1] = 3  # one image of class 3, which a small subset misses
    y[-2], y[-3] = 1, 2
    _write_arrays_npz(tmp_path / "r.npz", y_train=y, y_test=np.array([0, 1, 2, 3] * 2 + [3] * 3))
    for seed in range(3):
        data = load_data(f"npz:{tmp_path / 'r.npz'}", train_limit=5, seed=seed)
        assert data.num_classes == 4
    assert 3 not in data.train.labels.tolist()


def test_npz_missing_truncated_and_foreign(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(f"npz:{tmp_path / 'nope.npz'}")
    _write_arrays_npz(tmp_path / "d.npz")
    blob = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_data(f"npz:{tmp_path / 't.npz'}")
    np.savez(tmp_path / "f.npz", weights=np.zeros(3))
    with pytest.raises(DataError, match="expected the arrays x_train"):
        load_data(f"npz:{tmp_path / 'f.npz'}")


# ---------------------------------------------------------------- npz, JPEG layout

def _jpeg_npz(path, n_train=13, n_test=6, size=(11, 13), quality=90, corrupt=None):
    from PIL import Image

    rng = _rng(1)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for i in range(n):
            img = Image.fromarray(rng.randint(0, 256, size + (3,)).astype(np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        if corrupt is not None and split == "train":
            blobs[corrupt] = np.frombuffer(b"\xff\xd8 not a jpeg at all", np.uint8)
        out[f"{split}_jpeg"] = np.concatenate(blobs)
        out[f"{split}_offsets"] = np.concatenate(
            [[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        out[f"{split}_labels"] = np.arange(n) % 3
        out[f"{split}_blobs"] = blobs
    np.savez(path, **{k: v for k, v in out.items() if not k.endswith("_blobs")},
             classes=np.array(["a", "b", "c"]))
    return out


def test_npz_jpeg_layout_decodes_like_pillow(tmp_path):
    from PIL import Image

    raw = _jpeg_npz(tmp_path / "j.npz")
    data = load_data(f"npz:{tmp_path / 'j.npz'}")
    assert data.train.images.shape == (13, 3, 11, 13) and data.classes == ("a", "b", "c")
    for i in (0, 7, 12):
        ref = np.asarray(Image.open(io.BytesIO(raw["train_blobs"][i].tobytes())).convert("RGB"))
        got = data.train.images[i].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - ref).max() <= 2  # libjpeg-turbo vs Pillow IDCT rounding


def test_npz_jpeg_bad_offsets_and_bad_image(tmp_path):
    raw = _jpeg_npz(tmp_path / "j.npz")
    bad = dict(np.load(tmp_path / "j.npz"))
    bad["train_offsets"] = raw["train_offsets"] + 10**7
    np.savez(tmp_path / "b.npz", **bad)
    with pytest.raises(DataError, match="offsets must rise from 0"):
        load_data(f"npz:{tmp_path / 'b.npz'}")
    _jpeg_npz(tmp_path / "c.npz", corrupt=4)
    with pytest.raises(DataError, match="image 4 is not a readable JPEG"):
        load_data(f"npz:{tmp_path / 'c.npz'}")


@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} is absent")
def test_shared_cifar_slice():
    data = load_data(f"npz:{SHARED_CIFAR}", train_limit=600, test_limit=200, seed=1)
    assert data.train.images.shape == (600, 3, 32, 32) and data.num_classes == 10
    assert data.classes[0] == "airplane" and len(torch.unique(data.train.labels)) == 10
    assert data.pad == 4 and data.flip is True
    mean = torch.tensor(data.mean) * 255
    assert torch.allclose(mean, torch.tensor([125.3, 122.9, 113.9]), atol=6)  # the README's means


# ---------------------------------------------------------------- cifar10 pickle folder

def _cifar_folder(root, n=7, bad_label=False):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = _rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(rng.randint(0, 10, n))
        if bad_label and name == "test_batch":
            labels[0] = 10
        entry = {"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), "labels": labels}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar10_folder_layout(tmp_path):
    folder = _cifar_folder(tmp_path)
    data = load_data(f"cifar10:{tmp_path}")  # the parent works as well as the folder itself
    assert data.train.images.shape == (35, 3, 32, 32) and len(data.test) == 7
    with open(folder / "data_batch_2", "rb") as f:
        entry = pickle.load(f)
    row = entry["data"][3]  # 1024 red, 1024 green, 1024 blue values
    assert torch.equal(data.train.images[7 + 3], torch.from_numpy(row.reshape(3, 32, 32)))
    assert data.train.labels[7 + 3] == entry["labels"][3]
    assert data.classes[-1] == "truck"
    assert load_data(f"cifar10:{folder}").num_classes == 10


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        load_data(f"cifar10:{tmp_path}")
    folder = _cifar_folder(tmp_path / "a")
    blob = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(blob[:1000])
    with pytest.raises(DataError, match="data_batch_3 is truncated"):
        load_data(f"cifar10:{folder}")
    _cifar_folder(tmp_path / "b", bad_label=True)
    with pytest.raises(DataError, match="class index 10"):
        load_data(f"cifar10:{tmp_path / 'b'}")


# ---------------------------------------------------------------- imagefolder

def _image_folder(root, classes_train=("cat", "dog"), classes_val=("cat", "dog"), per_class=3):
    from PIL import Image

    rng = _rng(3)
    for split, classes in (("train", classes_train), ("val", classes_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.randint(0, 256, (40 + i, 50, 3)).astype(np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def test_imagefolder_loads_and_batches(tmp_path):
    _image_folder(tmp_path)
    data = load_data(f"imagefolder:{tmp_path}", crop=24)
    assert data.num_classes == 2 and data.classes == ("cat", "dog")
    assert data.input_size == (1, 3, 24, 24)
    loader = data.train_loader(4, seed=0, workers=0)
    batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (4, 3, 24, 24)
    test = list(data.test_loader(4, workers=0))
    assert sum(len(y) for _, y in test) == 6
    calib = list(data.calibration_loader(5, 5, workers=0))
    assert calib[0][0].shape == (5, 3, 24, 24)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_data(f"imagefolder:{tmp_path / 'x'}")
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        load_data(f"imagefolder:{tmp_path / 'a'}")
    _image_folder(tmp_path / "b", classes_val=("cat", "cow"))
    with pytest.raises(DataError, match="name different classes"):
        load_data(f"imagefolder:{tmp_path / 'b'}")


# ---------------------------------------------------------------- ArrayLoader

def _arrays(n=23, c=3, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageArrays(torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8),
                       torch.arange(n) % 4)


def _loader(arrays, batch, **kw):
    c = arrays.images.shape[1]
    return ArrayLoader(arrays, batch, mean=(0.5,) * c, std=(0.25,) * c, **kw)


def test_augmentation_matches_a_per_image_crop_and_flip():
    arrays = _arrays()
    pad = 2
    loader = _loader(arrays, 8, train=True, pad=pad, flip=True, seed=5)
    loader.set_epoch(3)
    # Redraw what the loader draws, then crop each image by hand.
    g = torch.Generator().manual_seed(5 * 1_000_003 + 3)
    order = torch.randperm(23, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    got = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert got.shape == (16, 3, 6, 5) and flips.any() and not flips.all()
    for k in range(16):
        img = torch.nn.functional.pad(arrays.images[order[k]].float(), (pad,) * 4)
        oy, ox = offsets[k].tolist()
        ref = img[:, oy:oy + 6, ox:ox + 5]
        if flips[k]:
            ref = ref.flip(-1)
        assert torch.allclose(got[k], (ref / 255 - 0.5) / 0.25)
        assert labels[k] == arrays.labels[order[k]]


def test_ddp_shards_concatenate_to_the_global_batch():
    arrays = _arrays(n=29)
    whole = _loader(arrays, 12, train=True, pad=1, flip=True, seed=2)
    ranks = [_loader(arrays, 12, train=True, pad=1, flip=True, seed=2, rank=r, world_size=3)
             for r in range(3)]
    for epoch in (0, 4):
        for lo in [whole] + ranks:
            lo.set_epoch(epoch)
        assert len(whole) == 2 and all(len(r) == 2 for r in ranks)
        for (x, y), *parts in zip(whole, *ranks):
            assert torch.equal(x, torch.cat([p[0] for p in parts]))
            assert torch.equal(y, torch.cat([p[1] for p in parts]))
    a, b = (_loader(arrays, 12, train=True, seed=2) for _ in range(2))
    a.set_epoch(0)
    b.set_epoch(1)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])  # a new order each epoch


def test_eval_shards_cover_every_image_once():
    arrays = _arrays(n=23)
    seen = torch.cat([y for r in range(2) for _, y in
                      _loader(arrays, 6, train=False, rank=r, world_size=2)])
    assert torch.equal(seen, arrays.labels)
    x, _ = next(iter(_loader(arrays, 6, train=False, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, (arrays.images[:6].float() / 255 - 0.5) / 0.25)


def test_loader_errors():
    arrays = _arrays(n=10)
    with pytest.raises(ValueError, match="exceeds the 10 training images"):
        _loader(arrays, 16, train=True)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        _loader(arrays, 5, train=True, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        _loader(arrays, 0, train=True)


def test_channel_stats_sample_spans_class_sorted_files():
    images = torch.cat([torch.zeros(50, 1, 2, 2), torch.full((50, 1, 2, 2), 255.0)]).to(torch.uint8)
    mean, std = channel_stats(images, max_images=10)
    assert abs(mean[0] - 0.5) < 0.11 and std[0] > 0.4


def test_imagefolder_eval_shards_count_every_image_once(tmp_path):
    _image_folder(tmp_path, per_class=5)  # 10 validation images over 3 ranks
    data = load_data(f"imagefolder:{tmp_path}", crop=16)
    counts = [sum(len(y) for _, y in data.test_loader(3, rank=r, world_size=3, workers=0))
              for r in range(3)]
    assert counts == [3, 3, 4]
