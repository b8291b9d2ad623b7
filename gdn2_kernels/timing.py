"""The one clock of the toolkit: median and IQR of a callable over repetitions, warm-up
excluded, L2 flushed. The tuner chooses configs by it (:func:`measure`, a fixed number of
repetitions) and the benchmarks report by it (:func:`measure_for`, repetitions filling a time
budget), so a config is reported by the clock that chose it.

On a GPU this follows ``triton.testing.do_bench``: CUDA events around each repetition, a 256 MB
buffer zeroed before each one so the L2 cache starts cold, gradients reset outside the timed
region. Under the interpreter the clock is ``time.perf_counter`` (wall clock): those numbers
measure the Python interpreter, not a GPU, and are labelled so.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024
CUDA_CLOCK = "cuda-events"
WALL_CLOCK = "wall-clock (interpreter)"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float
    reps: int
    clock: str


def summarize(samples_ms: Sequence[float], clock: str) -> Timing:
    """Median and inter-quartile range of ``samples_ms``."""
    xs = sorted(samples_ms)
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return Timing(statistics.median(xs), iqr, len(xs), clock)


def measure(fn: Callable[[], object], reps: int, warmup: int, device: torch.device,
            grads: Sequence[torch.Tensor] = ()) -> Timing:
    """Time ``fn`` ``reps`` times after ``warmup`` untimed calls; ``grads`` are reset each time."""

    def reset() -> None:
        for t in grads:
            t.grad = None

    for _ in range(warmup):
        reset()
        fn()
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            reset()
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return summarize(out, WALL_CLOCK)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        reset()
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], CUDA_CLOCK)


def measure_for(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25,
                rep_ms: float = 200, grads: Sequence[torch.Tensor] = ()) -> Timing:
    """:func:`measure` with the repetitions that fill ``rep_ms`` (and the warm-up calls that fill
    ``warmup_ms``), estimated from five timed calls as ``do_bench`` does; at least one of each."""
    estimate = measure(fn, 5, 1, device, grads).median_ms
    per_call = max(estimate, 1e-6)
    return measure(fn, max(1, int(rep_ms / per_call)), max(1, int(warmup_ms / per_call)), device,
                   grads)


__all__ = ["CUDA_CLOCK", "L2_FLUSH_BYTES", "Timing", "WALL_CLOCK", "measure", "measure_for",
           "summarize"]
