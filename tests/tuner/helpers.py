"""Small builders shared by the tuner tests (tiny problems, hand-made candidate lists)."""
from __future__ import annotations

import itertools

from gdn2_kernels import dispatch
from gdn2_kernels.configs import get_spec
from gdn2_kernels.tuner.trial import Candidate, Problem, Trial


def tiny_problem() -> Problem:
    return Problem(B=1, T=32, H=1, K=16, V=16, dtype="float32", decode_batch=2)


def state_fwd_candidates(bvs=(16, 32), warps=(2, 4), stages=(1, 2), bt: int = 32) -> list[Candidate]:
    spec = get_spec("state_fwd")
    base = dispatch.default_pipeline(bt).as_dict()
    out = []
    for bv, nw, ns in itertools.product(bvs, warps, stages):
        cfg = spec.config({"BT": bt, "BV": bv, "num_warps": nw, "num_stages": ns})
        pipe = dict(base)
        pipe["state_fwd"] = cfg
        out.append(Candidate("state_fwd", cfg, tuple(pipe.items()), bt, "fwd"))
    return out


def logged(cands: list[Candidate], medians: dict[str, float | None], effort: int = 1) -> list[Trial]:
    """Trials for a replay log: a None median marks a failed (wrong_result) candidate."""
    out = []
    for i, c in enumerate(cands):
        m = medians.get(c.label(), 5.0)
        out.append(Trial(f"t{i}-{effort}", c.kernel, c.config.as_dict(), c.chunk_size, c.workload,
                         c.stage, effort, "ok" if m is not None else "wrong_result",
                         median_ms=m, iqr_ms=0.0 if m is not None else None))
    return out
