"""Random search: ``n`` candidates drawn without replacement with a fixed seed (so resumable)."""
from __future__ import annotations

import random as _random
from typing import Sequence

from gdn2_kernels.tuner.trial import Budget, Candidate, Evaluator, StrategyOption, Trial

OPTIONS: tuple[StrategyOption, ...] = (
    StrategyOption("n", int, 16, "candidates drawn per kernel and chunk size", minimum=1),
    StrategyOption("seed", int, 0, "seed of the draw; the same seed redraws the same candidates"),
    StrategyOption("effort", int, 1, "timing effort of every trial", minimum=1),
)


def sample(space: Sequence[Candidate], n: int, seed: int) -> list[Candidate]:
    """``n`` candidates of ``space`` (all if it is smaller): the spec default (first) and every
    pinned candidate always, then a seeded draw of the rest."""
    space = list(space)
    if n >= len(space):
        return space
    keep = [c for i, c in enumerate(space) if i == 0 or c.pinned]
    rest = [c for i, c in enumerate(space) if i != 0 and not c.pinned]
    rng = _random.Random(seed)
    return keep + rng.sample(rest, max(0, min(len(rest), n - len(keep))))


def random(space: Sequence[Candidate], evaluator: Evaluator, budget: Budget, n: int = 16,
           seed: int = 0, effort: int = 1) -> list[Trial]:
    """Evaluate ``n`` random candidates of ``space`` at ``effort``."""
    return evaluator(sample(space, n, seed), effort, budget)
