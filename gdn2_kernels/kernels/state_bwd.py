"""Reverse inter-chunk state pass (docs/math.md "Backward", state and output paths).

The forward per chunk, with S the state entering it, is R = U - Y S, O = Q_gamma S + A_qk R and
S' = Diag(gamma_C) S + K_tail^T R. Walking the chunks backwards with dS' = dL/dS' (``dht`` for
the last chunk, fp32 on chip):

    dR  = A_qk^T dO + K_tail dS'                                   -> dR [B, T, H, V]
    dS  = Q_gamma^T dO + Diag(gamma_C) dS' - Y^T dR                (becomes dS' of the chunk before)

and it stores what the parallel intra-chunk backward needs: dR and dS' of every chunk -> dh
``[NT_total, H, K, V]``. After the first chunk, dS is the gradient of the initial state -> dh0
``[N, H, K, V]`` fp32. The residuals R are not formed here: the forward state pass writes them
(``state_fwd(store_r=True)``, in the backward's recomputation of h), so the serial loop reads no
state h and does one product less per chunk. ``OPERANDS`` (a tunable) chooses whether Q_gamma,
K_tail and gamma_C are read from the forward (``loaded``: no exponentials in the loop) or formed
from q, k and g_cum (``formed``).

Grid: ``(V / BV, N * H)``; each program owns a ``[K, BV]`` slice of one head's state gradient and
walks that sequence's chunks from last to first. K is held whole (padded to ``KP``). Transposed
products use loaded operands only (never a transposed mma accumulator: see the sm90 rule in
configs.py). With few sequences x heads the launcher narrows ``BV`` so the programs cover half
the SMs (``_parallel.serial_launch``; same results, more parallelism), and with ``SCAN="segmented"``
(a tunable) it runs a two-level scan over segments when that is still too few
(``state_bwd_segmented``). ``STORE_STATES=False`` keeps only the final dS (no dR, dh) and
``HAS_DO=False`` drops the dO terms: the two homogeneous passes of that scan.
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
def _state_bwd_kernel(
    q,
    k,
    g_cum,
    Qg,
    Kt,
    gC,
    Y,
    A_qk,
    do,
    dht,
    dR,
    dh,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    KP: tl.constexpr,
    LOADED: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    STORE_STATES: tl.constexpr,
    HAS_DO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, c0 = _prologue.sequence_of_program(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    NT = tl.cdiv(T, BT)

    if LOADED:
        Qg += (bos * H + i_h) * K
        Kt += (bos * H + i_h) * K
    else:
        q += (bos * H + i_h) * K
        k += (bos * H + i_h) * K
        g_cum += (bos * H + i_h) * K
    Y += (bos * H + i_h) * K
    if STORE_STATES:
        dR += (bos * H + i_h) * V
    if HAS_DO:
        do += (bos * H + i_h) * V
    A_qk += (bos * H + i_h) * BT

    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    p_S = o_k[:, None] * V + o_v[None, :]
    m_S = m_k[:, None] & m_v[None, :]

    b_dS = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht + (i_n * H + i_h).to(tl.int64) * K * V + p_S, mask=m_S, other=0.)

    for i_r in range(NT):
        i_t = NT - 1 - i_r
        o_t = i_t * BT + o_i
        m_t = o_t < T
        r_t = o_t.to(tl.int64)
        if STORE_STATES:
            tl.store(dh + ((c0 + i_t) * H + i_h) * K * V + p_S, b_dS.to(dh.dtype.element_ty),
                     mask=m_S)

        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_tk = r_t[:, None] * (H * K) + o_k[None, :]
        p_tv = r_t[:, None] * (H * V) + o_v[None, :]
        b_Y = tl.load(Y + p_tk, mask=m_tk, other=0.)                              # [BT, KP]
        dt = b_Y.dtype
        if LOADED:
            b_Kt = tl.load(Kt + p_tk, mask=m_tk, other=0.)
            b_gC = tl.load(gC + ((c0 + i_t) * H + i_h) * K + o_k, mask=m_k, other=0.)
        else:
            b_G = tl.load(g_cum + p_tk, mask=m_tk, other=0.)
            b_k = tl.load(k + p_tk, mask=m_tk, other=0.).to(tl.float32)
            last = tl.minimum(T, i_t * BT + BT) - 1
            b_Gl = tl.load(g_cum + last.to(tl.int64) * (H * K) + o_k, mask=m_k, other=0.)
            b_Kt = tl.where(m_tk, b_k * tl.exp(b_Gl[None, :] - b_G), 0.).to(dt)
            b_gC = tl.exp(b_Gl)
        b_dR = tl.dot(b_Kt, b_dS.to(dt), input_precision=DOT_PRECISION)          # [BT, BV]
        if HAS_DO:
            b_do = tl.load(do + p_tv, mask=m_tv, other=0.)
            b_A = tl.load(A_qk + r_t[:, None] * (H * BT) + o_i[None, :], mask=m_t[:, None],
                          other=0.)
            b_dR = tl.dot(tl.trans(b_A).to(dt), b_do.to(dt), input_precision=DOT_PRECISION) + b_dR
        if STORE_STATES:
            tl.store(dR + p_tv, b_dR.to(dR.dtype.element_ty), mask=m_tv)
        b_dS = b_dS * b_gC[:, None]
        if HAS_DO:
            if LOADED:
                b_Qg = tl.load(Qg + p_tk, mask=m_tk, other=0.)
            else:
                b_q = tl.load(q + p_tk, mask=m_tk, other=0.).to(tl.float32)
                b_Qg = (b_q * tl.exp(b_G) * scale).to(dt)
            b_dS += tl.dot(tl.trans(b_Qg), b_do.to(dt), input_precision=DOT_PRECISION)
        b_dS -= tl.dot(tl.trans(b_Y), b_dR.to(dt), input_precision=DOT_PRECISION)

    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * K * V + p_S, b_dS, mask=m_S)


def state_bwd_grid(N: int, H: int, V: int, BV: int) -> tuple[int, int]:
    return (triton.cdiv(V, BV), N * H)


def state_bwd(
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
    store_dh0: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    config: "KernelConfig",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the reverse state pass. Returns ``(dR, dh, dh0 or None)``.

    ``OPERANDS="loaded"`` reads the forward's Q_gamma, K_tail and gamma_C; ``"formed"`` forms them
    from q, k and g_cum. With ``SCAN="segmented"`` and too few programs to fill the GPU, the pass
    runs as a two-level scan (:func:`state_bwd_segmented`).
    """
    B, T, H, K = k.shape
    V = do.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ops = (q, k, g_cum, Qg, Kt, gC, Y, A_qk)
    seg = _parallel.scan_segments(config, N, H, T, V, cu_seqlens, do.device)
    if seg is not None:
        return state_bwd_segmented(ops, do, dht, scale, store_dh0, config, seg)
    dR = torch.empty(B, T, H, V, dtype=do.dtype, device=do.device)
    dh = torch.empty(gC.shape[0], H, K, V, dtype=Y.dtype, device=do.device)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=do.device) if store_dh0 else None
    _launch_pass(ops, do, dht, dR, dh, dh0, cu_seqlens, chunk_offsets, scale, T, N, V, config)
    return dR, dh, dh0


def _launch_pass(ops, do, dht, dR, dh, dh0, cu_seqlens, chunk_offsets, scale: float, T: int,
                 N: int, V: int, config: "KernelConfig") -> None:
    """One launch of the kernel on ``ops = (q, k, g_cum, Qg, Kt, gC, Y, A_qk)``. ``dR=None``
    skips dR and dh (only the final dS -> dh0); ``do=None`` runs the homogeneous recurrence (no
    output gradient)."""
    q, k, g_cum, Qg, Kt, gC, Y, A_qk = ops
    H, K = k.shape[2], k.shape[3]
    BV, launch_options = _parallel.serial_launch(config, N * H, V, k.device)
    _launch.launch(_state_bwd_kernel, state_bwd_grid(N, H, V, BV),
        q=q, k=k, g_cum=g_cum, Qg=Qg, Kt=Kt, gC=gC, Y=Y, A_qk=A_qk, do=do, dht=dht,
        dR=dR, dh=dh, dh0=dh0,
        cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets,
        scale=scale, T=T,
        H=H, K=K, V=V,
        BT=config["BT"], BV=BV, KP=max(16, triton.next_power_of_2(K)),
        LOADED=config["OPERANDS"] == "loaded",
        USE_DHT=dht is not None,
        STORE_DH0=dh0 is not None,
        STORE_STATES=dR is not None,
        HAS_DO=do is not None,
        IS_VARLEN=cu_seqlens is not None,
        **launch_options,
        DOT_PRECISION=_precision.dot_precision(Y.dtype),
    )


def state_bwd_segmented(ops, do, dht, scale: float, store_dh0: bool, config: "KernelConfig",
                        L: int):
    """The reverse pass as a two-level scan over segments of ``L`` chunks (the mirror of
    ``state_fwd_segmented``; same results up to rounding).

    Walking a chunk backwards is affine in the state gradient, dS = M^T dS' + (Q_gamma^T -
    Y^T A_qk^T) dO, so a segment maps the dS' entering it (from its right) to ``P dS' + Q``:

      1. Q: every segment from dS' = 0 with dO;  P: every segment from dS' = I (K x K) without
         dO; both in parallel over segments (only the final dS is kept);
      2. the gradient entering each segment from its right, right to left: the last segment's
         is ``dht``, then dS'_s = P_(s+1) dS'_(s+1) + Q_(s+1);
      3. every segment again from its dS': dR, dh, and dh0 from each sequence's first segment.
    """
    q, k, g_cum, Qg, Kt, gC, Y, A_qk = ops
    B, T, H, K = k.shape
    V = do.shape[-1]
    dev = do.device
    cu, firsts, S = _segments.segments(B, T, config["BT"], L, dev)
    q, k, g_cum, Qg, Kt, Y, A_qk, do = _segments.as_one_sequence(B, T, q, k, g_cum, Qg, Kt, Y,
                                                                 A_qk, do)
    ops = (q, k, g_cum, Qg, Kt, gC, Y, A_qk)
    n_seg = B * S

    def end_states(start, out):  # Q from dS' = 0 with dO; P from dS' = I without dO (final dS)
        _launch_pass(ops, do if start is None else None, start, None, None, out, cu, firsts,
                     scale, B * T, n_seg, out.shape[-1], config)

    entering = _segments.entering_states(end_states, dht, (B, S, H, K, V), True, dev)

    # Step 3: the serial pass over the segments as packed sequences, from their entering dS'.
    dR, dh, dh0_seg = state_bwd(*ops, do, entering, scale, store_dh0, cu, firsts, config)
    dh0 = dh0_seg.view(B, S, H, K, V)[:, 0].contiguous() if store_dh0 else None
    return dR.view(B, T, H, V), dh, dh0


def state_bwd_start_gradients(q, k, g_cum, Qg, Kt, gC, Y, A_qk, do, dht, scale: float, cu_seqlens,
                              chunk_offsets, config: "KernelConfig") -> torch.Tensor:
    """Only the gradient of the state entering each sequence, ``[N, H, K, D]`` fp32, from ``dht``
    ``[N, H, K, D]`` at its end (None: zeros): one launch, no dR, dh.

    With ``do`` (D = V) this is the reverse pass itself. With ``do=None`` it is the homogeneous
    one, dS = M_c^T dS' per chunk, so from identities (D = K) the result is the product of the
    transposed chunk transitions, first chunk leftmost: the transpose of what
    ``state_fwd_end_states`` gives with ``U=None``.
    """
    B, T, H, K = k.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    D = do.shape[-1] if do is not None else dht.shape[-1]
    dh0 = torch.empty(N, H, K, D, dtype=torch.float32, device=k.device)
    _launch_pass((q, k, g_cum, Qg, Kt, gC, Y, A_qk), do, dht, None, None, dh0, cu_seqlens,
                 chunk_offsets, scale, T, N, D, config)
    return dh0
