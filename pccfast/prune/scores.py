"""Channel-independence scores over calibration data (the importance part of pruning).

:class:`CICollector` hooks every scored site of a model (SPEC section 3: the post-ReLU output of
each conv, the max-pool output where a pool follows, the post-add ReLU of residual streams),
and while calibration batches run forward it turns each activation straight into per-image CI
(:func:`pccfast.channel_independence`, fastest backend) and adds it to a float64 running sum
per channel. One pass serves every layer; nothing is written to disk. Under
``torch.distributed`` the per-rank sums are all-reduced when the scores are read.

    col = pccfast.CICollector(model)          # hooks; builds the pruning graph at first use
    for images, _ in loader:                  # or col.run(loader): progress bar, stops at 640
        if not col.update(images): break
    scores = col.scores()                     # layer name -> (C,) float64, mean CI
    col.save("ci.pt"); scores = pccfast.CICollector.load_scores("ci.pt")
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .._checks import check_choice, check_float_tensor
from ..ci import channel_independence
from ..models._common import eval_mode, unwrap_parallel
from ..ops import backends
from ..sites import Site, SiteHooks

DEFAULT_IMAGES = 640  # CHIP: 5 batches of 128
SCORES_FORMAT = "pccfast.scores"
SCORES_VERSION = 1


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CICollector:
    """Streams mean CI per channel for every scored layer of ``model``.

    model: the network (a DDP/DataParallel wrapper is unwrapped); it runs in eval mode without
      gradients inside :meth:`update`, and its mode is restored.
    layers: None (every layer with a scored site) or a list of layer names (group names of
      :func:`pccfast.prune.graph.build_graph`: conv names, stage names for residual streams).
    max_images: calibration images in all (default 640, CHIP's); under DDP each rank takes
      ``ceil(max_images / world_size)``. The same images feed every layer.
    backend: the CI backend (``"auto"``: the fastest for the activations' device).
    input_size: build the pruning graph now for this input size; by default it is built at
      the first :meth:`update` from the batch's shape.
    progress: show a tqdm bar in :meth:`run` (rank 0 only).
    """

    def __init__(self, model: nn.Module, layers=None, max_images: int = DEFAULT_IMAGES,
                 backend: str = "auto", input_size=None, progress: bool = True,
                 engine: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive int, got {max_images!r}")
        if layers is not None and not (isinstance(layers, (list, tuple))
                                       and all(isinstance(n, str) for n in layers)):
            raise TypeError(f"layers must be None or a list of layer names, got {layers!r}")
        self.model = unwrap_parallel(model)
        self.backend = check_choice("backend", backend, backends.BACKENDS)
        self.max_images = max_images
        self.progress = progress
        self.engine = engine
        self._layers = list(layers) if layers is not None else None
        self.groups: dict[str, list[str]] = {}  # layer -> its site names
        self.sites: list[Site] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._seen: dict[str, int] = {}
        self.images = 0
        self._hooks: SiteHooks | None = None
        self._active = False
        if input_size is not None:
            self._attach(tuple(input_size))

    # -- set-up ---------------------------------------------------------------------------
    def _attach(self, input_size) -> None:
        from .graph import build_graph

        graph = build_graph(self.model, input_size, residual="stream",
                            prune_classifier_input=True, engine=self.engine)
        scored = [g for g in graph.groups if g.sites and g.convs]
        if self._layers is not None:
            names = {g.name: g for g in scored}
            missing = [n for n in self._layers if n not in names]
            if missing:
                raise ValueError(f"layers names {missing[:5]}, which {type(self.model).__name__} "
                                 f"does not score; its layers are {list(names)[:6]}...")
            scored = [names[n] for n in self._layers]
        if not scored:
            raise ValueError(f"{type(self.model).__name__} has no scored layer (no ReLU module "
                             "after a Conv2d/BatchNorm2d)")
        self.groups = {g.name: [s.name for s in g.sites] for g in scored}
        sites = {}
        for g in scored:
            for s in g.sites:
                sites.setdefault(s.name, s)
        self.sites = list(sites.values())
        self._hooks = SiteHooks(self.model, self.sites, self._accumulate)

    @property
    def layer_names(self) -> list[str]:
        return list(self.groups)

    @property
    def capacity(self) -> int:
        """Images this rank still takes."""
        _, world = _world()
        return max(0, math.ceil(self.max_images / world) - self.images)

    # -- collection -----------------------------------------------------------------------
    def _accumulate(self, site: Site, activation: torch.Tensor) -> None:
        if not self._active:
            return
        ci = channel_independence(activation.detach(), backend=self.backend)  # (N, C) float64
        total = ci.sum(0)
        if site.name in self._sums:
            self._sums[site.name] += total
        else:
            self._sums[site.name] = total
        self._seen[site.name] = self._seen.get(site.name, 0) + ci.shape[0]

    def update(self, images: torch.Tensor) -> int:
        """Runs one calibration batch ``images: (N, C, H, W)``; returns how many images were
        used (fewer once ``max_images`` is reached, 0 after)."""
        check_float_tensor("images", images, (4,))
        if self._hooks is None:
            self._attach((1,) + tuple(images.shape[1:]))
        take = min(images.shape[0], self.capacity)
        if take == 0:
            return 0
        param = next(self.model.parameters(), None)
        if param is not None:
            images = images[:take].to(param.device, non_blocking=True)
        else:
            images = images[:take]
        self._active = True
        try:
            with eval_mode(self.model), torch.no_grad():
                self.model(images)
        finally:
            self._active = False
        self.images += take
        return take

    def run(self, loader, device=None) -> "CICollector":
        """Feeds batches from ``loader`` (tensors, or tuples/lists whose first item is the
        images) until ``max_images``, with a progress bar."""
        from tqdm.auto import tqdm

        rank, _ = _world()
        bar = tqdm(total=self.capacity + self.images, initial=self.images, unit="img",
                   desc="CI", disable=not self.progress or rank != 0)
        try:
            for batch in loader:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                elif isinstance(batch, dict):
                    batch = batch.get("images", batch.get("image"))
                if device is not None:
                    batch = batch.to(device)
                used = self.update(batch)
                bar.update(used)
                if self.capacity == 0:
                    break
        finally:
            bar.close()
        if self.images == 0:
            warnings.warn("CICollector.run: the loader gave no images", stacklevel=2)
        return self

    # -- results --------------------------------------------------------------------------
    def _reduced(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Per-site CI sums and image counts, summed over the ranks under DDP."""
        import torch.distributed as dist

        names = [s.name for s in self.sites]
        missing = [n for n in names if n not in self._sums] or ([] if names else ["any layer"])
        if missing:
            rank, world = _world()
            where = f"rank {rank} " if world > 1 else ""
            raise RuntimeError(f"CICollector {where}has no CI yet: call update(images) (or "
                               f"run(loader)) first (no activations seen at {missing[:3]})")
        sums = {n: self._sums[n] for n in names}
        seen = {n: self._seen[n] for n in names}
        if _world()[1] > 1:
            device = sums[names[0]].device
            flat = torch.cat([sums[n] for n in names] + [
                torch.tensor([seen[n] for n in names], dtype=torch.float64, device=device)])
            dist.all_reduce(flat)
            offset = 0
            for n in names:
                sums[n] = flat[offset: offset + sums[n].numel()]
                offset += sums[n].numel()
            seen = {n: int(round(float(flat[offset + i]))) for i, n in enumerate(names)}
        return {n: v.to("cpu") for n, v in sums.items()}, seen

    def site_scores(self) -> dict[str, torch.Tensor]:
        """site name -> (C,) float64 mean CI at that activation (all ranks)."""
        sums, seen = self._reduced()
        return {n: sums[n] / seen[n] for n in sums}

    def scores(self) -> dict[str, torch.Tensor]:
        """layer name -> (C,) float64 mean CI, the input of :func:`pccfast.prune`.

        A conv's score is the mean CI of its scored activation; a residual stream's is the mean
        over its activations (every block output of the stage) of their mean CI. Under DDP this
        is a collective: every rank must call it.
        """
        per_site = self.site_scores()
        return {layer: torch.stack([per_site[s] for s in sites]).mean(0)
                for layer, sites in self.groups.items()}

    def save(self, path) -> None:
        """Writes :meth:`scores` (atomically) with the image count; rank 0 writes under DDP."""
        sums, seen = self._reduced()
        per_site = {n: sums[n] / seen[n] for n in sums}
        scores = {layer: torch.stack([per_site[s] for s in sites]).mean(0)
                  for layer, sites in self.groups.items()}
        if _world()[0] == 0:
            save_scores(scores, path, images=seen[self.sites[0].name],
                        model=type(self.model).__name__, sites=self.groups)

    @staticmethod
    def load_scores(path) -> dict[str, torch.Tensor]:
        """Scores written by :meth:`save` (layer name -> float64 tensor)."""
        return load_scores(path)

    def reset(self) -> None:
        """Forgets the sums (keeps the hooks)."""
        self._sums, self._seen, self.images = {}, {}, 0

    def remove(self) -> None:
        """Removes the hooks; the model is as before."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def __enter__(self) -> "CICollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"CICollector({type(self.model).__name__}, layers={len(self.groups)}, "
                f"images={self.images}/{self.max_images}, backend={self.backend!r})")


def save_scores(scores: dict, path, **meta) -> None:
    """Writes layer name -> CI tensor to ``path`` atomically (torch.save of plain tensors)."""
    import io as _io

    from ..atomic import atomic_write_bytes

    payload = {"format": SCORES_FORMAT, "version": SCORES_VERSION,
               "scores": {k: torch.as_tensor(v).detach().to("cpu", torch.float64)
                          for k, v in scores.items()}, "meta": meta}
    buffer = _io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_scores(path) -> dict[str, torch.Tensor]:
    """Reads a file written by :func:`save_scores`; a foreign or damaged file is a ValueError."""
    from ..io import read_torch_file

    payload = read_torch_file(path, "CI scores")
    if not isinstance(payload, dict) or payload.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not a pccfast scores file (written by CICollector.save)")
    if payload.get("version") != SCORES_VERSION:
        raise ValueError(f"{path}: scores version {payload.get('version')} is not supported")
    return dict(payload["scores"])
