"""Exhaustive search: every candidate of the space once, in order, until the budget ends."""
from __future__ import annotations

from typing import Sequence

from gdn2_kernels.tuner.trial import Budget, Candidate, Evaluator, StrategyOption, Trial

OPTIONS: tuple[StrategyOption, ...] = (
    StrategyOption("effort", int, 1, "timing effort of every trial (repetitions x effort)",
                   minimum=1),
)


def exhaustive(space: Sequence[Candidate], evaluator: Evaluator, budget: Budget,
               effort: int = 1) -> list[Trial]:
    """Evaluate all of ``space`` at ``effort``; the budget may stop it early."""
    return evaluator(list(space), effort, budget)
