"""The physical removal of channels (the mechanical part of pruning).

:func:`apply_plan` checks a plan against the model's graph and hands it to the graph's engine
(:mod:`pccfast.prune.engines`), which returns a smaller copy of the model: the same module
classes with sliced weights, so the result is a plain ``nn.Module`` that trains, saves and
exports like the original. :func:`mask_hooks` builds the reference it must match: the original
model with the removed channels zeroed wherever they are written (tests, and
``prune(..., verify=True)``).
"""

from __future__ import annotations

import torch
from torch import nn

from .._modules import eval_mode
from ..models._common import RECIPE_ATTRIBUTE
from .engines import build_graph, engine_of

def kept_tensors(graph, plan) -> dict[str, torch.Tensor]:
    """group name -> kept indices (LongTensor), for the groups the plan shrinks."""
    out = {}
    for layer in plan.layers:
        try:
            group = graph.group(layer.name)
        except KeyError:
            raise ValueError(f"the plan prunes {layer.name!r}, which this model does not have "
                             "(a plan replays on the model it was made for)") from None
        if group.width != layer.width_before:
            raise ValueError(f"the plan expects {layer.name!r} to have {layer.width_before} "
                             f"channels, the model has {group.width}")
        index = torch.as_tensor(layer.kept_indices, dtype=torch.long)
        if index.numel() != layer.width_after or index.numel() == 0:
            raise ValueError(f"the plan keeps {index.numel()} indices of {layer.name!r} but says "
                             f"width_after={layer.width_after}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= group.width
                              or bool((index[1:] <= index[:-1]).any())):
            raise ValueError(f"the plan's kept_indices of {layer.name!r} must be increasing "
                             f"and within 0..{group.width - 1}")
        if group.chunks > 1 and len(set(torch.bincount(
                index // (group.width // group.chunks), minlength=group.chunks).tolist())) != 1:
            raise ValueError(f"the plan's kept_indices of {layer.name!r} must keep the same "
                             f"number of channels in each of its {group.chunks} conv groups")
        if index.numel() < group.width:
            out[layer.name] = index
    return out


def apply_plan(model: nn.Module, plan, graph=None) -> nn.Module:
    """A physically smaller copy of ``model`` keeping the plan's channels (model unchanged).

    graph: the model's :class:`~pccfast.prune.graph_types.PruningGraph` (rebuilt from the
    plan's input size, options and engine when omitted).
    """
    if graph is None:
        graph = build_graph(model, plan.input_size, plan.residual, plan.prune_classifier_input,
                            engine=plan.engine)
    pruned = engine_of(graph).apply(model, graph, kept_tensors(graph, plan))
    recipe = getattr(pruned, RECIPE_ATTRIBUTE, None)
    if isinstance(recipe, dict):
        recipe["plans"] = list(recipe.get("plans", [])) + [plan.to_dict()]
    return pruned


def mask_hooks(model: nn.Module, graph, kept: dict[str, torch.Tensor]) -> list:
    """Forward hooks zeroing the removed channels of every pruned group wherever they are
    written (conv, BN and shortcut outputs). Returns the handles (``h.remove()`` each)."""
    return engine_of(graph).mask_hooks(model, graph, kept)


def max_masked_difference(model: nn.Module, pruned: nn.Module, graph, plan, x=None):
    """(max |pruned(x) - masked original(x)|, max |masked original(x)|) on x (random by
    default), both models in eval mode (their modes are restored)."""
    kept = kept_tensors(graph, plan)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if x is None:
        x = torch.randn(plan.input_size, device=device)
    handles = mask_hooks(model, graph, kept)
    try:
        with eval_mode(model, pruned), torch.no_grad():
            reference = model(x)
            out = pruned(x)
    finally:
        for h in handles:
            h.remove()
    return float((out - reference).abs().max()), float(reference.abs().max())
