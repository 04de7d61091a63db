"""Parameter and FLOP counts in the convention of the CHIP/HRank tables (SPEC section 3).

- ``params``: weights and biases of every Conv and Linear layer and of the attention
  projections (BatchNorm excluded);
- ``params_all``: every parameter of the model (BN included; torchvision's 25.56M for ResNet-50);
- ``flops``: multiply-accumulates (MACs) of Conv and Linear layers, biases not counted, and of
  attention layers (``nn.MultiheadAttention``, torchvision's Swin window attention, timm's ViT
  and Swin attention): their
  q/k/v and output projections and the two token-by-token products (``QK^T`` and ``AV``),
  which run as functions, not Linear modules, so a hook on Linear alone would miss them;
- ``flops_bn``: the BatchNorm layers' own operations, counted as thop does (2 per element of the
  output in eval mode: subtract the mean, divide by the standard deviation; the affine part
  folds into them), reported apart so ``flops + flops_bn`` is the thop-style total.

Counts are for the given input size as a whole: pass a batch of one, ``(1, 3, 32, 32)``, for the
per-image figures of the papers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._hooks import marked
from .._modules import eval_mode, unwrap_parallel

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
COUNTED_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED
COUNTED_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_input_size(input_size) -> tuple[int, ...]:
    if isinstance(input_size, torch.Size):
        input_size = tuple(input_size)
    if (not isinstance(input_size, (tuple, list)) or len(input_size) < 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in input_size)):
        raise TypeError(
            f"input_size must be a tuple of ints such as (1, 3, 32, 32), got {input_size!r}"
        )
    if min(input_size) < 1:
        raise ValueError(f"input_size must be positive, got {tuple(input_size)}")
    return tuple(input_size)


def is_window_attention(module: nn.Module) -> bool:
    """torchvision's Swin attention, which calls its ``qkv``/``proj`` weights as functions."""
    return (type(module).__module__.startswith("torchvision.")
            and type(module).__name__.startswith("ShiftedWindowAttention"))


def is_token_attention(module: nn.Module) -> bool:
    """timm's ViT/DeiT ``Attention`` and Swin ``WindowAttention`` on ``(N, tokens, C)``, and
    CoAtNet's/MaxViT's ``Attention2d`` on ``(N, C, H, W)`` maps (1x1 conv projections): their
    projections are Linear (or conv) modules, counted as such; the ``QK^T`` and ``AV`` products
    run as functions (counted by :func:`attention_products`)."""
    if not type(module).__module__.startswith("timm."):
        return False
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if type(module).__name__ in ("Attention", "WindowAttention"):
        return isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
    return is_map_attention(module)


def is_map_attention(module: nn.Module) -> bool:
    """timm's ``Attention2d`` (CoAtNet, MaxViT): attention over the pixels of an
    ``(N, C, H, W)`` map, with 1x1 conv projections and only parameter tables besides."""
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return (type(module).__module__.startswith("timm.") and type(module).__name__ == "Attention2d"
            and all(isinstance(getattr(module, n, None), nn.Conv2d)
                    and getattr(module, n).kernel_size == (1, 1) for n in ("qkv", "proj"))
            and len(convs) == 2)


def attention_products(module: nn.Module, shape) -> int:
    """MACs of ``QK^T`` and ``AV`` of a token attention on ``(N, tokens, C)`` (per window for
    Swin: N counts the windows) or on an ``(N, C, H, W)`` map (tokens: the pixels)."""
    if isinstance(module.qkv, nn.Conv2d):
        n, tokens = shape[0], math.prod(shape[2:])
        return 2 * n * tokens * tokens * (module.qkv.out_channels // 3)
    n, tokens = shape[0], shape[1]
    return 2 * n * tokens * tokens * (module.qkv.out_features // 3)


def attention_cost(module: nn.Module, shapes) -> tuple[int, int]:
    """(params, MACs) of one attention call on inputs of ``shapes`` (query, key, value for
    ``nn.MultiheadAttention``; ``(N, H, W, C)`` for Swin): projections, ``QK^T`` and ``AV``."""
    if is_map_attention(module):
        convs = (module.qkv, module.proj)
        pixels = shapes[0][0] * math.prod(shapes[0][2:])
        params = sum(p.numel() for m in convs for p in m.parameters(recurse=False))
        macs = pixels * sum(m.in_channels * m.out_channels // m.groups for m in convs)
        return params, macs + attention_products(module, shapes[0])
    if is_token_attention(module):
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        tokens = math.prod(shapes[0][:-1])
        params = sum(p.numel() for m in linears for p in m.parameters(recurse=False))
        macs = tokens * sum(m.in_features * m.out_features for m in linears)
        return params, macs + attention_products(module, shapes[0])
    if isinstance(module, nn.MultiheadAttention):
        q, k = shapes[0], shapes[1] if len(shapes) > 1 else shapes[0]
        v = shapes[2] if len(shapes) > 2 else k
        batch_first = module.batch_first and len(q) == 3
        n = q[0] if batch_first else (q[1] if len(q) == 3 else 1)
        lq, lk = (q[-2], k[-2]) if batch_first or len(q) == 2 else (q[0], k[0])
        e = module.embed_dim
        macs = n * (lq * e * e + lk * k[-1] * e + lk * v[-1] * e + 2 * lq * lk * e + lq * e * e)
        params = sum(p.numel() for p in module.parameters())
        return params, macs
    n, h, w, _ = shapes[0]
    wh, ww = module.window_size
    tokens = n * -(-h // wh) * wh * -(-w // ww) * ww  # padded to whole windows
    qkv, proj = module.qkv, module.proj
    macs = tokens * (qkv.in_features * qkv.out_features + 2 * wh * ww * proj.in_features
                     + proj.in_features * proj.out_features)
    params = sum(p.numel() for m in (qkv, proj) for p in m.parameters())
    return params, macs


def layer_params(model: nn.Module) -> int:
    """Weights and biases of the Conv and Linear layers and of the attention projections."""
    total = 0
    for module in model.modules():
        if isinstance(module, COUNTED_CONVS + (nn.Linear,)):
            total += sum(p.numel() for p in module.parameters(recurse=False))
        elif isinstance(module, nn.MultiheadAttention):  # in_proj_weight: no Linear module
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def count(model: nn.Module, input_size=(1, 3, 32, 32), device=None) -> dict[str, int]:
    """Counts of ``model`` for one forward pass at ``input_size``.

    Returns ``{"params", "params_all", "flops", "flops_bn"}`` (ints; see the module docstring
    for the conventions). The model runs once, in eval mode and without gradients, on random
    input on ``device`` (default: the model's); its mode is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_parallel(model)
    input_size = check_input_size(input_size)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    totals = {"flops": 0, "flops_bn": 0}

    @marked
    def hook(module, args, output):
        if isinstance(module, nn.Linear):
            totals["flops"] += output.numel() * module.in_features
        elif isinstance(module, _TRANSPOSED):  # every input element meets out/groups kernels
            totals["flops"] += args[0].numel() * math.prod(module.weight.shape[1:])
        elif isinstance(module, COUNTED_CONVS):  # every output element costs its fan-in
            totals["flops"] += output.numel() * math.prod(module.weight.shape[1:])
        elif isinstance(module, COUNTED_NORMS):
            totals["flops_bn"] += 2 * output.numel()

    @marked
    def attention_hook(module, args, kwargs, output):
        names = ("query", "key", "value") if isinstance(module, nn.MultiheadAttention) else ("x",)
        inputs = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        shapes = [tuple(a.shape) for a in inputs[:3] if isinstance(a, torch.Tensor)]
        if is_token_attention(module):  # its projections are counted as Linear modules
            totals["flops"] += attention_products(module, shapes[0])
        else:
            totals["flops"] += attention_cost(module, shapes)[1]

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, COUNTED_CONVS + (nn.Linear,) + COUNTED_NORMS)]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True)
                for m in model.modules()
                if isinstance(m, nn.MultiheadAttention) or is_window_attention(m)
                or is_token_attention(m)]
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.randn(input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    params_all = sum(p.numel() for p in model.parameters())
    return {"params": layer_params(model), "params_all": params_all, **totals}
