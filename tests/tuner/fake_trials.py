"""Trial functions for worker tests: run inside spawned workers instead of the real kernels.

Each takes ``(task, device_index)`` like :func:`tuner.evaluate.run_trial`. The candidate's config
decides the behaviour, so one sweep mixes good, crashing and hanging candidates.
"""
from __future__ import annotations

import os
import time

from tuner.trial import Trial


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
