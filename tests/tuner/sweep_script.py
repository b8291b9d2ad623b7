"""A sweep run as its own process by the resume test: exhaustive over state_fwd configs."""
from __future__ import annotations

import sys

from gdn2_kernels.tuner.evaluate import EvalSettings, PoolEvaluator, WorkerPool
from gdn2_kernels.tuner.strategies.exhaustive import exhaustive
from gdn2_kernels.tuner.trial import Budget, TrialLog


def main(log_path: str, trial_fn: str) -> None:
    from helpers import state_fwd_candidates, tiny_problem

    cands = state_fwd_candidates(bvs=(32,), warps=(2, 4), stages=(1, 2, 3, 4))
    pool = WorkerPool([-1], trial_fn)
    ev = PoolEvaluator(pool, TrialLog(log_path), EvalSettings(tiny_problem(), trial_fn=trial_fn))
    try:
        exhaustive(cands, ev, Budget())
    finally:
        pool.close()
    print(f"ran {ev.ran} resumed {ev.resumed}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
