"""Trials, their typed statuses, the budget, and the append-only JSONL trial log.

A *trial* is one candidate (a kernel config inside a whole pipeline, at one chunk size) evaluated
once at one timing ``effort``: compiled, verified against the reference, then timed. Its identity
(:func:`trial_id`) is a hash of everything that determines the result (problem, workload, kernel,
pipeline configs, effort), so a resumed sweep recognises finished trials in the log.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from gdn2_kernels.configs import KernelConfig

STATUSES = ("ok", "compile_error", "out_of_resources", "crash", "wrong_result", "timeout")
FAILED = frozenset(STATUSES) - {"ok"}


@dataclass(frozen=True)
class Problem:
    """The shape a tune times on. Configs are keyed on (K, V, dtype) only; B, T, H are not keys."""

    B: int = 4
    T: int = 4096
    H: int = 16
    K: int = 128
    V: int = 128
    dtype: str = "bfloat16"
    decode_batch: int = 64  # batch of the T = 1 decode step that times the recurrent kernel

    def label(self) -> str:
        return f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-{self.dtype}"


@dataclass(frozen=True)
class Candidate:
    """What one trial runs: ``kernel``'s config varied inside ``pipeline`` (other kernels fixed)."""

    kernel: str
    config: KernelConfig
    pipeline: tuple[tuple[str, KernelConfig], ...]  # every kernel's config, ``kernel``'s included
    chunk_size: int
    workload: str  # 'fwd', 'fwd+bwd' (chunk_gdn2) or 'decode' (fused_recurrent_gdn2)
    stage: str = "kernel"  # 'kernel' (one kernel varied), 'pipeline' (final per-BT), 'default'
    pinned: bool = False  # always in a sampled rung (the spec default, the configs in use now)

    def label(self) -> str:
        return self.config.label()


def trial_id(problem: Problem, cand: Candidate, effort: int) -> str:
    """Stable identity of (problem, candidate, effort), used to resume from the log."""
    doc = {"problem": dataclasses.asdict(problem), "kernel": cand.kernel, "stage": cand.stage,
           "workload": cand.workload, "effort": effort,
           "pipeline": {n: c.label() for n, c in cand.pipeline}}
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Trial:
    """The outcome of one trial, as appended to the log."""

    id: str
    kernel: str
    config: dict[str, Any]
    chunk_size: int
    workload: str
    stage: str
    effort: int
    status: str
    median_ms: float | None = None
    iqr_ms: float | None = None
    reps: int = 0
    clock: str = ""  # 'cuda-events' or 'wall-clock (interpreter)'
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # per tensor
    pipeline: dict[str, dict[str, Any]] = field(default_factory=dict)  # whole-pipeline trials
    message: str = ""
    throttled: bool = False
    retimed: int = 0
    device: str = ""
    seconds: float = 0.0
    finished: float = 0.0  # unix time

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def label(self) -> str:
        """The config as ``KernelConfig.label`` spells it."""
        return ",".join(f"{k}={v}" for k, v in self.config.items())

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trial":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Budget:
    """Limits of one search: distinct configs tried and a wall-clock deadline.

    ``charge`` is called by the evaluator for each *new* config it is asked about, finished ones
    replayed from the log included, so a resumed sweep stops where the uninterrupted one would.
    """

    def __init__(self, max_configs: int | None = None, deadline: float | None = None):
        self.max_configs = max_configs
        self.deadline = deadline
        self.used = 0

    def exhausted(self) -> bool:
        if self.max_configs is not None and self.used >= self.max_configs:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def charge(self) -> None:
        self.used += 1

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class Evaluator(Protocol):
    """Evaluates candidates at a timing effort; stops early (returns fewer) when the budget ends.

    Re-evaluating a config already seen (at a higher effort) does not charge the budget's config
    count, only its time.
    """

    def __call__(self, candidates: Sequence[Candidate], effort: int, budget: Budget) -> list[Trial]:
        ...


Strategy = Callable[..., list[Trial]]


@dataclass(frozen=True)
class StrategyOption:
    """One option of a strategy: its help text is generated from these (``gdn2 tune --help``)."""

    name: str
    type: type
    default: Any
    help: str
    minimum: int | None = None  # smallest value that works (None: any)


def best(trials: Iterable[Trial]) -> Trial | None:
    """The fastest ok trial at the highest effort any ok trial reached."""
    ok = [t for t in trials if t.ok and t.median_ms is not None]
    if not ok:
        return None
    top = max(t.effort for t in ok)
    return min((t for t in ok if t.effort == top), key=lambda t: t.median_ms)


class TrialLog:
    """Append-only JSONL log of finished trials; each line is flushed and fsynced when written.

    Reading tolerates a torn last line (a process killed mid-write) with a warning.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.trials: dict[str, Trial] = {}
        if os.path.exists(self.path):
            self.trials = {t.id: t for t in read_log(self.path)}

    def get(self, tid: str) -> Trial | None:
        return self.trials.get(tid)

    def append(self, trial: Trial) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        line = json.dumps(trial.as_dict())  # key order kept: labels follow the spec order
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.trials[trial.id] = trial


def read_log(path: str | os.PathLike) -> list[Trial]:
    """Every complete trial in a log, in order (a later line with the same id wins in TrialLog)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}, not an object")
                trial = Trial.from_dict(data)
                if not isinstance(trial.id, str) or trial.status not in STATUSES:
                    raise TypeError(f"id {trial.id!r} / status {trial.status!r} is not a trial's")
                out.append(trial)
            except (json.JSONDecodeError, TypeError, RecursionError) as exc:
                warnings.warn(f"{path}:{n}: skipping an unreadable trial line ({exc})", stacklevel=2)
    return out


__all__ = [
    "Budget",
    "Candidate",
    "Evaluator",
    "FAILED",
    "Problem",
    "STATUSES",
    "Strategy",
    "StrategyOption",
    "Trial",
    "TrialLog",
    "best",
    "read_log",
    "trial_id",
]
