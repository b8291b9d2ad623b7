"""Intra-chunk backward: output, WY and pairwise VJPs, gate gradients (docs/math.md "Backward").

One program per (chunk, head). With S = h (state entering the chunk), dS' = dh (gradient of the
state leaving it), R and dR from the reverse state pass, and the forward's A, A_qk, g_cum:

  phase A (value tiles BV)   dA_qk = lower(dO R^T)        dA = dR Z^T        dZ = A^T dR
                             dv = dZ (.) w,  dw = dZ (.) v                                  -> dv, dw
  phase B (key tiles BK)     dQ_gamma = dO S^T   dY = -dR S^T   dK_tail = R dS'^T
                             dA += dY E_bar^T    dE_bar = A^T dY
                             and the elementwise parts: dq = scale gamma dQ_gamma, dE = gamma dE_bar,
                             dk = (gamma_C/gamma) dK_tail, dG = Q_gamma dQ_gamma + E_bar dE_bar
                             - K_tail dK_tail (+ the gamma_C terms on the chunk's last row)
  phase C                    dT = -strict_lower(A^T dA A^T)                    -> scratch (fp32)
  phase D (key tiles BK)     pairwise VJP of T_rs = sum_c E_rc k_sc e^(G_rc - G_sc) and of
                             A_qk: row blocks give dE, dq (and dG += E dE + q dq), column blocks
                             give dk (and dG -= k dk); then db = dE (.) k, dk += dE (.) b and
                             dg = reverse cumsum of dG inside the chunk (and, with the gate in
                             the kernel, its chain rule to the raw gate input: ``_gate.py``).

With a single key tile (BK >= K) phase B's state products run inside phase A's value loop, so
dO, R and dR are read once instead of 1 + K / BK times.

The gates sit inside the dot products (dA takes Z = w (.) v and E_bar = gamma (.) b (.) k), which is
what distinguishes GDN-2's WY backward from KDA's scalar-beta one.

Tiling of phase D follows the forward: rows of block i use the anchor a = the block's first row
(exp(G_r - G_a) <= 1 and exp(G_a - G_s) <= 1 left of the block), columns of block j the anchor
b = the block's last row (exp(G_r - G_b) <= 1 below it, exp(G_b - G_s) <= 1 inside it). The
diagonal block rides on the same dot when the block's decay span is at most SAFE_SPAN, and is
formed exactly one column / row at a time otherwise. dT, dA_qk and the partial gradients pass
through global memory inside the program (ordered by barriers).

``PHASE_D`` (a tunable) places phase D: ``fused`` runs it in the same program as above;
``split`` runs it as a second launch, ``_intra_bwd_pairwise_kernel``, one program per (chunk,
head, key tile of ``BK_D``, which defaults to BK) that keeps the whole chunk's [BT, BK_D]
gradients in registers (row and column blocks become masked [BT, BT] x [BT, BK_D] dots) and
writes each of dq, dk, db, dg once. The split trades a launch and a re-read of dT / dA_qk for
K / BK_D times the programs in phase D, no partial-gradient round trips and fewer live
registers in the main program.

``PHASE_B`` (a tunable) places phase B: ``fused`` as above; ``split`` runs its state products
and elementwise parts first, in ``_intra_bwd_state_kernel``, one program per (chunk, head, key
tile) (the three [BT, BK] accumulators leave the main program's registers and the key tiles run
in parallel). Its share of dA (dY E_bar^T) goes to a [B, T, H, NK * BT] fp32 scratch that the
main program sums into phase A's dA before phase C.

Outputs are ``[B, T, H, K]`` for dq, dk, db, dg and the input dtype for dv, dw. Partial sums of
dq, dk, db, dg pass through fp32 scratch; the last update of each element of dq, db (phase D's
row blocks) and dk (its column blocks) is written to the output in the dtype the caller asks
for (the input dtypes, so no cast pass follows; fp32 when the in-op L2 norm's backward still
needs dq, dk), and dg stays fp32.
Grid: ``(number of chunks, B * H)``; with ``PHASE_D="split"``, then ``(number of chunks, B * H,
K / BK)``; with ``PHASE_B="split"``, ``(number of chunks, B * H, K / BK)`` before it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gdn2_kernels import _launch, _precision
from gdn2_kernels.kernels import _gate, _prologue

if TYPE_CHECKING:
    from gdn2_kernels.configs import KernelConfig

SAFE_SPAN = tl.constexpr(60.0)


@triton.jit(do_not_specialize=["T"])
def _intra_bwd_kernel(
    q,
    k,
    v,
    b,
    w,
    g_cum,
    A,
    h,
    dh,
    do,
    R,
    dR,
    dT_buf,
    dAqk_buf,
    dA_part,        # PHASE_B="split": [B, T, H, NK * BT] fp32, phase B's dA per key tile
    dq,
    dk,
    db,
    dg,
    dv,
    dw,
    dq_out,
    dk_out,
    db_out,
    cu_seqlens,
    chunk_indices,
    chunk_offsets,
    g_raw,          # in-kernel gate (_gate.py): raw gate input, dA_log / ddt_bias partials
    A_log,
    dt_bias,
    dA_log_part,
    ddt_bias_part,
    scale,
    lower_bound,    # in-kernel gate
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SOLVE_PRECISION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FUSED_D: tl.constexpr,
    SPLIT_B: tl.constexpr,          # phase B ran in _intra_bwd_state_kernel
    STATE_IN_A: tl.constexpr,       # one key tile and phase B here: its products in phase A
    NK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    GATE: tl.constexpr,             # in-kernel gate
    GATE_HAS_A: tl.constexpr,       # in-kernel gate
    GATE_HAS_BIAS: tl.constexpr,    # in-kernel gate
):
    tl.static_assert(BT % BC == 0, "BC must divide BT")
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T, i_ch = _prologue.chunk_of_program(i_t, i_b, T, cu_seqlens, chunk_indices,
                                                   chunk_offsets, BT, IS_VARLEN)
    t0 = i_t * BT

    for_k = (bos * H + i_h) * K
    for_v = (bos * H + i_h) * V
    for_a = (bos * H + i_h) * BT
    q += for_k
    k += for_k
    b += for_k
    g_cum += for_k
    dq += for_k
    dk += for_k
    db += for_k
    dg += for_k
    dq_out += for_k
    dk_out += for_k
    db_out += for_k
    v += for_v
    w += for_v
    do += for_v
    R += for_v
    dR += for_v
    dv += for_v
    dw += for_v
    A += for_a
    dT_buf += for_a
    dAqk_buf += for_a
    h += (i_ch * H + i_h) * K * V
    dh += (i_ch * H + i_h) * K * V

    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < T
    r_t = o_t.to(tl.int64)
    o_j = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    last = tl.minimum(T, t0 + BT) - 1
    p_A = r_t[:, None] * (H * BT) + o_j[None, :]
    # A is re-read in each phase (L1/L2 hits) rather than held: keeping the three [BT, BT] fp32
    # tiles live across phases spilled registers.
    b_A = tl.load(A + p_A, mask=m_t[:, None], other=0.)                              # [BT, BT]

    # Phase A: value tiles. With a single key tile (BK >= K) phase B's state products ride along,
    # so dO, R and dR are read once.
    b_dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    if STATE_IN_A:
        o_k1 = tl.arange(0, BK)
        m_k1 = o_k1 < K
        b_dQg = tl.zeros([BT, BK], dtype=tl.float32)
        b_dY = tl.zeros([BT, BK], dtype=tl.float32)
        b_dKt = tl.zeros([BT, BK], dtype=tl.float32)
        b_dD = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = r_t[:, None] * (H * V) + o_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.)
        b_R = tl.load(R + p_v, mask=m_tv, other=0.)
        b_dRs = tl.load(dR + p_v, mask=m_tv, other=0.)
        b_dR = b_dRs.to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_tv, other=0.).to(tl.float32)
        b_w = tl.load(w + p_v, mask=m_tv, other=0.).to(tl.float32)
        b_dAqk += tl.dot(b_do, tl.trans(b_R.to(b_do.dtype)), input_precision=DOT_PRECISION)
        b_dA += tl.dot(b_dR, tl.trans(b_w * b_v), input_precision=DOT_PRECISION)
        b_dZ = tl.dot(tl.trans(b_A), b_dR, input_precision=DOT_PRECISION)
        tl.store(dv + p_v, (b_dZ * b_w).to(dv.dtype.element_ty), mask=m_tv)
        tl.store(dw + p_v, (b_dZ * b_v).to(dw.dtype.element_ty), mask=m_tv)
        if STATE_IN_A:
            p_s = o_k1[:, None] * V + o_v[None, :]
            m_s = m_k1[:, None] & m_v[None, :]
            b_dQg, b_dY, b_dKt, b_dD = _state_products(h, dh, p_s, m_s, b_do, b_R, b_dRs,
                                                       b_dQg, b_dY, b_dKt, b_dD, DOT_PRECISION)
    b_dAqk = tl.where(o_j[:, None] >= o_j[None, :], b_dAqk, 0.) * scale
    tl.store(dAqk_buf + p_A, b_dAqk, mask=m_t[:, None])

    # Phase B: key tiles; the state products and the elementwise parts of the gradients.
    if SPLIT_B:
        p_P = r_t[:, None] * (H * NK * BT) + o_j[None, :] + (bos * H + i_h) * NK * BT
        for i_k in range(NK):
            b_dA += tl.load(dA_part + p_P + i_k * BT, mask=m_t[:, None], other=0.)
    elif STATE_IN_A:
        b_dA = _phase_b_elementwise(q, k, b, g_cum, A, dq, dk, db, dg, o_k1, m_t, r_t, o_t, last,
                                    p_A, b_dQg, b_dY, b_dKt, b_dD, b_dA, scale, H, K,
                                    DOT_PRECISION)
    else:
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_dQg = tl.zeros([BT, BK], dtype=tl.float32)
            b_dY = tl.zeros([BT, BK], dtype=tl.float32)
            b_dKt = tl.zeros([BT, BK], dtype=tl.float32)
            b_dD = tl.zeros([BK], dtype=tl.float32)
            for i_v in range(tl.cdiv(V, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                m_v = o_v < V
                m_tv = m_t[:, None] & m_v[None, :]
                p_v = r_t[:, None] * (H * V) + o_v[None, :]
                p_s = o_k[:, None] * V + o_v[None, :]
                m_s = m_k[:, None] & m_v[None, :]
                b_do = tl.load(do + p_v, mask=m_tv, other=0.)
                b_R = tl.load(R + p_v, mask=m_tv, other=0.)
                b_dRs = tl.load(dR + p_v, mask=m_tv, other=0.)
                b_dQg, b_dY, b_dKt, b_dD = _state_products(h, dh, p_s, m_s, b_do, b_R, b_dRs,
                                                           b_dQg, b_dY, b_dKt, b_dD,
                                                           DOT_PRECISION)
            b_dA = _phase_b_elementwise(q, k, b, g_cum, A, dq, dk, db, dg, o_k, m_t, r_t, o_t,
                                        last, p_A, b_dQg, b_dY, b_dKt, b_dD, b_dA, scale, H, K,
                                        DOT_PRECISION)

    # Phase C: dT = -strict_lower(A^T dA A^T) to scratch (dA_qk went there after phase A).
    b_A = tl.load(A + p_A, mask=m_t[:, None], other=0.)
    b_X = tl.dot(tl.trans(b_A), b_dA, input_precision=SOLVE_PRECISION)
    b_dT = -tl.dot(b_X, tl.trans(b_A), input_precision=SOLVE_PRECISION)
    b_dT = tl.where(o_j[:, None] > o_j[None, :], b_dT, 0.)
    tl.store(dT_buf + p_A, b_dT, mask=m_t[:, None])
    tl.debug_barrier()

    # Phase D: pairwise VJPs, one key tile at a time (or in _intra_bwd_pairwise_kernel).
    if FUSED_D:
        _phase_d_fused(q, k, b, g_cum, dT_buf, dAqk_buf, dq, dk, db, dg, dq_out, dk_out, db_out,
                       T, t0, r_t, m_t, H, K, BT, BC, BK, SOLVE_PRECISION, DOT_PRECISION)
        # In-kernel gate: the chain rule on the final dg.
        if GATE != 0:
            tl.debug_barrier()
        _gate.chain_rule_tiles(dg, g_raw, A_log, dt_bias, lower_bound, dA_log_part,
                               ddt_bias_part, for_k, (i_ch * H + i_h) * K, i_h, r_t, m_t, H, K,
                               BK, GATE, GATE_HAS_A, GATE_HAS_BIAS)


@triton.jit
def _state_products(h, dh, p_s, m_s, b_do, b_R, b_dR, b_dQg, b_dY, b_dKt, b_dD,
                    DOT_PRECISION: tl.constexpr):
    """Phase B's products with one [BK, BV] tile of S = h and dS' = dh, accumulated."""
    b_S = tl.load(h + p_s, mask=m_s, other=0.)                                       # [BK, BV]
    b_dS = tl.load(dh + p_s, mask=m_s, other=0.)
    dt = b_do.dtype
    b_dQg += tl.dot(b_do, tl.trans(b_S.to(dt)), input_precision=DOT_PRECISION)
    b_dY -= tl.dot(b_dR.to(dt), tl.trans(b_S.to(dt)), input_precision=DOT_PRECISION)
    b_dKt += tl.dot(b_R.to(dt), tl.trans(b_dS.to(dt)), input_precision=DOT_PRECISION)
    b_dD += tl.sum(b_S.to(tl.float32) * b_dS.to(tl.float32), 1)
    return b_dQg, b_dY, b_dKt, b_dD


@triton.jit
def _phase_b_elementwise(q, k, b, g_cum, A, dq, dk, db, dg, o_k, m_t, r_t, o_t, last, p_A,
                         b_dQg, b_dY, b_dKt, b_dD, b_dA, scale, H: tl.constexpr,
                         K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Phase B after its state products, for the key tile ``o_k``: dA += dY E_bar^T and the
    elementwise gradients (dq, dE in db, dk, dG) written for phase D. Returns dA."""
    _, m_tk, p_k, b_G, b_k, b_b, b_q, b_Gl = _prologue.key_tile(q, k, b, g_cum, o_k, m_t, r_t,
                                                              last, H, K)
    b_gam = tl.exp(b_G)
    b_Eb = b_b * b_k * b_gam                                                        # E_bar
    b_dA += tl.dot(b_dY, tl.trans(b_Eb), input_precision=DOT_PRECISION)
    b_At = tl.load(A + p_A, mask=m_t[:, None], other=0.)
    b_dEb = tl.dot(tl.trans(b_At), b_dY, input_precision=DOT_PRECISION)
    b_tail = tl.where(m_tk, tl.exp(b_Gl[None, :] - b_G), 0.)
    b_Kt = b_k * b_tail
    b_dG = b_q * b_gam * scale * b_dQg + b_Eb * b_dEb - b_Kt * b_dKt
    b_dGl = tl.sum(b_Kt * b_dKt, 0) + tl.exp(b_Gl) * b_dD
    b_dG += tl.where((o_t == last)[:, None], b_dGl[None, :], 0.)
    tl.store(dq + p_k, scale * b_gam * b_dQg, mask=m_tk)
    tl.store(db + p_k, b_gam * b_dEb, mask=m_tk)                     # dE, finished in phase D
    tl.store(dk + p_k, b_tail * b_dKt, mask=m_tk)
    tl.store(dg + p_k, b_dG, mask=m_tk)
    return b_dA


@triton.jit(do_not_specialize=["T"])
def _intra_bwd_state_kernel(
    q,
    k,
    b,
    g_cum,
    A,
    h,
    dh,
    do,
    R,
    dR,
    dq,
    dk,
    db,
    dg,
    dA_part,
    cu_seqlens,
    chunk_indices,
    chunk_offsets,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Phase B in its own launch (``PHASE_B="split"``): one program per (chunk, head, key tile).

    The state products dQ_gamma = dO S^T, dY = -dR S^T, dK_tail = R dS'^T over the value tiles
    and the elementwise parts of dq, dE (in db), dk, dG for its key tile, written to the fp32
    partials; its share of dA (dY E_bar^T) goes to ``dA_part`` at column block ``i_k``, summed by
    the main program before phase C. Grid: ``(number of chunks, B * H, cdiv(K, BK))``.
    """
    i_t, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T, i_ch = _prologue.chunk_of_program(i_t, i_b, T, cu_seqlens, chunk_indices,
                                                   chunk_offsets, BT, IS_VARLEN)
    t0 = i_t * BT
    for_k = (bos * H + i_h) * K
    for_v = (bos * H + i_h) * V
    q += for_k
    k += for_k
    b += for_k
    g_cum += for_k
    dq += for_k
    dk += for_k
    db += for_k
    dg += for_k
    do += for_v
    R += for_v
    dR += for_v
    A += (bos * H + i_h) * BT
    dA_part += (bos * H + i_h) * NK * BT + i_k * BT
    h += (i_ch * H + i_h) * K * V
    dh += (i_ch * H + i_h) * K * V

    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < T
    r_t = o_t.to(tl.int64)
    o_j = tl.arange(0, BT)
    last = tl.minimum(T, t0 + BT) - 1
    p_A = r_t[:, None] * (H * BT) + o_j[None, :]
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dQg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dY = tl.zeros([BT, BK], dtype=tl.float32)
    b_dKt = tl.zeros([BT, BK], dtype=tl.float32)
    b_dD = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = r_t[:, None] * (H * V) + o_v[None, :]
        p_s = o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_do = tl.load(do + p_v, mask=m_tv, other=0.)
        b_R = tl.load(R + p_v, mask=m_tv, other=0.)
        b_dRs = tl.load(dR + p_v, mask=m_tv, other=0.)
        b_dQg, b_dY, b_dKt, b_dD = _state_products(h, dh, p_s, m_s, b_do, b_R, b_dRs,
                                                   b_dQg, b_dY, b_dKt, b_dD, DOT_PRECISION)
    b_dA = _phase_b_elementwise(q, k, b, g_cum, A, dq, dk, db, dg, o_k, m_t, r_t, o_t, last, p_A,
                                b_dQg, b_dY, b_dKt, b_dD, tl.zeros([BT, BT], dtype=tl.float32),
                                scale, H, K, DOT_PRECISION)
    tl.store(dA_part + r_t[:, None] * (H * NK * BT) + o_j[None, :], b_dA, mask=m_t[:, None])


@triton.jit
def _phase_d_fused(q, k, b, g_cum, dT_buf, dAqk_buf, dq, dk, db, dg, dq_out, dk_out, db_out,
                   T, t0, r_t, m_t,
                   H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                   BK: tl.constexpr, SOLVE_PRECISION: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Phase D inside the main program: sub-chunk blocks, partial gradients through memory
    (fp32); each row's last update of dq, db (row blocks) and dk (column blocks) goes to the
    ``*_out`` tensors, in their dtype."""
    o_t = t0 + tl.arange(0, BT)
    o_j = tl.arange(0, BT)
    o_c = tl.arange(0, BC)
    n_c = tl.cdiv(tl.minimum(BT, T - t0), BC)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_t = r_t[:, None] * (H * K) + o_k[None, :]
        b_Gs = tl.load(g_cum + p_t, mask=m_tk, other=0.)                            # [BT, BK]
        b_ks = tl.load(k + p_t, mask=m_tk, other=0.).to(tl.float32)
        b_Es = tl.load(b + p_t, mask=m_tk, other=0.).to(tl.float32) * b_ks
        b_qs = tl.load(q + p_t, mask=m_tk, other=0.).to(tl.float32)

        # (a) row blocks: dE and dq.
        for i_c in range(n_c):
            c0 = i_c * BC
            o_r = t0 + c0 + o_c
            m_r = o_r < T
            m_rk = m_r[:, None] & m_k[None, :]
            r_r = o_r.to(tl.int64)
            p_r = r_r[:, None] * (H * K) + o_k[None, :]
            p_w = r_r[:, None] * (H * BT) + o_j[None, :]
            b_W1 = tl.load(dT_buf + p_w, mask=m_r[:, None], other=0.)               # [BC, BT]
            b_W2 = tl.load(dAqk_buf + p_w, mask=m_r[:, None], other=0.)
            b_Gr = tl.load(g_cum + p_r, mask=m_rk, other=0.)
            b_kr = tl.load(k + p_r, mask=m_rk, other=0.).to(tl.float32)
            b_br = tl.load(b + p_r, mask=m_rk, other=0.).to(tl.float32)
            b_qr = tl.load(q + p_r, mask=m_rk, other=0.).to(tl.float32)
            b_Ga = tl.load(g_cum + (t0 + c0).to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
            e_r = tl.minimum(t0 + c0 + BC, T) - 1
            b_Ge = tl.load(g_cum + e_r.to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
            b_span = tl.max(tl.where(m_k, b_Ga - b_Ge, 0.), 0)
            b_dr = tl.exp(tl.where(m_rk, b_Gr - b_Ga[None, :], 0.))                 # <= 1
            if b_span <= SAFE_SPAN:
                m_s = (o_j < c0 + BC) & m_t
                b_ka = tl.where(m_s[:, None], b_ks * tl.exp(tl.where(m_s[:, None],
                                                                      b_Ga[None, :] - b_Gs, 0.)), 0.)
                b_dEp = b_dr * tl.dot(b_W1, b_ka, input_precision=SOLVE_PRECISION)
                b_dqp = b_dr * tl.dot(b_W2, b_ka, input_precision=DOT_PRECISION)
            else:
                m_s = (o_j < c0) & m_t
                b_ka = tl.where(m_s[:, None], b_ks * tl.exp(tl.where(m_s[:, None],
                                                                      b_Ga[None, :] - b_Gs, 0.)), 0.)
                b_dEp = b_dr * tl.dot(b_W1, b_ka, input_precision=SOLVE_PRECISION)
                b_dqp = b_dr * tl.dot(b_W2, b_ka, input_precision=DOT_PRECISION)
                for j in range(BC):
                    m_jj = (o_c >= j) & m_r
                    p_j = (t0 + c0 + j).to(tl.int64) * (H * K) + o_k
                    m_jk = m_k & (o_k * 0 + (t0 + c0 + j) < T)
                    b_kj = tl.load(k + p_j, mask=m_jk, other=0.).to(tl.float32)
                    b_Gj = tl.load(g_cum + p_j, mask=m_jk, other=0.)
                    b_kdec = b_kj[None, :] * tl.exp(tl.where(m_jj[:, None], b_Gr - b_Gj[None, :], 0.))
                    b_kdec = tl.where(m_jj[:, None], b_kdec, 0.)
                    b_w1 = tl.sum(tl.where((o_j == c0 + j)[None, :], b_W1, 0.), 1)
                    b_w2 = tl.sum(tl.where((o_j == c0 + j)[None, :], b_W2, 0.), 1)
                    b_dEp += b_w1[:, None] * b_kdec
                    b_dqp += b_w2[:, None] * b_kdec
            b_Er = b_br * b_kr
            b_dE = tl.load(db + p_r, mask=m_rk, other=0.) + b_dEp
            b_dqf = tl.load(dq + p_r, mask=m_rk, other=0.) + b_dqp
            tl.store(dq_out + p_r, b_dqf.to(dq_out.dtype.element_ty), mask=m_rk)
            tl.store(db_out + p_r, (b_dE * b_kr).to(db_out.dtype.element_ty), mask=m_rk)
            tl.store(dk + p_r, tl.load(dk + p_r, mask=m_rk, other=0.) + b_dE * b_br, mask=m_rk)
            tl.store(dg + p_r, tl.load(dg + p_r, mask=m_rk, other=0.) + b_Er * b_dEp + b_qr * b_dqp,
                     mask=m_rk)
        tl.debug_barrier()

        # (b) column blocks: dk from the pairwise products.
        for i_c in range(n_c):
            c0 = i_c * BC
            o_s = t0 + c0 + o_c
            m_sr = o_s < T
            m_sk = m_sr[:, None] & m_k[None, :]
            r_s = o_s.to(tl.int64)
            p_s = r_s[:, None] * (H * K) + o_k[None, :]
            p_wc = r_t[:, None] * (H * BT) + (c0 + o_c)[None, :]
            b_W1c = tl.load(dT_buf + p_wc, mask=m_t[:, None], other=0.)             # [BT, BC]
            b_W2c = tl.load(dAqk_buf + p_wc, mask=m_t[:, None], other=0.)
            b_Gc = tl.load(g_cum + p_s, mask=m_sk, other=0.)                         # [BC, BK]
            b_kc = tl.load(k + p_s, mask=m_sk, other=0.).to(tl.float32)
            e_c = tl.minimum(t0 + c0 + BC, T) - 1
            b_Gb = tl.load(g_cum + e_c.to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
            b_Ga = tl.load(g_cum + (t0 + c0).to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
            b_span = tl.max(tl.where(m_k, b_Ga - b_Gb, 0.), 0)
            b_dc = tl.exp(tl.where(m_sk, b_Gb[None, :] - b_Gc, 0.))                 # <= 1
            if b_span <= SAFE_SPAN:
                m_rr = (o_t >= t0 + c0) & m_t
            else:
                m_rr = (o_t > e_c) & m_t
            b_xa = tl.exp(tl.where(m_rr[:, None], b_Gs - b_Gb[None, :], 0.))
            b_X1 = tl.where(m_rr[:, None], b_Es * b_xa, 0.)
            b_X2 = tl.where(m_rr[:, None], b_qs * b_xa, 0.)
            b_dkp = b_dc * (tl.dot(tl.trans(b_W1c), b_X1, input_precision=SOLVE_PRECISION)
                            + tl.dot(tl.trans(b_W2c), b_X2, input_precision=DOT_PRECISION))
            if b_span > SAFE_SPAN:
                for i in range(BC):
                    # Row i past T (the sequence ends inside the block) has G = 0: keep it out.
                    m_ii = (o_c <= i) & m_sr & (t0 + c0 + i < T)
                    p_i = (t0 + c0 + i).to(tl.int64) * (H * K) + o_k
                    m_ik = m_k & (o_k * 0 + (t0 + c0 + i) < T)
                    b_Gi = tl.load(g_cum + p_i, mask=m_ik, other=0.)
                    b_Ei = (tl.load(b + p_i, mask=m_ik, other=0.).to(tl.float32)
                            * tl.load(k + p_i, mask=m_ik, other=0.).to(tl.float32))
                    b_qi = tl.load(q + p_i, mask=m_ik, other=0.).to(tl.float32)
                    b_dec = tl.exp(tl.where(m_ii[:, None], b_Gi[None, :] - b_Gc, 0.))
                    b_dec = tl.where(m_ii[:, None], b_dec, 0.)
                    b_w1 = tl.sum(tl.where((o_j == c0 + i)[:, None], b_W1c, 0.), 0)     # [BC]
                    b_w2 = tl.sum(tl.where((o_j == c0 + i)[:, None], b_W2c, 0.), 0)
                    b_dkp += (b_w1[:, None] * b_Ei[None, :] + b_w2[:, None] * b_qi[None, :]) * b_dec
            b_dkf = tl.load(dk + p_s, mask=m_sk, other=0.) + b_dkp
            tl.store(dk_out + p_s, b_dkf.to(dk_out.dtype.element_ty), mask=m_sk)
            tl.store(dg + p_s, tl.load(dg + p_s, mask=m_sk, other=0.) - b_kc * b_dkp, mask=m_sk)
        tl.debug_barrier()

        # dg = reverse cumulative sum of dG inside the chunk.
        b_dG = tl.load(dg + p_t, mask=m_tk, other=0.)
        b_rev = tl.sum(b_dG, 0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
        tl.store(dg + p_t, b_rev, mask=m_tk)


@triton.jit(do_not_specialize=["T"])
def _intra_bwd_pairwise_kernel(
    q,
    k,
    b,
    g_cum,
    dT_buf,
    dAqk_buf,
    dq,
    dk,
    db,
    dg,
    dq_out,
    dk_out,
    db_out,
    cu_seqlens,
    chunk_indices,
    chunk_offsets,
    g_raw,          # in-kernel gate (_gate.py)
    A_log,
    dt_bias,
    dA_log_part,
    ddt_bias_part,
    lower_bound,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    SOLVE_PRECISION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    GATE: tl.constexpr,             # in-kernel gate
    GATE_HAS_A: tl.constexpr,
    GATE_HAS_BIAS: tl.constexpr,
):
    """Phase D in its own launch (``PHASE_D="split"``): one program per (chunk, head, key tile).

    Reads dT and dA_qk from the scratch and the partial dq, dE (in db), dk, dG of phases A-C,
    adds the pairwise VJPs and writes the final dq, db, dk, dg of its [BT, BK] tile once. Row
    blocks (dE, dq) and column blocks (dk) accumulate into whole-chunk register tiles: each
    block's product is a [BT, BT] x [BT, BK] dot whose rows (or columns) outside the block are
    masked, so there is no read-modify-write through memory and no barrier. Anchors, SAFE_SPAN
    and the exact diagonal fallback are those of the fused phase D (module docstring).
    Grid: ``(number of chunks, B * H, cdiv(K, BK))``.
    """
    tl.static_assert(BT % BC == 0, "BC must divide BT")
    i_t, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, bos, T, i_ch = _prologue.chunk_of_program(i_t, i_b, T, cu_seqlens, chunk_indices,
                                                   chunk_offsets, BT, IS_VARLEN)
    t0 = i_t * BT
    for_k = (bos * H + i_h) * K
    for_a = (bos * H + i_h) * BT
    q += for_k
    k += for_k
    b += for_k
    g_cum += for_k
    dq += for_k
    dk += for_k
    db += for_k
    dg += for_k
    dq_out += for_k
    dk_out += for_k
    db_out += for_k
    dT_buf += for_a
    dAqk_buf += for_a

    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < T
    r_t = o_t.to(tl.int64)
    o_j = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_t = r_t[:, None] * (H * K) + o_k[None, :]
    p_A = r_t[:, None] * (H * BT) + o_j[None, :]
    b_W1 = tl.load(dT_buf + p_A, mask=m_t[:, None], other=0.)                         # [BT, BT]
    b_W2 = tl.load(dAqk_buf + p_A, mask=m_t[:, None], other=0.)
    b_Gs = tl.load(g_cum + p_t, mask=m_tk, other=0.)                                 # [BT, BK]
    b_ks = tl.load(k + p_t, mask=m_tk, other=0.).to(tl.float32)
    b_qs = tl.load(q + p_t, mask=m_tk, other=0.).to(tl.float32)
    n_c = tl.cdiv(tl.minimum(BT, T - t0), BC)

    # (a) row blocks i: dE_r += dT_r. k~_i, dq_r += dA_qk_r. k~_i against the block's first row a.
    b_dEp = tl.zeros([BT, BK], dtype=tl.float32)
    b_dqp = tl.zeros([BT, BK], dtype=tl.float32)
    for i_c in range(n_c):
        c0 = i_c * BC
        m_blk = (o_j >= c0) & (o_j < c0 + BC) & m_t                                  # rows r
        b_Ga = tl.load(g_cum + (t0 + c0).to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
        e_r = tl.minimum(t0 + c0 + BC, T) - 1
        b_Ge = tl.load(g_cum + e_r.to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
        b_span = tl.max(tl.where(m_k, b_Ga - b_Ge, 0.), 0)
        b_dr = tl.exp(tl.where(m_blk[:, None], b_Gs - b_Ga[None, :], 0.))            # <= 1
        b_W1r = tl.where(m_blk[:, None], b_W1, 0.)
        b_W2r = tl.where(m_blk[:, None], b_W2, 0.)
        if b_span <= SAFE_SPAN:
            m_s = (o_j < c0 + BC) & m_t
        else:
            m_s = (o_j < c0) & m_t
        b_ka = tl.where(m_s[:, None], b_ks * tl.exp(tl.where(m_s[:, None],
                                                              b_Ga[None, :] - b_Gs, 0.)), 0.)
        b_dEp += tl.where(m_blk[:, None],
                          b_dr * tl.dot(b_W1r, b_ka, input_precision=SOLVE_PRECISION), 0.)
        b_dqp += tl.where(m_blk[:, None],
                          b_dr * tl.dot(b_W2r, b_ka, input_precision=DOT_PRECISION), 0.)
        if b_span > SAFE_SPAN:
            # The diagonal block exactly, one column j at a time: exp(G_r - G_j) <= 1 for r >= j.
            for j in range(BC):
                m_jj = m_blk & (o_j >= c0 + j)
                p_j = (t0 + c0 + j).to(tl.int64) * (H * K) + o_k
                m_jk = m_k & (o_k * 0 + (t0 + c0 + j) < T)
                b_kj = tl.load(k + p_j, mask=m_jk, other=0.).to(tl.float32)
                b_Gj = tl.load(g_cum + p_j, mask=m_jk, other=0.)
                b_kdec = tl.where(m_jj[:, None], b_kj[None, :] * tl.exp(
                    tl.where(m_jj[:, None], b_Gs - b_Gj[None, :], 0.)), 0.)
                b_w1 = tl.sum(tl.where((o_j == c0 + j)[None, :], b_W1r, 0.), 1)
                b_w2 = tl.sum(tl.where((o_j == c0 + j)[None, :], b_W2r, 0.), 1)
                b_dEp += b_w1[:, None] * b_kdec
                b_dqp += b_w2[:, None] * b_kdec

    # dq is final here; dE finishes db and feeds dk and dG (E = b (.) k).
    b_dqf = tl.load(dq + p_t, mask=m_tk, other=0.) + b_dqp
    tl.store(dq_out + p_t, b_dqf.to(dq_out.dtype.element_ty), mask=m_tk)
    b_bs = tl.load(b + p_t, mask=m_tk, other=0.).to(tl.float32)
    b_dE = tl.load(db + p_t, mask=m_tk, other=0.) + b_dEp
    tl.store(db_out + p_t, (b_dE * b_ks).to(db_out.dtype.element_ty), mask=m_tk)
    b_Es = b_bs * b_ks
    b_dk = tl.load(dk + p_t, mask=m_tk, other=0.) + b_dE * b_bs
    b_dG = tl.load(dg + p_t, mask=m_tk, other=0.) + b_Es * b_dEp + b_qs * b_dqp

    # (b) column blocks j: dk_s += dT^T_s . E~ + dA_qk^T_s . q~ against the block's last row.
    b_W1t = tl.trans(b_W1)                                                           # [s, r]
    b_W2t = tl.trans(b_W2)
    b_dkp = tl.zeros([BT, BK], dtype=tl.float32)
    for i_c in range(n_c):
        c0 = i_c * BC
        m_blk = (o_j >= c0) & (o_j < c0 + BC) & m_t                                  # columns s
        e_c = tl.minimum(t0 + c0 + BC, T) - 1
        b_Gb = tl.load(g_cum + e_c.to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
        b_Ga = tl.load(g_cum + (t0 + c0).to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
        b_span = tl.max(tl.where(m_k, b_Ga - b_Gb, 0.), 0)
        b_dc = tl.exp(tl.where(m_blk[:, None], b_Gb[None, :] - b_Gs, 0.))            # <= 1
        if b_span <= SAFE_SPAN:
            m_rr = (o_t >= t0 + c0) & m_t
        else:
            m_rr = (o_t > e_c) & m_t
        b_xa = tl.exp(tl.where(m_rr[:, None], b_Gs - b_Gb[None, :], 0.))
        b_X1 = tl.where(m_rr[:, None], b_Es * b_xa, 0.)
        b_X2 = tl.where(m_rr[:, None], b_qs * b_xa, 0.)
        b_W1c = tl.where(m_blk[:, None], b_W1t, 0.)
        b_W2c = tl.where(m_blk[:, None], b_W2t, 0.)
        b_dkp += tl.where(m_blk[:, None], b_dc * (
            tl.dot(b_W1c, b_X1, input_precision=SOLVE_PRECISION)
            + tl.dot(b_W2c, b_X2, input_precision=DOT_PRECISION)), 0.)
        if b_span > SAFE_SPAN:
            # The diagonal block exactly, one row i at a time: exp(G_i - G_s) <= 1 for s <= i.
            for i in range(BC):
                # Row i past T (the sequence ends inside the block) has G = 0: keep it out.
                m_ii = m_blk & (o_j <= c0 + i) & (t0 + c0 + i < T)
                p_i = (t0 + c0 + i).to(tl.int64) * (H * K) + o_k
                m_ik = m_k & (o_k * 0 + (t0 + c0 + i) < T)
                b_Gi = tl.load(g_cum + p_i, mask=m_ik, other=0.)
                b_Ei = (tl.load(b + p_i, mask=m_ik, other=0.).to(tl.float32)
                        * tl.load(k + p_i, mask=m_ik, other=0.).to(tl.float32))
                b_qi = tl.load(q + p_i, mask=m_ik, other=0.).to(tl.float32)
                b_dec = tl.where(m_ii[:, None], tl.exp(
                    tl.where(m_ii[:, None], b_Gi[None, :] - b_Gs, 0.)), 0.)
                b_w1 = tl.sum(tl.where((o_j == c0 + i)[None, :], b_W1c, 0.), 1)        # [s]
                b_w2 = tl.sum(tl.where((o_j == c0 + i)[None, :], b_W2c, 0.), 1)
                b_dkp += (b_w1[:, None] * b_Ei[None, :] + b_w2[:, None] * b_qi[None, :]) * b_dec
    b_dk += b_dkp
    b_dG -= b_ks * b_dkp
    tl.store(dk_out + p_t, b_dk.to(dk_out.dtype.element_ty), mask=m_tk)
    # dg = reverse cumulative sum of dG inside the chunk.
    b_rev = tl.sum(b_dG, 0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    b_rev = _gate.chain_rule(b_rev, g_raw, for_k + p_t, m_tk, A_log, dt_bias, lower_bound,  # gate
                             dA_log_part, ddt_bias_part, (i_ch * H + i_h) * K, i_h, o_k, m_k, K,
                             GATE, GATE_HAS_A, GATE_HAS_BIAS)
    tl.store(dg + p_t, b_rev, mask=m_tk)


def intra_bwd_grid(num_chunks: int, B: int, H: int) -> tuple[int, int]:
    return (num_chunks, B * H)


def intra_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    g_cum: torch.Tensor,
    A: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    do: torch.Tensor,
    R: torch.Tensor,
    dR: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    config: "KernelConfig",
    grad_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype] | None = None,
    gate: _gate.GateArgs = _gate.NO_GATE,
) -> tuple[torch.Tensor, ...]:
    """Launch the intra-chunk backward. Returns ``(dq, dk, dv, dg, db, dw)``.

    dg is fp32; dq, dk, db come out in ``grad_dtypes`` (default fp32), written by the kernel's
    last update of each element, so no cast pass follows. Their partial sums live in fp32 scratch.
    With ``gate`` (its ``g_raw`` and partials set) dg is the gradient of the raw gate input and
    the dA_log / ddt_bias partials are written (``_gate.chain_rule``).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = config["BT"]
    dT_buf = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)
    dAqk_buf = _launch.empty_as(dT_buf)
    dq = torch.empty(B, T, H, K, dtype=torch.float32, device=k.device)
    dk, db, dg = _launch.empty_as(dq), _launch.empty_as(dq), _launch.empty_as(dq)
    dq_out, dk_out, db_out = (
        x if dt in (None, torch.float32) else torch.empty(x.shape, dtype=dt, device=x.device)
        for x, dt in zip((dq, dk, db), grad_dtypes or (None, None, None)))
    dv = _launch.empty_as(v)
    dw = _launch.empty_as(w)
    num_chunks = triton.cdiv(T, BT) if cu_seqlens is None else chunk_indices.shape[0]
    fused_d = config["PHASE_D"] == "fused"
    split_b = config["PHASE_B"] == "split"
    NK = triton.cdiv(K, config["BK"])
    dA_part = (torch.empty(B, T, H, NK * BT, dtype=torch.float32, device=k.device) if split_b
               else dT_buf)
    if split_b:
        _launch.launch(
            _intra_bwd_state_kernel, (num_chunks, B * H, NK),
            q=q, k=k, b=b, g_cum=g_cum, A=A, h=h, dh=dh, do=do, R=R, dR=dR,
            dq=dq, dk=dk, db=db, dg=dg, dA_part=dA_part,
            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_offsets=chunk_offsets,
            scale=scale, T=T, H=H, K=K, V=V, BT=BT, BK=config["BK"], BV=config["BV"], NK=NK,
            DOT_PRECISION=_precision.dot_precision(k.dtype),
            IS_VARLEN=cu_seqlens is not None,
            **config.launch_options(),
        )
    _launch.launch(_intra_bwd_kernel, intra_bwd_grid(num_chunks, B, H),
        q=q, k=k, v=v, b=b, w=w, g_cum=g_cum, A=A, h=h, dh=dh, do=do, R=R, dR=dR,
        dT_buf=dT_buf, dAqk_buf=dAqk_buf, dA_part=dA_part,
        dq=dq, dk=dk, db=db, dg=dg, dv=dv, dw=dw,
        dq_out=dq_out, dk_out=dk_out, db_out=db_out,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_offsets=chunk_offsets,
        scale=scale, T=T,
        H=H, K=K, V=V,
        BT=BT, BC=config["BC"], BK=config["BK"], BV=config["BV"],
        SOLVE_PRECISION=config["SOLVE_PRECISION"],
        DOT_PRECISION=_precision.dot_precision(k.dtype),
        FUSED_D=fused_d,
        SPLIT_B=split_b,
        STATE_IN_A=config["BK"] >= K and not split_b,
        NK=NK,
        IS_VARLEN=cu_seqlens is not None,
        **config.launch_options(),
        **gate.backward_args(),
    )
    if not fused_d:
        BK_D = config["BK_D"] or config["BK"]
        _launch.launch(
            _intra_bwd_pairwise_kernel, (num_chunks, B * H, triton.cdiv(K, BK_D)),
            q=q, k=k, b=b, g_cum=g_cum, dT_buf=dT_buf, dAqk_buf=dAqk_buf,
            dq=dq, dk=dk, db=db, dg=dg, dq_out=dq_out, dk_out=dk_out, db_out=db_out,
            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_offsets=chunk_offsets,
            T=T, H=H, K=K, BT=BT, BC=config["BC"], BK=BK_D,
            SOLVE_PRECISION=config["SOLVE_PRECISION"],
            DOT_PRECISION=_precision.dot_precision(k.dtype),
            IS_VARLEN=cu_seqlens is not None,
            **config.launch_options(),
            **gate.backward_args(),
        )
    return dq_out, dk_out, dv, dg, db_out, dw
