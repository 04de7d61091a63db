"""What pre-training did to the features: a per-layer record of each pre-trained model.

For every scored layer (the sites the PCC regulariser hooks), over held images:

- ``pcc_channel`` / ``pcc_pixel``: the PCC score S (SPEC section 1: mean |correlation| of
  distinct rows, per image) with rows = channels and with rows = pixel positions;
- ``ci_share``: the mean over images of ``sum_c CI_c(A) / ||A||_*``, the share of the nuclear
  norm each channel holds alone, summed: 1 for mutually orthogonal channels, smaller the more
  the channels are linear combinations of each other (what PCC promotion aims at);
- ``ci_mean`` (mean CI over channels and images) and ``nuclear_mean`` (mean ||A||_*).

Without this record "PCC did not help pruning" cannot be told apart from "PCC did nothing".
"""

from __future__ import annotations

from collections import defaultdict

import torch

FEATURE_COLUMNS = ("layer", "channels", "pixels", "pcc_channel", "pcc_pixel", "ci_share",
                   "ci_mean", "nuclear_mean", "images")


def feature_record(model: torch.nn.Module, loader, max_images: int) -> list[dict]:
    """One row per scored layer of ``model`` (eval mode) over the first ``max_images`` images of
    ``loader`` (batches of images or (images, labels)), in forward order."""
    from ..ci import channel_independence
    from ..pcc import pcc
    from ..sites import SiteHooks, select_sites

    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images <= 0:
        raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
    sums: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    shapes: dict[str, tuple] = {}

    def measure(site, x):
        x = x.detach().float()
        n, c = x.shape[:2]
        p = x[0, 0].numel()
        shapes.setdefault(site.name, (c, p))
        s = sums[site.name]
        if c > 1:
            s["pcc_channel"] += float(pcc(x, orientation="channel")) * n
        if p > 1:
            s["pcc_pixel"] += float(pcc(x, orientation="pixel")) * n
        ci = channel_independence(x)  # (N, C) float64
        nuclear = torch.linalg.matrix_norm(x.reshape(n, c, p).double(), ord="nuc")
        share = torch.where(nuclear > 0, ci.sum(1) / nuclear.clamp_min(1e-300),
                            torch.zeros_like(nuclear))
        s["ci_share"] += float(share.sum())
        s["ci_mean"] += float(ci.mean(1).sum())
        s["nuclear_mean"] += float(nuclear.sum())
        s["images"] += n

    model = model.eval()
    device = next(model.parameters()).device
    hooks = SiteHooks(model, select_sites(model), measure)
    seen = 0
    try:
        with torch.no_grad():
            for batch in loader:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                images = images[: max_images - seen].to(device)
                model(images)
                seen += images.shape[0]
                if seen >= max_images:
                    break
    finally:
        hooks.remove()
    if seen == 0:
        raise ValueError("feature_record: the loader gave no images")
    rows = []
    for name, s in sums.items():
        n = s["images"]
        c, p = shapes[name]
        rows.append({"layer": name, "channels": c, "pixels": p,
                     "pcc_channel": s["pcc_channel"] / n if c > 1 else None,
                     "pcc_pixel": s["pcc_pixel"] / n if p > 1 else None,
                     "ci_share": s["ci_share"] / n, "ci_mean": s["ci_mean"] / n,
                     "nuclear_mean": s["nuclear_mean"] / n, "images": int(n)})
    return rows
