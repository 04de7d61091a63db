"""Where the scored activations of a network are: the activation output that follows a conv.

The PCC regulariser and the CI collector both hook these tensors, found by one rule
(:func:`scored_sites`): from a conv (or a pointwise ``nn.Linear`` on a channels-last map, as in
ConvNeXt's MLP), through an optional BatchNorm (plain, or bundled with its activation like
timm's ``BatchNormAct2d``) and layers that pass channels unchanged (Identity, Dropout), to the
first activation: ReLU, ReLU6, LeakyReLU, SiLU, GELU, Hardswish, Mish, ELU, ... as a module or
as a function call in ``forward``. Convs that read a globally pooled 1x1 map (squeeze-excitation,
heads after the pool) have no site: CI and PCC need several spatial positions.

A site names the module whose forward output is the activation, which call of that module it is
(torchvision's ResNet blocks call one ``relu`` module three times: after bn1, after bn2 and after
the residual add; only the first two follow a BN) and the conv whose output channels the
activation carries. A functional activation is applied inside the hook to the output of the
module before it; a channels-last activation is moved to ``(N, C, H, W)``.

Discovery traces the model with ``torch.fx``; a model that cannot be traced falls back to the
order in which modules were registered, with a warning.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._checks import compiled_original
from ._hooks import marked

# Activations: module types, and functions / tensor methods with their out-of-place form.
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU,
    nn.SELU, nn.Hardtanh, nn.Tanh, nn.PReLU,
)
ACTIVATION_FUNCTIONS = {
    F.relu: F.relu, F.relu_: F.relu, torch.relu: F.relu, torch.relu_: F.relu, F.relu6: F.relu6,
    F.leaky_relu: F.leaky_relu, F.leaky_relu_: F.leaky_relu, F.silu: F.silu, F.gelu: F.gelu,
    F.hardswish: F.hardswish, F.mish: F.mish, F.elu: F.elu, F.elu_: F.elu, F.celu: F.celu,
    F.selu: F.selu, F.hardtanh: F.hardtanh, F.hardtanh_: F.hardtanh, torch.tanh: torch.tanh,
}
ACTIVATION_METHODS = {"relu": F.relu, "relu_": F.relu, "tanh": torch.tanh, "tanh_": torch.tanh}
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                        nn.AlphaDropout)
_GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GLOBAL_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
_CHANNELS_LAST_ENDS = ("permute", "reshape", "view", "flatten", "transpose", "movedim")


@dataclass(frozen=True)
class Site:
    """One scored activation.

    name: the site's name, the module name or ``module:k`` when the module runs several times.
    module: the module whose forward output is hooked.
    call_index: which call of that module within one forward pass (None: every call).
    conv: the conv (or pointwise Linear) whose output channels the activation carries.
    norm: the BatchNorm between them ("" when none).
    activation: ``(function, args, kwargs items)`` to apply to the hooked output when the model
      calls the activation as a function (the hook sees the module before it); () otherwise.
    channels_last: the hooked tensor is ``(N, H, W, C)`` (ConvNeXt's and Swin's MLP) or
      ``(N, tokens, C)`` (ViT's MLP); hooks see it as ``(N, C, H, W)`` or ``(N, C, tokens, 1)``.
    """

    name: str
    module: str
    call_index: int | None
    conv: str = ""
    norm: str = ""
    activation: tuple = ()
    channels_last: bool = False

    @property
    def apply_relu(self) -> bool:
        """Whether the hook applies the activation itself (a functional call in ``forward``)."""
        return bool(self.activation)

    def tensor(self, output: torch.Tensor) -> torch.Tensor:
        """The scored ``(N, C, ...)`` activation from the hooked module's output."""
        if self.activation:
            fn, args, kwargs = self.activation
            output = fn(output, *args, **dict(kwargs))
        if not self.channels_last:
            return output
        output = output.movedim(-1, 1)
        return output.unsqueeze(-1) if output.dim() == 3 else output  # (N, C, tokens, 1)


def _leaf_types():
    from .prune.layer_rules import leaf_types

    return (_BatchNorm, nn.Conv2d, nn.Linear) + leaf_types()


def is_drop_path(module: nn.Module) -> bool:
    """timm's DropPath: per-sample scaling in training, identity in eval (channels untouched).
    Traced as one call, as torchvision's ``stochastic_depth`` is."""
    return type(module).__name__ == "DropPath" and type(module).__module__.startswith("timm.")


class Tracer(fx.Tracer):
    """torch.fx's tracer with convs, linears and BatchNorms (subclasses too: timm's
    ``BatchNormAct2d``, ``Conv2dSame``) and the layer types registered as leaves
    (:func:`pccfast.prune.layer_rules.register_layer`, e.g. option-A shortcuts) kept as single
    calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .prune.counting import is_token_attention  # timm's attention: one call

        from .prune.layer_rules import is_leaf  # registered by name (timm's SplitAttn)

        return (isinstance(m, _leaf_types()) or is_token_attention(m) or is_drop_path(m)
                or is_leaf(m) or super().is_leaf_module(m, qualname))


def trace(model: nn.Module, training: bool = True) -> fx.Graph:
    """The fx graph of ``model`` as it trains (every branch a training step runs, e.g.
    GoogLeNet's auxiliary heads), or as it evaluates; the model's own modes are left as they
    were."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        return Tracer().trace(model)
    finally:
        for m, training in saved:
            m.training = training


def eval_modules(model: nn.Module) -> set[str] | None:
    """The modules an eval-mode forward calls (None if it does not trace): CI is collected in
    eval mode, so sites in training-only branches (auxiliary heads) never see an image."""
    try:
        graph = trace(model, training=False)
    except Exception:
        return None
    return {n.target for n in graph.nodes if n.op == "call_module"}


def bundled_activation(module: nn.Module) -> nn.Module | None:
    """The activation inside a norm+activation module (timm's ``BatchNormAct2d``), or None."""
    act = getattr(module, "act", None) if isinstance(module, _BatchNorm) else None
    return act if isinstance(act, nn.Module) and not isinstance(act, nn.Identity) else None


def _constant(value) -> bool:
    return not isinstance(value, fx.Node)


def activation_of(node: fx.Node, modules) -> tuple | None:
    """``()`` for an activation module, ``(fn, args, kwargs)`` for a functional one, else None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, nn.PReLU) and m.num_parameters != 1:
            return None  # per-channel slopes: a layer with weights, not a plain activation
        return () if isinstance(m, ACTIVATION_MODULES) else None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        fn = ACTIVATION_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in ACTIVATION_METHODS:
        fn = ACTIVATION_METHODS[node.target]
    else:
        return None
    args, kwargs = node.args[1:], {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if args and isinstance(args[-1], bool):
        args = args[:-1]  # a positional inplace flag (every one of them has it last)
    if not all(_constant(a) for a in args) or not all(_constant(v) for v in kwargs.values()):
        return None
    return fn, tuple(args), tuple(sorted(kwargs.items()))


def is_global_pool(node: fx.Node, modules) -> bool:
    """Whether ``node`` pools every spatial position into one (1x1 maps or (N, C) vectors)."""
    def is_one(size):
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        return all(s == 1 for s in sizes)

    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, _GLOBAL_POOL_MODULES) and is_one(m.output_size)
    if node.op == "call_function" and node.target in _GLOBAL_POOL_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return is_one(size)
    is_mean = (node.op == "call_method" and node.target in ("mean", "amax")) or (
        node.op == "call_function" and node.target in (torch.mean, torch.amax))
    if is_mean:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return {2, 3} <= set(dims) or {-1, -2} <= set(dims)
    return False


def _flattened_map(node) -> bool:
    """Whether ``node`` is ``x.flatten(2)`` (an ``(N, C, H, W)`` map as ``(N, C, tokens)``)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return False
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim")
    return target == "flatten" and start == 2


def _keeps_last_dim(node: fx.Node) -> bool:
    """Whether a reshape keeps the channels in the last dim (known once shapes were
    propagated): the same size, or a multiple (the dims before merged in: patch merging)."""
    shapes = [getattr(n.meta.get("tensor_meta"), "shape", None) for n in (node, node.args[0])]
    return (all(s is not None and len(s) >= 3 for s in shapes)
            and shapes[0][-1] % shapes[1][-1] == 0)


def pooled_and_last(graph: fx.Graph, modules) -> tuple[set, set]:
    """(pooled, channels_last): nodes computed from globally pooled maps only; nodes whose
    channels are the last dim (after ``permute(0, 2, 3, 1)`` or timm's
    ``flatten(2).transpose(1, 2)``, until the next reshape)."""
    pooled, last = set(), set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if is_global_pool(node, modules) or (inputs and all(a in pooled for a in inputs)):
            pooled.add(node)
        target = node.target
        target = target if isinstance(target, str) else getattr(target, "__name__", "")
        if target == "permute" and node.op in ("call_method", "call_function"):
            dims = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims", ()),)
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = tuple(dims[0])
            if tuple(dims) in ((0, 2, 3, 1), (0, 2, 1)):  # (N, H, W, C); ViT's (N, tokens, C)
                last.add(node)
            elif node.args and node.args[0] in last and dims and dims[-1] in (len(dims) - 1, -1):
                last.add(node)  # the last dim stays last
        elif target == "transpose" and _flattened_map(node.args[0] if node.args else None):
            if set(node.args[1:3]) in ({1, 2}, {1, -1}):  # timm's x.flatten(2).transpose(1, 2)
                last.add(node)
        elif (target in ("reshape", "view", "flatten") and node.args and node.args[0] in last
              and _keeps_last_dim(node)):  # timm's Swin: (N, H, W, C) <-> (N, H*W, C)
            last.add(node)
        elif target not in _CHANNELS_LAST_ENDS and node.args and node.op != "output":
            first = node.args[0]
            if target == "cat" and isinstance(first, (tuple, list)):  # ViT's class token
                first = next((a for a in first if isinstance(a, fx.Node) and a in last), None)
            if isinstance(first, fx.Node) and first in last:
                last.add(node)
    return pooled, last


def _call_indices(graph: fx.Graph):
    calls: Counter[str] = Counter()
    index: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            index[node] = calls[node.target]
            calls[node.target] += 1
    return index, calls


def scored_sites(graph: fx.Graph, modules: dict[str, nn.Module], chip_pool: bool = False
                 ) -> dict[fx.Node, Site]:
    """Producer node -> the site of its activation, for every conv, pointwise Linear on a
    channels-last map and residual add that has one (see the module docstring).

    chip_pool: where a MaxPool2d module directly follows an activation module, score the pool's
    output instead (CHIP's choice for VGG: the tensor the next conv reads).
    """
    pooled, last = pooled_and_last(graph, modules)
    call_index, calls = _call_indices(graph)

    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def next_real(node):
        nxt = only_user(node)
        while nxt is not None and nxt.op == "call_module" and isinstance(
                modules.get(nxt.target), _TRANSPARENT_MODULES):
            node, nxt = nxt, only_user(nxt)
        return node, nxt

    def site_at(hooked: fx.Node, conv, norm, activation=(), channels_last=False):
        index = call_index[hooked]
        name = hooked.target if calls[hooked.target] == 1 else f"{hooked.target}:{index}"
        return Site(name, hooked.target, index, conv, norm, activation, channels_last)

    def maybe_pool(node: fx.Node, site: Site) -> Site:
        if not chip_pool:
            return site
        pool = only_user(node)
        if pool is not None and pool.op == "call_module" and isinstance(
                modules.get(pool.target), nn.MaxPool2d):
            return site_at(pool, site.conv, site.norm)
        return site

    def find(start: fx.Node) -> Site | None:
        conv = start.target if start.op == "call_module" else ""
        channels_last = start in last
        node, nxt = next_real(start)
        if nxt is not None and _joins_convs(nxt, modules):  # MixNet's mixed conv: its parts
            node, nxt = next_real(nxt)  # are scored on the concatenation's activation
        norm = ""
        if nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target),
                                                                      _BatchNorm):
            norm = nxt.target
            if bundled_activation(modules[norm]) is not None:
                return maybe_pool(nxt, site_at(nxt, conv, norm, (), channels_last))
            node, nxt = next_real(nxt)
        if nxt is None:
            return None
        activation = activation_of(nxt, modules)
        if activation is None:
            return None
        if activation == ():
            return maybe_pool(nxt, site_at(nxt, conv, norm, (), channels_last))
        if node.op != "call_module":  # a functional activation after a function: no hook point
            return None
        return site_at(node, conv, norm, activation, channels_last)

    out = {}
    for node in graph.nodes:
        if node.op == "call_module":
            m = modules.get(node.target)
            is_conv = isinstance(m, nn.Conv2d)
            is_pointwise = isinstance(m, nn.Linear) and node.args and node.args[0] in last
            if not (is_conv or is_pointwise) or (node.args and node.args[0] in pooled):
                continue
        elif not _is_add(node):
            continue
        site = find(node)
        if site is not None:
            out[node] = site
    return out


def _joins_convs(node: fx.Node, modules) -> bool:
    """A concatenation along the channels of convs read by nothing else (a mixed conv)."""
    if not (node.op == "call_function" and node.target is torch.cat and node.args):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = node.args[0]
    return dim == 1 and isinstance(parts, (list, tuple)) and all(
        isinstance(p, fx.Node) and p.op == "call_module"
        and isinstance(modules.get(p.target), nn.Conv2d) and len(p.users) == 1 for p in parts)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


def _trace_sites(model: nn.Module) -> list[Site]:
    graph = trace(model)
    found = scored_sites(graph, dict(model.named_modules()))
    return list(dict.fromkeys(s for node, s in found.items() if not _is_add(node)))


def _registration_order_sites(model: nn.Module) -> list[Site]:
    """Fallback: an activation module registered right after a BatchNorm/conv scores its
    output, and so does a norm+activation module right after a conv."""
    found, conv, norm, previous = [], "", "", None
    for name, module in model.named_modules():
        if next(module.children(), None) is not None and not isinstance(module, _BatchNorm):
            continue  # containers (a BatchNormAct2d holds its activation)
        if isinstance(module, nn.Conv2d):
            conv, norm = name, ""
        elif isinstance(module, _BatchNorm):
            norm = name
            if bundled_activation(module) is not None and isinstance(previous, nn.Conv2d):
                found.append(Site(name, name, None, conv, norm))
        elif isinstance(module, ACTIVATION_MODULES) and isinstance(previous,
                                                                   (nn.Conv2d, _BatchNorm)):
            found.append(Site(name, name, None, conv, norm))
        if not isinstance(module, _TRANSPARENT_MODULES):
            previous = module
    return found


def find_sites(model: nn.Module) -> list[Site]:
    """Every activation output that follows a conv (optionally through a BatchNorm), in order."""
    inner = compiled_original(model)
    if inner is not None:
        # torch.compile(model): fx traces the original; names keep the wrapper's "_orig_mod."
        def outer(name: str) -> str:
            return f"_orig_mod.{name}" if name else ""

        return [replace(s, name=outer(s.name), module=outer(s.module), conv=outer(s.conv),
                        norm=outer(s.norm)) for s in find_sites(inner)]
    try:
        return _trace_sites(model)
    except Exception as exc:  # fx cannot trace data-dependent control flow and the like
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "finding the scored activations by module registration order instead",
            stacklevel=2,
        )
        return _registration_order_sites(model)


def select_sites(model: nn.Module, layers=None) -> list[Site]:
    """The sites to hook.

    layers: None (every activation after a conv/BN), a list of names (site names such as
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
    still needs its activation function (``site.apply_relu``) or is channels-last
    (``site.channels_last``): a gradient can only be taken w.r.t. that tensor.
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
                site = replace(site, name=f"{site.name}:{index}", call_index=index)
            self.fn(site, output if self.raw else site.tensor(output))

        return marked(hook)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
