"""Pruning criteria as objects: each turns a model (and, if it needs them, calibration images
and their gradients) into the same ``layer -> (C,) float64`` scores that :func:`pccfast.prune`
takes, so plans, budgets and surgery are shared and a comparison between criteria differs only
in the scores (SPEC section 3).

- ``ci`` (default): mean channel independence of the scored activation (CHIP).
- ``l1``: the L1 norm of each output filter of the conv(s) producing the channels (Li et al.,
  ICLR 2017), ``sum |W[c]|`` over input channels and kernel; needs no data.
- ``hrank``: the mean over calibration images of the matrix rank of each channel's H x W map
  (Lin et al., HRank, CVPR 2020), in float32 as HRank's code, with
  :func:`torch.linalg.matrix_rank`'s default tolerance ``max(H, W) * eps_fp32 * sigma_max``.
- ``taylor``: first-order Taylor importance on the activation (Molchanov et al., CVPR 2019, the
  "gate after each channel" form): per image ``n`` and channel ``c``,
  ``|sum_{h,w} a[n,c,h,w] * dL_n/da[n,c,h,w]|`` with ``L_n`` image ``n``'s cross-entropy (model
  in eval mode, BatchNorm frozen, so images do not interact), averaged over the images. The
  paper squares the per-batch sum; the absolute per-image value is the common implementation
  and does not depend on the batch size.
- ``random``: seeded uniform scores in [0, 1), the control every pruning paper should show;
  each layer's scores depend only on the seed and the layer's name.

The activation criteria (``ci``, ``hrank``, ``taylor``) score the same sites as CI, and a
residual stream's score is the mean over its sites of their per-site means. ``l1`` scores the
same layers; a stream's score is the mean over the convs writing the stream (stem, every block's
last conv, the shortcut convs: their filters are pruned with one index set) of their filter
norms. :class:`pccfast.prune.scores.ScoreCollector` streams them in one pass.

A new criterion is one :class:`Criterion` subclass (its ``name``, what it ``needs``, and
``image_scores`` or ``layer_scores``). :func:`register_criterion` makes its name known to
``pccfast.scores``, the CLI and studies; without registering, ``"package.module:Class"`` names
it wherever a criterion name goes. :func:`get_criterion` is the one place a name is looked up.
"""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from .._checks import check_finite_tensor, check_float_tensor
from ..ci import channel_independence

NEEDS = ("nothing", "images", "gradients")


@dataclass(frozen=True)
class ScoredLayer:
    """One layer the collector scores: ``name`` (a conv, or a residual stage's stream), its
    ``width`` (channels), the ``convs`` writing its channels and the ``sites`` (activations)
    whose scores it averages; ``conv_offsets``: where the layer's channels start among the
    outputs of a conv that writes more (a conv output cut into parts by a later split)."""

    name: str
    width: int
    convs: tuple[str, ...]
    sites: tuple[str, ...]
    conv_offsets: tuple[tuple[str, tuple[int, ...]], ...] = ()


class Criterion:
    """How one criterion scores channels; :class:`~pccfast.prune.ScoreCollector` asks it.

    name: the registry key (``--criterion NAME``, ``study.criteria``, files and records).
    needs: ``"nothing"`` (scores from the weights or a seed: implement :meth:`layer_scores`),
      ``"images"`` (scores from each calibration batch's activations, in no-grad eval mode:
      implement :meth:`image_scores`) or ``"gradients"`` (the same with the loss gradient of the
      activation, from one backward per batch; the loader must give labels. Where the model
      applies its activation as a function after the hooked module, the pair is that module's
      output ``z`` and ``dL/dz``: override :meth:`check_sites` to refuse such sites where that
      matters, as ``taylor`` does for all but ReLU).
    label: what reports call the scores (default ``"NAME scores"``).
    summary: a few words for ``--help``.
    spatial: the score reads each channel's H x W map as a whole (its rank, its independence),
      so 1x1 maps leave it little to go by: the collector warns once per layer.
    """

    name: str = ""
    needs: str = "images"
    label: str = ""
    summary: str = ""
    spatial: bool = False

    def image_scores(self, activation: torch.Tensor, grad: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
        """``(N, C, H, W)`` activation (and, for ``needs="gradients"``, its loss gradient, else
        None) -> ``(N, C)`` float64 per-image scores, which the collector averages over the
        images. backend: the CI backend the collector was given."""
        raise NotImplementedError(f"{type(self).__name__} needs {self.needs!r} but does not "
                                  "implement image_scores")

    def layer_scores(self, model: nn.Module, layer: ScoredLayer, seed: int = 0) -> torch.Tensor:
        """``(layer.width,)`` float64 scores of one layer without data (``needs="nothing"``)."""
        raise NotImplementedError(f"{type(self).__name__} needs nothing but does not implement "
                                  "layer_scores")

    def check_sites(self, sites) -> None:
        """Raises ValueError for a :class:`~pccfast.sites.Site` this criterion cannot score."""

    def describe(self) -> str:
        return self.label or f"{self.name} scores"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, needs={self.needs!r})"


_REGISTRY: dict[str, type[Criterion]] = {}
CRITERIA = MappingProxyType(_REGISTRY)  # name -> Criterion class, read-only and live


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Adds a :class:`Criterion` subclass to the registry under ``cls.name`` (a decorator);
    a name taken by another class is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"register_criterion takes a Criterion subclass, got {cls!r}")
    _check_class(cls, cls.__name__)
    if ":" in cls.name or not cls.name.strip():
        raise ValueError(f"{cls.__name__}.name must be a non-empty name without ':', "
                         f"got {cls.name!r}")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"criterion {cls.name!r} is registered already ({known.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def get_criterion(criterion, argument: str = "criterion") -> Criterion:
    """The :class:`Criterion` for a registered name, ``"package.module:Class"``, a Criterion
    subclass or instance; anything else is a ValueError naming ``argument``."""
    if isinstance(criterion, Criterion):
        _check_class(type(criterion), repr(criterion))
        return criterion
    if isinstance(criterion, type) and issubclass(criterion, Criterion):
        _check_class(criterion, criterion.__name__)
        return criterion()
    if isinstance(criterion, str):
        if criterion in _REGISTRY:
            return _REGISTRY[criterion]()
        if ":" in criterion:
            return _import(criterion, argument)
    raise ValueError(f"{argument} must be one of {tuple(_REGISTRY)} or 'package.module:Class' "
                     f"(a pccfast.prune.Criterion subclass), got {criterion!r}")


def criterion_name(criterion) -> str:
    """The name a criterion goes by in files and records: the string it was given as, or the
    object's ``name``."""
    return criterion if isinstance(criterion, str) else get_criterion(criterion).name


def scores_label(name: str) -> str:
    """What a report calls a criterion's scores (``"NAME scores"`` for one it cannot find)."""
    try:
        return get_criterion(name).describe()
    except (TypeError, ValueError):
        return f"{name} scores"


def _import(spec: str, argument: str) -> Criterion:
    module_name, _, attr = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"{argument} {spec!r}: cannot import {attr} from {module_name} "
                         f"({exc})") from exc
    if not (isinstance(found, type) and issubclass(found, Criterion)):
        raise ValueError(f"{argument} {spec!r} is a {type(found).__name__}, not a "
                         "pccfast.prune.Criterion subclass")
    _check_class(found, spec)
    return found()


def _check_class(cls: type[Criterion], what: str) -> None:
    if cls.needs not in NEEDS:
        raise ValueError(f"{what}: needs must be one of {NEEDS}, got {cls.needs!r}")
    method = "layer_scores" if cls.needs == "nothing" else "image_scores"
    if getattr(cls, method) is getattr(Criterion, method):
        raise TypeError(f"{what} needs {cls.needs!r}, so it must implement {method}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{what}: name must be a non-empty string, got {cls.name!r}")


def channel_rank(fmap: torch.Tensor) -> torch.Tensor:
    """HRank: ``(N, C, H, W) -> (N, C)`` float64, the rank of every channel's H x W map.

    Batched over all N*C maps in float32 (HRank's own precision); the tolerance is
    :func:`torch.linalg.matrix_rank`'s default, ``max(H, W) * eps_fp32 * sigma_max`` per map.
    """
    check_float_tensor("fmap", fmap, (4,))
    check_finite_tensor("fmap", fmap)
    n, c, h, w = fmap.shape
    ranks = torch.linalg.matrix_rank(fmap.detach().to(torch.float32).reshape(n * c, h, w))
    return ranks.reshape(n, c).to(torch.float64)


def taylor_importance(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor: ``(N, C, H, W)`` activation and its loss gradient -> ``(N, C)``
    float64 ``|sum_{h,w} a * g|`` (products in the activation's precision, summed in float64)."""
    check_float_tensor("activation", activation, (4,))
    if not isinstance(grad, torch.Tensor) or grad.shape != activation.shape:
        raise ValueError(f"grad must be a tensor of the activation's shape "
                         f"{tuple(activation.shape)}, got {getattr(grad, 'shape', grad)!r}")
    product = activation.detach() * grad.detach()
    check_finite_tensor("activation * grad", product)
    return product.sum(dim=(2, 3), dtype=torch.float64).abs()


def filter_l1(model: nn.Module, convs, width: int, offsets=()) -> torch.Tensor:
    """Li et al.: ``(width,)`` float64 L1 norm of each output filter, the mean over ``convs``
    (the convs writing one channel group; ``offsets``: ``(conv, starts)`` pairs for convs writing
    it as parts of a wider output, each part's filters counted; other convs with another output
    width are skipped)."""
    starts_of = dict(offsets)
    norms = []
    for name in dict.fromkeys(convs):
        weight = model.get_submodule(name).weight.detach()
        filters = weight.to("cpu", torch.float64).abs().flatten(1).sum(1)
        starts = starts_of.get(name, (0,) if weight.shape[0] == width else ())
        norms += [filters[a:a + width] for a in starts if a + width <= weight.shape[0]]
    if not norms:
        raise ValueError(f"l1: no conv among {list(convs)} has {width} output filters")
    return torch.stack(norms).mean(0)


def random_scores(layer: str, width: int, seed: int) -> torch.Tensor:
    """``(width,)`` float64 uniform in [0, 1) from a generator seeded by ``seed`` and the
    layer's name (the same seed gives the same scores, whatever other layers are scored)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + zlib.crc32(layer.encode())) % (1 << 63)
    generator = torch.Generator().manual_seed(mixed)
    return torch.rand(width, generator=generator, dtype=torch.float64)


@register_criterion
class ChannelIndependence(Criterion):
    name, needs, label, spatial = "ci", "images", "CI", True
    summary = "channel independence, the default"

    def image_scores(self, activation, grad=None, backend="auto"):
        return channel_independence(activation.detach(), backend=backend)


@register_criterion
class FilterL1(Criterion):
    name, needs = "l1", "nothing"
    summary = "filter L1 norm"

    def layer_scores(self, model, layer, seed=0):
        return filter_l1(model, layer.convs, layer.width, layer.conv_offsets)


@register_criterion
class HRank(Criterion):
    name, needs, spatial = "hrank", "images", True
    summary = "feature-map rank"

    def image_scores(self, activation, grad=None, backend="auto"):
        return channel_rank(activation)


@register_criterion
class Taylor(Criterion):
    name, needs = "taylor", "gradients"
    summary = "|activation x gradient|"

    def image_scores(self, activation, grad=None, backend="auto"):
        return taylor_importance(activation, grad)

    def check_sites(self, sites) -> None:
        """The collector takes dL/dz at the hooked module's output z; where the model applies
        its activation f as a function after it, z * dL/dz equals a * dL/da only for
        f(z) = z f'(z)."""
        import torch.nn.functional as F

        for site in sites:
            if site.activation and site.activation[0] not in (F.relu, F.leaky_relu):
                raise ValueError(
                    f"criterion 'taylor' cannot score {site.name}: the model applies "
                    f"{site.activation[0].__name__} as a function call after it, so no hook "
                    "sees the activation's gradient (only ReLU/LeakyReLU calls work: use a "
                    "module such as nn.SiLU() there, or another criterion)")


@register_criterion
class RandomScores(Criterion):
    name, needs = "random", "nothing"
    summary = "seeded control"

    def layer_scores(self, model, layer, seed=0):
        return random_scores(layer.name, layer.width, seed)
