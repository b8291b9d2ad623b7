"""Token-by-token forward for decoding and short prompts (MATH.md "Recurrence").

For each sequence and head, with the state S ``[K, V]`` held in fp32 registers, token by token:

    [q_t, k_t <- q_t / ||q_t||, k_t / ||k_t||]      (USE_QK_L2NORM: eps as in kernels/l2norm.py)
    S   <- Diag(exp(g_t)) S                         (CHECK_G: a NaN, Inf or positive g_t makes
                                                     g_t NaN, so S and o are NaN from token t
                                                     on, and sets the error flag; _gate_check)
    r_t  = S^T (b_t (.) k_t)
    S   <- S + k_t (w_t (.) v_t - r_t)^T
    o_t  = S^T (scale * q_t)                        -> o   [B, T, H, V] (dtype of v)

and finally ``ht = S`` ``[N, H, K, V]`` fp32 (STORE_HT). The state entering each sequence is
``h0`` ``[N, H, K, V]`` fp32 (USE_H0) or zero. Varlen (IS_VARLEN): B == 1 and sequence n owns rows
``cu_seqlens[n] : cu_seqlens[n+1]``.

Grid: ``(V / BV, N * H)``; each program owns a ``[K, BV]`` slice of one head's state for the
whole sequence, so nothing crosses programs. ``K`` is held whole, padded to a power of two
(``KP``): the erase read-out ``r_t`` and the L2 norms reduce over K inside the program. The only
tile is ``BV``: small tiles give more programs (batch 1 decode has only N * H of them per tile),
large ones fewer loads of the K-vectors per byte of state; the launcher narrows the tuned
``BV`` when N * H programs would cover less than half the SMs (``_parallel.serial_launch``).
A decode step (T = 1) is bound by the state traffic, ``2 * N * H * K * V * 4`` bytes;
everything else is a few KB.

This kernel has no backward: training and prefill use ``chunk_gdn2``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gdn2_kernels import _launch, _parallel
from gdn2_kernels.kernels import _prologue
from gdn2_kernels.kernels.l2norm import L2NORM_EPS

if TYPE_CHECKING:
    from gdn2_kernels.configs import KernelConfig


@triton.jit
def _recurrent_fwd_kernel(
    q,
    k,
    v,
    g,
    b,
    w,
    h0,
    o,
    ht,
    g_err,
    cu_seqlens,
    scale,
    eps,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    KP: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    CHECK_G: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    tl.static_assert(KP >= K, "KP must cover K")
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T

    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_S = (i_nh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]                 # [KP, BV]
    m_S = m_k[:, None] & m_v[None, :]

    b_S = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + p_S, mask=m_S, other=0.)

    # Row (bos + t, i_h) of a [B, T, H, D] tensor starts at ((bos + t) * H + i_h) * D.
    p_qk = q + (bos * H + i_h) * K + o_k
    p_kk = k + (bos * H + i_h) * K + o_k
    p_gk = g + (bos * H + i_h) * K + o_k
    p_bk = b + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_w = w + (bos * H + i_h) * V + o_v
    p_o = o + (bos * H + i_h) * V + o_v
    m_bad = o_k < 0                                    # [KP] channels that ever had a bad g
    for _ in range(T):
        b_q = tl.load(p_qk, mask=m_k, other=0.).to(tl.float32)                     # [KP]
        b_k = tl.load(p_kk, mask=m_k, other=0.).to(tl.float32)
        b_g = tl.load(p_gk, mask=m_k, other=0.).to(tl.float32)
        b_b = tl.load(p_bk, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.).to(tl.float32)                      # [BV]
        b_w = tl.load(p_w, mask=m_v, other=0.).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + eps)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + eps)

        if CHECK_G:
            m_g = _prologue.valid_log_decay(b_g) | ~m_k
            m_bad |= ~m_g
            b_g = tl.where(m_g, b_g, float("nan"))
        b_S = b_S * tl.exp(b_g)[:, None]
        b_r = tl.sum(b_S * (b_b * b_k)[:, None], axis=0)                           # [BV]
        b_S = b_S + b_k[:, None] * (b_w * b_v - b_r)[None, :]
        b_o = tl.sum(b_S * (b_q * scale)[:, None], axis=0)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_v)

        p_qk += H * K
        p_kk += H * K
        p_gk += H * K
        p_bk += H * K
        p_v += H * V
        p_w += H * V
        p_o += H * V

    if STORE_HT:
        tl.store(ht + p_S, b_S, mask=m_S)
    if CHECK_G:
        if tl.max(m_bad.to(tl.int32), 0) > 0:
            tl.store(g_err, 1)


def recurrent_fwd_grid(N: int, H: int, V: int, BV: int) -> tuple[int, int]:
    return (triton.cdiv(V, BV), N * H)


def recurrent_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    cu_seqlens: torch.Tensor | None,
    config: "KernelConfig",
    g_err: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the token recurrence on contiguous inputs. Returns ``(o, ht or None)``.

    ``g_err`` (int32[1], optional) turns on the in-kernel check of g (``_gate_check``).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    BV, launch_options = _parallel.serial_launch(config, N * H, V, v.device)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    ht = (torch.empty(N, H, K, V, dtype=torch.float32, device=v.device) if output_final_state
          else None)
    _launch.launch(_recurrent_fwd_kernel, recurrent_fwd_grid(N, H, V, BV),
        q=q, k=k, v=v, g=g, b=b, w=w, h0=initial_state,
        o=o, ht=ht, g_err=g_err,
        cu_seqlens=cu_seqlens,
        scale=scale, eps=L2NORM_EPS, T=T,
        H=H, K=K, V=V,
        BV=BV, KP=triton.next_power_of_2(K),
        USE_H0=initial_state is not None,
        STORE_HT=output_final_state,
        USE_QK_L2NORM=use_qk_l2norm,
        CHECK_G=g_err is not None,
        IS_VARLEN=cu_seqlens is not None,
        **launch_options,
    )
    return o, ht
