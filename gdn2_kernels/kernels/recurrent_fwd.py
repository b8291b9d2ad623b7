"""Token-by-token forward for decoding and short prompts (docs/math.md "Recurrence").

For each sequence and value head, with the state S ``[K, V]`` held in fp32 registers, token by
token:

    [q_t, k_t <- q_t / ||q_t||, k_t / ||k_t||]      (USE_QK_L2NORM: eps as in kernels/l2norm.py)
    [g_t <- gate(g_t)]                              (GATE: the in-kernel activation, _gate.py)
    S   <- Diag(exp(g_t)) S                         (CHECK_G: a NaN, Inf or positive g_t makes
                                                     g_t NaN, so S and o are NaN from token t
                                                     on, and sets the error flag; _gate_check)
    r_t  = S^T (b_t (.) k_t)
    S   <- S + k_t (w_t (.) v_t - r_t)^T
    o_t  = S^T (scale * q_t)                        -> o   [B, T, HV, V] (dtype of ``o``)

and finally ``ht = S`` (STORE_HT). q, k are ``[B, T, H, K]``; v, w ``[B, T, HV, V]`` and g, b
``[B, T, HV, K]`` with HV a multiple of H (grouped value heads: value head j reads key head
j // (HV / H)). The state entering each sequence is ``h0`` (USE_H0) or zero. Varlen (IS_VARLEN):
B == 1 and sequence n owns rows ``cu_seqlens[n] : cu_seqlens[n+1]``.

States are fp32 ``[.., HV, K, V]``, or ``[.., HV, V, K]`` with STATE_V_FIRST (only the addresses
change; the register tile is [K, BV] either way). Where they live:

* POOL = 0: ``h0`` is ``[N, HV, K, V]``.
* POOL = 1: ``h0`` is a state pool ``[slots, HV, K, V]`` (slot stride ``stride_h0``) and
  ``state_indices[n]`` the slot sequence n starts from.
* POOL = 2: ``state_indices`` is ``[N, T_max]``; sequence n starts from slot ``[n, a_n - 1]``
  (``a_n = num_accepted_tokens[n]`` with SPEC, else 1).
``ht`` is ``[N, HV, K, V]`` (it may be ``h0`` itself: in place), or with HT_POOL the pool: the
final state goes back to slot ``[n]`` (POOL = 1), or the state after token t to slot ``[n, t]``
(POOL = 2: speculative decoding keeps every draft position's state).
A negative slot (a padding entry) reads a zero state and is never written. Nothing here depends
on tensor values on the host, so a launch can be captured in a CUDA graph.

Grid: ``(V / BV, N * HV)``; each program owns a ``[K, BV]`` slice of one head's state for the
whole sequence, so nothing crosses programs. ``K`` is held whole, padded to a power of two
(``KP``): the erase read-out ``r_t`` and the L2 norms reduce over K inside the program. The only
tile is ``BV``: small tiles give more programs (batch 1 decode has only N * HV of them per tile),
large ones fewer loads of the K-vectors per byte of state; the launcher narrows the tuned
``BV`` when N * HV programs would cover less than half the SMs (``_parallel.serial_launch``).
A decode step (T = 1) is bound by the state traffic, ``2 * N * HV * K * V * 4`` bytes;
everything else is a few KB.

This kernel has no backward: training and prefill use ``chunk_gdn2``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gdn2_kernels import _launch, _parallel
from gdn2_kernels.kernels import _gate, _prologue
from gdn2_kernels.kernels.l2norm import L2NORM_EPS

if TYPE_CHECKING:
    from gdn2_kernels.configs import KernelConfig


@triton.jit
def _state_offsets(o_k, o_v, K: tl.constexpr, V: tl.constexpr, STATE_V_FIRST: tl.constexpr):
    """Offsets of a ``[KP, BV]`` state tile inside one head's state."""
    if STATE_V_FIRST:
        p = o_v[None, :].to(tl.int64) * K + o_k[:, None]
    else:
        p = o_k[:, None].to(tl.int64) * V + o_v[None, :]
    return p


@triton.jit
def _slot_mask(m_S, o_v, slot):
    """``m_S`` where ``slot`` is a real slot (>= 0); a padding slot masks everything. (The scalar
    is broadcast through an offset vector: Triton's interpreter refuses a scalar-bool mask.)"""
    return m_S & ((o_v * 0 + slot) >= 0)[None, :]


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
    state_indices,
    num_accepted_tokens,
    A_log,
    dt_bias,
    scale,
    eps,
    lower_bound,
    T,
    stride_h0,
    stride_ht,
    stride_idx_seq,
    stride_idx_tok,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    KP: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
    CHECK_G: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    STATE_V_FIRST: tl.constexpr,
    POOL: tl.constexpr,
    HT_POOL: tl.constexpr,
    SPEC: tl.constexpr,
    GATE: tl.constexpr,
    GATE_HAS_A: tl.constexpr,
    GATE_HAS_BIAS: tl.constexpr,
):
    tl.static_assert(KP >= K, "KP must cover K")
    tl.static_assert(HV % H == 0, "HV must be a multiple of H")
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
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
    p_S = i_hv.to(tl.int64) * K * V + _state_offsets(o_k, o_v, K, V, STATE_V_FIRST)  # [KP, BV]
    m_S = m_k[:, None] & m_v[None, :]
    i_idx = i_n.to(tl.int64) * stride_idx_seq           # this sequence's row of state_indices

    b_S = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_H0:
        if POOL == 0:
            b_S += tl.load(h0 + i_n.to(tl.int64) * stride_h0 + p_S, mask=m_S, other=0.)
        else:
            if SPEC:
                i_a = tl.load(num_accepted_tokens + i_n).to(tl.int64) - 1
            else:
                i_a = 0
            slot = tl.load(state_indices + i_idx + i_a * stride_idx_tok).to(tl.int64)
            b_S += tl.load(h0 + slot * stride_h0 + p_S, mask=_slot_mask(m_S, o_v, slot),
                           other=0.)

    # Row (bos + t, head) of a [B, T, heads, D] tensor starts at ((bos + t) * heads + head) * D.
    p_qk = q + (bos * H + i_h) * K + o_k
    p_kk = k + (bos * H + i_h) * K + o_k
    p_gk = g + (bos * HV + i_hv) * K + o_k
    p_bk = b + (bos * HV + i_hv) * K + o_k
    p_v = v + (bos * HV + i_hv) * V + o_v
    p_w = w + (bos * HV + i_hv) * V + o_v
    p_o = o + (bos * HV + i_hv) * V + o_v
    m_bad = o_k < 0                                    # [KP] channels that ever had a bad g
    for i_t in range(T):
        b_q = tl.load(p_qk, mask=m_k, other=0.).to(tl.float32)                     # [KP]
        b_k = tl.load(p_kk, mask=m_k, other=0.).to(tl.float32)
        b_g = tl.load(p_gk, mask=m_k, other=0.).to(tl.float32)
        b_b = tl.load(p_bk, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.).to(tl.float32)                      # [BV]
        b_w = tl.load(p_w, mask=m_v, other=0.).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + eps)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + eps)
        b_g = _gate.activate(b_g, A_log, dt_bias, lower_bound, i_hv, o_k, m_k, K, GATE,
                             GATE_HAS_A, GATE_HAS_BIAS)

        if CHECK_G:
            m_g = _prologue.valid_log_decay(b_g) | ~m_k
            m_bad |= ~m_g
            b_g = tl.where(m_g, b_g, float("nan"))
        b_S = b_S * tl.exp(b_g)[:, None]
        b_r = tl.sum(b_S * (b_b * b_k)[:, None], axis=0)                           # [BV]
        b_S = b_S + b_k[:, None] * (b_w * b_v - b_r)[None, :]
        b_o = tl.sum(b_S * (b_q * scale)[:, None], axis=0)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_v)
        if POOL == 2:
            if HT_POOL:
                slot_t = tl.load(state_indices + i_idx + i_t * stride_idx_tok).to(tl.int64)
                tl.store(ht + slot_t * stride_ht + p_S, b_S, mask=_slot_mask(m_S, o_v, slot_t))

        p_qk += H * K
        p_kk += H * K
        p_gk += HV * K
        p_bk += HV * K
        p_v += HV * V
        p_w += HV * V
        p_o += HV * V

    if STORE_HT:
        if HT_POOL:
            if POOL == 1:
                slot = tl.load(state_indices + i_idx).to(tl.int64)
                tl.store(ht + slot * stride_ht + p_S, b_S, mask=_slot_mask(m_S, o_v, slot))
        else:
            tl.store(ht + i_n.to(tl.int64) * stride_ht + p_S, b_S, mask=m_S)
    if CHECK_G:
        if tl.max(m_bad.to(tl.int32), 0) > 0:
            tl.store(g_err, 1)


def recurrent_fwd_grid(N: int, HV: int, V: int, BV: int) -> tuple[int, int]:
    return (triton.cdiv(V, BV), N * HV)


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
    *,
    gate: _gate.GateArgs = _gate.NO_GATE,
    state_v_first: bool = False,
    out: torch.Tensor | None = None,
    final_state: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    g_err: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the token recurrence on contiguous inputs. Returns ``(o, ht or None)``.

    ``out``: the output buffer ``[B, T, HV, V]`` (allocated in v's dtype when None).
    ``final_state``: where the final state goes when ``output_final_state`` (allocated
    ``[N, HV, K, V]`` fp32 when None; pass ``initial_state`` to update it in place).
    ``state_indices`` (``[N]`` or ``[N, T_max]``, with ``num_accepted_tokens`` ``[N]`` for the
    latter): ``initial_state`` is a state pool indexed by slot, and so is ``final_state`` when
    given (module doc); without ``final_state`` the final states come back as ``[N, HV, K, V]``.
    ``g_err`` (int32[1], optional) turns on the in-kernel check of g (``_gate_check``).
    """
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    BV, launch_options = _parallel.serial_launch(config, N * HV, V, v.device)
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=v.device) if out is None else out
    ht = final_state
    if output_final_state and ht is None:
        shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
        ht = torch.empty(shape, dtype=torch.float32, device=v.device)
    if not output_final_state:
        ht = None
    pool = 0 if state_indices is None else state_indices.ndim
    per_slot = HV * K * V
    _launch.launch(_recurrent_fwd_kernel, recurrent_fwd_grid(N, HV, V, BV),
        q=q, k=k, v=v, g=g, b=b, w=w, h0=initial_state,
        o=o, ht=ht, g_err=g_err,
        cu_seqlens=cu_seqlens, state_indices=state_indices,
        num_accepted_tokens=num_accepted_tokens,
        A_log=gate.A_log, dt_bias=gate.dt_bias,
        scale=scale, eps=L2NORM_EPS, lower_bound=float(gate.lower_bound), T=T,
        stride_h0=initial_state.stride(0) if initial_state is not None else per_slot,
        stride_ht=ht.stride(0) if ht is not None else per_slot,
        stride_idx_seq=state_indices.stride(0) if state_indices is not None else 0,
        stride_idx_tok=state_indices.stride(1) if pool == 2 else 0,
        H=H, HV=HV, K=K, V=V,
        BV=BV, KP=triton.next_power_of_2(K),
        USE_H0=initial_state is not None,
        STORE_HT=ht is not None,
        USE_QK_L2NORM=use_qk_l2norm,
        CHECK_G=g_err is not None,
        IS_VARLEN=cu_seqlens is not None,
        STATE_V_FIRST=state_v_first,
        POOL=pool,
        HT_POOL=pool > 0 and final_state is not None and ht is not None,
        SPEC=num_accepted_tokens is not None,
        GATE=gate.kind, GATE_HAS_A=gate.A_log is not None,
        GATE_HAS_BIAS=gate.dt_bias is not None,
        **launch_options,
    )
    return o, ht
