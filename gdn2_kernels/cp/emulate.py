"""Every rank's steps of ``chunk_gdn2_cp`` in one process, the all-gathers replaced by stacking.

For accuracy at any number of ranks on one device (tests; lab/device_cp_summary.py): the
numerics are those of the distributed op (same steps, same chain), only the ranks run one after
another and nothing is communicated. Not a way to run faster.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import torch

from gdn2_kernels import _device, dispatch
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.cp import steps
from gdn2_kernels.cp.context import CPContext, build_cp_context
from gdn2_kernels.pipeline import GDN2Options

_GRADS = ("dq", "dk", "dv", "dg", "db", "dw")


@dataclass
class EmulatedRun:
    """What the ranks computed, put back on the global token axis."""

    o: torch.Tensor                       # [1, T, H, V]
    final_state: torch.Tensor             # [N, H, K, V]: each global sequence's final state
    grads: dict[str, torch.Tensor] = field(default_factory=dict)   # dq ... dw, dh0


def _to_global(ctxs: list[CPContext], local: list[torch.Tensor], T: int) -> torch.Tensor:
    out = local[0].new_empty(local[0].shape[0], T, *local[0].shape[2:])
    for ctx, x in zip(ctxs, local):
        off = 0
        for a, e in ctx.global_ranges():
            out[:, a:e] = x[:, off:off + e - a]
            off += e - a
    return out


def emulate_cp(q, k, v, g, b, w, cu_seqlens: Sequence[int], world_size: int,
               layout: str = "contiguous", *, do: torch.Tensor | None = None,
               scale: float | None = None, initial_state: torch.Tensor | None = None,
               use_qk_l2norm_in_kernel: bool = False) -> EmulatedRun:
    """``chunk_gdn2_cp`` of the global batch (``[1, T, ...]`` tensors, global ``cu_seqlens``,
    ``initial_state`` ``[N, H, K, V]`` per global sequence) over ``world_size`` emulated ranks;
    with ``do`` also the gradients of ``<o, do>``."""
    T, V = q.shape[1], v.shape[-1]
    bounds = [int(c) for c in cu_seqlens]
    ctxs = [build_cp_context(bounds, layout=layout, rank=r, world_size=world_size)
            for r in range(world_size)]
    opts = GDN2Options.of_call(q, scale, initial_state, True, use_qk_l2norm_in_kernel, True,
                               False)
    with _device.guard(q):
        pipe = dispatch.resolve(ProblemKey.of(q, v))
        ranks = []
        for ctx in ctxs:
            x = [ctx.local_slice(t).contiguous() for t in (q, k, v, g, b, w)]
            h0 = (ctx.local_initial_state(initial_state, bounds).contiguous()
                  if initial_state is not None else None)
            local = steps.prepare(*x, opts, pipe, steps.local_layout(ctx, pipe.chunk_size,
                                                                     q.device))
            ranks.append((ctx, local, h0, steps.summarize_forward(local, h0, ctx, pipe)))
        gathered = torch.stack([summary for *_, summary in ranks])
        for ctx, local, h0, _ in ranks:
            steps.finish_forward(local, h0, gathered, ctx, opts, pipe)
        run = EmulatedRun(_to_global(ctxs, [r[1].fwd.o for r in ranks], T),
                          torch.empty(len(bounds) - 1, *q.shape[2:], V, dtype=torch.float32,
                                      device=q.device))
        for ctx, local, _, _ in ranks:
            for i in ctx.final_rows():
                s = ctx.row_spans()[i][0]
                run.final_state[bisect.bisect_right(bounds, s) - 1] = local.fwd.ht[i]
        if do is None:
            return run
        dos = [ctx.local_slice(do).contiguous() for ctx in ctxs]
        gathered = torch.stack([
            steps.summarize_backward(local, steps.own_maps(summary, ctx, V), d, None, ctx, opts,
                                     pipe)
            for (ctx, local, _, summary), d in zip(ranks, dos)])
        per_rank = []
        for (ctx, local, _, _), d in zip(ranks, dos):
            dq, dk, gr = steps.finish_backward(local, d, None, gathered, ctx, opts, pipe,
                                               need_dh0=initial_state is not None)
            per_rank.append({"dq": dq.to(q.dtype), "dk": dk.to(k.dtype), "dv": gr.dv,
                             "dg": gr.dg.to(g.dtype), "db": gr.db.to(b.dtype), "dw": gr.dw,
                             "dh0": gr.dh0})
    for name in _GRADS:
        run.grads[name] = _to_global(ctxs, [r[name] for r in per_rank], T)
    if initial_state is not None:
        dh0 = torch.empty_like(initial_state, dtype=torch.float32)
        for ctx, got in zip(ctxs, per_rank):
            for i, (s, _) in enumerate(ctx.row_spans()):
                n = bisect.bisect_right(bounds, s) - 1
                if bounds[n] == s:
                    dh0[n] = got["dh0"][i]
        run.grads["dh0"] = dh0
    return run
