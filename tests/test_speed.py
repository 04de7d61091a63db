"""pccfast.benchmark: the timing logic on a fake clock (alternation, medians, ratios), and on
real models only an ordering no machine can reverse (no timing thresholds)."""

import pytest
import torch
from torch import nn

import pccfast
from pccfast.speed import speedup_summary, time_rounds, torch_threads


class FakeClock:
    """Each call "takes" the seconds the function returns; records the call order."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn):
        name, seconds = fn()
        self.calls.append(name)
        return seconds


def test_rounds_alternate_which_model_runs_first_and_pair_the_times():
    clock = FakeClock()
    slow = iter([5.0, 1.0, 9.0, 1.0, 7.0])  # the machine slows down in rounds 2 and 3
    fast = iter([2.5, 0.5, 3.0, 0.5, 3.5])
    model_s, base_s = time_rounds(lambda: ("model", next(fast)), lambda: ("base", next(slow)),
                                  rounds=5, warmup=0, clock=clock)
    assert clock.calls == ["model", "base", "base", "model", "model", "base", "base", "model",
                           "model", "base"]
    assert model_s == [2.5, 0.5, 3.0, 0.5, 3.5] and base_s == [5.0, 1.0, 9.0, 1.0, 7.0]


def test_three_callables_take_turns_to_start():
    clock = FakeClock()
    times = time_rounds(*[lambda n=n: (n, 1.0) for n in "abc"], rounds=3, warmup=1, clock=clock)
    assert clock.calls == list("abc" "bca" "cab")  # the warm-up round is not timed
    assert times == [[1.0] * 3] * 3


def test_the_speedup_is_the_median_of_per_round_ratios(monkeypatch):
    """Load that hits both models of a round leaves the ratio alone; the medians say so."""
    import pccfast.speed as speed

    times = {"model": iter([1.0, 10.0, 1.0, 1.0, 10.0]),
             "base": iter([3.0, 30.0, 3.0, 3.0, 30.0])}

    class Clock:
        def __init__(self, device, clock="wall"):
            pass

        def __call__(self, fn):
            return next(times[fn()])

    monkeypatch.setattr(speed, "_Clock", Clock)
    monkeypatch.setattr(speed, "_runner", lambda model, x: (lambda: model))
    result = pccfast.benchmark("model", (3, 8, 8), baseline="base", batch_sizes=(4,), rounds=5,
                               warmup=0, device="cpu")
    row, = result.rows
    assert row.batch_size == 4
    assert row.speedup == row.speedup_q1 == row.speedup_q3 == pytest.approx(3.0)
    assert row.model.median_ms == pytest.approx(1000.0) and row.model.runs == 5
    assert row.baseline.median_ms == pytest.approx(3000.0)
    assert row.model.q3_ms == pytest.approx(10_000.0) and row.model.min_ms == pytest.approx(1000.0)
    assert "3.00x" in result.table()


def test_max_seconds_stops_after_three_rounds():
    clock = FakeClock()
    import time

    def slow():
        time.sleep(0.02)
        return "m", 0.02

    times, = time_rounds(slow, rounds=100, warmup=0, max_seconds=0.01, clock=clock)
    assert len(times) == 3


class Stack(nn.Module):
    def __init__(self, depth, width=32):
        super().__init__()
        self.body = nn.Sequential(*[nn.Conv2d(width if i else 3, width, 3, padding=1)
                                    for i in range(depth)])

    def forward(self, x):
        return self.body(x).mean((2, 3))


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_a_model_eight_times_heavier_ranks_as_slower(clock):
    torch.manual_seed(0)
    light, heavy = Stack(1).eval(), Stack(8, width=96).eval()  # ~60x the MACs
    result = pccfast.benchmark(light, (3, 24, 24), baseline=heavy, batch_sizes=(1, 3), rounds=5,
                               clock=clock)
    assert result.extra == {"clock": clock}
    assert [r.batch_size for r in result.rows] == [1, 3]
    for row in result.rows:
        assert row.speedup > 1.0  # light is faster than heavy: baseline / model time
        assert row.model.median_ms < row.baseline.median_ms
        assert row.model.q1_ms <= row.model.median_ms <= row.model.q3_ms
    assert result.threads == torch.get_num_threads() and result.device == "cpu"
    assert result.to_dict()["rows"][0]["batch_size"] == 1


def test_threads_are_set_while_timing_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    result = pccfast.benchmark(Stack(1).eval(), (3, 8, 8), batch_sizes=1, rounds=1, threads=1)
    assert result.threads == 1 and result.rows[0].speedup is None
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=(3, 0, 8)), "input_size must be one input's shape"),
    (dict(input_size="3x8"), "input_size must be a shape"),
    (dict(batch_sizes=(1, 0)), "batch_sizes must be positive integers"),
    (dict(threads=0), "threads must be a positive integer"),
    (dict(rounds=0), "rounds must be a positive integer"),
    (dict(clock="gpu"), "clock must be one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = dict(input_size=(3, 8, 8))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        pccfast.benchmark(Stack(1).eval(), args.pop("input_size"), **args)


def test_onnxruntime_sessions_are_timed_like_modules(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = Stack(2).eval()
    path = pccfast.export(model, tmp_path / "m.onnx", (3, 8, 8))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = pccfast.benchmark(session, (3, 8, 8), baseline=model, batch_sizes=(2,), rounds=2)
    assert result.rows[0].speedup > 0 and result.device == "cpu"


def test_speedup_summary_leaves_the_models_where_they_were():
    light, heavy = Stack(1), Stack(4)
    out = speedup_summary(heavy, light.train(), (1, 3, 16, 16), max_seconds=0.5)
    assert out["speedup_cpu"] > 0 and out["speedup_cpu_batch"] == 1
    assert set(out["latency_cpu_ms"]) == {"original", "pruned"}
    assert light.training  # a copy was timed in eval mode
