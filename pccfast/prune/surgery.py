"""The physical removal of channels (the mechanical part of pruning).

:func:`apply_plan` returns a smaller copy of the model: the same module classes with sliced
weights (conv outputs, BatchNorm, the next conv's inputs, a Linear's inputs, option-A shortcut
indices), so the result is a plain ``nn.Module`` that trains, saves and exports like the
original. :func:`mask_hooks` builds the reference it must match: the original model with the
removed channels zeroed wherever they are written (tests, and ``prune(..., verify=True)``).
"""

from __future__ import annotations

import torch
from torch import nn

from .._hooks import clean_copy, marked
from ..models._common import RECIPE_ATTRIBUTE, eval_mode
from ..models.resnet_cifar import PadShortcut

_PRODUCER_ROLES = ("conv_out", "bn", "shortcut_out", "linear_out")


def _replace_param(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


def _slice_out(module: nn.Module, role: str, index: torch.Tensor) -> None:
    if role == "conv_out":
        _replace_param(module, "weight", 0, index)
        _replace_param(module, "bias", 0, index)
        module.out_channels = index.numel()
    elif role == "bn":
        for name in ("weight", "bias", "running_mean", "running_var"):
            _replace_param(module, name, 0, index)
        module.num_features = index.numel()
    elif role == "linear_out":
        _replace_param(module, "weight", 0, index)
        _replace_param(module, "bias", 0, index)
        module.out_features = index.numel()


def _slice_in(module: nn.Module, role: str, index: torch.Tensor, factor: int) -> None:
    if role == "conv_in":
        _replace_param(module, "weight", 1, index)
        module.in_channels = index.numel()
    elif role == "linear_in":
        features = (index[:, None] * factor + torch.arange(factor)).flatten()
        _replace_param(module, "weight", 1, features)
        module.in_features = features.numel()


def _remap_shortcut(module: PadShortcut, kept_in: torch.Tensor | None,
                    kept_out: torch.Tensor | None) -> None:
    """Keeps the pairs (source -> target) whose both ends survive, renumbered."""
    in_pos = torch.full((module.in_channels,), -1, dtype=torch.long)
    out_pos = torch.full((module.out_channels,), -1, dtype=torch.long)
    kept_in = torch.arange(module.in_channels) if kept_in is None else kept_in
    kept_out = torch.arange(module.out_channels) if kept_out is None else kept_out
    in_pos[kept_in] = torch.arange(kept_in.numel())
    out_pos[kept_out] = torch.arange(kept_out.numel())
    source, target = in_pos[module.source.cpu()], out_pos[module.target.cpu()]
    both = (source >= 0) & (target >= 0)
    device = module.source.device
    module.source = source[both].to(device)
    module.target = target[both].to(device)
    module.in_channels = kept_in.numel()
    module.out_channels = kept_out.numel()


def _kept_tensors(graph, plan) -> dict[str, torch.Tensor]:
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
        if index.numel() < group.width:
            out[layer.name] = index
    return out


def apply_plan(model: nn.Module, plan, graph=None) -> nn.Module:
    """A physically smaller copy of ``model`` keeping the plan's channels (model unchanged).

    graph: the model's :class:`~pccfast.prune.graph.PruningGraph` (rebuilt from the plan's
    input size and options when omitted).
    """
    if graph is None:
        from .graph import build_graph

        graph = build_graph(model, plan.input_size, plan.residual, plan.prune_classifier_input,
                            engine=plan.engine)
    kept = _kept_tensors(graph, plan)
    if graph.engine == "torch_pruning":
        from .tp_engine import apply_tp_plan

        pruned = apply_tp_plan(model, graph, kept)
    else:
        pruned = clean_copy(model)
        modules = dict(pruned.named_modules())
        shortcuts: dict[str, list] = {}
        for name, index in kept.items():
            group = graph.group(name)
            for port in group.producers:
                if port.role == "shortcut_out":
                    shortcuts.setdefault(port.module, [None, None])[1] = index
                else:
                    _slice_out(modules[port.module], port.role, index)
            for port in group.consumers:
                if port.role == "shortcut_in":
                    shortcuts.setdefault(port.module, [None, None])[0] = index
                else:
                    _slice_in(modules[port.module], port.role, index, port.factor)
        for name, (kept_in, kept_out) in shortcuts.items():
            _remap_shortcut(modules[name], kept_in, kept_out)
    recipe = getattr(pruned, RECIPE_ATTRIBUTE, None)
    if isinstance(recipe, dict):
        recipe["plans"] = list(recipe.get("plans", [])) + [plan.to_dict()]
    return pruned


def mask_hooks(model: nn.Module, graph, kept: dict[str, torch.Tensor]) -> list:
    """Forward hooks zeroing the removed channels of every pruned group wherever they are
    written (conv, BN and shortcut outputs). Returns the handles (``h.remove()`` each)."""
    if graph.engine == "torch_pruning":
        from .tp_engine import tp_mask_hooks

        return tp_mask_hooks(model, graph, kept)
    modules = dict(model.named_modules())
    handles = []
    for name, index in kept.items():
        group = graph.group(name)
        removed = torch.ones(group.width, dtype=torch.bool)
        removed[index] = False
        for port in group.producers:
            if port.role in _PRODUCER_ROLES:
                handles.append(modules[port.module].register_forward_hook(_zeroing(removed)))
    return handles


def _zeroing(removed: torch.Tensor):
    def hook(module, args, output):
        keep = (~removed).to(output.device, output.dtype)
        return output * keep.view(1, -1, *([1] * (output.dim() - 2)))

    return marked(hook)


def max_masked_difference(model: nn.Module, pruned: nn.Module, graph, plan, x=None):
    """(max |pruned(x) - masked original(x)|, max |masked original(x)|) on x (random by
    default), both models in eval mode (their modes are restored)."""
    kept = _kept_tensors(graph, plan)
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
