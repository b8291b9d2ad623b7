"""Trial functions for worker tests: run inside spawned workers instead of the real kernels.

Each takes ``(task, device_index)`` like :func:`gdn2_kernels.tuner.evaluate.run_trial`. The
candidate's config decides the behaviour, so one sweep mixes good, crashing and hanging
candidates.
"""
from __future__ import annotations

import os
import time

from gdn2_kernels.tuner.trial import Trial


def _trial(task, status: str, median: float | None) -> Trial:
    c = task.candidate
    return Trial(task.id, c.kernel, c.config.as_dict(), c.chunk_size, c.workload, c.stage,
                 task.effort, status, median_ms=median, iqr_ms=0.0 if median else None,
                 device=f"pid{os.getpid()}")


def by_config(task, device_index: int) -> Trial:
    """BV=16 aborts the process (like a segfault), BV=64 raises, num_warps=8 hangs; else ok."""
    cfg = task.candidate.config.as_dict()
    side = os.environ.get("GDN2_TEST_EXECUTIONS")
    if side:
        with open(side, "a") as f:
            f.write(task.candidate.label() + "\n")
    if cfg.get("BV") == 16:
        os.abort()
    if cfg.get("BV") == 64:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if cfg.get("num_warps") == 8:
        time.sleep(60)
    time.sleep(float(os.environ.get("GDN2_TEST_TRIAL_SECONDS", "0")))
    return _trial(task, "ok", 1.0 + cfg.get("num_stages", 1) / 10 + cfg.get("num_warps", 1) / 100)


# Whole-pipeline medians by (B of the problem, chunk size): BT=16 wins the batched problem but is
# the slowest on one long sequence; BT=32 is second on both and must be chosen.
PIPELINE_MS = {(2, 16): 1.0, (2, 32): 1.1, (2, 64): 2.0, (1, 16): 3.0, (1, 32): 1.2, (1, 64): 2.5}


def by_chunk_and_length(task, device_index: int) -> Trial:
    """Per-kernel trials all take 1 ms; pipeline trials take PIPELINE_MS[(B, BT)]."""
    c = task.candidate
    median = 1.0
    if c.stage in ("pipeline", "default"):
        median = PIPELINE_MS[(task.settings.problem.B, c.chunk_size)]
    t = _trial(task, "ok", median)
    t.pipeline = {n: cfg.as_dict() for n, cfg in c.pipeline}
    t.errors = {"o": {"max_rel_err": 1e-6, "rel_rms": 1e-7, "tolerance": 1e-3}}
    return t
