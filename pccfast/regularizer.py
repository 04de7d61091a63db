"""``PCCRegularizer``: the PCC term of the pre-training loss, over the scored layers of a model."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._checks import check_choice, compiled_original, is_compiling
from .ops import backends
from .ops.pcc_options import DEFAULT_EPS, PCCOptions, pcc_shape
from .pcc import pcc_with_options
from .sites import Site, SiteHooks, select_sites

MODES = {"promote": -1.0, "suppress": 1.0}


class PCCRegularizer:
    """``loss = sgn * weight * mean_l S_l`` over the hooked layers (SPEC section 1).

    mode="promote" (sgn = -1, the default) rewards correlated feature maps, building the linear
    redundancy that CI pruning then removes; "suppress" (sgn = +1) decorrelates them.

    The score of each layer is computed inside its forward hook, while the activation is at
    hand, so nothing beyond the score's own autograd state is kept. Scores are computed only
    while gradients are enabled (training), or always with ``always=True``.

        reg = PCCRegularizer(model, weight=0.05)
        loss = F.cross_entropy(model(x), y) + reg.loss()
        reg.remove()          # or: with PCCRegularizer(model) as reg: ...

    layers: None (every activation after a conv, as CI scores them), names, or a predicate; see
    :func:`pccfast.sites.select_sites`. Other keywords are those of :func:`pccfast.pcc`, or
    ``options``, a :class:`~pccfast.ops.pcc_options.PCCOptions` holding them all.
    :attr:`mean_score` is the latest pass's mean PCC score, unweighted, for logging.

    A layer whose rows have a single feature (1x1 maps in the channel orientation, e.g. the last
    stage of a ResNet at 32x32 input) has PCC 0 whatever its activations: it is left out of the
    mean, with a warning the first time (not inside a ``torch.compile`` trace).
    Create the regulariser before the model first runs compiled: hooks added to a model that has
    already run compiled are not seen. A ``torch.compile``d model is searched through to the
    original module (its site names start with ``_orig_mod.``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers=None,
        weight: float = 0.05,
        mode: str = "promote",
        orientation: str = "channel",
        group: str = "sample",
        penalty: str = "abs",
        include_diagonal: bool = False,
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        check_finite: bool = True,
        always: bool = False,
        options: PCCOptions | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a float, got {type(weight).__name__}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight}")
        self.sign = MODES[check_choice("mode", mode, MODES)]
        self.weight = float(weight)
        self.mode = mode
        self.options = _options(options, orientation, group, penalty, include_diagonal, eps)
        self.backend = check_choice("backend", backend, backends.BACKENDS)
        self.check_finite = check_finite
        self.always = always
        self.enabled = True
        self.sites: list[Site] = select_sites(model, layers)
        if not self.sites:
            raise ValueError(
                f"{type(model).__name__} has no activation (ReLU, SiLU, GELU, ...) after a conv "
                "to regularise; "
                "name the layers with layers=[...]"
            )
        self._latest: dict[str, torch.Tensor] = {}
        self._mean: torch.Tensor | None = None  # mean_l S_l of _latest, once asked for
        self._single_feature: set[str] = set()  # sites left out: rows of one feature
        self._compiled_model = _was_compiled(model)
        self._hooks = SiteHooks(model, self.sites, self._score, on_start=self._new_pass)

    @property
    def layer_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def _new_pass(self) -> None:
        if self.enabled and (self.always or torch.is_grad_enabled()):
            self._latest, self._mean = {}, None

    def _score(self, site: Site, activation: torch.Tensor) -> None:
        if not self.enabled or not (self.always or torch.is_grad_enabled()):
            return
        if activation.dim() == 4 and pcc_shape(activation.shape, self.options).features == 1:
            self._leave_out(site, activation.shape)
            return
        self._latest[site.name] = pcc_with_options(activation, self.options, self.backend,
                                                   check_finite=False)
        self._mean = None

    def _leave_out(self, site: Site, shape) -> None:
        """A site whose rows have one feature: vhat = 0, so its PCC is 0 by definition and would
        only dilute the mean over layers."""
        if is_compiling() or site.name in self._single_feature:
            return
        self._single_feature.add(site.name)
        rows = "1x1 maps" if self.options.orientation == "channel" else "a single channel"
        warnings.warn(
            f"PCCRegularizer: {site.name} has {rows} (activation shape {tuple(shape)}), so each "
            f"{self.options.orientation} row is one value and its PCC is 0 by definition; the "
            "layer is left out of the loss",
            stacklevel=2,
        )

    def loss(self) -> torch.Tensor:
        """The regularisation term of the latest forward pass (a differentiable 0-d tensor):
        ``sgn * weight * mean_score``."""
        return (self.sign * self.weight) * self._mean_score()

    @property
    def mean_score(self) -> torch.Tensor:
        """The latest forward pass's ``mean_l S_l`` (a detached 0-d tensor, on the model's
        device: reading it does not synchronise), the raw PCC score before sign and weight."""
        return self._mean_score().detach()

    def _mean_score(self) -> torch.Tensor:
        if self._mean is not None:
            return self._mean
        if not self._latest:
            raise RuntimeError(self._no_scores_message())
        values = list(self._latest.values())
        mean = torch.stack([v.to(values[0].dtype) for v in values]).mean()
        if self.check_finite and not is_compiling() and not bool(torch.isfinite(mean.detach())):
            bad = [n for n, v in self._latest.items() if not bool(torch.isfinite(v))]
            raise ValueError(
                f"the PCC scores of {', '.join(bad)} are not finite: their activations contain "
                f'NaN or Inf, or values that overflow backend "{self.backend}" (see pccfast.pcc)'
            )
        self._mean = mean
        return mean

    def _no_scores_message(self) -> str:
        if self._single_feature and set(self.layer_names) <= self._single_feature:
            return (
                "PCCRegularizer.loss(): every hooked layer has rows of a single feature (PCC 0 by "
                "definition): use larger inputs, group=\"batch\" or other layers=[...]"
            )
        if self._compiled_model:
            return (
                "PCCRegularizer.loss() saw no activations: the model is compiled (torch.compile), "
                "and hooks added after it has run compiled are not seen; create the "
                "PCCRegularizer before compiling the model (and run a forward pass with "
                "gradients enabled, or always=True)"
            )
        return (
            "PCCRegularizer.loss() needs a forward pass of the model first (with gradients "
            "enabled, or always=True); hooks added after the model has run under torch.compile "
            "are not seen: create the PCCRegularizer before compiling the model"
        )

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """layer name -> the latest PCC score S_l (detached)."""
        return {name: value.detach() for name, value in self._latest.items()}

    def remove(self) -> None:
        """Removes the hooks; the model is as it was before."""
        self._hooks.remove()
        self._latest, self._mean = {}, None

    def __enter__(self) -> "PCCRegularizer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"PCCRegularizer(layers={len(self.sites)}, weight={self.weight}, mode={self.mode!r}, "
            f"{self.options})"
        )


def _options(options, orientation, group, penalty, include_diagonal, eps) -> PCCOptions:
    """``options`` as given, or the separate keywords as one PCCOptions (not both)."""
    if options is None:
        return PCCOptions(orientation, group, penalty, include_diagonal, eps)
    if not isinstance(options, PCCOptions):
        raise TypeError(f"options must be a pccfast.ops.pcc_options.PCCOptions, "
                        f"got {type(options).__name__}")
    given = (orientation, group, penalty, include_diagonal, eps)
    if given != PCCOptions().op_args():
        raise TypeError("give the PCC options either as options=PCCOptions(...) or as separate "
                        "keywords (orientation=, group=, ...), not both")
    return options


def _was_compiled(model: nn.Module) -> bool:
    """torch.compile(model) (an OptimizedModule) or model.compile()."""
    return (compiled_original(model) is not None
            or getattr(model, "_compiled_call_impl", None) is not None)
