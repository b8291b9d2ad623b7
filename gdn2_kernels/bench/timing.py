"""How the benchmark measures: median latency with the L2 flushed, peak memory, the ceilings.

:class:`Measurer` is the seam the CPU tests use to inject fake timings; :class:`CudaMeasurer` is
the real one (:func:`gdn2_kernels.timing.measure_for`, the clock the tuner chooses configs by:
median of the runs that fill a time budget, the L2 cache cleared before each run, warm-up runs
excluded; the runner calls each function once more before that, so Triton autotuning and
compilation are never timed).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from gdn2_kernels import timing
from gdn2_kernels.bench.model import Ceilings, copy_gbps, matmul_tflops

MATMUL_N = 8192                    # ceiling probe: 8192^3 bf16 matmul
COPY_BYTES = 2 * 1024 ** 3         # ceiling probe: 2 GiB device-to-device copy


class Measurer(Protocol):
    def time_ms(self, fn: Callable[[], object]) -> tuple[float, float]:
        """Median and inter-quartile range, in milliseconds, of ``fn`` (already warmed)."""

    def peak_bytes(self, fn: Callable[[], object]) -> int | None:
        """Peak memory that one call of ``fn`` allocates above what was allocated before it."""

    def ceilings(self) -> Ceilings:
        """Measured matmul TFLOP/s and copy GB/s."""

    def sync(self) -> None:
        """Wait for queued device work."""


class CudaMeasurer:
    """Times on the current CUDA device."""

    def __init__(self, warmup_ms: int = 25, rep_ms: int = 200):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    def time_ms(self, fn: Callable[[], object]) -> tuple[float, float]:
        t = timing.measure_for(fn, torch.device("cuda", torch.cuda.current_device()),
                               self.warmup_ms, self.rep_ms)
        return t.median_ms, t.iqr_ms

    def peak_bytes(self, fn: Callable[[], object]) -> int | None:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)

    def ceilings(self) -> Ceilings:
        a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
        mm_ms, _ = self.time_ms(lambda: torch.matmul(a, b))
        del a, b
        src = torch.empty(COPY_BYTES, device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        cp_ms, _ = self.time_ms(lambda: dst.copy_(src))
        del src, dst
        torch.cuda.empty_cache()
        return Ceilings(matmul_tflops(MATMUL_N, mm_ms), copy_gbps(COPY_BYTES, cp_ms))

    def sync(self) -> None:
        torch.cuda.synchronize()
