"""Per-channel importance scores over calibration data (the importance part of pruning).

:class:`ScoreCollector` hooks every scored site of a model (SPEC section 3: the activation output
after each conv, the max-pool output where a pool follows, the post-add ReLU of residual streams),
and while calibration batches run forward it turns each activation straight into per-image
scores of its criterion (a :class:`~pccfast.prune.criteria.Criterion`: CI by default,
:func:`pccfast.channel_independence` on the fastest backend) and adds them to a float64 running
sum per channel. One pass serves every layer; nothing is written to disk. Under
``torch.distributed`` the per-rank sums are all-reduced when the scores are read. Criteria that
need no data (``l1``, ``random``) need no pass. :class:`CICollector` is the collector with
``criterion="ci"``.

    col = pccfast.CICollector(model)          # hooks; builds the pruning graph at first use
    for images, _ in loader:                  # or col.run(loader): progress bar, stops at 640
        if not col.update(images): break
    scores = col.scores()                     # layer name -> (C,) float64, mean CI
    col.save("ci.pt"); scores = pccfast.CICollector.load_scores("ci.pt")
    scores = pccfast.scores(model, loader, criterion="taylor")   # any criterion, one call
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_float_tensor, check_materialised
from .._modules import eval_mode, unwrap_parallel
from ..ops import backends
from ..sites import Site, SiteHooks
from .criteria import ScoredLayer, criterion_name, get_criterion

DEFAULT_IMAGES = 640  # CHIP: 5 batches of 128
SCORES_FORMAT = "pccfast.scores"
SCORES_VERSION = 1


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ScoreCollector:
    """Streams one criterion's per-channel scores for every scored layer of ``model``.

    model: the network (a DDP/DataParallel/torch.compile wrapper is unwrapped: it runs eagerly
      under the hooks, scores keyed by the original names); it runs in eval mode inside
      :meth:`update` (without gradients, except for a criterion that needs them, ``taylor``),
      and its mode is restored.
    criterion: a registered name (``"ci"``, default; ``"l1"``, ``"hrank"``, ``"taylor"``,
      ``"random"``), ``"package.module:Class"``, or a :class:`~pccfast.prune.Criterion`
      (:mod:`pccfast.prune.criteria`). A criterion that needs nothing (``l1``, ``random``)
      takes no images: :meth:`update` only finds the layers from the batch's shape (or give
      ``input_size``).
    layers: None (every layer with a scored site) or a list of layer names (group names of
      :func:`pccfast.prune.graph.build_graph`: conv names, stage names for residual streams).
    max_images: calibration images in all (default 640, CHIP's); under DDP each rank takes
      ``ceil(max_images / world_size)``. The same images feed every layer.
    backend: the CI backend (``"auto"``: the fastest for the activations' device).
    input_size: build the pruning graph now for this input size; by default it is built at
      the first :meth:`update` from the batch's shape.
    progress: show a tqdm bar in :meth:`run` (rank 0 only).
    seed: the seed of ``random``.
    loss_fn: the loss of a criterion that needs gradients (``taylor``), ``(output, labels) ->
      scalar``, a sum over the images (default ``cross_entropy(output, labels,
      reduction="sum")``, so each image gets its own gradient).
    """

    def __init__(self, model: nn.Module, criterion="ci", layers=None,
                 max_images: int = DEFAULT_IMAGES, backend: str = "auto", input_size=None,
                 progress: bool = True, engine: str = "auto", seed: int = 0, loss_fn=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive int, got {max_images!r}")
        if layers is not None and not (isinstance(layers, (list, tuple))
                                       and all(isinstance(n, str) for n in layers)):
            raise TypeError(f"layers must be None or a list of layer names, got {layers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be None or a callable (output, labels) -> loss, "
                            f"got {type(loss_fn).__name__}")
        self.model = unwrap_parallel(model)
        check_materialised("model", self.model)
        self.scorer = get_criterion(criterion)  # the one lookup of the criterion's name
        self.criterion = criterion_name(criterion)
        self._gradients = self.scorer.needs == "gradients"
        self.backend = check_choice("backend", backend, backends.BACKENDS)
        self.max_images = max_images
        self.progress = progress
        self.engine = engine
        self.seed = seed
        self.loss_fn = loss_fn
        self._layers = list(layers) if layers is not None else None
        self.groups: dict[str, list[str]] = {}  # layer -> its site names
        self.convs: dict[str, list[str]] = {}  # layer -> the convs writing its channels
        self.widths: dict[str, int] = {}
        self.offsets: dict[str, dict[str, tuple]] = {}  # layer -> site -> its channels' starts
        self.conv_offsets: dict[str, tuple] = {}  # layer -> ((conv, its channels' starts), ...)
        self.sites: list[Site] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._seen: dict[str, int] = {}
        self._pending: list = []  # gradients: [site, hooked output, its version, scored]
        self.images = 0
        self._hooks: SiteHooks | None = None
        self._attached = False
        self._active = False
        if input_size is not None:
            self._attach(tuple(input_size))

    @property
    def needs_data(self) -> bool:
        """Whether the criterion scores activations (calibration images)."""
        return self.scorer.needs != "nothing"

    @property
    def _what(self) -> str:
        return self.scorer.describe()

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
            raise ValueError(f"{type(self.model).__name__} has no scored layer: "
                             f"{graph.why_nothing_to_score()}")
        self.groups = {g.name: [s.name for s in g.sites] for g in scored}
        self.convs = {g.name: list(g.convs) for g in scored}
        self.widths = {g.name: g.width for g in scored}
        self.offsets = {g.name: dict(g.site_offsets) for g in scored}  # parts of wider sites
        self.conv_offsets = {g.name: _conv_starts(g) for g in scored} if (
            graph.engine == "pccfast") else {}
        sites = {}
        for g in scored:
            for s in g.sites:
                sites.setdefault(s.name, s)
        self.sites = list(sites.values())
        self.scorer.check_sites(self.sites)
        if self.needs_data:
            self._hooks = SiteHooks(self.model, self.sites, self._accumulate, raw=self._gradients)
        self._attached = True

    @property
    def layer_names(self) -> list[str]:
        return list(self.groups)

    @property
    def layers(self) -> dict[str, ScoredLayer]:
        """layer name -> what a criterion knows of it (width, convs, sites)."""
        return {name: ScoredLayer(name, self.widths[name], tuple(self.convs[name]),
                                  tuple(sites), self.conv_offsets.get(name, ()))
                for name, sites in self.groups.items()}

    @property
    def capacity(self) -> int:
        """Images this rank still takes."""
        _, world = _world()
        return max(0, math.ceil(self.max_images / world) - self.images)

    # -- collection -----------------------------------------------------------------------
    def _accumulate(self, site: Site, activation: torch.Tensor) -> None:
        if not self._active:
            return
        if self._gradients:  # scored in backward, when dL/da arrives
            index = len(self._pending)
            self._pending.append([site, activation, activation._version, False])
            if activation.requires_grad:
                activation.register_hook(lambda grad, i=index: self._gradient_arrived(i, grad))
            return
        if self.scorer.spatial and activation.dim() == 4 \
                and activation.shape[-1] * activation.shape[-2] == 1:
            self._warn_single_pixel(site.name, tuple(activation.shape))
        self._add(site.name, self._image_scores(site, activation))

    def _image_scores(self, site: Site, activation: torch.Tensor, grad=None) -> torch.Tensor:
        """The criterion's (N, C) scores of one activation, checked: a criterion defined
        elsewhere that returns another shape is named, not summed into a wrong answer."""
        found = self.scorer.image_scores(activation, grad, backend=self.backend)
        expected = tuple(activation.shape[:2])
        if not isinstance(found, torch.Tensor) or tuple(found.shape) != expected:
            raise ValueError(f"criterion {self.criterion!r}: image_scores must return an (N, C) "
                             f"= {expected} tensor at {site.name}, got "
                             f"{_shape_of(found)}")
        return found.detach().to(torch.float64)

    def _warn_single_pixel(self, site: str, shape) -> None:
        """1x1 maps (as PCCRegularizer warns) for a criterion that reads each channel's map as a
        whole (``Criterion.spatial``): its rank is 0 or 1, its CI its size, not its independence."""
        warned = self.__dict__.setdefault("_single_pixel", set())
        if site in warned:
            return
        warned.add(site)
        warnings.warn(f"{type(self).__name__}: {site} has 1x1 maps (activation shape {shape}), "
                      f"so each channel's map is one value and its {self.criterion} score says "
                      "little (it reads the map as a whole: hrank gives 0 or 1, ci the value's "
                      "size, not the channel's independence); score at a larger input size",
                      stacklevel=2)

    def _add(self, site: str, per_image: torch.Tensor) -> None:
        total = per_image.sum(0)  # (N, C) float64 -> (C,)
        if site in self._sums:
            self._sums[site] += total
        else:
            self._sums[site] = total
        self._seen[site] = self._seen.get(site, 0) + per_image.shape[0]

    def _gradient_arrived(self, index: int, grad: torch.Tensor) -> None:
        site, hooked, version, _ = self._pending[index]
        if not site.apply_relu and hooked._version != version:
            raise RuntimeError(f"{self.criterion}: the activation at {site.name} was changed in "
                               "place after it was hooked, so its value is unknown")
        # Where the model's own F.relu follows the hook, ``hooked`` is its input z (or, after an
        # in-place ReLU, relu(z)) and ``grad`` is dL/dz: 0 where z <= 0, dL/da elsewhere, so
        # hooked * grad = a * dL/da either way.
        if site.channels_last:  # (N, H, W, C), ConvNeXt's MLP
            hooked, grad = hooked.movedim(-1, 1), grad.movedim(-1, 1)
        self._add(site.name, self._image_scores(site, hooked.detach(), grad))
        self._pending[index][3] = True

    def _gradient_batch(self, images: torch.Tensor, labels) -> None:
        """One forward and one backward to the input (not to the weights: their .grad stays as
        it was); each hooked activation is scored, |sum_hw a * dL/da| per image and channel, as
        its gradient passes, so no gradient outlives its layer's backward."""
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            loss = self._loss(self.model(x), labels)
            if not loss.requires_grad:
                raise RuntimeError(f"{self.criterion}: the loss does not depend on the model's "
                                   "input")
            torch.autograd.grad(loss, x, allow_unused=True)
        for site, hooked, _, scored in self._pending:
            if not scored:  # the loss does not depend on this activation
                channels = hooked.shape[-1 if site.channels_last else 1]
                self._add(site.name, torch.zeros((hooked.shape[0], channels), dtype=torch.float64,
                                                 device=hooked.device))

    def _loss(self, output, labels) -> torch.Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(output, labels)
        else:
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                raise TypeError(f"{self.criterion}'s default loss is the cross-entropy of "
                                f"logits (N, classes); {type(self.model).__name__} returned "
                                f"{getattr(output, 'shape', type(output).__name__)}: pass loss_fn")
            loss = F.cross_entropy(output, labels, reduction="sum")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r}")
        return loss.reshape(())

    def update(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> int:
        """Runs one calibration batch ``images: (N, C, H, W)`` (``labels: (N,)`` class indices,
        needed by a criterion that needs gradients); returns how many images were used (fewer
        once ``max_images`` is reached, 0 after, and always 0 for ``l1`` and ``random``)."""
        check_float_tensor("images", images, (4,))
        if not self._attached:
            self._attach((1,) + tuple(images.shape[1:]))
        if not self.needs_data:
            return 0
        take = min(images.shape[0], self.capacity)
        if take == 0:
            return 0
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else images.device
        images = images[:take].to(device, non_blocking=True)
        if self._gradients:
            labels = self._check_labels(labels, take, device)
        self._active = True
        try:
            with eval_mode(self.model):
                if self._gradients:
                    self._gradient_batch(images, labels)
                else:
                    with torch.no_grad():
                        self.model(images)
        finally:
            self._active = False
            self._pending = []
        self.images += take
        return take

    def _check_labels(self, labels, take: int, device):
        if self.loss_fn is not None and not isinstance(labels, torch.Tensor):
            return labels  # the user's loss knows what it takes
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"criterion {self.criterion!r} needs labels: update(images, labels) "
                             f"with labels an (N,) tensor of class indices, got "
                             f"{type(labels).__name__}")
        if self.loss_fn is None and (labels.dim() != 1 or labels.dtype.is_floating_point
                                     or labels.dtype == torch.bool):
            raise ValueError(f"labels must be an (N,) integer tensor of class indices, got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        entries = labels.shape[0] if labels.dim() else 0
        if entries < take:
            raise ValueError(f"labels has {entries} entries for {take} images")
        return labels[:take].to(device, non_blocking=True)

    def run(self, loader, device=None) -> "ScoreCollector":
        """Feeds batches from ``loader`` (tensors, or tuples/lists of images and labels, or
        dicts with "image(s)" and "label(s)") until ``max_images``, with a progress bar.
        ``l1`` and ``random`` take the input size from the first batch and stop."""
        from tqdm.auto import tqdm

        rank, _ = _world()
        bar = tqdm(total=self.capacity + self.images, initial=self.images, unit="img",
                   desc=self._what.split()[0], disable=not self.progress or rank != 0)
        seen_batch = False
        try:
            for batch in loader:
                labels = None
                if isinstance(batch, (tuple, list)):
                    batch, labels = batch[0], (batch[1] if len(batch) > 1 else None)
                elif isinstance(batch, dict):
                    labels = batch.get("labels", batch.get("label"))
                    batch = batch.get("images", batch.get("image"))
                if device is not None:
                    batch = batch.to(device)
                seen_batch = True
                used = self.update(batch, labels)
                bar.update(used)
                if self.capacity == 0 or not self.needs_data:
                    break
        finally:
            bar.close()
        if not seen_batch or (self.needs_data and self.images == 0):
            warnings.warn(f"{type(self).__name__}.run: the loader gave no images", stacklevel=2)
        return self

    # -- results --------------------------------------------------------------------------
    def _reduced(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Per-site sums and image counts, summed over the ranks under DDP."""
        import torch.distributed as dist

        names = [s.name for s in self.sites]
        missing = [n for n in names if n not in self._sums] or ([] if names else ["any layer"])
        if missing:
            rank, world = _world()
            where = f"rank {rank} " if world > 1 else ""
            raise RuntimeError(f"{type(self).__name__} {where}has no {self._what} yet: call "
                               f"update(images) (or run(loader)) first (no activations seen at "
                               f"{missing[:3]})")
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
        """site name -> (C,) float64 mean score at that activation (all ranks); for the
        criteria that need data only."""
        if not self.needs_data:
            raise ValueError(f"criterion {self.criterion!r} scores no activations; use scores()")
        sums, seen = self._reduced()
        return {n: sums[n] / seen[n] for n in sums}

    def _scores_and_images(self) -> tuple[dict[str, torch.Tensor], int]:
        if not self.needs_data:
            if not self._attached:
                raise RuntimeError(f"{type(self).__name__} does not know the model's layers "
                                   "yet: give input_size or call update(images) once")
            return {name: self._layer_scores(layer) for name, layer in self.layers.items()}, 0
        sums, seen = self._reduced()
        per_site = {n: sums[n] / seen[n] for n in sums}
        return ({layer: torch.stack([self._part(layer, s, per_site[s]) for s in sites]).mean(0)
                 for layer, sites in self.groups.items()}, seen[self.sites[0].name])

    def _part(self, layer: str, site: str, scores: torch.Tensor) -> torch.Tensor:
        """The layer's channels among a site's scores: a part of a conv's output that a later
        split reads apart starts at its offset (equal parts pruned with one index set: the mean
        over the parts)."""
        width = self.widths[layer]
        starts = self.offsets.get(layer, {}).get(site, (0,))
        return torch.stack([scores[a:a + width] for a in starts]).mean(0)

    def _layer_scores(self, layer: ScoredLayer) -> torch.Tensor:
        found = self.scorer.layer_scores(self.model, layer, seed=self.seed)
        if not isinstance(found, torch.Tensor) or tuple(found.shape) != (layer.width,):
            raise ValueError(f"criterion {self.criterion!r}: layer_scores must return a "
                             f"({layer.width},) tensor for {layer.name}, got "
                             f"{_shape_of(found)}")
        return found.detach().to("cpu", torch.float64)

    def scores(self) -> dict[str, torch.Tensor]:
        """layer name -> (C,) float64 scores, the input of :func:`pccfast.prune`.

        A conv's score is the mean score of its scored activation; a residual stream's is the
        mean over its activations (every block output of the stage) of their mean score (for
        ``l1``: the mean over the convs writing the stream). Under DDP this is a collective
        for the activation criteria: every rank must call it.
        """
        return self._scores_and_images()[0]

    def save(self, path) -> None:
        """Writes :meth:`scores` (atomically) with the image count and the criterion; rank 0
        writes under DDP."""
        scores, images = self._scores_and_images()
        if _world()[0] == 0:
            save_scores(scores, path, images=images, model=type(self.model).__name__,
                        sites=self.groups, criterion=self.criterion)

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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.model).__name__}, "
                f"criterion={self.criterion!r}, layers={len(self.groups)}, "
                f"images={self.images}/{self.max_images}, backend={self.backend!r})")


class CICollector(ScoreCollector):
    """Streams mean CI per channel for every scored layer of ``model``: a
    :class:`ScoreCollector` with ``criterion="ci"`` (see there for the arguments)."""

    def __init__(self, model: nn.Module, layers=None, max_images: int = DEFAULT_IMAGES,
                 backend: str = "auto", input_size=None, progress: bool = True,
                 engine: str = "auto"):
        super().__init__(model, "ci", layers, max_images, backend, input_size, progress, engine)

    def __repr__(self) -> str:
        return (f"CICollector({type(self.model).__name__}, layers={len(self.groups)}, "
                f"images={self.images}/{self.max_images}, backend={self.backend!r})")


def collect_scores(model: nn.Module, loader=None, criterion="ci", *, layers=None,
                   max_images: int = DEFAULT_IMAGES, input_size=None, device=None,
                   seed: int = 0, backend: str = "auto", loss_fn=None, progress: bool = False,
                   engine: str = "auto") -> dict[str, torch.Tensor]:
    """``layer -> (C,) float64`` scores of one criterion, the input of :func:`pccfast.prune`.

    loader: calibration batches (images, or (images, labels): ``taylor`` needs the labels);
      ``l1`` and ``random`` need none when ``input_size`` is given, else they read the input
      size from the first batch. criterion: a name, ``"package.module:Class"`` or a
      :class:`~pccfast.prune.Criterion`. Other arguments as :class:`ScoreCollector`.

        scores = pccfast.scores(model, loader, criterion="hrank", max_images=500)
    """
    col = ScoreCollector(model, criterion, layers, max_images, backend, input_size, progress,
                         engine, seed, loss_fn)
    try:
        if col.needs_data or input_size is None:
            if loader is None:
                need = "calibration images" if col.needs_data else "input_size"
                raise ValueError(f"criterion {col.criterion!r} needs a loader ({need})")
            col.run(loader, device)
        return col.scores()
    finally:
        col.remove()


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else repr(value)


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


def _conv_starts(group) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(conv, where the group's channels start among its outputs) for every conv writing it."""
    starts: dict[str, list[int]] = {}
    for port in group.producers:
        if port.module in group.convs and port.role in ("conv_out", "dw", "linear_out"):
            starts.setdefault(port.module, []).append(port.offset)
    return tuple((m, tuple(sorted(set(v)))) for m, v in starts.items())
