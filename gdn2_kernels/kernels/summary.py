"""Span summaries (context parallelism): launcher calls only, tensors in and out.

The state pass over one span of tokens (a sequence, or the piece of one that a rank holds) is
affine in the state entering it (docs/math.md "Chunkwise form"; chunk c maps S to
M_c S + K_tail^T U with M_c = Diag(gamma_C) - K_tail^T Y). So a span is summarised by

    S_end    = M^T S_start + H        H [N, H, K, V] fp32: the end state from S_start = 0
                                      M [N, H, K, K] fp32: M^T = M_n ... M_2 M_1 (its chunks)

and, for the backward, with G the gradient of the state entering the span when the state leaving
it has gradient 0 (only the span's own dO, through Q_gamma and A_qk):

    dS_start = M dS_end + G           G [N, H, K, V] fp32

M is stored as cuDNN's summary ops store it (their ``M_buf``), so the backward multiplies by M
itself and the forward by its transpose. Everything is computed from the intra-chunk forward's
factors (Y, U, K_tail, gamma_C: the WY machinery, chunk-parallel), then one state pass per
output: H from S = 0 with U, M^T from S = I without U (``state_fwd_end_states``), G from dS' = 0
with dO (``state_bwd_start_gradients``); M can come from the backward pass too (dS' = I, no dO),
which gives it untransposed. Each pass is serial over the chunks of a span and parallel over
spans, heads and value tiles, like the ordinary state passes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gdn2_kernels import _segments
from gdn2_kernels.kernels.state_bwd import state_bwd_start_gradients
from gdn2_kernels.kernels.state_fwd import state_fwd_end_states

if TYPE_CHECKING:
    from gdn2_kernels.configs import KernelConfig


def span_summary_fwd(
    Qg: torch.Tensor,
    Kt: torch.Tensor,
    gC: torch.Tensor,
    Y: torch.Tensor,
    U: torch.Tensor,
    A_qk: torch.Tensor,
    start: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    config: "KernelConfig",
    transition: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(H, M or None)`` of every sequence from the intra-chunk forward's outputs, with
    ``config`` the state_fwd config. ``start`` ``[N, H, K, V]`` fp32 makes H the end state from
    those states instead of zeros (M does not depend on it)."""
    Hs = state_fwd_end_states(Qg, Kt, gC, Y, U, A_qk, start, cu_seqlens, chunk_offsets, config)
    if not transition:
        return Hs, None
    N, H, K = Hs.shape[:3]
    eye = _segments.identity_states(N, H, K, Y.device)
    P = state_fwd_end_states(Qg, Kt, gC, Y, None, A_qk, eye, cu_seqlens, chunk_offsets, config)
    return Hs, P.transpose(-1, -2).contiguous()


def span_summary_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    g_cum: torch.Tensor,
    Qg: torch.Tensor,
    Kt: torch.Tensor,
    gC: torch.Tensor,
    Y: torch.Tensor,
    A_qk: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    config: "KernelConfig",
    transition: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(G, M or None)`` of every sequence, with ``config`` the state_bwd config (q, k as the
    intra-chunk forward saw them: L2-normalised when the op normalises). ``dht`` ``[N, H, K, V]``
    makes G the full gradient of the entering state for that gradient of the leaving one."""
    G = state_bwd_start_gradients(q, k, g_cum, Qg, Kt, gC, Y, A_qk, do, dht, scale, cu_seqlens,
                                  chunk_offsets, config)
    if not transition:
        return G, None
    N, H, K = G.shape[:3]
    eye = _segments.identity_states(N, H, K, do.device)
    M = state_bwd_start_gradients(q, k, g_cum, Qg, Kt, gC, Y, A_qk, None, eye, scale,
                                  cu_seqlens, chunk_offsets, config)
    return G, M
