"""Successive halving: short timings of many candidates, the best ``1/eta`` re-timed longer.

Rung 0 times ``n`` candidates (a seeded sample, or all when ``n`` is 0) at effort 1; each next rung
keeps the fastest ``1/eta`` of the verified ones and multiplies the timing effort by ``eta``, until
one remains or the budget ends. Failed candidates (any status but ok) never advance.
"""
from __future__ import annotations

from typing import Sequence

from gdn2_kernels.tuner.strategies.random import sample
from gdn2_kernels.tuner.trial import Budget, Candidate, Evaluator, StrategyOption, Trial

OPTIONS: tuple[StrategyOption, ...] = (
    StrategyOption("n", int, 0, "candidates in the first rung (0: the whole space)", minimum=0),
    StrategyOption("eta", int, 3, "keep the best 1/eta of each rung; effort grows by eta",
                   minimum=2),
    StrategyOption("seed", int, 0, "seed of the first rung's sample"),
)


def halving(space: Sequence[Candidate], evaluator: Evaluator, budget: Budget, n: int = 0,
            eta: int = 3, seed: int = 0) -> list[Trial]:
    """Run the rungs; returns every trial of every rung."""
    if eta < 2:
        raise ValueError(f"halving: eta must be at least 2, got {eta}")
    pool = sample(space, n, seed) if n > 0 else list(space)
    effort, trials = 1, []
    while pool:
        rung = evaluator(pool, effort, budget)
        trials += rung
        ok = sorted((t for t in rung if t.ok and t.median_ms is not None),
                    key=lambda t: t.median_ms)
        if len(ok) <= 1 or budget.exhausted():
            break
        keep = {t.label() for t in ok[:max(1, len(ok) // eta)]}
        pool = [c for c in pool if c.label() in keep]
        effort *= eta
    return trials
