"""Rules of pccfast's own graph for timm layer types that the walk cannot follow call by call,
registered by name (timm stays optional; :mod:`pccfast.prune.layer_rules`).

ResNeSt's ``SplitAttn``: one conv writes ``radix`` parts of ``C`` channels each, the parts are
summed, pooled, and turned into per-part attention weights (``fc1``, ``fc2``, a softmax over the
parts), and the weighted parts are summed into ``C`` output channels. Output channel ``c`` reads
channel ``c`` of every part and of ``fc2``'s every part, and the softmax runs across the parts
of one channel: so the layer's output is one group, pruned with one index set in every part
of the conv, ``bn0`` and ``fc2`` (``fc1`` reads it as its inputs), scored on ``act0``'s
activation (every part, averaged). ``fc1``'s channels come from pooled 1x1 maps and stay whole.
"""

from __future__ import annotations

import math

from ..sites import Site
from .graph_types import Port
from .layer_rules import register_layer


def _split_attn_graph(b, n) -> None:
    module, name, xl = n.module, n.name, n.xl
    radix, conv, fc1, fc2 = module.radix, module.conv, module.fc1, module.fc2
    if xl is None or xl.dim != 1:
        raise n.error("its input has no channel group")
    if radix < 2 or fc1.groups != 1 or fc2.groups != 1 or type(conv).__name__ != "Conv2d":
        raise n.error("split attention with cardinality > 1, radix 1 or a conv of another "
                      "type (pccfast follows ResNeSt's cardinality-1 SplitAttn)")
    width = conv.out_channels // radix
    spatial = math.prod(n.meta.shape) // width  # batch x pixels of the conv's output
    kernel = math.prod(conv.kernel_size)
    first = b.first(n)
    b.read_gated(n.x, f"read by {name} through a gate")
    out = b.new_group(width, "conv", n)
    b.groups.add_chunks(b.single(xl, n), conv.groups, name, n.what)
    for i, (s, offset) in enumerate(b.offsets(xl.segs)):
        b.group(s).consumers.append(Port(f"{name}.conv", "conv_in", 1, offset))
        b.terms.append((f"{name}.conv", s, out, radix * kernel, radix * kernel * spatial, False,
                        first, conv.groups))
    hidden = b.new_group(fc1.out_channels, "conv", n, pooled=True)
    b.group(hidden).producers.append(Port(f"{name}.fc1", "conv_out"))
    b.group(out).consumers.append(Port(f"{name}.fc1", "conv_in"))
    b.terms.append((f"{name}.fc1", out, hidden, 1, 1, fc1.bias is not None, first, 1))
    b.terms.append((f"{name}.fc2", hidden, out, radix, radix, False, first, 1))
    biased = [m for m in (conv, fc2) if m.bias is not None]
    for m in biased:  # radix biases per channel: bias-only terms
        b.terms.extend((f"{name}.{'conv' if m is conv else 'fc2'}", None, out, 0, 0, True,
                        first, 1) for _ in range(radix))
    for r in range(radix):
        for part, role in (("conv", "conv_out"), ("bn0", "bn"), ("fc2", "conv_out")):
            b.group(out).producers.append(Port(f"{name}.{part}", role, 1, r * width))
    b.norm_calls.append((out, radix * spatial, f"{name}.bn0"))
    if hasattr(module, "bn1") and not _is_identity(module.bn1):
        b.norm_calls.append((hidden, 1, f"{name}.bn1"))
    b.inner_sites.setdefault(out, []).append((
        Site(f"{name}.act0", f"{name}.act0", 0, f"{name}.conv", f"{name}.bn0"),
        [r * width for r in range(radix)]))
    b.share(n, xl, out)
    b.write(n, out)


def _is_identity(module) -> bool:
    return type(module).__name__ == "Identity"


register_layer("timm.layers.split_attn.SplitAttn", graph=_split_attn_graph, leaf=True)
