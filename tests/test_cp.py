"""Context parallelism across processes: ``chunk_gdn2_cp`` on 2 and 4 gloo ranks equals the
single-process ``chunk_gdn2`` on the whole batch, and bad input fails on every rank.

``torch.multiprocessing`` spawns the ranks (tests/cp_worker.py), which run the real Triton
kernels through the interpreter; each world size runs once for all its cases (spawning and
importing dominate otherwise). Outputs, final-state rows (a sequence's final state, or the state
handed to the next rank) and every gradient, with random cotangents on all of them, are compared
with the single-process op on the global batch within ``TOLERANCES`` of the input dtype; the
boundary states of the reference come from the op run on the sequences' prefixes. A rank that
hangs makes the gloo collective time out, and the test gives the processes a deadline, so a hang
fails the test instead of stalling the suite.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp
from cp_worker import main as worker_main
from cp_worker import row_spans, sequence_of

from gdn2_kernels import chunk_gdn2, dispatch
from gdn2_kernels.accuracy import TOLERANCES, rel_rms
from gdn2_kernels.configs import dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.cp import build_cp_context

H, K, V, T = 1, 16, 24, 64      # one head: heads are covered by test_cp_summary.py
DEADLINE_S = 600       # a whole world's run; reached only when something hangs

CASES = {
    2: [
        dict(name="contig-1seq-h0-final", layout="contiguous", cu=[0, 64], h0=True,
             final_state=True),
        dict(name="zigzag-varlen-l2norm-bf16-keep-h", layout="zigzag", cu=[0, 10, 50, 64],
             dtype=torch.bfloat16, l2norm=True, disable_recompute=True),
        dict(name="fla-contig-varlen-h0-final-scale", layout="contiguous", cu=[0, 10, 64],
             h0=True, final_state=True, fla=True, scale=0.3),
        dict(name="fla-zigzag-1seq", layout="zigzag", cu=[0, 64], fla=True),
    ],
    4: [
        dict(name="contig-varlen-h0-final", layout="contiguous", cu=[0, 5, 40, 44, 64],
             h0=True, final_state=True),
        dict(name="zigzag-1seq-h0", layout="zigzag", cu=[0, 64], h0=True),
    ],
}
ERRORS = {
    2: [
        dict(kind="lengths", cu_by_rank=[[0, 64], [0, 32]]),
        dict(kind="short_slice", cu=[0, 64], bad_rank=1),
        dict(kind="group", cu=[0, 64], built_for=4),
        dict(kind="carried_h0", cu=[0, 64], bad_rank=1),
        dict(kind="g_dtype", cu=[0, 64], bad_rank=0),
    ],
    4: [
        dict(kind="lengths", cu_by_rank=[[0, 64], [0, 64], [0, 32], [0, 64]]),
        dict(kind="contexts_disagree", cu_by_rank=[[0, 64], [0, 64], [0, 30, 64], [0, 64]]),
    ],
}
# What every rank's error must say, per kind.
EXPECTED = {
    "lengths": "different numbers of tokens",
    "short_slice": "rank 1: q holds T = 31 tokens",
    "group": "was built for rank",
    "carried_h0": "rank 1: initial_state rows [0] are not zero",
    "g_dtype": "rank 0: g has dtype torch.float64",
    "contexts_disagree": "rebuild every rank's context",
}
DEFAULTS = dict(dtype=torch.float32, h0=False, final_state=False, l2norm=False, fla=False,
                chunk=16, scale=None, disable_recompute=False)


def _spans_of_all_ranks(case: dict, world: int) -> list[tuple[int, int]]:
    return [s for r in range(world)
            for s in row_spans(build_cp_context(case["cu"], layout=case["layout"], rank=r,
                                                world_size=world))]


def _plan(world: int) -> dict:
    cases = []
    for spec in CASES[world]:
        c = {**DEFAULTS, **spec}
        x = make_inputs(1, T, H, K, V, c["dtype"], with_h0=c["h0"], cu_seqlens=c["cu"])
        c["inputs"] = {n: getattr(x, n) for n in ("q", "k", "v", "g", "b", "w")}
        c["h0"] = x.h0
        c["do"] = torch.randn(1, T, H, V).to(c["dtype"])
        c["dht"] = {f"{s}-{e}": torch.randn(H, K, V) for s, e in _spans_of_all_ranks(c, world)}
        cases.append(c)
    x = make_inputs(1, T, H, K, V)
    inputs = {n: getattr(x, n) for n in ("q", "k", "v", "g", "b", "w")}
    return {"cases": cases, "errors": [{**e, "inputs": inputs} for e in ERRORS[world]]}


def _spawn(world: int, workdir: str) -> None:
    ctx = mp.spawn(worker_main, args=(world, workdir), nprocs=world, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks still running after {DEADLINE_S} s (a hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@functools.lru_cache(maxsize=None)
def _run(world: int) -> tuple[dict, dict, dict]:
    """Spawn ``world`` ranks once for all its cases: ``(plan, results by case, errors by rank)``."""
    workdir = tempfile.mkdtemp(prefix=f"gdn2_cp{world}_")
    plan = _plan(world)
    torch.save(plan, os.path.join(workdir, "plan.pt"))
    _spawn(world, workdir)
    results = {c["name"]: [torch.load(os.path.join(workdir, f"{c['name']}.rank{r}.pt"))
                           for r in range(world)]
               for c in plan["cases"]
               if os.path.exists(os.path.join(workdir, f"{c['name']}.rank0.pt"))}
    errors = {}
    for r in range(world):
        with open(os.path.join(workdir, f"errors.rank{r}.json")) as f:
            errors[r] = json.load(f)
    return plan, results, errors


def _reference(case: dict) -> dict[str, torch.Tensor]:
    """The single-process op on the global batch: o, the state at the end of every local
    sequence of every rank, and the gradients of the same loss the ranks compute."""
    cu = case["cu"]
    leaves = [case["inputs"][n].clone().requires_grad_() for n in ("q", "k", "v", "g", "b", "w")]
    h0 = case["h0"].clone().requires_grad_() if case["h0"] is not None else None
    cu_t = torch.tensor(cu, dtype=torch.int32)
    with dispatch.override(dispatch.default_pipeline(case["chunk"])):
        o, ht = chunk_gdn2(*leaves, scale=case["scale"], initial_state=h0,
                           output_final_state=True, cu_seqlens=cu_t,
                           use_qk_l2norm_in_kernel=case["l2norm"])
        loss = (o.float() * case["do"].float()).sum()
        states = {}
        if case["final_state"]:
            spans = sorted(case["dht"], key=lambda s: int(s.split("-")[0]))
            inner = []
            for key in spans:
                s, e = map(int, key.split("-"))
                n = sequence_of(cu, s)
                if e == cu[n + 1]:
                    states[key] = ht[n]
                else:
                    inner.append((key, n, e))
            if inner:        # the op on each prefix ending at a rank boundary
                pieces = [[x[:, cu[n]:e] for x in leaves] for _, n, e in inner]
                packed = [torch.cat(p, 1) for p in zip(*pieces)]
                bounds = [0]
                for _, n, e in inner:
                    bounds.append(bounds[-1] + e - cu[n])
                _, hp = chunk_gdn2(*packed, scale=case["scale"],
                                   initial_state=h0[[n for _, n, _ in inner]]
                                   if h0 is not None else None, output_final_state=True,
                                   cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                                   use_qk_l2norm_in_kernel=case["l2norm"])
                states.update({key: hp[i] for i, (key, _, _) in enumerate(inner)})
            loss = loss + sum((states[k] * case["dht"][k]).sum() for k in states)
        loss.backward()
    ref = {"o": o.detach(), "states": {k: v.detach() for k, v in states.items()}}
    ref.update({n: x.grad for n, x in zip(("dq", "dk", "dv", "dg", "db", "dw"), leaves)})
    if h0 is not None:
        ref["dh0"] = h0.grad
    return ref


def _assemble(case: dict, world: int, per_rank: list[dict], name: str) -> torch.Tensor:
    """A token-axis tensor of the global batch from the ranks' local ones."""
    out = torch.full_like(case["inputs"]["q" if name in ("dq", "dk", "dg", "db") else "v"],
                          float("nan"), dtype=per_rank[0][name].dtype)
    for r, got in enumerate(per_rank):
        ctx = build_cp_context(case["cu"], layout=case["layout"], rank=r, world_size=world)
        off = 0
        for a, e in ctx.global_ranges():
            out[:, a:e] = got[name][:, off:off + e - a]
            off += e - a
    return out


def _case_ids(world: int) -> list[tuple[int, str]]:
    return [(world, c["name"]) for c in CASES[world]]


@pytest.mark.parametrize("world,name", _case_ids(2) + _case_ids(4),
                         ids=lambda x: str(x) if isinstance(x, str) else f"W{x}")
def test_cp_equals_the_single_process_op(world, name):
    plan, results, errors = _run(world)
    for r, errs in errors.items():
        assert "crash" not in errs, f"rank {r} crashed:\n{errs['crash']['message']}"
    case = next(c for c in plan["cases"] if c["name"] == name)
    per_rank = results[name]
    ref = _reference(case)
    tol = TOLERANCES[dtype_name(case["dtype"])]
    names = ["o", "dq", "dk", "dv", "dg", "db", "dw"]
    bad = {n: rel_rms(_assemble(case, world, per_rank, n), ref[n]) for n in names}
    if case["final_state"]:
        keys = [f"{s}-{e}" for got in per_rank for s, e in got["spans"].tolist()]
        got_states = torch.cat([got["ht"] for got in per_rank])
        bad["ht"] = rel_rms(got_states, torch.stack([ref["states"][k] for k in keys]))
    if case["h0"] is not None:       # each sequence's dh0 from the rank where it starts
        dh0 = torch.full_like(ref["dh0"], float("nan"))
        for got in per_rank:
            for i, (s, _) in enumerate(got["spans"].tolist()):
                n = sequence_of(case["cu"], s)
                if case["cu"][n] == s:
                    dh0[n] = got["dh0"][i]
                else:
                    assert torch.all(got["dh0"][i] == 0), "a carried row's dh0 must be zero"
        bad["dh0"] = rel_rms(dh0, ref["dh0"])
    failing = {n: e for n, e in bad.items() if not e <= tol[n]}
    assert not failing, f"{name} on {world} ranks: rel RMS over tolerance {failing}"


@pytest.mark.parametrize("world,kind", [(w, e["kind"]) for w in (2, 4) for e in ERRORS[w]],
                         ids=lambda x: str(x) if isinstance(x, str) else f"W{x}")
def test_bad_input_raises_on_every_rank(world, kind):
    _, _, errors = _run(world)
    for r, errs in errors.items():
        assert "crash" not in errs, f"rank {r} crashed:\n{errs['crash']['message']}"
        got = errs[kind]
        assert got["type"] == "ValueError", f"rank {r}: {got}"
        assert "chunk_gdn2_cp" in got["message"] and EXPECTED[kind] in got["message"], \
            f"rank {r}: {got['message']}"
