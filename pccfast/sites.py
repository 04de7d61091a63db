"""Where the scored activations of a CNN are: the ReLU outputs that follow a conv (+ BN).

The PCC regulariser and the CI collector both hook these tensors. A site names the module
whose forward output is the activation, which call of that module it is (torchvision's ResNet
blocks call one ``relu`` module three times: after bn1, after bn2 and after the residual add;
only the first two follow a BN) and the conv whose output channels the activation carries.

Discovery traces the model with ``torch.fx``; a model that cannot be traced falls back to the
order in which modules were registered, with a warning.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._hooks import marked

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_NORMS = (nn.BatchNorm2d,)


@dataclass(frozen=True)
class Site:
    """One scored activation.

    name: the site's name, the module name or ``module:k`` when the module runs several times.
    module: the module whose forward output is hooked.
    call_index: which call of that module within one forward pass (None: every call).
    conv: the Conv2d whose output channels the activation carries ("" when unknown).
    norm: the BatchNorm2d between them ("" when none).
    apply_relu: the hooked output still needs a ReLU (the model calls F.relu, not a module).
    """

    name: str
    module: str
    call_index: int | None
    conv: str = ""
    norm: str = ""
    apply_relu: bool = False


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _module_of(node, modules, kinds) -> str | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        if isinstance(modules.get(node.target), kinds):
            return node.target
    return None


def _trace_sites(model: nn.Module) -> list[Site]:
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: Counter[str] = Counter()
    call_index: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            call_index[node] = calls[node.target]
            calls[node.target] += 1
    found = []
    for node in graph.nodes:
        if not _is_relu(node, modules) or not node.args:
            continue
        source = node.args[0]
        norm = _module_of(source, modules, _NORMS)
        conv_node = source.args[0] if norm and source.args else source
        conv = _module_of(conv_node, modules, (nn.Conv2d,))
        if conv is None:
            continue  # a ReLU after something else (a residual add, a linear layer)
        if node.op == "call_module":
            hooked, index, apply_relu = node.target, call_index[node], False
        else:  # functional ReLU: hook the module before it and apply the ReLU in the hook
            hooked, index, apply_relu = source.target, call_index[source], True
        name = hooked if calls[hooked] == 1 else f"{hooked}:{index}"
        found.append(Site(name, hooked, index, conv, norm or "", apply_relu))
    return found


def _registration_order_sites(model: nn.Module) -> list[Site]:
    """Fallback: a ReLU module registered right after a BatchNorm2d/Conv2d scores its output."""
    found, conv, norm, previous = [], "", "", None
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # containers
        if isinstance(module, nn.Conv2d):
            conv, norm = name, ""
        elif isinstance(module, _NORMS):
            norm = name
        elif isinstance(module, nn.ReLU) and isinstance(previous, (nn.Conv2d,) + _NORMS):
            found.append(Site(name, name, None, conv, norm))
        previous = module
    return found


def find_sites(model: nn.Module) -> list[Site]:
    """Every ReLU output that follows a Conv2d (optionally through a BatchNorm2d), in order."""
    try:
        return _trace_sites(model)
    except Exception as exc:  # fx cannot trace data-dependent control flow and the like
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "finding the scored ReLUs by module registration order instead",
            stacklevel=2,
        )
        return _registration_order_sites(model)


def select_sites(model: nn.Module, layers=None) -> list[Site]:
    """The sites to hook.

    layers: None (every ReLU after a conv/BN), a list of names (site names such as
    ``"layer1.0.relu:1"``, or module names: every site of that module, or the module's own
    output when it is no site), or a predicate ``(name, module) -> bool`` over named modules
    (a module picked that way that is no site has its own output scored).
    """
    sites = find_sites(model)
    if layers is None:
        return sites
    modules = dict(model.named_modules())
    if callable(layers):
        chosen = [n for n, m in modules.items() if n and layers(n, m)]
    elif isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers):
        chosen = list(layers)
    else:
        raise TypeError(
            "layers must be None, a list of layer names or a predicate (name, module) -> bool, "
            f"got {type(layers).__name__}"
        )
    by_name = {s.name: s for s in sites}
    out: list[Site] = []
    for name in chosen:
        if name in by_name:
            out.append(by_name[name])
            continue
        of_module = [s for s in sites if s.module == name]
        if of_module:
            out.extend(of_module)
        elif name in modules:
            out.append(Site(name, name, None))
        else:
            raise ValueError(
                f"layers names {name!r}, which is neither a scored site "
                f"({', '.join(list(by_name)[:4])}, ...) nor a module of the model"
            )
    if not out:
        raise ValueError("layers selected no module of the model")
    return list(dict.fromkeys(out))


class SiteHooks:
    """Calls ``fn(site, activation)`` for every selected site during each forward of ``model``.

    Modules called several times per forward are told apart by counting their calls; a
    pre-hook on the model resets the counts, and calls ``on_start()`` when given, at the start
    of every forward pass. ``raw=True`` passes the module's own output even where the site
    still needs its ReLU (``site.apply_relu``): a gradient can only be taken w.r.t. that tensor.
    """

    def __init__(self, model: nn.Module, sites: list[Site], fn, on_start=None, raw: bool = False):
        self.fn = fn
        self.on_start = on_start
        self.raw = raw
        self._calls: Counter[str] = Counter()
        modules = dict(model.named_modules())
        by_module: dict[str, dict[int | None, Site]] = {}
        for site in sites:
            by_module.setdefault(site.module, {})[site.call_index] = site
        self._handles = [model.register_forward_pre_hook(self._reset)]
        for module_name, wanted in by_module.items():
            hook = self._make_hook(module_name, wanted)
            self._handles.append(modules[module_name].register_forward_hook(hook))

    @marked
    def _reset(self, module, args):
        self._calls.clear()
        if self.on_start is not None:
            self.on_start()

    def _make_hook(self, module_name: str, wanted: dict[int | None, Site]):
        def hook(module, args, output):
            index = self._calls[module_name]
            self._calls[module_name] += 1
            site = wanted.get(index, wanted.get(None))
            if site is None:
                return
            if site.call_index is None and index > 0:
                site = Site(f"{site.name}:{index}", site.module, index, site.conv, site.norm,
                            site.apply_relu)
            self.fn(site, F.relu(output) if site.apply_relu and not self.raw else output)

        return marked(hook)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
