"""Tied weights: one parameter shared by several modules. Surgery gives every pruned module its
own sliced copy, so pruning would untie them silently; :func:`check_ties` refuses instead."""

from __future__ import annotations

from torch import nn


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that are one tensor held by several modules, one list per tie."""
    holders: dict[int, list[str]] = {}
    modules: dict[int, set[int]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{module_name}.{name}".lstrip("."))
            modules.setdefault(id(param), set()).add(id(module))
    return [names for key, names in holders.items() if len(modules[key]) > 1]


def check_ties(model: nn.Module, pruned: nn.Module) -> None:
    """Raises ValueError when a tie of ``model`` is broken in ``pruned``."""
    for names in tied_parameters(model):
        try:
            params = [pruned.get_parameter(n) for n in names]
        except AttributeError:
            continue  # (a module the pruner replaced)
        if any(p is not params[0] for p in params):
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(names, params))
            raise ValueError(
                f"{' and '.join(names)} are one tensor (tied weights) in "
                f"{type(model).__name__}, and pruning would untie them ({shapes}): pccfast "
                "does not prune tied weights; untie them first if they may differ (e.g. "
                f"model.{names[1]} = nn.Parameter(model.{names[0]}.detach().clone()))")
