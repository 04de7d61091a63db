"""Real data: calibrate and prune a VGG-16-CIFAR (width 0.25) on CIFAR-10 images, and check the
kept channels are the top-CI ones by the brute-force definition (one nuclear norm per channel)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import pccfast
from pccfast.models import vgg16_cifar

from cases import assert_within, ci_tolerance, site_activations

ROOT = Path(__file__).resolve().parents[1]
NAME = Path("shared") / "data" / "cifar10_jpeg.npz"
CANDIDATES = [ROOT.parent / NAME, ROOT.parent.parent / NAME, Path("/work") / NAME]
MEAN = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1) / 255
STD = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1) / 255
IMAGES = 40
BATCH = 16


def cifar_images(count: int) -> torch.Tensor:
    path = next((p for p in CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.skip(f"CIFAR-10 JPEG copy not found at {CANDIDATES[-1]}")
    Image = pytest.importorskip("PIL.Image")
    data = np.load(path)
    jpeg, offsets = data["test_jpeg"], data["test_offsets"]
    picks = np.linspace(0, len(offsets) - 2, count).astype(int)  # labels are sorted: every class
    pixels = [np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes()))
                         .convert("RGB"))
              for i in picks]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


def bruteforce_scores(model, groups, images, batch):
    """layer -> (mean brute-force CI at its site, from hooks of this test's own on the
    collector's batches (the same activation bits); the SPEC bar averaged over the images:
    how far the collector's fast scores may be from it)."""
    sites = [site for (site,) in groups.values()]
    parts = [site_activations(model, sites, images[i:i + batch])
             for i in range(0, len(images), batch)]
    out = {}
    for layer, (site,) in groups.items():
        acts = torch.cat([p[site] for p in parts])
        out[layer] = (pccfast.channel_independence(acts, method="bruteforce").mean(0),
                      ci_tolerance(acts).mean())
    return out


def test_kept_channels_are_the_top_ci_ones_by_brute_force():
    images = cifar_images(IMAGES)
    assert images.shape == (IMAGES, 3, 32, 32)
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.25)
    col = pccfast.CICollector(model, max_images=IMAGES, progress=False)
    col.run(torch.utils.data.DataLoader(images, batch_size=BATCH))
    assert col.images == IMAGES
    scores = col.scores()
    col.remove()
    reference = bruteforce_scores(model, col.groups, images, BATCH)

    exact = 0
    for kwargs in ({"rates": "[0.21]*7+[0.75]*5"}, {"tau": 0.6}):
        pruned, plan = pccfast.prune(model, scores, **kwargs)
        assert len(plan.layers) == 12
        for layer in plan.layers:
            bf, bound = reference[layer.name]
            assert_within(scores[layer.name], bf, bound)
            kept = torch.tensor(layer.kept_indices)
            removed = torch.tensor(sorted(set(range(layer.width_before)) - set(layer.kept_indices)))
            if removed.numel():
                # Scores within `bound` of bf: a removed channel beats a kept one by 2 * bound
                # at most, and without such a near-tie the kept ones are bf's top-k exactly.
                gap = float(bf[kept].min() - bf[removed].max())
                assert gap >= -2 * float(bound), layer.name
                if gap > 2 * float(bound):
                    top = torch.argsort(bf, descending=True, stable=True)[: layer.width_after]
                    assert layer.kept_indices == sorted(top.tolist())
                    exact += 1
        with torch.no_grad():
            assert pruned.eval()(images[:4]).shape == (4, 10)
    assert exact >= 20  # of 24 layer choices, nearly all have no near-tie at the boundary
