"""pccfast's own engine's surgery: slices the weights of every module on a pruned group's ports
(conv outputs and inputs, BatchNorm, Linear inputs and outputs; a layer type with roles of its
own through its rule's ``slice``, :mod:`pccfast.prune.layer_rules`), and the forward hooks that
zero the removed channels of the original, the reference the pruned model must match."""

from __future__ import annotations

import torch
from torch import nn

from .._hooks import clean_copy, marked
from .layer_rules import rule_for, split_rule_for


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


_BUILT_IN_ROLES = ("conv_out", "dw", "bn", "linear_out", "conv_in", "linear_in")
# Convs that standardise each filter over its inputs (timm's weight-standardised convs, NFNet,
# BiT): removing an input channel changes the weights of the others.
_STANDARDISED_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
UNPRUNABLE_CONV_HINT = ("Neither pccfast nor its Torch-Pruning fallback prunes this layer type "
                        "exactly: keep the model unpruned, or register a rule for the type "
                        "(pccfast.prune.layer_rules.register_layer) that prunes it exactly")


def unprunable_conv(module: nn.Module) -> str:
    """Why slicing ``module`` as a plain conv would not be exact ("" when it would): parameters
    besides weight and bias (timm's ScaledStdConv2d's per-channel gain), or weights
    standardised over their inputs."""
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
    why = []
    if extra:
        why.append(f"its parameters {', '.join(extra)} (besides weight and bias) are not sliced")
    if type(module).__name__ in _STANDARDISED_CONVS:
        why.append("its weights are standardised over their input channels, so removing one "
                   "changes the others")
    return "; ".join(why)


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


def slice_channels(model: nn.Module, graph, kept: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` keeping, of every group named in ``kept``, those channels."""
    pruned = clean_copy(model)
    modules = dict(pruned.named_modules())
    own_roles: dict[str, dict[str, torch.Tensor]] = {}  # layers with roles of their own
    for (module, role), (index, factor) in _port_indices(graph, kept).items():
        if role not in _BUILT_IN_ROLES:
            own_roles.setdefault(module, {})[role] = index
        elif role.endswith("_in"):
            _slice_in(modules[module], role, index, factor)
        else:
            _slice_out(modules[module], role, index)
    for name, indices in own_roles.items():
        rule = rule_for(modules[name])
        if rule is None or rule.slice is None:
            raise ValueError(f"{name} ({type(modules[name]).__name__}) has ports with roles "
                             f"{sorted(indices)} but no registered slice rule")
        rule.slice(modules[name], indices)
    for owner, parts in getattr(graph, "splits", ()):
        widths = [sum(len(kept[g]) if g in kept else graph.group(g).width for g in part)
                  for part in parts]
        split_rule_for(modules[owner])(modules[owner], widths)
    return pruned


def fx_mask_hooks(model: nn.Module, graph, kept: dict[str, torch.Tensor]) -> list:
    """Forward hooks zeroing the removed channels of every pruned group wherever it is written
    (every producer: conv, BN, Linear and shortcut outputs). Returns the handles."""
    modules = dict(model.named_modules())
    handles = []
    for name, index in kept.items():
        group = graph.group(name)
        removed = torch.ones(group.width, dtype=torch.bool)
        removed[index] = False
        removed = removed.nonzero().flatten()
        for port in group.producers:
            hook = zeroing_hook(port.offset + removed, port.dim)
            handles.append(modules[port.module].register_forward_hook(hook))
    return handles


def zeroing_hook(removed: torch.Tensor, dim: int = 1):
    """A forward hook zeroing channels ``removed`` (positions along ``dim``) of a module's
    output."""
    def hook(module, args, output):
        keep = torch.ones(output.shape[dim], device=output.device, dtype=output.dtype)
        keep[removed.to(output.device)] = 0
        shape = [1] * output.dim()
        shape[dim] = -1
        return output * keep.view(shape)

    return marked(hook)
