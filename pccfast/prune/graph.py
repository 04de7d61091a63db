"""Which channels move together: the pruning graph of a model (the structure part of pruning).

The stable import path of :func:`build_graph` (the engine switch, :mod:`pccfast.prune.engines`)
and of the graph's types (:mod:`pccfast.prune.graph_types`). How pccfast's own engine follows a
CNN (convs, BatchNorm, residual streams, concatenations, grouped convs, attention kept whole):
:mod:`pccfast.prune.fx_graph`; Torch-Pruning's: :mod:`pccfast.prune.tp_engine`.
"""

from __future__ import annotations

from .engines import build_graph
from .graph_types import (ENGINES, RESIDUAL_MODES, ChannelGroup, CostTerm, Port, PruningGraph,
                          TorchPruningFailure, UnsupportedLayerError)

__all__ = ["ENGINES", "RESIDUAL_MODES", "ChannelGroup", "CostTerm", "Port", "PruningGraph",
           "TorchPruningFailure", "UnsupportedLayerError", "build_graph"]
