"""Models outside pccfast's own structural pruner: Torch-Pruning's DependencyGraph finds the
coupled layers (concatenations, depthwise and grouped convs, ...) and performs the removal, while
the channel choice stays ours (CI scores, the same plans).

Groups are Torch-Pruning's pruning groups rooted at each Conv2d, named after their first conv;
a group with several convs (a residual stream) has kind ``stream``. Scored sites are found on the
fx graph when the model traces (the same rule as :mod:`pccfast.prune.graph`), else by
:func:`pccfast.sites.find_sites`. Budgets are searched on a closed form, as in the pccfast engine:
each group removes, from every conv/linear/BN its Torch-Pruning group touches, the same share of
that layer's channels, and each layer's params and MACs are bilinear in its widths; the form is
checked at build time against an actually pruned copy (every prunable group halved), and where
it disagrees (a layer it does not model) the search counts pruned copies instead (slow).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import signal
import threading
import traceback

import torch
from torch import nn

from .._hooks import clean_copy, marked
from .._modules import eval_mode
from .counting import COUNTED_CONVS, COUNTED_NORMS, count
from .fx_graph import build_fx_graph
from .fx_surgery import UNPRUNABLE_CONV_HINT, unprunable_conv, zeroing_hook
from .graph_types import (ChannelGroup, Port, PruningGraph, TorchPruningFailure,
                          UnsupportedLayerError)


# Torch-Pruning's grouping can run for hours on some graphs (torchvision's swin_v2_s, timm's
# coatnet_0_rw_224: _fix_dependency_graph_non_recursive): the fallback gives up after this long.
TIME_LIMIT_S = 120.0


class _TimeUp(BaseException):
    """The alarm (a BaseException, so Torch-Pruning's and our ``except Exception`` pass it)."""


@contextlib.contextmanager
def time_limit(seconds: float, model_name: str):
    """Raises :class:`TorchPruningFailure` when the block runs past ``seconds``. The bound
    needs SIGALRM, so it holds in the main thread of a Unix process; elsewhere (other threads,
    Windows, a timer already set by the caller) the block runs unbounded."""
    usable = (hasattr(signal, "setitimer") and seconds and seconds > 0
              and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return

    late, active = [], [True]

    def alarm(signum, frame):
        late.append(True)
        if active[0]:
            raise _TimeUp

    def stop():
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    previous = signal.signal(signal.SIGALRM, alarm)
    # Repeats: an alarm raised inside a finaliser is swallowed by Python, so it comes again.
    signal.setitimer(signal.ITIMER_REAL, seconds, min(seconds, 1.0))
    try:
        try:
            yield
        finally:
            stop()
    except _TimeUp:  # from the block, or (rarely) from stop() itself
        stop()
    if late:  # also when the block finished after a swallowed alarm: past the limit either way
        raise TorchPruningFailure(
            f"Torch-Pruning did not finish grouping {model_name}'s layers within {seconds:g} s "
            "(pccfast.prune.tp_engine.TIME_LIMIT_S)",
            f"no result within {seconds:g} s; pccfast.prune.tp_engine.TIME_LIMIT_S bounds it")


def torch_pruning_missing() -> str:
    if importlib.util.find_spec("torch_pruning") is None:
        return "Torch-Pruning is not installed (pip install torch-pruning, or pccfast[prune])"
    return ""


def _tp():
    missing = torch_pruning_missing()
    if missing:
        raise ImportError(missing)
    import torch_pruning

    return torch_pruning


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def output_layers(model: nn.Module, input_size) -> set[str]:
    """The conv and linear layers whose outputs are the model's outputs: the last such layer on
    every path from an output back into the network (through BN, activations, pooling,
    reshapes; found on the autograd graph of one forward pass, so any model that runs has them).
    Pruning one would change what the model returns (squeezenet's classifier is a Conv2d)."""
    names = {m: n for n, m in model.named_modules()}
    made_by: dict = {}

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            made_by[output.grad_fn] = names[module]

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    handles = [m.register_forward_hook(marked(hook)) for m in layers]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with eval_mode(model), torch.enable_grad():
            outputs = model(torch.randn(input_size, device=device, requires_grad=True))
    finally:
        for h in handles:
            h.remove()
    found, seen = set(), set()
    stack = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in made_by:
            found.add(made_by[fn])
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def _failure(model: nn.Module, input_size, exc: Exception, doing: str) -> TorchPruningFailure:
    """Torch-Pruning's own exception (a bare ZeroDivisionError on ShuffleNet's channel shuffle)
    as an error that says which part of the model pccfast's tracer cannot follow either."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if "torch_pruning" in f.filename]
    where = f" in {inside[-1].name}" if inside else ""
    detail = f"{type(exc).__name__}{where} while {doing}"
    part = ""
    try:
        build_fx_graph(model, input_size, "stream", False)
    except UnsupportedLayerError as stop:
        part = f"; pccfast's own pruner stops at {stop.layer} ({stop.what}): {stop.why}"
    except Exception:  # the model does not trace: Torch-Pruning's detail is all there is
        pass
    return TorchPruningFailure(
        f"Torch-Pruning fails on {type(model).__name__} ({detail}: {exc}){part}; this model "
        "cannot be pruned", detail)


def _dependency_graph(model: nn.Module, input_size):
    tp = _tp()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with eval_mode(model):
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.randn(input_size, device=device), verbose=False)
    except Exception as exc:
        raise _failure(model, input_size, exc, "building its dependency graph") from exc


def _sites_by_conv(model: nn.Module) -> dict:
    """conv name -> its scored site, by the rule of :func:`pccfast.sites.scored_sites` (CHIP's
    max-pool choice included) when the model traces."""
    from ..sites import find_sites, scored_sites, trace

    try:
        graph = trace(model)
    except Exception:
        return {s.conv: s for s in find_sites(model) if s.conv}
    found = scored_sites(graph, dict(model.named_modules()), chip_pool=True)
    return {node.target: site for node, site in found.items() if node.op == "call_module"}


class TPGraph(PruningGraph):
    """A :class:`PruningGraph` whose structure comes from Torch-Pruning."""

    engine = "torch_pruning"

    def __init__(self, model, groups, input_size, residual, prune_classifier_input, roots,
                 shares=None):
        super().__init__(model, groups, [], tuple(input_size), residual, [], prune_classifier_input)
        self.roots = roots  # group name -> root conv name
        self._costs: dict[tuple, dict] = {}
        # group -> [(layer, "in"/"out", channels of the layer removed with all the group's)]
        self.shares = shares or {}
        self.layers = _layer_shapes(model, input_size) if shares is not None else None
        if self.layers is not None and not self._closed_form_agrees():
            self.layers = None

    def _closed_form_agrees(self) -> bool:
        probes = [{}, {g.name: max(1, g.width // 2) for g in self.prunable}]
        return all(self._closed_cost(w) == self._pruned_cost(w) for w in probes)

    def cost(self, widths: dict[str, int]) -> dict[str, int]:
        """params, flops and flops_bn for these group widths: the closed form where it was
        checked, else counts of a copy pruned to them (cached)."""
        if self.layers is not None:
            return self._closed_cost(widths)
        return self._pruned_cost(widths)

    def _closed_cost(self, widths: dict[str, int]) -> dict[str, int]:
        removed: dict[tuple[str, str], int] = {}
        for name, width in widths.items():
            r = self.group(name).width - width
            if r > 0:
                for layer, side, count_ in self.shares.get(name, ()):
                    removed[layer, side] = (removed.get((layer, side), 0)
                                            + r * count_ // self.group(name).width)
        params = flops = flops_bn = 0
        for name, kind, c_in, c_out, groups, per_pair, bias, calls in self.layers:
            w_in = c_in - removed.get((name, "in"), 0)
            w_out = c_out - removed.get((name, "out"), 0)
            if kind == "bn":
                flops_bn += 2 * w_out * calls
                continue
            if groups > 1 and groups == c_in == c_out:  # depthwise: its groups shrink too
                fan = w_out * per_pair
            else:
                fan = w_out * (w_in // groups) * per_pair
            params += fan + (w_out if bias else 0)
            flops += fan * calls
        return {"params": params, "flops": flops, "flops_bn": flops_bn}

    def _pruned_cost(self, widths: dict[str, int]) -> dict[str, int]:
        """Counts of a copy pruned to these widths (cached)."""
        key = tuple(sorted((k, v) for k, v in widths.items() if v < self.group(k).width))
        if key not in self._costs:
            kept = {k: torch.arange(v) for k, v in key}
            pruned = apply_tp_plan(self.model, self, kept) if kept else self.model
            try:
                counts = count(pruned, self.input_size)
            except Exception as exc:  # mixnet's split sizes: Torch-Pruning left them whole
                raise _failure(self.model, self.input_size, exc,
                               "running a copy it pruned") from exc
            self._costs[key] = {"params": counts["params"], "flops": counts["flops"],
                                "flops_bn": counts["flops_bn"]}
        return dict(self._costs[key])


def _layer_shapes(model: nn.Module, input_size) -> list[tuple] | None:
    """(name, kind, in, out, groups, weights per in/out pair, bias, output positions over the
    calls) of every Conv2d, Linear and BatchNorm :func:`pccfast.count` counts; None when the
    model has other layers count() counts (its closed form would miss them)."""
    names = {m: n for n, m in model.named_modules()}
    if any(isinstance(m, COUNTED_CONVS + COUNTED_NORMS)
           and not isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
           or isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return None
    positions: dict[str, int] = {}

    @marked
    def hook(module, args, output):
        width = module.out_features if isinstance(module, nn.Linear) else (
            module.out_channels if isinstance(module, nn.Conv2d) else module.num_features)
        positions[names[module]] = positions.get(names[module], 0) + output.numel() // width

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with eval_mode(model), torch.no_grad():
            model(torch.randn(input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for m in layers:
        name = names[m]
        if isinstance(m, nn.BatchNorm2d):
            out.append((name, "bn", m.num_features, m.num_features, 1, 0, False,
                        positions.get(name, 0)))
        elif isinstance(m, nn.Linear):
            out.append((name, "linear", m.in_features, m.out_features, 1, 1, m.bias is not None,
                        positions.get(name, 0)))
        else:
            out.append((name, "conv", m.in_channels, m.out_channels, m.groups,
                        math.prod(m.kernel_size), m.bias is not None, positions.get(name, 0)))
    return out


def build_tp_graph(model: nn.Module, input_size, residual: str = "stream",
                   prune_classifier_input: bool = False) -> TPGraph:
    for name, module in model.named_modules():  # Torch-Pruning slices them as plain convs
        inexact = unprunable_conv(module) if isinstance(module, nn.Conv2d) else ""
        if inexact:
            raise UnsupportedLayerError(name, type(module).__name__, inexact,
                                        UNPRUNABLE_CONV_HINT)
    with time_limit(TIME_LIMIT_S, type(model).__name__):
        return _build_tp_graph(model, input_size, residual, prune_classifier_input)


def _build_tp_graph(model, input_size, residual, prune_classifier_input) -> TPGraph:
    tp = _tp()
    dg = _dependency_graph(model, input_size)
    names = {m: n for n, m in model.named_modules()}
    outputs = output_layers(model, input_size)
    sites = _sites_by_conv(model)
    groups, roots, assigned, shares = [], {}, set(), {}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        if conv in assigned:
            continue
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels,
                                     idxs=list(range(conv.out_channels)))
        producers, consumers, members = [], [], []
        share: dict[tuple[str, str], int] = {}
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if not isinstance(module, nn.Module) or module not in names:
                continue
            name = names[module]
            side = "out" if dg.is_out_channel_pruning_fn(handler) else "in"
            share[name, side] = max(share.get((name, side), 0), len(item.idxs))
            if dg.is_out_channel_pruning_fn(handler):
                role = "conv_out" if isinstance(module, nn.Conv2d) else (
                    "bn" if isinstance(module, nn.modules.batchnorm._BatchNorm) else "out")
                producers.append(Port(name, role))
                if isinstance(module, nn.Conv2d):
                    members.append(module)
            else:
                role = "linear_in" if isinstance(module, nn.Linear) else "in"
                consumers.append(Port(name, role))
        assigned.update(members)
        conv_names = [names[m] for m in members]
        kind = "stream" if len(conv_names) > 1 else "conv"
        g = ChannelGroup(names[conv], conv.out_channels, kind, list(dict.fromkeys(producers)),
                         list(dict.fromkeys(consumers)),
                         [sites[names[m]] for m in members  # a split's parts are narrower
                          if names[m] in sites and m.out_channels == conv.out_channels])
        reads_linear = any(p.role == "linear_in" for p in g.consumers)
        touches_output = any(p.module in outputs for p in g.producers)
        if touches_output:
            g.prunable, g.reason = False, "the model's output"
        elif reads_linear and not prune_classifier_input:
            g.prunable, g.reason = False, ("read by the classifier (CHIP keeps it; "
                                           "prune_classifier_input=True prunes it)")
        elif kind == "stream" and residual == "inner":
            g.prunable, g.reason = False, "a residual stream (residual='inner')"
        elif not g.sites:
            g.prunable, g.reason = False, "no scored activation (no activation after its conv/BN)"
        elif not _allows_halving(tp, dg, conv):
            g.prunable, g.reason = False, (
                f"Torch-Pruning refuses to prune it to {max(1, conv.out_channels // 2)} "
                "channels (a layer coupled with it, e.g. behind a slice or split, would lose "
                "all its channels)")
        groups.append(g)
        roots[g.name] = names[conv]
        shares[g.name] = [(layer, side, n) for (layer, side), n in share.items()]
    return TPGraph(model, groups, input_size, residual, prune_classifier_input, roots, shares)


def _allows_halving(tp, dg, conv: nn.Conv2d) -> bool:
    """Whether Torch-Pruning lets the group of ``conv`` keep half its channels (the build-time
    cost probe's widths; ghostnet's and resnest's split/concat groups do not)."""
    removed = list(range(max(1, conv.out_channels // 2), conv.out_channels))
    if not removed:
        return True
    try:
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=removed)
        return bool(dg.check_pruning_group(group))
    except Exception:  # Torch-Pruning's own failure: the group is not prunable either
        return False


def apply_tp_plan(model: nn.Module, graph: TPGraph, kept: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with Torch-Pruning's group.prune() removing the unkept channels."""
    tp = _tp()
    pruned = clean_copy(model)
    dg = _dependency_graph(pruned, graph.input_size)
    modules = dict(pruned.named_modules())
    for name, index in kept.items():
        root = modules[graph.roots[name]]
        removed = sorted(set(range(graph.group(name).width)) - set(index.tolist()))
        if not removed:
            continue
        try:
            group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=removed)
            allowed = dg.check_pruning_group(group)
        except Exception as exc:
            raise _failure(model, graph.input_size, exc, f"grouping {name}") from exc
        if not allowed:
            raise ValueError(f"Torch-Pruning refuses to prune {name} to {index.numel()} channels")
        try:
            group.prune()
        except Exception as exc:
            raise _failure(model, graph.input_size, exc, f"pruning {name}") from exc
    return pruned


def tp_mask_hooks(model: nn.Module, graph: TPGraph, kept: dict[str, torch.Tensor]) -> list:
    """Hooks zeroing the removed channels at every output Torch-Pruning would shrink."""
    tp = _tp()
    dg = _dependency_graph(model, graph.input_size)
    modules = dict(model.named_modules())
    handles = []
    for name, index in kept.items():
        removed_idx = sorted(set(range(graph.group(name).width)) - set(index.tolist()))
        group = dg.get_pruning_group(modules[graph.roots[name]], tp.prune_conv_out_channels,
                                     idxs=removed_idx)
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if not isinstance(module, nn.Module) or not dg.is_out_channel_pruning_fn(handler):
                continue
            width = (module.out_channels if isinstance(module, nn.Conv2d) else
                     module.num_features if hasattr(module, "num_features") else
                     getattr(module, "out_features", None))
            if width is None:
                continue
            removed = torch.as_tensor(sorted(set(item.idxs)), dtype=torch.long)
            handles.append(module.register_forward_hook(zeroing_hook(removed, 1)))
    return handles
