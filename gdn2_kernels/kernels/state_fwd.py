"""Inter-chunk state pass fused with the output (docs/math.md "Chunkwise form", last three lines).

For each chunk, in order, with S the state entering it (fp32, on chip):

    R   = U - Y S                                    (per-row residuals)
    O   = Q_gamma S + A_qk R                                       -> o   [B, T, H, V]
    S  <- Diag(gamma_C) S + K_tail^T R

Q_gamma, K_tail (in the dtype of the dots) and gamma_C come from the intra-chunk forward, so a
serial step loads no fp32 decay tile and computes no exponentials.

and finally ``ht = S`` ``[N, H, K, V]`` fp32. With ``STORE_H`` the state entering every chunk is
also written to ``h`` ``[NT_total, H, K, V]`` and with ``STORE_R`` the residuals to ``R``
``[B, T, H, V]`` (the backward reads both: state_bwd takes R from here instead of recomputing it
from h in its serial loop); ``STORE_O=False`` skips the output (the backward's recomputation).

Grid: ``(V / BV, N * H)``; each program owns a ``[K, BV]`` slice of one head's state and walks
that sequence's chunks serially. ``K`` is held whole (padded to a power of two, ``KP``); the
value axis is split into ``BV`` tiles, which is the knob that trades per-program work for
parallelism when N * H is small (the launcher narrows it further when the programs would
cover less than half the SMs: ``_parallel.serial_launch``). With ``SCAN="segmented"`` (a tunable)
and programs still covering less than half the SMs, the launcher runs a two-level scan over
segments of the sequence instead (``state_fwd_segmented``). Dots run on the storage dtype of Y
(bf16 tensor cores for bf16 inputs; ``DOT_PRECISION`` for fp32, see ``_precision``) with fp32
accumulation; the state itself stays fp32.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gdn2_kernels import _launch, _parallel, _precision, _segments
from gdn2_kernels.kernels import _prologue

if TYPE_CHECKING:
    from gdn2_kernels.configs import KernelConfig


@triton.jit(do_not_specialize=["T"])
def _state_fwd_kernel(
    Qg,
    Kt,
    gC,
    Y,
    U,
    A_qk,
    h0,
    o,
    ht,
    h,
    R,
    cu_seqlens,
    chunk_offsets,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    KP: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    STORE_H: tl.constexpr,
    STORE_O: tl.constexpr,
    STORE_R: tl.constexpr,
    HAS_U: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, c0 = _prologue.sequence_of_program(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    NT = tl.cdiv(T, BT)

    Qg += (bos * H + i_h) * K
    Kt += (bos * H + i_h) * K
    Y += (bos * H + i_h) * K
    if HAS_U:
        U += (bos * H + i_h) * V
    if STORE_O:
        o += (bos * H + i_h) * V
    if STORE_R:
        R += (bos * H + i_h) * V
    A_qk += (bos * H + i_h) * BT

    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    p_S = o_k[:, None] * V + o_v[None, :]
    m_S = m_k[:, None] & m_v[None, :]

    b_S = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + p_S, mask=m_S, other=0.)

    for i_t in range(NT):
        o_t = i_t * BT + o_i
        m_t = o_t < T
        r_t = o_t.to(tl.int64)
        if STORE_H:
            tl.store(h + ((c0 + i_t) * H + i_h) * K * V + p_S, b_S.to(h.dtype.element_ty), mask=m_S)
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = r_t[:, None] * (H * K) + o_k[None, :]
        p_tv = r_t[:, None] * (H * V) + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_Y = tl.load(Y + p_tk, mask=m_tk, other=0.)                              # [BT, KP]
        b_Kt = tl.load(Kt + p_tk, mask=m_tk, other=0.)
        b_gC = tl.load(gC + ((c0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.)

        dt = b_Y.dtype
        b_Sd = b_S.to(dt)
        b_R = -tl.dot(b_Y, b_Sd, input_precision=DOT_PRECISION)                     # [BT, BV]
        if HAS_U:
            b_R += tl.load(U + p_tv, mask=m_tv, other=0.).to(tl.float32)
        b_Rd = b_R.to(dt)
        if STORE_R:
            tl.store(R + p_tv, b_R.to(R.dtype.element_ty), mask=m_tv)
        if STORE_O:
            b_Qg = tl.load(Qg + p_tk, mask=m_tk, other=0.)
            b_A = tl.load(A_qk + r_t[:, None] * (H * BT) + o_i[None, :], mask=m_t[:, None],
                          other=0.)
            b_O = (tl.dot(b_Qg, b_Sd, input_precision=DOT_PRECISION)
                   + tl.dot(b_A.to(dt), b_Rd, input_precision=DOT_PRECISION))
            tl.store(o + p_tv, b_O.to(o.dtype.element_ty), mask=m_tv)
        b_S = b_S * b_gC[:, None] + tl.dot(tl.trans(b_Kt), b_Rd, input_precision=DOT_PRECISION)

    if STORE_HT:
        tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + p_S, b_S, mask=m_S)


def state_fwd_grid(N: int, H: int, V: int, BV: int) -> tuple[int, int]:
    return (triton.cdiv(V, BV), N * H)


def state_fwd(
    Qg: torch.Tensor,
    Kt: torch.Tensor,
    gC: torch.Tensor,
    Y: torch.Tensor,
    U: torch.Tensor,
    A_qk: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    store_h: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    num_chunks: int,
    config: "KernelConfig",
    store_o: bool = True,
    store_r: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Launch the fused state pass and output. Returns ``(o, ht, h, R)``, each None when not
    asked.

    ``store_o=False`` with ``store_h`` and ``store_r`` is the backward's recomputation of the chunk
    states and residuals.
    With ``SCAN="segmented"`` and too few programs to fill the GPU, the pass runs as a two-level
    scan (:func:`state_fwd_segmented`).
    """
    B, T, H, K = Y.shape
    V = U.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    seg = _parallel.scan_segments(config, N, H, T, V, cu_seqlens, Y.device)
    if seg is not None:
        return state_fwd_segmented(Qg, Kt, gC, Y, U, A_qk, initial_state, output_final_state,
                                   store_h, num_chunks, config, seg, store_o, store_r)
    dev = Y.device
    o = torch.empty(B, T, H, V, dtype=Y.dtype, device=dev) if store_o else None
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if output_final_state else None
    h = torch.empty(num_chunks, H, K, V, dtype=Y.dtype, device=dev) if store_h else None
    R = torch.empty(B, T, H, V, dtype=Y.dtype, device=dev) if store_r else None
    _launch_pass(Qg, Kt, gC, Y, U, A_qk, initial_state, o, ht, h, cu_seqlens, chunk_offsets, T,
                 N, V, config, R)
    return o, ht, h, R


def _launch_pass(Qg, Kt, gC, Y, U, A_qk, h0, o, ht, h, cu_seqlens, chunk_offsets, T: int, N: int,
                 V: int, config: "KernelConfig", R=None) -> None:
    """One launch of the kernel; ``U=None`` runs the homogeneous recurrence (R = -Y S)."""
    H, K = Y.shape[2], Y.shape[3]
    BV, launch_options = _parallel.serial_launch(config, N * H, V, Y.device)
    _launch.launch(_state_fwd_kernel, state_fwd_grid(N, H, V, BV),
        Qg=Qg, Kt=Kt, gC=gC, Y=Y, U=U, A_qk=A_qk, h0=h0,
        o=o, ht=ht, h=h, R=R,
        cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets,
        T=T,
        H=H, K=K, V=V,
        BT=config["BT"], BV=BV, KP=max(16, triton.next_power_of_2(K)),
        USE_H0=h0 is not None,
        STORE_HT=ht is not None,
        STORE_H=h is not None,
        STORE_O=o is not None,
        STORE_R=R is not None,
        HAS_U=U is not None,
        IS_VARLEN=cu_seqlens is not None,
        **launch_options,
        DOT_PRECISION=_precision.dot_precision(Y.dtype),
    )


def state_fwd_segmented(Qg, Kt, gC, Y, U, A_qk, initial_state, output_final_state: bool,
                        store_h: bool, num_chunks: int, config: "KernelConfig", L: int,
                        store_o: bool = True, store_r: bool = False):
    """The state pass as a two-level scan over segments of ``L`` chunks (same results as
    :func:`state_fwd` up to rounding; for few sequences x heads, where the serial pass leaves
    the GPU idle).

    The chunk step is affine in the state, S' = M S + K_tail^T U with M = Diag(gamma_C) -
    K_tail^T Y, so a segment maps its entering state to ``P S + Q``. Each sequence is cut into
    segments of L chunks, which the kernel runs as independent (varlen) sequences:

      1. Q: every segment from S = 0 (its end state);  P: every segment from S = I (K x K) with
         U = 0 (the product of its M's), both in parallel over segments;
      2. the segments' entering states, S_(s+1) = P_s S_s + Q_s, one batched matmul per segment;
      3. every segment again from its entering state: o, h and the final state.

    Three passes of the kernel instead of one, each with S-fold more programs and 1/S of the
    serial chain.
    """
    B, T, H, K = Y.shape
    V = U.shape[-1]
    dev = Y.device
    cu, firsts, S = _segments.segments(B, T, config["BT"], L, dev)
    Qg, Kt, Y, U, A_qk = _segments.as_one_sequence(B, T, Qg, Kt, Y, U, A_qk)
    n_seg = B * S

    def end_states(start, out):  # Q from S = 0 with U; P from S = I without U (R = -Y S)
        _launch_pass(Qg, Kt, gC, Y, U if start is None else None, A_qk, start, None, out, None,
                     cu, firsts, B * T, n_seg, out.shape[-1], config)

    starts = _segments.entering_states(end_states, initial_state, (B, S, H, K, V), False, dev)

    # Step 3: the serial pass over the segments as packed sequences, from their entering states.
    o, ht_seg, h, R = state_fwd(Qg, Kt, gC, Y, U, A_qk, starts, output_final_state, store_h, cu,
                                firsts, num_chunks, config, store_o, store_r)
    ht = ht_seg.view(B, S, H, K, V)[:, -1].contiguous() if output_final_state else None
    return (o.view(B, T, H, V) if store_o else None), ht, h, (R.view(B, T, H, V) if store_r
                                                              else None)


def state_fwd_end_states(Qg, Kt, gC, Y, U, A_qk, start, cu_seqlens, chunk_offsets,
                         config: "KernelConfig") -> torch.Tensor:
    """Only the state after each sequence, ``[N, H, K, D]`` fp32, from ``start`` ``[N, H, K, D]``
    (None: zeros): one launch, no o, no h.

    With ``U`` (D = V) this is the recurrence itself. With ``U=None`` it is the homogeneous one,
    S' = M_c S with M_c = Diag(gamma_C) - K_tail^T Y per chunk (R = -Y S), so from identities
    (D = K) the result is the product of the sequence's chunk transitions, last chunk leftmost.
    """
    B, T, H, K = Y.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    D = U.shape[-1] if U is not None else start.shape[-1]
    out = torch.empty(N, H, K, D, dtype=torch.float32, device=Y.device)
    _launch_pass(Qg, Kt, gC, Y, U, A_qk, start, None, out, None, cu_seqlens, chunk_offsets, T, N,
                 D, config)
    return out
