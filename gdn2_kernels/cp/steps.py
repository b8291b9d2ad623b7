"""One rank's share of a context-parallel ``chunk_gdn2``, between its two exchanges.

Forward:  :func:`prepare` (L2 norm, intra-chunk forward) -> :func:`summarize_forward` (the
          summaries this rank sends) -> all-gather -> :func:`finish_forward` (the true entering
          states, then the ordinary state pass and output).
Backward: :func:`summarize_backward` (the gradient summaries this rank sends) -> all-gather ->
          :func:`finish_backward` (each leaving gradient, then the ordinary backward once).

The gradients are linear in the final-state gradient, so the chain of transposed maps gives every
rank the gradient of its leaving state before any rank runs its backward, and each backward runs
once. No communication happens here (comm.py does it), so a test can run the ranks' steps in one
process and stack their summaries in place of the all-gather.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from gdn2_kernels import _varlen, dispatch
from gdn2_kernels.cp import chain
from gdn2_kernels.cp.context import CPContext
from gdn2_kernels.kernels.chunk_bwd import BwdResult, chunk_gdn2_bwd
from gdn2_kernels.kernels.chunk_fwd import FwdResult
from gdn2_kernels.kernels.intra_fwd import intra_fwd
from gdn2_kernels.kernels.l2norm import l2norm_bwd, l2norm_fwd
from gdn2_kernels.kernels.state_fwd import state_fwd
from gdn2_kernels.kernels.summary import span_summary_bwd, span_summary_fwd
from gdn2_kernels.pipeline import GDN2Options


@dataclass(frozen=True)
class Layout:
    """The local varlen index tensors (from the context's host boundaries: no device sync)."""

    cu_seqlens: torch.Tensor
    chunk_indices: torch.Tensor
    chunk_offsets: torch.Tensor


@functools.lru_cache(maxsize=64)
def _layout(bounds: tuple[int, ...], BT: int, device: torch.device) -> Layout:
    cu = torch.tensor(bounds, dtype=torch.int32)
    return Layout(cu.to(device), _varlen.chunk_indices(cu, BT).to(device),
                  _varlen.chunk_offsets(cu, BT).to(device))


def local_layout(ctx: CPContext, BT: int, device: torch.device) -> Layout:
    return _layout(ctx.boundaries, BT, device)


@dataclass
class Local:
    """One rank's slice after the intra-chunk forward (q, k normalised when the op normalises),
    and, after :func:`finish_forward`, its forward results."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    q_rstd: torch.Tensor | None
    k_rstd: torch.Tensor | None
    fwd: FwdResult
    layout: Layout
    h0: torch.Tensor | None = None       # the true entering states of the local sequences


def _span(layout: Layout, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local sequence ``i`` alone, as (cu_seqlens, chunk_offsets) views for a varlen launch."""
    return layout.cu_seqlens[i:i + 2], layout.chunk_offsets[i:i + 2]


def prepare(q, k, v, g, b, w, opts: GDN2Options, pipe: dispatch.PipelineConfig,
            layout: Layout) -> Local:
    """The L2 norm (if asked) and the intra-chunk forward of the local slice."""
    q_rstd = k_rstd = None
    if opts.use_qk_l2norm_in_kernel:
        q, q_rstd = l2norm_fwd(q, pipe["l2norm_fwd"])
        k, k_rstd = l2norm_fwd(k, pipe["l2norm_fwd"])
    g_cum, A, A_qk, Y, U, Qg, Kt, gC = intra_fwd(q, k, v, g.float(), b, w, opts.scale,
                                                 layout.cu_seqlens, layout.chunk_indices,
                                                 pipe["intra_fwd"])
    fwd = FwdResult(None, None, g_cum, A, A_qk, Y, U, Qg, Kt, gC, None, None,
                    layout.chunk_indices, layout.chunk_offsets)
    return Local(q, k, v, b, w, q_rstd, k_rstd, fwd, layout)


def _no_summaries(x: Local, ctx: CPContext) -> torch.Tensor:
    """``[parts, H, K, V + K]`` fp32 zeros: what a rank sends for parts with nothing to send."""
    H, K, V = x.k.shape[2], x.k.shape[3], x.v.shape[3]
    return torch.zeros(len(ctx.parts), H, K, V + K, dtype=torch.float32, device=x.k.device)


def _rows_replaced(base: torch.Tensor | None, rows: list[tuple[int, torch.Tensor | None]],
                   x: Local, ctx: CPContext, add: bool) -> torch.Tensor | None:
    """A per-local-sequence ``[N_local, H, K, V]`` fp32 tensor: ``base`` (None: zeros) with the
    given rows set (or, with ``add``, added to); ``base`` itself when no row is given."""
    rows = [(i, t) for i, t in rows if t is not None]
    if not rows:
        return base
    out = (base.clone() if base is not None else
           torch.zeros(ctx.num_seqs, *x.k.shape[2:], x.v.shape[-1], dtype=torch.float32,
                       device=x.k.device))
    for i, t in rows:
        if add:
            out[i] += t
        else:
            out[i] = t
    return out


def summarize_forward(x: Local, initial_state: torch.Tensor | None, ctx: CPContext,
                      pipe: dispatch.PipelineConfig) -> torch.Tensor:
    """``[parts, H, K, V + K]`` fp32: per part, ``H | M`` of its last local sequence when that
    goes on into later slots (chain.py), zeros otherwise."""
    f = x.fwd
    V = x.v.shape[-1]
    out = _no_summaries(x, ctx)
    for i, part in enumerate(ctx.parts):
        if part.post == 0:
            continue
        j = part.last
        starts_here = part.pre == 0 or j > part.first     # else it started slots earlier: from 0
        start = initial_state[j:j + 1] if starts_here and initial_state is not None else None
        Hs, M = span_summary_fwd(f.Qg, f.Kt, f.gC, f.Y, f.U, f.A_qk, start, *_span(x.layout, j),
                                 pipe["state_fwd"], transition=part.is_middle)
        out[i, ..., :V] = Hs[0]
        if M is not None:
            out[i, ..., V:] = M[0]
    return out


def finish_forward(x: Local, initial_state: torch.Tensor | None, gathered: torch.Tensor,
                   ctx: CPContext, opts: GDN2Options, pipe: dispatch.PipelineConfig) -> None:
    """The true entering states from the all-gathered ``[world_size, parts, H, K, V + K]``
    summaries, then the ordinary state pass: fills ``x.fwd.o``, ``x.fwd.ht``, ``x.fwd.h`` (with
    ``disable_recompute``) and ``x.h0``."""
    entering = chain.entering_states(chain.slot_order(gathered, ctx), ctx, x.v.shape[-1])
    h0 = _rows_replaced(initial_state, [(p.first, S) for p, S in zip(ctx.parts, entering)], x,
                        ctx, add=False)
    f, lay = x.fwd, x.layout
    f.o, f.ht, f.h, f.R = state_fwd(f.Qg, f.Kt, f.gC, f.Y, f.U, f.A_qk, h0,
                                    opts.output_final_state, opts.disable_recompute,
                                    lay.cu_seqlens, lay.chunk_offsets, lay.chunk_indices.shape[0],
                                    pipe["state_fwd"], store_r=opts.disable_recompute)
    x.h0 = h0


def own_maps(summary: torch.Tensor, ctx: CPContext, V: int) -> torch.Tensor | None:
    """The ``[parts, H, K, K]`` transitions in this rank's forward summary, None when it has no
    middle slot (the backward exchange sends them again, so no rank keeps everyone's)."""
    if not any(p.is_middle for p in ctx.parts):
        return None
    return summary[..., V:].contiguous()


def summarize_backward(x: Local, maps: torch.Tensor | None, do: torch.Tensor,
                       dht: torch.Tensor | None, ctx: CPContext, opts: GDN2Options,
                       pipe: dispatch.PipelineConfig) -> torch.Tensor:
    """``[parts, H, K, V + K]`` fp32: per part, ``G | M`` of its first local sequence when that
    continues an earlier slot (chain.py), zeros otherwise; ``maps`` from :func:`own_maps`."""
    f = x.fwd
    V = x.v.shape[-1]
    out = _no_summaries(x, ctx)
    for i, part in enumerate(ctx.parts):
        if part.pre == 0:
            continue
        j = part.first
        G, _ = span_summary_bwd(x.q, x.k, f.g_cum, f.Qg, f.Kt, f.gC, f.Y, f.A_qk, do,
                                dht[j:j + 1] if dht is not None else None, opts.scale,
                                *_span(x.layout, j), pipe["state_bwd"])
        out[i, ..., :V] = G[0]
        if part.is_middle:
            out[i, ..., V:] = maps[i]
    return out


def finish_backward(x: Local, do: torch.Tensor, dht: torch.Tensor | None, gathered: torch.Tensor,
                    ctx: CPContext, opts: GDN2Options, pipe: dispatch.PipelineConfig,
                    need_dh0: bool) -> tuple[torch.Tensor, torch.Tensor, BwdResult]:
    """Each leaving gradient from the all-gathered gradient summaries, then the ordinary backward
    once: ``(dq, dk, the other gradients)`` (dq, dk fp32; dh0 zero on the rows of sequences
    continued from earlier ranks, whose given initial state is unused)."""
    leaving = chain.leaving_gradients(chain.slot_order(gathered, ctx), ctx, x.v.shape[-1])
    dht = _rows_replaced(dht, [(p.last, D) for p, D in zip(ctx.parts, leaving)], x, ctx,
                         add=True)
    f, lay = x.fwd, x.layout
    grads = chunk_gdn2_bwd(x.q, x.k, x.v, x.b, x.w, f.g_cum, f.A, f.A_qk, f.Y, f.U, f.Qg, f.Kt,
                           f.gC, f.h, f.R, opts.scale, x.h0, do, dht, lay.cu_seqlens,
                           lay.chunk_indices, lay.chunk_offsets, pipe,
                           need_dh0=need_dh0)
    if grads.dh0 is not None:
        for part in ctx.parts:
            if part.pre > 0:
                grads.dh0[part.first] = 0
    dq, dk = grads.dq, grads.dk
    if opts.use_qk_l2norm_in_kernel:
        dq = l2norm_bwd(x.q, x.q_rstd, dq, pipe["l2norm_bwd"])
        dk = l2norm_bwd(x.k, x.k_rstd, dk, pipe["l2norm_bwd"])
    return dq, dk, grads
