"""``pccfast.prune``: graph, plan and surgery in one call."""

from __future__ import annotations

from torch import nn

from .._checks import check_materialised
from .._modules import unwrap_parallel
from .counting import count
from .engines import build_graph, engine_of
from .plan import Plan, make_plan
from .surgery import apply_plan, max_masked_difference
from .ties import check_ties

# The pruned forward must match the masked original to this fraction of the output's scale.
VERIFY_RTOL = 1e-4


def prune(model: nn.Module, scores: dict, *, rates=None, tau: float | None = None,
          target_flops: float | None = None, target_params: float | None = None,
          input_size=(1, 3, 32, 32), residual: str = "stream",
          prune_classifier_input: bool = False, engine: str = "auto",
          verify: bool = True, round_to: int = 1) -> tuple[nn.Module, Plan]:
    """Removes the least independent channels; returns ``(pruned_model, plan)``.

    model: the trained network (left unchanged; the pruned one is a smaller copy; a DDP
      or torch.compile wrapper is unwrapped).
    scores: layer name -> per-channel mean CI (float64), from ``CICollector.scores()``; any
      criterion's, finite and >= 0 (a larger score keeps the channel).
    How much (one of):
      rates: a CHIP rate list, ``"[0.21]*7+[0.75]*5"`` (a string, a list, or one float for
        every layer), entries in CHIP's order (:func:`pccfast.prune.plan.rate_layout`);
      tau: per layer, keep the fewest highest-CI channels holding ``tau`` of the CI sum;
      target_flops / target_params: the fraction of MACs / params (BN excluded) to remove,
        met within 0.5 points by searching tau (or, with rates, a global rate scale).
    input_size: the input the FLOPs are counted for, ``(1, 3, 32, 32)`` for CIFAR.
    residual: ``"stream"`` (prune residual streams with aligned indices, CHIP) or ``"inner"``
      (only the convs inside residual blocks).
    prune_classifier_input: also prune the channels the classifier reads (CHIP keeps them).
    engine: ``"auto"``, ``"pccfast"`` or ``"torch_pruning"`` (see :func:`build_graph`).
    round_to: every pruned channel group keeps a multiple of this many channels (at least
      that many; grouped convs keep whole groups): channel counts fast kernels prefer.
    verify: check on a random input that the pruned forward equals the original forward with
      the removed channels zeroed (two forward passes; raises RuntimeError if not).

    Refused: tied weights (one parameter in several modules: surgery would untie them) and
    meta-device models.

    The plan (:class:`~pccfast.prune.plan.Plan`) lists every prunable layer's width
    before/after and kept indices; ``plan.to_json()`` / ``plan.save(path)`` store it.
    """
    model = unwrap_parallel(model)
    check_materialised("model", model)
    graph = build_graph(model, input_size, residual, prune_classifier_input, engine)
    if not graph.prunable:
        raise ValueError(f"{type(model).__name__} has no prunable layer: "
                         f"{graph.why_nothing_to_score()}")
    plan = make_plan(graph, scores, rates=rates, tau=tau, target_flops=target_flops,
                     target_params=target_params, round_to=round_to)
    pruned = apply_plan(model, plan, graph)
    check_ties(model, pruned)
    plan.before = _counts(graph, {}, model)
    plan.after = _counts(graph, plan.widths, pruned)
    if not engine_of(graph).exact_cost:  # the search's closed form, checked on the real model
        counted = count(pruned, input_size)
        plan.after = {k: counted[k] for k in plan.after}
    if verify:
        difference, scale = max_masked_difference(model, pruned, graph, plan)
        if not difference <= VERIFY_RTOL * max(scale, 1e-6):
            raise RuntimeError(
                f"the pruned {type(model).__name__} does not match the original with the "
                f"removed channels zeroed (max difference {difference:.3g} at output scale "
                f"{scale:.3g}); a layer reorders or mixes channels in a way the "
                f"{graph.engine} engine does not model"
            )
    return pruned, plan


def _counts(graph, widths: dict[str, int], model: nn.Module) -> dict[str, int]:
    """:func:`pccfast.count` of ``model`` from the graph's closed form (no forward pass)."""
    cost = graph.cost(widths)
    return {"params": cost["params"], "params_all": sum(p.numel() for p in model.parameters()),
            "flops": cost["flops"], "flops_bn": cost["flops_bn"]}
