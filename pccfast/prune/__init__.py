"""Structured pruning by channel independence, in the four parts Torch-Pruning keeps apart:

- :mod:`~pccfast.prune.graph`: which channels move together (convs, BN, residual streams):
  :func:`build_graph` picks the engine (:mod:`~pccfast.prune.engines`: pccfast's own,
  :mod:`~pccfast.prune.fx_graph` with :mod:`~pccfast.prune.layer_rules`, or Torch-Pruning's,
  :mod:`~pccfast.prune.tp_engine`), and the graph remembers it for the surgery;
- :mod:`~pccfast.prune.scores`: :class:`CICollector`, CI over calibration data, and
  :class:`ScoreCollector` for any criterion (:mod:`~pccfast.prune.criteria`: one
  :class:`Criterion` class each, ci, l1, hrank, taylor, random, in a registry);
- :mod:`~pccfast.prune.plan`: how many and which channels (rate lists, tau, budgets);
- :mod:`~pccfast.prune.surgery`: the physical removal;
plus :mod:`~pccfast.prune.counting` (params/FLOPs), :mod:`~pccfast.prune.pruner` (the four in
one call) and :mod:`~pccfast.prune.tp_importance` (CI as a Torch-Pruning importance).

``pccfast.prune(model, scores, rates=...)`` calls :func:`pccfast.prune.pruner.prune` (also
``pccfast.prune.prune``): the attribute ``pccfast.prune`` is a small callable whose other names
are this package's (:mod:`pccfast.prune_entry`), so ``pccfast.prune.Plan`` and
``pccfast.prune(...)`` both work.
"""

from __future__ import annotations

from .counting import count
from .criteria import CRITERIA, Criterion, ScoredLayer, get_criterion, register_criterion
from .graph import ChannelGroup, PruningGraph, UnsupportedLayerError, build_graph
from .plan import Plan, make_plan, parse_rates, rate_layout
from .pruner import prune
from .scores import CICollector, ScoreCollector, collect_scores, load_scores, save_scores
from .surgery import apply_plan
from .tp_importance import CIImportance

__all__ = [
    "CICollector",
    "CIImportance",
    "CRITERIA",
    "ChannelGroup",
    "Criterion",
    "Plan",
    "PruningGraph",
    "ScoredLayer",
    "ScoreCollector",
    "UnsupportedLayerError",
    "apply_plan",
    "build_graph",
    "collect_scores",
    "count",
    "get_criterion",
    "load_scores",
    "make_plan",
    "parse_rates",
    "prune",
    "rate_layout",
    "register_criterion",
    "save_scores",
]
