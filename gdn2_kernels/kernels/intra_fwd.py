"""Intra-chunk forward: cumulative decay, T and A_qk, the WY inverse, and the WY factors.

Computes, for each chunk of C = ``BT`` tokens and each head (docs/math.md "Chunkwise form"):

    G_r   = sum_{i<=r} g_i                                   -> g_cum  [B, T, H, K] fp32
            (g_i activated from the raw gate input first with GATE: ``_gate.activate``)
    T     = strict_lower(E_bar K_bar^T)                      (kept on chip)
    A     = (I + T)^-1                                       -> A      [B, T, H, BT] fp32
    A_qk  = scale * lower(Q K^T (.) exp(G_r - G_s))          -> A_qk   [B, T, H, BT] fp32
    Y     = A E_bar,   E_bar = exp(G) (.) b (.) k            -> Y      [B, T, H, K]  (dtype of k)
    U     = A Z,       Z = w (.) v                           -> U      [B, T, H, V]  (dtype of k)
    Q_gamma = scale * exp(G) (.) q                           -> Qg     [B, T, H, K]  (dtype of k)
    K_tail  = exp(G_C - G) (.) k                             -> Kt     [B, T, H, K]  (dtype of k)
    gamma_C = exp(G_C)  (C = the chunk's last row)           -> gC     [NT_total, H, K] fp32

Row t of A / A_qk holds row (t mod C) of its chunk's C x C matrix (zeros above the diagonal).

Grid: ``(number of chunks, B * H)``; one program per (chunk, head). Varlen: the first grid axis
walks ``chunk_indices`` (sequence, chunk) pairs so chunks never straddle two sequences.

Tiling: the chunk is cut into C / ``BC`` row blocks. For row block i, the entries left of its
diagonal block come from one dot over key tiles of ``BK`` with both factors offset against the
block's first row a (exp(G_r - G_a) and exp(G_a - G_s), both <= 1, so strong decay never
overflows). The diagonal BC x BC block uses the same anchor when the block's decay span
max_c(G_a - G_last) is at most SAFE_SPAN = 60 (then every factor lies in [e^-60, e^60]: no overflow,
full fp32 precision); with stronger decay it is formed exactly, one column s at a time, from
exp(G_r - G_s) on [BC, BK] tiles. The check is per block at run time; both paths are tested.
The diagonal block of A is inverted in fp32 registers (``DIAG_INVERSE``): by forward
substitution (BC - 1 dependent row steps, each a reduction over the block) or by doubling (blocks
of 2, 4, ..., BC rows merged as X - X L X: log2(BC) levels of two BC x BC dots). Row block i of A
is then ``-A_ii (T_i,<i A_<i,:)``, reading the finished rows of A back from
this program's own output (a barrier orders the two). ``SOLVE_PRECISION`` sets the dot precision
of the T product, of the doubling inverse and of those merges (ieee, tf32x3 = split precision,
or tf32); every other dot uses ``DOT_PRECISION`` (``_precision``: tf32x3 for fp32 inputs). Y and
U are dots of the finished A with key tiles of ``BK`` and value tiles of ``BV``.

The backward recomputes nothing from this kernel's registers: it reads A, A_qk and g_cum.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gdn2_kernels import _launch, _precision, _varlen
from gdn2_kernels.kernels import _gate, _prologue

if TYPE_CHECKING:
    from gdn2_kernels.configs import KernelConfig


SAFE_SPAN = tl.constexpr(60.0)


@triton.jit(do_not_specialize=["T"])
def _intra_fwd_kernel(
    q,
    k,
    v,
    g,
    b,
    w,
    g_cum,
    A,
    A_qk,
    Y,
    U,
    Qg,
    Kt,
    gC,
    g_err,
    cu_seqlens,
    chunk_indices,
    A_log,          # in-kernel gate (_gate.py)
    dt_bias,        # in-kernel gate
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
    DIAG_INVERSE: tl.constexpr,
    LOG2_BC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHECK_G: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    GATE: tl.constexpr,             # in-kernel gate
    GATE_HAS_A: tl.constexpr,       # in-kernel gate
    GATE_HAS_BIAS: tl.constexpr,    # in-kernel gate
):
    tl.static_assert(BT % BC == 0, "BC must divide BT")
    tl.static_assert((1 << LOG2_BC) == BC, "BC must be a power of two")
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:
        i_ch = i_t.to(tl.int64)                  # flat chunk index (chunk_indices is in order)
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        i_ch = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
        bos = i_b.to(tl.int64) * T
    t0 = i_t * BT

    # Row bases of this (sequence, head); rows advance by H * D elements.
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    b += (bos * H + i_h) * K
    g_cum += (bos * H + i_h) * K
    Y += (bos * H + i_h) * K
    Qg += (bos * H + i_h) * K
    Kt += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    w += (bos * H + i_h) * V
    U += (bos * H + i_h) * V
    A += (bos * H + i_h) * BT
    A_qk += (bos * H + i_h) * BT

    o_t = t0 + tl.arange(0, BT)             # rows of the chunk (within the sequence)
    m_t = o_t < T
    r_t = o_t.to(tl.int64)
    o_j = tl.arange(0, BT)                  # columns of the chunk's C x C matrices
    o_c = tl.arange(0, BC)

    # 1. G = cumsum(g) inside the chunk. CHECK_G: a NaN, Inf or positive g anywhere in the chunk
    #    makes the chunk's whole G NaN (so o and the state are NaN from this chunk on, never
    #    finite garbage) and raises the error flag (_gate_check).
    n_bad = tl.zeros([], dtype=tl.int32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_k = r_t[:, None] * (H * K) + o_k[None, :]
        b_g = tl.load(g + p_k, mask=m_tk, other=0.).to(tl.float32)
        b_g = _gate.activate(b_g, A_log, dt_bias, lower_bound, i_h, o_k, o_k < K, K,  # gate
                             GATE, GATE_HAS_A, GATE_HAS_BIAS)
        if CHECK_G:
            n_bad += tl.sum(tl.sum((~_prologue.valid_log_decay(b_g)).to(tl.int32), 1), 0)
        tl.store(g_cum + p_k, tl.cumsum(b_g, axis=0), mask=m_tk)
    if CHECK_G:
        if n_bad > 0:
            _prologue.poison_chunk(g_cum, g_err, r_t, m_t, H, K, BT, BK)
    tl.debug_barrier()

    # 2. Row blocks of T and A_qk, and the blocked solve for A.
    n_c = tl.cdiv(tl.minimum(BT, T - t0), BC)
    for i_c in range(n_c):
        c0 = i_c * BC
        o_r = t0 + c0 + o_c
        m_r = o_r < T
        r_r = o_r.to(tl.int64)
        m_left = o_j < c0                                        # columns left of the block
        b_Toff = tl.zeros([BC, BT], dtype=tl.float32)
        b_Qoff = tl.zeros([BC, BT], dtype=tl.float32)
        b_Td = tl.zeros([BC, BC], dtype=tl.float32)
        b_Qd = tl.zeros([BC, BC], dtype=tl.float32)
        # Decay span of the block, max over channels of G_a - G_last (>= 0). Under SAFE_SPAN the
        # diagonal block is a dot against the same anchor (factors within e^-60..e^60, exact in
        # fp32); above it (strong decay) it is formed one column at a time.
        e_r = tl.minimum(t0 + c0 + BC, T) - 1
        b_span = 0.
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_Ga = tl.load(g_cum + (t0 + c0).to(tl.int64) * (H * K) + o_k, mask=o_k < K, other=0.)
            b_Ge = tl.load(g_cum + e_r.to(tl.int64) * (H * K) + o_k, mask=o_k < K, other=0.)
            b_span = tl.maximum(b_span, tl.max(b_Ga - b_Ge, 0))
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_rk = m_r[:, None] & m_k[None, :]
            m_tk = m_t[:, None] & m_k[None, :]
            p_r = r_r[:, None] * (H * K) + o_k[None, :]
            p_t = r_t[:, None] * (H * K) + o_k[None, :]
            b_Gr = tl.load(g_cum + p_r, mask=m_rk, other=0.)                       # [BC, BK]
            b_kr = tl.load(k + p_r, mask=m_rk, other=0.).to(tl.float32)
            b_br = tl.load(b + p_r, mask=m_rk, other=0.).to(tl.float32)
            b_qr = tl.load(q + p_r, mask=m_rk, other=0.).to(tl.float32)
            b_Ga = tl.load(g_cum + (t0 + c0).to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)

            b_er = b_br * b_kr                                                      # e_r
            # Padded rows (past T) have G = 0: keep them out of exp() so 0 * inf never appears.
            b_dr = tl.exp(tl.where(m_r[:, None], b_Gr - b_Ga[None, :], 0.))          # <= 1
            if BC < BT:
                # Columns left of the block (none when one block spans the chunk).
                b_Gs = tl.load(g_cum + p_t, mask=m_tk, other=0.)                    # [BT, BK]
                b_ks = tl.load(k + p_t, mask=m_tk, other=0.).to(tl.float32)
                b_ds = tl.exp(tl.where(m_left[:, None], b_Ga[None, :] - b_Gs, 0.))  # <= 1 if left
                b_ks_a = tl.where(m_left[:, None], b_ks * b_ds, 0.)                 # [BT, BK]
                b_Toff += tl.dot(b_er * b_dr, tl.trans(b_ks_a), input_precision=SOLVE_PRECISION)
                b_Qoff += tl.dot(b_qr * b_dr, tl.trans(b_ks_a), input_precision=DOT_PRECISION)

            if b_span <= SAFE_SPAN:
                b_kr_a = b_kr * tl.exp(tl.where(m_r[:, None], b_Ga[None, :] - b_Gr, 0.))
                b_Td += tl.dot(b_er * b_dr, tl.trans(b_kr_a), input_precision=SOLVE_PRECISION)
                b_Qd += tl.dot(b_qr * b_dr, tl.trans(b_kr_a), input_precision=DOT_PRECISION)
            else:
                # Diagonal block, one column s at a time: exp(G_r - G_s), r >= s (2-D tiles).
                for j in range(BC):
                    m_j = (o_c >= j) & m_r
                    p_j = (t0 + c0 + j).to(tl.int64) * (H * K) + o_k
                    m_jk = m_k & (o_k * 0 + (t0 + c0 + j) < T)
                    b_kj = tl.load(k + p_j, mask=m_jk, other=0.).to(tl.float32)
                    b_Gj = tl.load(g_cum + p_j, mask=m_jk, other=0.)
                    b_kdec = b_kj[None, :] * tl.exp(tl.where(m_j[:, None], b_Gr - b_Gj[None, :], 0.))
                    b_Td += tl.where((o_c == j)[None, :], tl.sum(b_er * b_kdec, 1)[:, None], 0.)
                    b_Qd += tl.where((o_c == j)[None, :], tl.sum(b_qr * b_kdec, 1)[:, None], 0.)
        b_Td = tl.where(o_c[:, None] > o_c[None, :], b_Td, 0.)

        # Inverse of the unit lower-triangular diagonal block.
        if DIAG_INVERSE == "doubling":
            # Blocks of 2, 4, ..., BC rows: with X the inverse of the diagonal blocks of size s
            # and L the part of T joining two s-blocks inside one 2s-block,
            # [[P, 0], [C, D]]^-1 = X - X L X. log2(BC) levels of two BC x BC dots each.
            m_low = o_c[:, None] > o_c[None, :]
            b_Ai = (o_c[:, None] == o_c[None, :]).to(tl.float32) - tl.where(
                m_low & ((o_c[:, None] >> 1) == (o_c[None, :] >> 1)), b_Td, 0.)
            for lvl in tl.static_range(1, LOG2_BC):
                m_join = (m_low & ((o_c[:, None] >> (lvl + 1)) == (o_c[None, :] >> (lvl + 1)))
                          & ((o_c[:, None] >> lvl) != (o_c[None, :] >> lvl)))
                b_L = tl.where(m_join, b_Td, 0.)
                b_XL = tl.dot(b_Ai, b_L, input_precision=SOLVE_PRECISION)
                b_Ai -= tl.dot(b_XL, b_Ai, input_precision=SOLVE_PRECISION)
        else:
            # Forward substitution, one row at a time.
            b_Ai = -tl.where(o_c[:, None] > o_c[None, :], b_Td, 0.)
            for i in range(1, BC):
                m_i = o_c == i
                b_a = tl.sum(tl.where(m_i[:, None], b_Ai, 0.), 0)
                b_a = b_a + tl.sum(b_a[:, None] * b_Ai, 0)
                b_Ai = tl.where(m_i[:, None], b_a[None, :], b_Ai)
            b_Ai += (o_c[:, None] == o_c[None, :]).to(tl.float32)

        # Row block i of A: -A_ii T_i,<i A_<i,:  (rows of A left of c0 are final; the first
        # block has none).
        b_Arow = tl.zeros([BC, BT], dtype=tl.float32)
        if i_c > 0:
            p_Ap = r_t[:, None] * (H * BT) + o_j[None, :]
            b_Ap = tl.load(A + p_Ap, mask=(m_left & m_t)[:, None], other=0.)        # [BT, BT]
            b_acc = tl.dot(b_Toff, b_Ap, input_precision=SOLVE_PRECISION)
            b_Arow = -tl.dot(b_Ai, b_acc, input_precision=SOLVE_PRECISION)          # [BC, BT]

        m_diag = (o_j >= c0) & (o_j < c0 + BC)
        p_row = r_r[:, None] * (H * BT) + o_j[None, :]
        p_diag = r_r[:, None] * (H * BT) + (c0 + o_c)[None, :]
        tl.store(A + p_row, b_Arow, mask=m_r[:, None] & ~m_diag[None, :])
        tl.store(A + p_diag, b_Ai, mask=m_r[:, None])
        b_Qrow = tl.where(m_left[None, :], b_Qoff, 0.) * scale
        tl.store(A_qk + p_row, b_Qrow, mask=m_r[:, None] & ~m_diag[None, :])
        tl.store(A_qk + p_diag, tl.where(o_c[:, None] >= o_c[None, :], b_Qd, 0.) * scale,
                 mask=m_r[:, None])
        tl.debug_barrier()

    # 3. WY factors Y = A E_bar and U = A Z, and the state pass's operands Q_gamma, K_tail and
    #    gamma_C, written in the dtype its dots use (so it loads no fp32 G tile).
    last = tl.minimum(T, t0 + BT) - 1
    b_A = tl.load(A + r_t[:, None] * (H * BT) + o_j[None, :], mask=m_t[:, None], other=0.)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k, m_tk, p_t, b_G, b_k, b_b, b_q, b_Gl = _prologue.key_tile(q, k, b, g_cum, o_k, m_t,
                                                                     r_t, last, H, K)
        b_gam = tl.exp(b_G)
        b_Y = tl.dot(b_A, b_b * b_k * b_gam, input_precision=DOT_PRECISION)
        tl.store(Y + p_t, b_Y.to(Y.dtype.element_ty), mask=m_tk)
        tl.store(Qg + p_t, (b_q * b_gam * scale).to(Qg.dtype.element_ty), mask=m_tk)
        b_Kt = tl.where(m_tk, b_k * tl.exp(b_Gl[None, :] - b_G), 0.)
        tl.store(Kt + p_t, b_Kt.to(Kt.dtype.element_ty), mask=m_tk)
        tl.store(gC + (i_ch * H + i_h) * K + o_k, tl.exp(b_Gl), mask=m_k)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = r_t[:, None] * (H * V) + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_tv, other=0.).to(tl.float32)
        b_w = tl.load(w + p_v, mask=m_tv, other=0.).to(tl.float32)
        b_U = tl.dot(b_A, b_w * b_v, input_precision=DOT_PRECISION)
        tl.store(U + p_v, b_U.to(U.dtype.element_ty), mask=m_tv)


def intra_fwd_grid(num_chunks: int, B: int, H: int) -> tuple[int, int]:
    return (num_chunks, B * H)


def intra_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
    config: "KernelConfig",
    g_err: torch.Tensor | None = None,
    gate: _gate.GateArgs = _gate.NO_GATE,
) -> tuple[torch.Tensor, ...]:
    """Launch the intra-chunk forward. Returns ``(g_cum, A, A_qk, Y, U, Qg, Kt, gC)``.

    ``g_err`` (int32[1], optional) turns on the in-kernel check of g (``_gate_check``); with
    ``gate`` (``_gate.GateArgs``) ``g`` is the raw gate input, activated where it is loaded (and
    checked after its activation)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = config["BT"]
    g_cum = torch.empty(B, T, H, K, dtype=torch.float32, device=k.device)
    A = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)
    A_qk = _launch.empty_as(A)
    Y = torch.empty(B, T, H, K, dtype=k.dtype, device=k.device)
    U = torch.empty(B, T, H, V, dtype=k.dtype, device=k.device)
    Qg = _launch.empty_as(Y)
    Kt = _launch.empty_as(Y)
    num_chunks = triton.cdiv(T, BT) if cu_seqlens is None else chunk_indices.shape[0]
    gC = torch.empty(_varlen.num_chunks(T, B, chunk_indices, BT), H, K, dtype=torch.float32,
                     device=k.device)
    _launch.launch(_intra_fwd_kernel, intra_fwd_grid(num_chunks, B, H),
        q=q, k=k, v=v, g=g, b=b, w=w,
        g_cum=g_cum, A=A, A_qk=A_qk, Y=Y, U=U, Qg=Qg, Kt=Kt, gC=gC, g_err=g_err,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
        scale=scale, T=T,
        H=H, K=K, V=V,
        BT=BT, BC=config["BC"], BK=config["BK"], BV=config["BV"],
        SOLVE_PRECISION=config["SOLVE_PRECISION"],
        DIAG_INVERSE=config["DIAG_INVERSE"], LOG2_BC=config["BC"].bit_length() - 1,
        DOT_PRECISION=_precision.dot_precision(k.dtype),
        CHECK_G=g_err is not None,
        IS_VARLEN=cu_seqlens is not None,
        **config.launch_options(),
        **gate.forward_args(),
    )
    return g_cum, A, A_qk, Y, U, Qg, Kt, gC
