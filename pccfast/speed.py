"""Measured inference latency, and the speed-up of a pruned model over its original.

FLOPs removed is not time saved: small batches are bound by per-layer overheads, odd channel
counts miss the vector widths and tiles fast kernels are built for, and the layers left whole
(stem, classifier, depthwise convs) keep their cost. So pccfast times what it prunes.

    result = pccfast.benchmark(pruned, (3, 32, 32), baseline=model, batch_sizes=(1, 64))
    print(result.table())              # per batch size: ms (median, spread), speed-up
    result.rows[0].speedup             # baseline time / model time, median over rounds

A *round* runs each model once, alternating which goes first, so that load from other
processes hits both; the speed-up is the median of the per-round ratios, robust to drift. On
CUDA the forward is timed with events after a synchronise; on CPU with ``time.perf_counter``.
``model`` may also be an ``onnxruntime.InferenceSession`` (timed through ``session.run``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

DEFAULT_BATCH_SIZES = (1, 64)


@dataclass
class Timing:
    """Forward latency of one model at one batch size, in milliseconds over ``runs`` runs."""

    median_ms: float
    q1_ms: float  # first and third quartiles: the spread
    q3_ms: float
    min_ms: float
    runs: int


@dataclass
class BenchRow:
    batch_size: int
    model: Timing
    baseline: Timing | None = None
    speedup: float | None = None  # median over rounds of baseline time / model time
    speedup_q1: float | None = None
    speedup_q3: float | None = None


@dataclass
class BenchResult:
    """What :func:`benchmark` measured, and where (device, torch threads, input)."""

    rows: list[BenchRow]
    device: str
    threads: int
    input_size: tuple[int, ...]
    dtype: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A text table: batch, model ms (q1-q3), baseline ms, speed-up (q1-q3)."""
        lines = [f"{self.device}, {self.threads} torch threads, input {tuple(self.input_size)}, "
                 f"{self.dtype}",
                 f"{'batch':>5}  {'model ms (q1-q3)':>24}  {'baseline ms (q1-q3)':>24}  "
                 f"{'speed-up (q1-q3)':>20}"]
        for r in self.rows:
            base = _span(r.baseline) if r.baseline else "-"
            up = (f"{r.speedup:.2f}x ({r.speedup_q1:.2f}-{r.speedup_q3:.2f})"
                  if r.speedup is not None else "-")
            lines.append(f"{r.batch_size:>5}  {_span(r.model):>24}  {base:>24}  {up:>20}")
        return "\n".join(lines)


def _span(t: Timing) -> str:
    return f"{t.median_ms:.3f} ({t.q1_ms:.3f}-{t.q3_ms:.3f})"


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _timing(seconds: list[float]) -> Timing:
    ms = [1e3 * s for s in seconds]
    q1, q2, q3 = _quartiles(ms)
    return Timing(q2, q1, q3, min(ms), len(ms))


# ----------------------------------------------------------------------------- runners
def _is_onnx_session(model) -> bool:
    return type(model).__name__ == "InferenceSession" and hasattr(model, "run")


def _runner(model, x: torch.Tensor):
    """A no-argument callable running one forward of ``model`` on ``x``."""
    if _is_onnx_session(model):
        name = model.get_inputs()[0].name
        feed = {name: x.detach().cpu().numpy()}
        return lambda: model.run(None, feed)
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be an nn.Module, a callable or an onnxruntime "
                        f"InferenceSession, got {type(model).__name__}")

    def run():
        with torch.inference_mode():
            return model(x)

    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Clock:
    """Times one call: events on CUDA (after a synchronise); on CPU the wall clock, or with
    ``clock="cpu"`` the process's CPU time (all its threads), which other processes on a shared
    machine do not inflate: a latency proxy for one thread, a total-work measure for several."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
        self.cuda = device.type == "cuda"
        self.clock = CLOCKS[clock]

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = self.clock()
        fn()
        return self.clock() - t0


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` for the block (None: unchanged)."""
    if threads is None:
        yield torch.get_num_threads()
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- measuring
def time_rounds(*fns, rounds: int = 20, warmup: int = 2, max_seconds: float | None = None,
                clock=None) -> list[list[float]]:
    """Interleaved timed runs of several callables: one list of seconds per callable, all of
    equal length (entry ``i`` of each from round ``i``).

    Each round runs every callable once, starting at a different one each round (with two:
    the model first, then the baseline first, ...), so a slow-down of the machine during a round
    hits all of them. ``max_seconds`` stops early (after at least 3 rounds) once the measuring has
    taken that long. ``clock(fn) -> seconds`` (default: ``time.perf_counter`` around the call).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not fns:
        raise ValueError("time_rounds needs at least one callable")
    clock = clock or _Clock(torch.device("cpu"))
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    for i in range(rounds):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            times[k].append(clock(fns[k]))
        if max_seconds is not None and i >= 2 and time.perf_counter() - started > max_seconds:
            break
    return times


def speedups(baseline_s: list[float], model_s: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of the per-round ratios baseline time / model time."""
    return _quartiles([b / m for b, m in zip(baseline_s, model_s)])


def benchmark(model, input_size, *, baseline=None, batch_sizes=DEFAULT_BATCH_SIZES,
              device=None, threads: int | None = None, dtype=torch.float32,
              channels_last: bool = False, rounds: int = 20, warmup: int = 2,
              max_seconds: float | None = None, seed: int = 0,
              clock: str = "wall") -> BenchResult:
    """Times ``model``'s forward (inference mode) at each batch size, against ``baseline``.

    input_size: one image's shape ``(C, H, W)`` (or ``(1, C, H, W)``; the batch is replaced).
    baseline: a second model timed in the same rounds, alternating (see :func:`time_rounds`);
      each row then has ``speedup = baseline time / model time`` (median over rounds, with
      quartiles).
    device: where the models run (default: where the model's parameters are; CPU for an
      onnxruntime session). The models are not moved: put them there first.
    threads: torch CPU threads while timing (None: as set); recorded in the result.
    dtype / channels_last: of the input (bf16 and channels_last for GPUs).
    rounds / warmup / max_seconds: timed rounds, untimed rounds first, a time cap per batch size.
    clock: ``"wall"`` (latency) or ``"cpu"`` (process CPU time: steadier on a shared machine;
      equals latency on one thread); CUDA always uses events.
    """
    size = _image_size(input_size)
    batches = _batch_sizes(batch_sizes)
    dev = torch.device(device) if device is not None else _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with torch_threads(threads) as used:
        for n in batches:
            x = torch.randn((n, *size), generator=gen).to(dev, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            timer = _Clock(dev, clock)
            fns = [_runner(model, x)] + ([_runner(baseline, x)] if baseline is not None else [])
            model_s, *base = time_rounds(*fns, rounds=rounds, warmup=warmup,
                                         max_seconds=max_seconds, clock=timer)
            row = BenchRow(n, _timing(model_s))
            if base:
                row.baseline = _timing(base[0])
                row.speedup_q1, row.speedup, row.speedup_q3 = speedups(base[0], model_s)
            rows.append(row)
    return BenchResult(rows, str(dev), used, size, str(dtype).replace("torch.", ""),
                       {"clock": "cuda events" if dev.type == "cuda" else clock})


def _image_size(input_size) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        raise TypeError(f"input_size must be a shape such as (3, 32, 32), got {input_size!r}") \
            from None
    if len(size) == 4:
        size = size[1:]
    if len(size) < 1 or any(v < 1 for v in size):
        raise ValueError(f"input_size must be one input's shape such as (3, 32, 32) (positive "
                         f"sizes), got {tuple(input_size)!r}")
    return size


def _batch_sizes(batch_sizes) -> tuple[int, ...]:
    if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool):
        batch_sizes = (batch_sizes,)
    out = tuple(batch_sizes)
    if not out or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in out):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    return out


def _device_of(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def speedup_summary(original: nn.Module, pruned: nn.Module, input_size, *,
                    batch_size: int = 1, max_seconds: float = 2.0) -> dict:
    """The pruned model's measured CPU speed-up over the original, for a run's summary.json:
    a few seconds at one batch size (CPU, current threads), as cheap as a report needs."""
    import copy

    original = copy.deepcopy(original).cpu().eval()
    pruned = copy.deepcopy(pruned).cpu().eval()
    result = benchmark(pruned, input_size, baseline=original, batch_sizes=(batch_size,),
                       device="cpu", rounds=50, warmup=2, max_seconds=max_seconds)
    row = result.rows[0]
    return {"speedup_cpu": row.speedup, "speedup_cpu_q1": row.speedup_q1,
            "speedup_cpu_q3": row.speedup_q3, "speedup_cpu_batch": batch_size,
            "speedup_cpu_threads": result.threads,
            "latency_cpu_ms": {"original": row.baseline.median_ms,
                               "pruned": row.model.median_ms}}
