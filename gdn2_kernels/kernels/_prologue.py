"""Shared ``@triton.jit`` prologues: which tokens and chunks a program owns (dense or varlen).

Two shapes of program exist: per (chunk, head) (the intra-chunk kernels) and per (sequence,
head, value tile) (the state passes and decoding). Both take a dense ``[B, T]`` batch (sequence
``i_b`` starts at token ``i_b * T``) or a packed one (``cu_seqlens``; ``chunk_indices`` maps a
program to (sequence, chunk), ``chunk_offsets`` gives each sequence's first chunk in the flat
chunk list that holds the per-chunk states). :func:`key_tile` loads what the WY factors and their
gradients read of one key tile of a chunk (intra_fwd's step 3, intra_bwd's phase B).
:func:`valid_log_decay` and :func:`poison_chunk` are the in-kernel check of g (``_gate_check``).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_of_program(i_t, i_b, T, cu_seqlens, chunk_indices, chunk_offsets, BT: tl.constexpr,
                     IS_VARLEN: tl.constexpr):
    """(chunk index in its sequence, first token of the sequence, its length, flat chunk index)
    of the program with grid index ``i_t`` along the chunks (dense: of sequence ``i_b``)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
        i_ch = tl.load(chunk_offsets + i_n).to(tl.int64) + i_t
    else:
        bos = i_b.to(tl.int64) * T
        i_ch = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
    return i_t, bos, T, i_ch


@triton.jit
def sequence_of_program(i_n, T, cu_seqlens, chunk_offsets, BT: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    """(first token, length, first flat chunk) of sequence ``i_n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, T, c0


@triton.jit
def key_tile(q, k, b, g_cum, o_k, m_t, r_t, last, H: tl.constexpr, K: tl.constexpr):
    """One chunk's key tile ``o_k`` (rows ``r_t``, valid where ``m_t``; pointers already at the
    program's sequence and head): ``(m_k, m_tk, p, G, k, b, q, G_last)`` with the cumulative
    log-decay G and its value at the chunk's ``last`` token, k, b, q in fp32."""
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p = r_t[:, None] * (H * K) + o_k[None, :]
    b_G = tl.load(g_cum + p, mask=m_tk, other=0.)
    b_k = tl.load(k + p, mask=m_tk, other=0.).to(tl.float32)
    b_b = tl.load(b + p, mask=m_tk, other=0.).to(tl.float32)
    b_q = tl.load(q + p, mask=m_tk, other=0.).to(tl.float32)
    b_Gl = tl.load(g_cum + last.to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
    return m_k, m_tk, p, b_G, b_k, b_b, b_q, b_Gl


# Largest finite float32: g >= -FLT_MAX is False for -inf and NaN.
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def valid_log_decay(b_g):
    """True where a log-decay entry is finite and <= 0 (False for NaN, +-Inf and g > 0)."""
    return (b_g <= 0.) & (b_g >= -FLT_MAX)


@triton.jit
def poison_chunk(g_cum, g_err, r_t, m_t, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr):
    """A chunk whose g failed the check: its whole cumulative log-decay becomes NaN (every later
    product of the chunk and the state it hands on is NaN) and the error flag is set."""
    tl.debug_barrier()  # after the chunk's own G stores, which other threads may have made
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_k = r_t[:, None] * (H * K) + o_k[None, :]
        tl.store(g_cum + p_k, tl.full([BT, BK], float("nan"), tl.float32), mask=m_tk)
    tl.store(g_err, 1)
