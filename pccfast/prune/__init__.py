"""Structured pruning by channel independence, in the four parts Torch-Pruning keeps apart:

- :mod:`~pccfast.prune.graph`: which channels move together (convs, BN, residual streams);
- :mod:`~pccfast.prune.scores`: :class:`CICollector`, CI over calibration data, and
  :class:`ScoreCollector` for any criterion (:mod:`~pccfast.prune.criteria`: one
  :class:`Criterion` class each, ci, l1, hrank, taylor, random, in a registry);
- :mod:`~pccfast.prune.plan`: how many and which channels (rate lists, tau, budgets);
- :mod:`~pccfast.prune.surgery`: the physical removal;
plus :mod:`~pccfast.prune.counting` (params/FLOPs), :mod:`~pccfast.prune.tp_engine`
(Torch-Pruning for models outside the zoo) and :mod:`~pccfast.prune.tp_importance` (CI as a
Torch-Pruning importance).

This package is also callable: ``pccfast.prune(model, scores, rates=...)`` is
:func:`pccfast.prune.pruner.prune`, so ``pccfast.prune.Plan`` and ``pccfast.prune(...)`` both work.
"""

from __future__ import annotations

import sys
import types

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


class _CallablePackage(types.ModuleType):
    """Lets ``pccfast.prune(...)`` call :func:`prune` while ``pccfast.prune.*`` stays a package."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
