"""The rank side of tests/test_cp.py, run in processes that ``torch.multiprocessing`` spawns.

Each rank joins a gloo group (a file store in the test's directory, a timeout so a mismatched
collective fails instead of hanging), reads the plan the test wrote (cases with their global
inputs), runs ``chunk_gdn2_cp`` forward and backward on its slice of every numeric case through
Triton's interpreter, then every error case, and saves what it got for the test to compare.
Float allocations are NaN-poisoned as in the test session, so an element never written shows up.
"""
from __future__ import annotations

import bisect
import datetime
import json
import os
import traceback
from types import SimpleNamespace

GLOO_TIMEOUT_S = 90


def row_spans(ctx) -> list[tuple[int, int]]:
    """Global ``(start, end)`` of each local sequence of ``ctx``."""
    spans = []
    for part, (a, _) in zip(ctx.parts, ctx.global_ranges()):
        base = ctx.boundaries[part.first]
        for i in range(part.first, part.last + 1):
            spans.append((a + ctx.boundaries[i] - base, a + ctx.boundaries[i + 1] - base))
    return spans


def sequence_of(cu: list[int], start: int) -> int:
    """Index of the global sequence that holds token ``start``."""
    return bisect.bisect_right(cu, start) - 1


def _poison_allocations() -> None:
    import torch

    def poisoned(factory):
        def make(*args, **kwargs):
            out = factory(*args, **kwargs)
            if out.is_floating_point():
                with torch.no_grad():
                    out.fill_(float("nan"))
            return out
        return make

    for name in ("empty", "empty_like", "empty_strided"):
        setattr(torch, name, poisoned(getattr(torch, name)))


def fla_context(group, cu: list[int], rank: int, world: int, layout: str):
    """An object with FLA's ``FLACPContext`` fields (as fla.ops.cp.build_cp_context fills them),
    written from FLA's documented meaning of each field rather than from our context."""
    import torch

    slots = [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]
    L = cu[-1] // (world * len(slots))
    local, meta = [0], []
    for i, s in enumerate(slots):
        a, e = s * L, (s + 1) * L
        cuts = sorted({a, e, *(c for c in cu if a < c < e)})
        local += [c - a + i * L for c in cuts[1:]]
        first_pos = cu[sequence_of(cu, a)] // L
        last_pos = (cu[bisect.bisect_left(cu, e)] - 1) // L
        meta.append((len(cuts) - 1, s - first_pos, last_pos - s))
    cu_t = torch.tensor(local, dtype=torch.int32)
    ns = SimpleNamespace(group=group, cu_seqlens=cu_t, cu_seqlens_cpu=cu_t.clone(), layout=layout,
                         pre_num_ranks=None, post_num_ranks=None, is_first_rank=None,
                         is_last_rank=None)
    if layout == "contiguous":
        ns.pre_num_ranks, ns.post_num_ranks = meta[0][1], meta[0][2]
        ns.is_first_rank, ns.is_last_rank = meta[0][1] == 0, meta[0][2] == 0
    else:
        ns.part_len, ns.front_num_seqs = L, meta[0][0]
        ns.pre_num_ranks_by_part = (meta[0][1], meta[1][1])
        ns.post_num_ranks_by_part = (meta[0][2], meta[1][2])
        ns.is_first_by_part = (meta[0][1] == 0, meta[1][1] == 0)
        ns.is_last_by_part = (meta[0][2] == 0, meta[1][2] == 0)
    return ns


def local_initial_state(h0, cu: list[int], spans: list[tuple[int, int]]):
    """Row i: the global initial state of its sequence where it starts, zeros where it
    continues one from an earlier rank."""
    import torch

    rows = torch.zeros(len(spans), *h0.shape[1:], dtype=h0.dtype)
    for i, (s, _) in enumerate(spans):
        n = sequence_of(cu, s)
        if cu[n] == s:
            rows[i] = h0[n]
    return rows


def _run_case(case: dict, rank: int, world: int, out_dir: str) -> None:
    import torch

    from gdn2_kernels import dispatch
    from gdn2_kernels.cp import build_cp_context, chunk_gdn2_cp

    cu = case["cu"]
    ctx = build_cp_context(cu, layout=case["layout"])
    cp_context = fla_context(None, cu, rank, world, case["layout"]) if case["fla"] else ctx
    if case["fla"]:
        import torch.distributed as dist

        cp_context.group = dist.group.WORLD
    leaves = [ctx.local_slice(case["inputs"][n]).contiguous().requires_grad_()
              for n in ("q", "k", "v", "g", "b", "w")]
    spans = row_spans(ctx)
    h0 = None
    if case["h0"] is not None:
        h0 = local_initial_state(case["h0"], cu, spans).requires_grad_()
    with dispatch.override(dispatch.default_pipeline(case["chunk"])):
        o, ht = chunk_gdn2_cp(*leaves, scale=case["scale"], initial_state=h0,
                              output_final_state=case["final_state"],
                              use_qk_l2norm_in_kernel=case["l2norm"],
                              disable_recompute=case["disable_recompute"], cp_context=cp_context)
        loss = (o.float() * ctx.local_slice(case["do"]).float()).sum()
        if ht is not None:
            dht = torch.stack([case["dht"][f"{s}-{e}"] for s, e in spans])
            loss = loss + (ht * dht).sum()
        loss.backward()
    got = {"o": o.detach(), "spans": torch.tensor(spans)}
    if ht is not None:
        got["ht"] = ht.detach()
    for name, x in zip(("dq", "dk", "dv", "dg", "db", "dw"), leaves):
        got[name] = x.grad
    if h0 is not None:
        got["dh0"] = h0.grad
    torch.save(got, os.path.join(out_dir, f"{case['name']}.rank{rank}.pt"))


def _run_error(case: dict, rank: int, world: int) -> dict:
    import torch

    from gdn2_kernels.cp import build_cp_context, chunk_gdn2_cp

    kind = case["kind"]
    cu = case["cu_by_rank"][rank] if "cu_by_rank" in case else case["cu"]
    ctx = build_cp_context(cu, layout="contiguous",
                           **({"rank": rank, "world_size": case["built_for"]}
                              if "built_for" in case else {}))
    T = ctx.local_len - (1 if kind == "short_slice" and rank == case["bad_rank"] else 0)
    x = {n: case["inputs"][n][:, :T].contiguous() for n in ("q", "k", "v", "g", "b", "w")}
    h0 = None
    if kind == "g_dtype" and rank == case["bad_rank"]:
        x["g"] = x["g"].double()
    if kind == "carried_h0" and rank == case["bad_rank"]:
        h0 = torch.ones(ctx.num_seqs, *case["inputs"]["q"].shape[2:], x["v"].shape[-1])
    try:
        chunk_gdn2_cp(*x.values(), initial_state=h0, cp_context=ctx)
    except Exception as exc:  # noqa: BLE001 - the test checks the type and message
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": "no error"}


def main(rank: int, world: int, workdir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    _poison_allocations()
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    plan = torch.load(os.path.join(workdir, "plan.pt"))
    errors = {}
    try:
        for case in plan["cases"]:
            _run_case(case, rank, world, workdir)
        for case in plan["errors"]:
            errors[case["kind"]] = _run_error(case, rank, world)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        errors["crash"] = {"type": "crash", "message": traceback.format_exc()}
    with open(os.path.join(workdir, f"errors.rank{rank}.json"), "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()
