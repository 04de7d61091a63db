"""How many channels each layer keeps, and which (the policy part of pruning; SPEC section 3).

Keep counts come from one of:

- a CHIP-style rate list, ``"[0.21]*7+[0.75]*5"`` (parsed by :func:`parse_rates`, never
  ``eval``): the fraction of channels removed per layer, ``keep = int(width * (1 - rate))`` as
  CHIP computes it;
- an adaptive threshold ``tau`` (CCM-LRR): per layer, the fewest highest-CI channels whose CI
  sum reaches ``tau`` times the layer's total;
- a budget, ``target_flops`` or ``target_params`` (the fraction removed), met to within
  :data:`BUDGET_TOLERANCE` by searching ``tau``, or a global scale of a given rate list.

Which channels: the ``k`` highest mean CI, ties to the lower index, kept in original order.

``round_to=N`` (Torch-Pruning's name) makes every pruned group keep a multiple of ``N`` channels
(at least ``N``; a group narrower than that, or one whose rounded count reaches its width, stays
whole): GPU and CPU kernels run fastest on channel counts that fill their vector lanes and
tiles. Counts round *up* (a rate removes at most its fraction, tau's CI share is still reached);
a grouped conv keeps whole groups (steps of ``lcm(N, groups)``). Budgets search over the rounded
counts, so they are met, or refused with the reachable range, as without rounding.

Rate lists follow CHIP's layout. Plain chains (VGG): one entry per prunable conv in order
(VGG-16: 12, the last conv feeds the classifier and stays). Residual networks: one entry for
the stem, one per prunable stage stream, one per residual block (shared by the block's inner
convs), e.g. ResNet-56 ``[0.]+[0.15]*2+[0.4]*27`` (30), ResNet-50 ``[0.]+[0.1]*3+[0.35]*16`` (20).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch

BUDGET_TOLERANCE = 0.005  # budgets are met to within half a percentage point
PLAN_FORMAT = "pccfast.plan"
PLAN_VERSION = 1


class BudgetError(ValueError):
    """A FLOPs or params target that no keep counts of this model meet within the tolerance."""


MAX_RATE_ENTRIES = 100_000  # far beyond any network's prunable layers; bounds the parser
_TOKEN = re.compile(r"\s*(?:(?P<number>\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?P<op>[\[\],*+]))")


# ----------------------------------------------------------------------------- rate lists
def parse_rates(text: str, max_entries: int = MAX_RATE_ENTRIES) -> list[float]:
    """A CHIP rate list ``"[0.21]*7+[0.75]*5"`` -> ``[0.21, ..., 0.75, ...]`` (12 floats).

    Grammar (whitespace allowed): ``list ('*' int)? ('+' list ('*' int)?)*`` with
    ``list = '[' number (',' number)* ']'``. Nothing is evaluated; anything else is a
    ValueError that points at the offending character. A list longer than ``max_entries`` is a
    ValueError too, found from the repeat counts before anything is expanded (``[0.5]*10**9``
    would otherwise take gigabytes before a length check could reject it).
    """
    pieces = _rate_pieces(text)
    total = rates_length(pieces)
    if total > max_entries:
        raise ValueError(f"rates {_shown(text)} has {_entries(total)}, more than the {max_entries} "
                         "a rate list may have (one per prunable layer)")
    out: list[float] = []
    for values, repeat in pieces:
        out += values * repeat
    return out


def rates_length(pieces) -> int:
    """Entries of a parsed rate list, counted without expanding it."""
    return sum(len(values) * repeat for values, repeat in pieces)


def _entries(total: int) -> str:
    return f"{total} entries" if total < 10**15 else f"about 10^{int(math.log10(total))} entries"


def _shown(text: str) -> str:
    """``text`` for an error message, cut to a readable length."""
    return repr(text) if len(text) <= 60 else repr(text[:50]) + f"... ({len(text)} characters)"


def _rate_pieces(text: str) -> list[tuple[list[float], int]]:
    """``"[0.21]*7+[0.75]*5"`` -> ``[([0.21], 7), ([0.75], 5)]`` (the grammar of parse_rates)."""
    if not isinstance(text, str):
        raise TypeError(f"rates must be a string such as '[0.21]*7+[0.75]*5', "
                        f"got {type(text).__name__}")
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"rates {_shown(text)}: unexpected character "
                             f"{stripped[pos:].lstrip()[:1]!r} at position {pos}; expected a "
                             "form like '[0.21]*7+[0.75]*5'")
        kind = "number" if m.group("number") is not None else m.group("op")
        tokens.append((kind, m.group(0).strip(), m.start()))
        pos = m.end()
    if not tokens:
        raise ValueError("rates is empty; expected a form like '[0.21]*7+[0.75]*5'")
    pieces: list[tuple[list[float], int]] = []
    i = 0

    def expect(kind):
        nonlocal i
        if i >= len(tokens):
            raise ValueError(f"rates {_shown(text)}: ended early, expected {kind!r}")
        if tokens[i][0] != kind:
            raise ValueError(f"rates {_shown(text)}: expected {kind!r} at position {tokens[i][2]}, "
                             f"got {tokens[i][1]!r}")
        i += 1
        return tokens[i - 1][1]

    while True:
        expect("[")
        values = [float(expect("number"))]
        while i < len(tokens) and tokens[i][0] == ",":
            i += 1
            values.append(float(expect("number")))
        expect("]")
        repeat = 1
        if i < len(tokens) and tokens[i][0] == "*":
            i += 1
            count = expect("number")
            if not count.isdigit():
                raise ValueError(f"rates {_shown(text)}: a repeat count must be an integer, "
                                 f"got {count!r}")
            # (Python refuses int() of more than 4300 digits)
            repeat = int(count) if len(count) <= 100 else 10**len(count)
        pieces.append((values, repeat))
        if i == len(tokens):
            return pieces
        expect("+")


@dataclass(frozen=True)
class RateSlot:
    """One entry of a rate list: the groups it sets, or a placeholder that must stay 0."""

    label: str
    groups: tuple[str, ...]
    zero_reason: str = ""  # nonempty: the entry must be 0 (or equal entry ``same_as``)
    same_as: int = -1


def rate_layout(graph) -> list[RateSlot]:
    """The entries of a rate list for this model, in CHIP's order (see the module docstring)."""
    groups = graph.groups
    streams = [g for g in groups if g.kind == "stream"]
    if not streams or not graph.blocks:
        return [RateSlot(g.name, (g.name,)) for g in graph.prunable]
    slots: list[RateSlot] = []
    first_block = next((i for i, g in enumerate(groups) if g.block or g.kind == "stream"),
                       len(groups))
    stem = [g for g in groups[:first_block] if g.kind == "conv" and g.prunable]
    stream_slots = []
    for g in streams:
        if g.prunable:
            stream_slots.append(RateSlot(g.name, (g.name,)))
        elif "residual='inner'" in g.reason:
            stream_slots.append(RateSlot(g.name, (), f"{g.name} is a residual stream and "
                                         "residual='inner' keeps streams whole"))
    if stem:
        slots += [RateSlot(g.name, (g.name,)) for g in stem]
    else:  # the stem conv writes the first stage's stream (CIFAR ResNets)
        stem_conv = next((g for g in groups if g.convs), None)
        host = stem_conv.name if stem_conv is not None else "?"
        same = (1 if stream_slots and stream_slots[0].label == host and stream_slots[0].groups
                else -1)
        how = "set by the next entry" if same >= 0 else "which is kept whole"
        slots.append(RateSlot(f"stem (in {host})", (), f"the stem's output is the residual stream "
                              f"{host}, {how}", same))
    slots += stream_slots
    for block in graph.blocks:
        inner = tuple(g.name for g in groups
                      if g.block == block and g.kind == "conv" and g.prunable)
        if inner:
            slots.append(RateSlot(block, inner))
    covered = {n for s in slots for n in s.groups}
    slots += [RateSlot(g.name, (g.name,)) for g in graph.prunable if g.name not in covered]
    return slots


def _check_rates(rates, slots: list[RateSlot], model_name: str) -> list[float]:
    if isinstance(rates, str):
        count = rates_length(_rate_pieces(rates))  # counted before expanding anything
        values = parse_rates(rates) if count == len(slots) else []
    elif isinstance(rates, (int, float)) and not isinstance(rates, bool):
        # one rate for every layer it can apply to: entries that must stay 0 get 0
        values = [0.0 if slot.zero_reason and slot.same_as < 0 else float(rates) for slot in slots]
        count = len(values)
    elif isinstance(rates, (list, tuple)):
        values = list(rates)
        count = len(values)
    else:
        raise TypeError(f"rates must be a string like '[0.21]*7+[0.75]*5', a list of floats or "
                        f"one float, got {type(rates).__name__}")
    if count != len(slots):
        labels = [s.label for s in slots]
        shown = (", ".join(labels) if len(labels) <= 8
                 else ", ".join(labels[:4] + ["..."] + labels[-2:]))
        raise ValueError(f"rates has {_entries(count)} but {model_name} expects {len(slots)} "
                         f"(one per prunable layer, CHIP's order: {shown})")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"rates[{i}] must be a finite number, got {v!r}")
        if not 0.0 <= v < 1.0:
            raise ValueError(f"rates[{i}] ({slots[i].label}) must be in [0, 1), got {v}")
        out.append(float(v))
    for i, slot in enumerate(slots):
        if (slot.zero_reason and out[i] != 0.0
                and not (slot.same_as >= 0 and out[i] == out[slot.same_as])):
            raise ValueError(f"rates[{i}] ({slot.label}) must be 0: {slot.zero_reason}, "
                             f"got {out[i]}")
    return out


def keep_from_rate(width: int, rate: float) -> int:
    """CHIP's count: ``int(width * (1 - rate))``, at least 1."""
    return max(1, min(width, int(width * (1 - rate))))


def keep_from_rates(graph, rates, round_to: int = 1) -> tuple[dict[str, int], list[float]]:
    slots = rate_layout(graph)
    values = _check_rates(rates, slots, type(graph.model).__name__)
    keep = {}
    for slot, rate in zip(slots, values):
        for name in slot.groups:
            keep[name] = keep_from_rate(graph.group(name).width, rate)
    return rounded(graph, keep, round_to), values


# ----------------------------------------------------------------------------- round_to
def check_round_to(round_to) -> int:
    """``round_to`` as a positive int, or a ValueError/TypeError naming it."""
    if isinstance(round_to, bool) or not isinstance(round_to, int):
        raise TypeError(f"round_to must be a positive integer (channels), got "
                        f"{type(round_to).__name__} {round_to!r}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer (channels), got {round_to}")
    return round_to


def round_step(group, round_to: int) -> int:
    """The channel step of a group's keep count: ``round_to``, widened to whole conv groups."""
    return math.lcm(round_to, group.chunks)


def round_keep_to(group, k: int, round_to: int) -> int:
    """``k`` rounded up to a multiple of :func:`round_step` (at least one step), capped at the
    group's width (the group then stays whole)."""
    step = round_step(group, round_to)
    return min(group.width, max(step, -(-int(k) // step) * step))


def step_keep(group, k: int, sign: int, round_to: int) -> int | None:
    """The next keep count below (``sign`` -1) or above (+1) ``k`` on the group's
    :func:`round_step` grid (the full width counts as on it); None past either end."""
    step = round_step(group, round_to)
    new = (k - 1) // step * step if sign < 0 else min(group.width, (k // step + 1) * step)
    return new if step <= new <= group.width and new != k else None


def rounded(graph, keep: dict[str, int], round_to: int) -> dict[str, int]:
    """Every keep count of ``keep`` through :func:`round_keep_to`."""
    if round_to == 1:
        return dict(keep)
    return {name: round_keep_to(graph.group(name), k, round_to) for name, k in keep.items()}


# ----------------------------------------------------------------------------- scores
def ranked(score: torch.Tensor) -> torch.Tensor:
    """Channel indices by decreasing score, ties to the lower index."""
    return torch.argsort(-score, stable=True)


def kept_indices(score: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring channels (ties: lower index), in original order."""
    return sorted(ranked(score)[:k].tolist())


def keep_from_tau(score: torch.Tensor, tau: float) -> int:
    """Fewest highest-CI channels whose CI sum reaches tau times the total (at least 1)."""
    return keep_from_tau_cumulative(torch.cumsum(score[ranked(score)], 0), tau)


def check_scores(graph, scores, needed: list[str]) -> dict[str, torch.Tensor]:
    """Scores as CPU float64 tensors; every group in ``needed`` present with its width, its
    scores finite and >= 0, and not every score 0 (such scores cannot rank channels)."""
    if not isinstance(scores, dict):
        raise TypeError(f"scores must be a dict layer name -> CI tensor (CICollector.scores()), "
                        f"got {type(scores).__name__}")
    names = {g.name for g in graph.groups}
    unknown = [k for k in scores if k not in names]
    if unknown:
        raise ValueError(f"scores names layers that {type(graph.model).__name__} lacks: "
                         f"{unknown[:5]}; its prunable layers are "
                         f"{[g.name for g in graph.prunable][:5]}...")
    out = {}
    for name in needed:
        if name not in scores:
            raise ValueError(f"scores lack layer {name!r} (collect CI with CICollector on this "
                             "model)")
        value = torch.as_tensor(scores[name]).detach().to("cpu", torch.float64).flatten()
        width = graph.group(name).width
        if value.numel() != width:
            raise ValueError(f"scores[{name!r}] has {value.numel()} values, layer has {width} "
                             "channels")
        _check_rankable(name, value)
        out[name] = value
    if out and not any(bool(v.any()) for v in out.values()):
        raise ValueError(f"scores are 0 for every channel of all {len(out)} layers, so they "
                         "cannot rank channels (scores of an untrained or dead model?): collect "
                         "them again on the trained model")
    return out


def _check_rankable(name: str, value: torch.Tensor) -> None:
    """Finite and non-negative: every criterion scores >= 0, a larger score keeping the channel,
    and tau and budgets take shares of a layer's total (negative scores make that meaningless)."""
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"scores[{name!r}] holds {int(bad.sum())} NaN or Inf value(s) (channel "
                         f"{i}: {float(value[i])}); scores must be finite: collect them again")
    if bool((value < 0).any()):
        i = int(value.argmin())
        raise ValueError(f"scores[{name!r}] holds {int((value < 0).sum())} negative value(s) "
                         f"(channel {i}: {float(value[i]):.6g}); scores must be >= 0, a larger "
                         "score keeping the channel (CI, l1, hrank, taylor and random all are)")


# ----------------------------------------------------------------------------- budgets
def _removed(graph, keep: dict[str, int], before: dict[str, int], metric: str) -> float:
    return 1.0 - graph.cost(keep)[metric] / before[metric]


def _bisect(evaluate, lo: float, hi: float, target: float, increasing: bool, steps: int = 60):
    """Searches x in [lo, hi] for evaluate(x) -> (removed, keep) closest to target."""
    best = None
    for x in (lo, hi):
        removed, keep = evaluate(x)
        if best is None or abs(removed - target) < abs(best[0] - target):
            best = (removed, keep, x)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        removed, keep = evaluate(mid)
        if abs(removed - target) < abs(best[0] - target):
            best = (removed, keep, mid)
        if (removed < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


def keep_for_budget(graph, scores, metric: str, target: float, rates=None, round_to: int = 1):
    """Keep counts removing ``target`` of ``metric`` ("params" or "flops") within the tolerance.

    Without rates: searches tau. With rates: scales them by a global factor (each scaled rate
    capped so that a layer keeps at least one channel). Counts are rounded (``round_to``)
    inside the search, so the budget is met by the rounded counts. Returns
    ``(keep, setting)`` where setting records the tau or scale found.
    """
    before = graph.cost({})
    prunable = [g.name for g in graph.prunable]
    if rates is None:
        cumulative = {n: torch.cumsum(scores[n][ranked(scores[n])], 0) for n in prunable}

        def evaluate(tau):
            keep = {n: keep_from_tau_cumulative(cumulative[n], tau) for n in prunable}
            keep = rounded(graph, keep, round_to)
            return _removed(graph, keep, before, metric), keep

        removed, keep, tau = _bisect(evaluate, 0.0, 1.0, target, increasing=False)
        setting = {"tau": tau}
        if abs(removed - target) > BUDGET_TOLERANCE:
            # tau moves every layer at once, in steps that can exceed the tolerance on a small
            # model: finish channel by channel, in the order tau itself would take them
            removed, keep, moved = _refine_by_channels(graph, keep, cumulative, metric, target,
                                                       before, round_to)
            setting["channels_moved"] = moved
    else:
        slots = rate_layout(graph)
        base = _check_rates(rates, slots, type(graph.model).__name__)
        positive = [r for r in base if r > 0]
        if not positive:
            raise ValueError("a budget with rates scales them, but every rate is 0")
        limit = (1.0 - 1e-9) / min(positive)  # every scaled rate capped below 1 (one channel)

        def evaluate(scale):
            keep = {}
            for slot, rate in zip(slots, base):
                for name in slot.groups:
                    keep[name] = keep_from_rate(graph.group(name).width,
                                                min(rate * scale, 1 - 1e-9))
            keep = rounded(graph, keep, round_to)
            return _removed(graph, keep, before, metric), keep

        removed, keep, scale = _bisect(evaluate, 0.0, limit, target, increasing=True)
        setting = {"rate_scale": scale}
        if abs(removed - target) > BUDGET_TOLERANCE:
            # layers of one rate and width move together: finish channel by channel, in an
            # order that depends on the graph alone (the counts stay the same for any scores)
            removed, keep, moved = _refine_by_channels(graph, keep, None, metric, target, before,
                                                       round_to)
            setting["channels_moved"] = moved
    if abs(removed - target) > BUDGET_TOLERANCE:
        lo = evaluate(1.0 if rates is None else 0.0)[0]
        hi = evaluate(0.0 if rates is None else limit)[0]
        if lo - BUDGET_TOLERANCE <= target <= hi + BUDGET_TOLERANCE:
            why = (f"it lies within the {lo:.4f} to {hi:.4f} of its {metric} this model's "
                   f"prunable layers allow removing, but no keep counts found come closer than "
                   f"{removed:.4f} (one channel moves {metric} in steps too coarse here)")
        else:
            why = (f"this model's prunable layers allow removing {lo:.4f} to {hi:.4f} of its "
                   f"{metric} (closest: {removed:.4f})")
        raise BudgetError(
            f"target_{metric}={target} cannot be met within {BUDGET_TOLERANCE * 100:.1f} points: "
            + why + (f". {graph.limits}" if getattr(graph, "limits", "") else ""))
    return keep, setting


def _critical_tau(cumulative: torch.Tensor, rank: int) -> float:
    """The tau above which a tau plan keeps the channel of this rank (0 = the best): the
    fraction of the layer's score sum held by the channels ranked before it."""
    total = float(cumulative[-1])
    if rank <= 0 or total <= 0.0:
        return 0.0
    return float(cumulative[rank - 1]) / total


def _refine_by_channels(graph, keep: dict[str, int], cumulative: dict | None, metric: str,
                        target: float, before: dict, round_to: int = 1,
                        max_moves: int = 10_000):
    """Moves single channels (one step of :func:`step_keep`: ``round_to`` channels, or a whole
    group chunk where a grouped conv needs it) from ``keep`` until ``target`` is met within the
    tolerance, or no move gets closer.

    Each step takes a move that gets closer to the target, preferring one that lands within
    the tolerance, then the channel a tau plan would drop first (highest critical tau, see
    :func:`_critical_tau`) or add first (lowest), ties to the earlier layer. When every single
    move overshoots by more than it gains, the pair of one move each way that lands nearest is
    taken. ``cumulative`` None: no scores (a rate profile's counts), layer order only.
    Deterministic: the result depends on the scores and the graph only.
    -> (removed, keep, channels moved).
    """
    names = [g.name for g in graph.prunable]
    keep = {n: round_keep_to(graph.group(n), keep[n], round_to) for n in names}

    def moves(state: dict[str, int], sign: int):
        """(new state, layer index, order key) for every one-step move; sign -1 removes."""
        out = []
        for i, n in enumerate(names):
            k = step_keep(graph.group(n), state[n], sign, round_to)
            if k is None:
                continue
            rank = state[n] - 1 if sign < 0 else state[n]  # the channel dropped / added
            critical = 0.0 if cumulative is None else _critical_tau(cumulative[n], rank)
            out.append(({**state, n: k}, (-critical if sign < 0 else critical, i)))
        return out

    removed = _removed(graph, keep, before, metric)
    start = dict(keep)
    for _ in range(max_moves):
        error = abs(removed - target)
        if error <= BUDGET_TOLERANCE:
            break
        sign = -1 if removed < target else 1  # remove channels to remove more
        best = None
        for state, order in moves(keep, sign):
            got = _removed(graph, state, before, metric)
            key = (abs(got - target) > BUDGET_TOLERANCE, order)
            if abs(got - target) < error and (best is None or key < best[0]):
                best = (key, state, got)
        if best is None:  # every single move overshoots: one move each way
            for first, order in moves(keep, sign):
                for state, back in moves(first, -sign):
                    got = _removed(graph, state, before, metric)
                    key = (round(abs(got - target), 12), order, back)
                    if abs(got - target) < error and (best is None or key < best[0]):
                        best = (key, state, got)
        if best is None:
            break
        _, keep, removed = best
    moved = sum(abs(keep[n] - start[n]) for n in names)
    return removed, keep, moved


def keep_from_tau_cumulative(cumulative: torch.Tensor, tau: float) -> int:
    total = float(cumulative[-1])
    if total <= 0.0:
        return 1
    k = int(torch.searchsorted(cumulative,
                               torch.tensor([tau * total], dtype=cumulative.dtype))[0]) + 1
    return max(1, min(cumulative.numel(), k))


# ----------------------------------------------------------------------------- the plan
@dataclass
class LayerPlan:
    """One channel group: its width before/after and the kept channel indices."""

    name: str
    kind: str
    width_before: int
    width_after: int
    kept_indices: list[int]
    convs: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    rate: float | None = None


@dataclass
class Plan:
    """What :func:`pccfast.prune` removed: JSON-serialisable, replayable on the same model.

    layers: every prunable group (width before/after, kept indices in original order).
    round_to: every pruned group keeps a multiple of this many channels (1: any count).
    method / setting: how the counts were chosen (``rates``, ``tau``, ``target_flops``,
    ``target_params``; setting holds the rate list, tau, or the tau/scale a budget search found).
    before / after: :func:`pccfast.count` of the original and pruned model; removed: fractions.
    """

    layers: list[LayerPlan]
    method: str
    setting: dict
    input_size: tuple[int, ...]
    residual: str = "stream"
    prune_classifier_input: bool = False
    engine: str = "pccfast"
    model: str = ""
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    round_to: int = 1

    @property
    def kept(self) -> dict[str, list[int]]:
        return {layer.name: layer.kept_indices for layer in self.layers}

    @property
    def widths(self) -> dict[str, int]:
        return {layer.name: layer.width_after for layer in self.layers}

    @property
    def removed(self) -> dict[str, float]:
        out = {}
        for key in ("params", "params_all", "flops"):
            if self.before.get(key):
                out[key] = 1.0 - self.after.get(key, 0) / self.before[key]
        return out

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model,
            "engine": self.engine, "residual": self.residual,
            "prune_classifier_input": self.prune_classifier_input,
            "input_size": list(self.input_size), "method": self.method, "setting": self.setting,
            "round_to": self.round_to,
            "before": self.before, "after": self.after, "removed": self.removed,
            "layers": [vars(layer).copy() for layer in self.layers],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError("not a pccfast plan (no 'format': 'pccfast.plan' entry)")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')} is not supported "
                             f"(this pccfast reads version {PLAN_VERSION})")
        try:
            layers = [LayerPlan(**layer) for layer in data["layers"]]
            return cls(layers, data["method"], data["setting"], tuple(data["input_size"]),
                       data["residual"], data["prune_classifier_input"], data["engine"],
                       data.get("model", ""), data.get("before", {}), data.get("after", {}),
                       check_round_to(data.get("round_to", 1)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed pccfast plan: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        from ..atomic import atomic_write_bytes

        atomic_write_bytes(path, self.to_json().encode())

    @classmethod
    def load(cls, path) -> "Plan":
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_json(f.read())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not a pccfast plan (invalid JSON: {exc})") from exc

    def summary(self) -> str:
        """A text table: layer, width before -> after, for the layers that changed."""
        lines = [f"{'layer':<28} {'before':>7} {'after':>7}"]
        for layer in self.layers:
            if layer.width_after != layer.width_before:
                lines.append(f"{layer.name:<28} {layer.width_before:>7} {layer.width_after:>7}")
        for key, value in self.removed.items():
            lines.append(f"{key} removed: {100 * value:.2f}%")
        return "\n".join(lines)


def make_plan(graph, scores, *, rates=None, tau=None, target_flops=None, target_params=None,
              round_to: int = 1) -> Plan:
    """Chooses the kept channels of every prunable group of ``graph`` (see the module docstring).

    Exactly one of rates / tau / target_flops / target_params, or rates with one target (the
    rates are then scaled by a global factor to meet it). ``round_to``: every pruned group keeps
    a multiple of this many channels.
    """
    round_to = check_round_to(round_to)
    targets = {k: v for k, v in (("flops", target_flops), ("params", target_params))
               if v is not None}
    if len(targets) > 1:
        raise ValueError("give one of target_flops and target_params, not both")
    if tau is not None and (rates is not None or targets):
        raise ValueError("tau sets the keep counts by itself; do not combine it with rates or a "
                         "target")
    if rates is None and tau is None and not targets:
        raise ValueError("say how much to prune: rates='[0.21]*7+[0.75]*5', tau=0.6, "
                         "target_flops=0.846 or target_params=0.9275")
    prunable = [g.name for g in graph.prunable]
    for metric, value in targets.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"target_{metric} is the fraction to remove, in (0, 1), got {value!r}")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                            or not 0 < tau <= 1):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")

    slot_rate: dict[str, float] = {}
    if targets:
        metric, target = next(iter(targets.items()))
        checked = check_scores(graph, scores, prunable)
        keep, found = keep_for_budget(graph, checked, metric, float(target), rates, round_to)
        method, setting = f"target_{metric}", {f"target_{metric}": float(target), **found}
        if rates is not None:  # (one float is a rate for every layer)
            setting["rates"] = rates if isinstance(rates, (str, int, float)) else list(rates)
    elif tau is not None:
        checked = check_scores(graph, scores, prunable)
        keep = rounded(graph, {n: keep_from_tau(checked[n], float(tau)) for n in prunable},
                       round_to)
        method, setting = "tau", {"tau": float(tau)}
    else:
        keep, values = keep_from_rates(graph, rates, round_to)
        for slot, rate in zip(rate_layout(graph), values):
            for name in slot.groups:
                slot_rate[name] = rate
        needed = [n for n in prunable if keep.get(n, graph.group(n).width) < graph.group(n).width]
        checked = check_scores(graph, scores, needed)
        method, setting = "rates", {"rates": rates if isinstance(rates, str) else values}

    layers = []
    for g in graph.prunable:
        k = keep.get(g.name, g.width)
        indices = list(range(g.width)) if k >= g.width else g.keep_indices(checked[g.name], k)
        layers.append(LayerPlan(g.name, g.kind, g.width, len(indices), indices, g.convs,
                                [s.name for s in g.sites], slot_rate.get(g.name)))
    return Plan(layers, method, setting, graph.input_size, graph.residual,
                getattr(graph, "prune_classifier_input", False), graph.engine,
                type(graph.model).__name__, round_to=round_to)
