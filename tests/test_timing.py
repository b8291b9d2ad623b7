"""The toolkit's one clock (``gdn2_kernels.timing``): the tuner and the benchmarks time with it."""
from __future__ import annotations

import torch

from gdn2_kernels import timing


def test_measure_counts_reps_and_resets_grads():
    x = torch.ones(3, requires_grad=True)
    calls = []

    def fn():
        assert x.grad is None  # reset before every call
        calls.append(1)
        x.grad = torch.ones(3)

    t = timing.measure(fn, reps=4, warmup=2, device=torch.device("cpu"), grads=(x,))
    assert len(calls) == 6 and t.reps == 4 and t.clock == timing.WALL_CLOCK
    assert t.median_ms >= 0 and t.iqr_ms >= 0


def test_measure_for_fills_a_budget_with_at_least_one_run():
    calls = []
    t = timing.measure_for(lambda: calls.append(1), torch.device("cpu"), warmup_ms=0, rep_ms=0)
    assert t.reps == 1 and len(calls) == 5 + 1 + 1 + 1  # estimate (warm-up + 5), warm-up, run
    assert timing.summarize([1.0, 2.0, 3.0, 4.0], "x").median_ms == 2.5


def test_the_benchmarks_and_the_tuner_share_it():
    import inspect

    from gdn2_kernels.bench import timing as bench_timing
    from gdn2_kernels.tuner import evaluate

    assert "timing.measure_for" in inspect.getsource(bench_timing.CudaMeasurer.time_ms)
    assert "timing.measure(" in inspect.getsource(evaluate)
