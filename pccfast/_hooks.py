"""The hooks pccfast puts on a user's model are marked, so that the copies pccfast makes
(:func:`pccfast.prune`'s pruned model) never carry them: a pruned model must not call back into a
CICollector or a PCCRegularizer, and must pickle (``pccfast.save``) although hooks are closures.
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn

HOOK_MARK = "_pccfast_hook"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


def marked(fn):
    """Marks ``fn`` (a function; for a method, its class's function) as a pccfast hook."""
    setattr(fn, HOOK_MARK, True)
    return fn


def is_marked(fn) -> bool:
    return bool(getattr(fn, HOOK_MARK, False))


@contextlib.contextmanager
def without_marked_hooks(model: nn.Module):
    """Takes pccfast's hooks off every submodule for the duration, then puts them back in their
    order (the handles stay valid: the same dicts are refilled)."""
    saved = []
    for module in model.modules():
        marked_ids = {key for attr in _HOOK_DICTS[:4]
                      for key, fn in module.__dict__.get(attr, {}).items() if is_marked(fn)}
        if not marked_ids:
            continue
        for attr in _HOOK_DICTS:  # the hooks and the flags torch keeps by hook id
            d = module.__dict__.get(attr)
            if d and marked_ids.intersection(d):
                saved.append((d, dict(d)))
                for key in marked_ids.intersection(d):
                    del d[key]
    try:
        yield
    finally:
        for d, items in saved:
            d.clear()
            d.update(items)


def clean_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` without pccfast's hooks (the user's own hooks are copied)."""
    with without_marked_hooks(model):
        return copy.deepcopy(model)
