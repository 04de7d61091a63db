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

_PRODUCER_ROLES = ("conv_out", "dw", "bn", "shortcut_out", "linear_out")


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
    elif role == "dw":  # a depthwise conv: its inputs, outputs and groups go together
        _replace_param(module, "weight", 0, index)
        _replace_param(module, "bias", 0, index)
        module.in_channels = module.out_channels = module.groups = index.numel()
    elif role == "bn":
        for name in ("weight", "bias", "running_mean", "running_var"):
            _replace_param(module, name, 0, index)
        module.num_features = index.numel()
    elif role == "linear_out":
        _replace_param(module, "weight", 0, index)
        _replace_param(module, "bias", 0, index)
        module.out_features = index.numel()


def _slice_grouped_in(module: nn.Conv2d, index: torch.Tensor) -> None:
    """A grouped conv's inputs: every group keeps the same number, each output row reads the
    kept inputs of its own group."""
    groups, per_group = module.groups, module.in_channels // module.groups
    local = index.view(groups, -1) - (torch.arange(groups) * per_group)[:, None]
    weight = module.weight.detach()
    rows = weight.shape[0] // groups
    parts = [weight[g * rows:(g + 1) * rows].index_select(1, local[g].to(weight.device))
             for g in range(groups)]
    module.weight = nn.Parameter(torch.cat(parts).clone(),
                                 requires_grad=module.weight.requires_grad)


def _slice_in(module: nn.Module, role: str, index: torch.Tensor, factor: int) -> None:
    if role == "conv_in":
        if module.groups > 1:
            _slice_grouped_in(module, index)
        else:
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
        if group.chunks > 1 and len(set(torch.bincount(
                index // (group.width // group.chunks), minlength=group.chunks).tolist())) != 1:
            raise ValueError(f"the plan's kept_indices of {layer.name!r} must keep the same "
                             f"number of channels in each of its {group.chunks} conv groups")
        if index.numel() < group.width:
            out[layer.name] = index
    return out


def _port_indices(graph, kept: dict[str, torch.Tensor]) -> dict[tuple[str, str], tuple]:
    """(module, role) -> (kept channel indices over all the module's channels there, features
    per channel), for every port that loses a channel. A port reading a concatenation gathers
    the kept channels of each segment at its offset."""
    pieces: dict[tuple[str, str], list] = {}
    for group in graph.groups:
        index = kept.get(group.name)
        for port in group.producers + group.consumers:
            piece = (port.offset, index if index is not None else torch.arange(group.width),
                     index is not None, port.factor)
            pieces.setdefault((port.module, port.role), []).append(piece)
    out = {}
    for key, parts in pieces.items():
        parts = sorted(dict(((p[0], p[1].numel()), p) for p in parts).values(), key=lambda p: p[0])
        if not any(p[2] for p in parts):
            continue
        out[key] = (torch.cat([offset + index for offset, index, _, _ in parts]), parts[0][3])
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
        for (module, role), (index, factor) in _port_indices(graph, kept).items():
            if role == "shortcut_out":
                shortcuts.setdefault(module, [None, None])[1] = index
            elif role == "shortcut_in":
                shortcuts.setdefault(module, [None, None])[0] = index
            elif role.endswith("_in"):
                _slice_in(modules[module], role, index, factor)
            else:
                _slice_out(modules[module], role, index)
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
        removed = removed.nonzero().flatten()
        for port in group.producers:
            if port.role in _PRODUCER_ROLES:
                hook = _zeroing_at(port.offset + removed, port.dim)
                handles.append(modules[port.module].register_forward_hook(hook))
    return handles


def _zeroing_at(removed: torch.Tensor, dim: int):
    """A hook zeroing channels ``removed`` (positions along ``dim``) of a module's output."""
    def hook(module, args, output):
        keep = torch.ones(output.shape[dim], device=output.device, dtype=output.dtype)
        keep[removed.to(output.device)] = 0
        shape = [1] * output.dim()
        shape[dim] = -1
        return output * keep.view(shape)

    return marked(hook)


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
