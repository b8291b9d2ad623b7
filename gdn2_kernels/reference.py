"""PyTorch references for the Gated Delta Rule-2 (docs/math.md).

* :func:`naive_recurrent_gdn2` is the token recurrence of docs/math.md "Recurrence", the ground
  truth every kernel is tested against (run it on float64 inputs for tests).
* :func:`naive_chunk_gdn2` is an independent implementation of docs/math.md "Chunkwise form"; its
  per-stage outputs (:func:`chunk_stages_fwd`) are laid out like the kernels' intermediates so
  each kernel stage is tested on its own.
* :func:`naive_recurrent_kda` and :func:`naive_recurrent_gdn` are separately written recurrences of
  the two special cases (scalar write strength; also scalar decay), used to check that tied gates
  reproduce them.

* :func:`naive_gate` is the in-kernel gate activation (``use_gate_in_kernel``).

All functions take FLA's layout: tensors ``[B, T, H, D]``, states ``[N, H, K, V]``, varlen as
``B == 1`` plus ``cu_seqlens``; v, w, g, b may have HV = G * H heads (grouped value heads: q and
k are repeated G times, value head j reads key head j // G). They are differentiable with autograd (no in-place updates of
tensors that need grad), which the gradient tests use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _sequences(T: int, B: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(i, 0, T) for i in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Row-wise L2 normalisation over the last axis, as FLA's ``l2norm`` (x / sqrt(sum x^2 + eps))."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def naive_gate(g: Tensor, A_log: Tensor | None = None, dt_bias: Tensor | None = None,
               lower_bound: float | None = None) -> Tensor:
    """The in-kernel gate (``use_gate_in_kernel``): the log-decay from the raw gate input.

    With x = g + dt_bias (``dt_bias`` ``[HV * K]``, one per head and key channel; ``A_log``
    ``[HV]``, one per head; g ``[..., HV, K]``), as fla-core 0.6.0's ``naive_kda_gate`` and
    ``naive_kda_lowerbound_gate``:

        lower_bound None:  -exp(A_log) * softplus(x)
        lower_bound set:   lower_bound * sigmoid(exp(A_log) * x)   (sigmoid(x) without A_log)

    Computed in g's dtype promoted with the parameters' (float64 for tests); differentiable.
    """
    HV, K = g.shape[-2:]
    dt = torch.promote_types(g.dtype, torch.float32)
    for p in (A_log, dt_bias):
        if p is not None:
            dt = torch.promote_types(dt, p.dtype)
    x = g.to(dt)
    if dt_bias is not None:
        x = x + dt_bias.to(dt).reshape(HV, K)
    a = A_log.to(dt).reshape(HV, 1).exp() if A_log is not None else None
    if lower_bound is None:
        if a is None:
            raise ValueError("naive_gate: the softplus gate needs A_log")
        return -a * torch.nn.functional.softplus(x)
    return lower_bound * torch.sigmoid(x if a is None else a * x)


def _prepare(q, k, v, g, b, w, scale, use_qk_l2norm):
    dt = _compute_dtype(q, k, v, g, b, w)
    q, k, v, g, b, w = (x.to(dt) for x in (q, k, v, g, b, w))
    G = v.shape[2] // q.shape[2]
    if G > 1:  # grouped value heads: value head j reads key head j // G
        q, k = q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q * scale, k, v, g, b, w, dt


def naive_recurrent_gdn2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    b: Tensor,
    w: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token GDN-2 (docs/math.md "Recurrence").

    Computes in float64 when any input is float64, else float32.

    Returns:
        o: ``[B, T, H, V]`` in the compute dtype.
        final_state: ``[N, H, K, V]`` in the compute dtype, or None.
    """
    q, k, v, g, b, w, dt = _prepare(q, k, v, g, b, w, scale, use_qk_l2norm_in_kernel)
    B, T, H, K = k.shape
    V = v.shape[-1]
    outs, finals = [], []
    for n, (i_b, bos, eos) in enumerate(_sequences(T, B, cu_seqlens)):
        if initial_state is not None:
            S = initial_state[n].to(dt)
        else:
            S = torch.zeros(H, K, V, dtype=dt, device=k.device)
        o_seq = []
        for t in range(bos, eos):
            e_t = b[i_b, t] * k[i_b, t]                              # [H, K]
            z_t = w[i_b, t] * v[i_b, t]                              # [H, V]
            S = S * g[i_b, t].exp()[..., None]                       # Diag(alpha) S
            r_t = torch.einsum("hk,hkv->hv", e_t, S)
            S = S + k[i_b, t][..., None] * (z_t - r_t)[:, None, :]
            o_seq.append(torch.einsum("hk,hkv->hv", q[i_b, t], S))
        outs.append(torch.stack(o_seq, 0) if o_seq else v.new_zeros(0, H, V))
        finals.append(S)
    o = _assemble(outs, B, T, cu_seqlens)
    return o, (torch.stack(finals, 0) if output_final_state else None)


def _assemble(per_seq: list[Tensor], B: int, T: int, cu_seqlens: Tensor | None) -> Tensor:
    if cu_seqlens is None:
        return torch.stack(per_seq, 0)
    return torch.cat(per_seq, 0)[None]


def naive_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Kimi Delta Attention: S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T.

    ``beta`` is ``[B, T, H]``; written independently of the GDN-2 recurrence.
    """
    dt = _compute_dtype(q, k, v, g)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, H, K = k.shape
    S = (initial_state.to(dt) if initial_state is not None
         else torch.zeros(B, H, K, v.shape[-1], dtype=dt, device=k.device))
    outs = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None]
        S = g[:, t].exp()[..., None] * S
        v_new = bt * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + torch.einsum("bhk,bhv->bhkv", kt, v_new)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, 1), (S if output_final_state else None)


def naive_recurrent_gdn(q, k, v, alpha_log, beta, scale=None, initial_state=None, output_final_state=False):
    """Gated DeltaNet: scalar decay per head, S_t = a_t (I - beta_t k k^T) S + beta_t k v^T.

    ``alpha_log`` and ``beta`` are ``[B, T, H]``; written independently of the other recurrences.
    """
    dt = _compute_dtype(q, k, v, alpha_log)
    q, k, v, alpha_log, beta = (x.to(dt) for x in (q, k, v, alpha_log, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, H, K = k.shape
    S = (initial_state.to(dt) if initial_state is not None
         else torch.zeros(B, H, K, v.shape[-1], dtype=dt, device=k.device))
    outs = []
    for t in range(T):
        kt = k[:, t]
        S = alpha_log[:, t, :, None, None].exp() * S
        pred = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + beta[:, t, :, None, None] * torch.einsum("bhk,bhv->bhkv", kt, v[:, t] - pred)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, 1), (S if output_final_state else None)


@dataclass
class ChunkStages:
    """Intermediates of the chunkwise forward, laid out like the kernels' buffers.

    g_cum ``[B,T,H,K]`` (cumulative log-decay inside each chunk); A and A_qk ``[B,T,H,BT]`` (row t
    holds row t's entries of its chunk's C x C matrix, zero above the diagonal); Y ``[B,T,H,K]``;
    U ``[B,T,H,V]``; Qg = scale * exp(G) q and Kt = exp(G_C - G) k ``[B,T,H,K]``; gC = exp(G_C)
    ``[NC_total,H,K]``; h ``[NC_total,H,K,V]`` (state entering each chunk); o ``[B,T,H,V]``;
    final ``[N,H,K,V]``. A_qk includes ``scale``.
    """

    g_cum: Tensor
    A: Tensor
    A_qk: Tensor
    Y: Tensor
    U: Tensor
    Qg: Tensor
    Kt: Tensor
    gC: Tensor
    h: Tensor
    o: Tensor
    final: Tensor


def _pair_decay(G: Tensor) -> Tensor:
    """exp(G_r - G_s) for r >= s, zero above the diagonal; [C, H, K] -> [H, C, C, K].

    Formed from differences so nothing overflows (docs/math.md "Never form gamma^-1 alone").
    """
    diff = G.permute(1, 0, 2)[:, :, None, :] - G.permute(1, 0, 2)[:, None, :, :]
    C = G.shape[0]
    lower = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
    return torch.where(lower[None, :, :, None], diff, torch.full_like(diff, -torch.inf)).exp()


def _chunk_forward(q, k, v, g, b, w, S0, C):
    """One chunk of docs/math.md "Chunkwise form" (rows of one sequence, all heads). Returns the
    pieces."""
    n, H, K = k.shape
    G = g.cumsum(0)                                                  # [n, H, K]
    decay = _pair_decay(G)                                           # [H, n, n, K]
    E = b * k                                                        # erase direction before decay
    strict = torch.ones(n, n, dtype=torch.bool, device=k.device).tril(-1)
    Tm = torch.einsum("rhc,shc,hrsc->hrs", E, k, decay) * strict     # T = strict_lower(E_bar K_bar^T)
    I = torch.eye(n, dtype=k.dtype, device=k.device)
    A = torch.linalg.solve_triangular(I + Tm, I.expand(H, n, n), upper=False, unitriangular=True)
    E_bar = E * G.exp()                                              # gamma (.) B (.) K
    Y = torch.einsum("hrs,shk->rhk", A, E_bar)
    U = torch.einsum("hrs,shv->rhv", A, w * v)
    R = U - torch.einsum("rhk,hkv->rhv", Y, S0)
    A_qk = torch.einsum("rhc,shc,hrsc->hrs", q, k, decay)            # includes r == s
    O = torch.einsum("rhk,hkv->rhv", q * G.exp(), S0) + torch.einsum("hrs,shv->rhv", A_qk, R)
    G_last = G[-1]                                                   # [H, K]
    K_tail = k * (G_last[None] - G).exp()
    S = S0 * G_last.exp()[..., None] + torch.einsum("rhk,rhv->hkv", K_tail, R)
    return G, A, A_qk, Y, U, O, S, q * G.exp(), K_tail, G_last.exp()


def chunk_stages_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    b: Tensor,
    w: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
) -> ChunkStages:
    """The chunkwise forward with every intermediate (see :class:`ChunkStages`)."""
    q, k, v, g, b, w, dt = _prepare(q, k, v, g, b, w, scale, use_qk_l2norm_in_kernel)
    B, T, H, K = k.shape
    V, C = v.shape[-1], chunk_size
    g_cum = torch.zeros(B, T, H, K, dtype=dt, device=k.device)
    A_all = torch.zeros(B, T, H, C, dtype=dt, device=k.device)
    Aqk_all = torch.zeros_like(A_all)
    Y_all = torch.zeros(B, T, H, K, dtype=dt, device=k.device)
    U_all = torch.zeros(B, T, H, V, dtype=dt, device=k.device)
    o_all = torch.zeros(B, T, H, V, dtype=dt, device=k.device)
    Qg_all, Kt_all = torch.zeros_like(Y_all), torch.zeros_like(Y_all)
    hs, gCs, finals = [], [], []
    for n, (i_b, bos, eos) in enumerate(_sequences(T, B, cu_seqlens)):
        S = (initial_state[n].to(dt) if initial_state is not None
             else torch.zeros(H, K, V, dtype=dt, device=k.device))
        for s in range(bos, eos, C):
            e = min(s + C, eos)
            hs.append(S)
            G, A, A_qk, Y, U, O, S, Qg, Kt, gC = _chunk_forward(
                q[i_b, s:e], k[i_b, s:e], v[i_b, s:e], g[i_b, s:e], b[i_b, s:e], w[i_b, s:e], S, C)
            Qg_all[i_b, s:e], Kt_all[i_b, s:e] = Qg, Kt
            gCs.append(gC)
            m = e - s
            g_cum[i_b, s:e] = G
            A_all[i_b, s:e, :, :m] = A.permute(1, 0, 2)
            Aqk_all[i_b, s:e, :, :m] = A_qk.permute(1, 0, 2)
            Y_all[i_b, s:e], U_all[i_b, s:e], o_all[i_b, s:e] = Y, U, O
        finals.append(S)
    h = torch.stack(hs, 0) if hs else torch.zeros(0, H, K, V, dtype=dt, device=k.device)
    gC_all = torch.stack(gCs, 0) if gCs else torch.zeros(0, H, K, dtype=dt, device=k.device)
    return ChunkStages(g_cum, A_all, Aqk_all, Y_all, U_all, Qg_all, Kt_all, gC_all, h, o_all,
                       torch.stack(finals, 0))


def naive_chunk_gdn2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    b: Tensor,
    w: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise GDN-2 (docs/math.md "Chunkwise form"), independent of the token recurrence.

    Not differentiable through the in-place assembly; use :func:`naive_recurrent_gdn2` for grads.
    """
    st = chunk_stages_fwd(q, k, v, g, b, w, scale, initial_state, chunk_size,
                          use_qk_l2norm_in_kernel, cu_seqlens)
    return st.o, (st.final if output_final_state else None)


__all__ = [
    "ChunkStages",
    "chunk_stages_fwd",
    "l2norm",
    "naive_chunk_gdn2",
    "naive_gate",
    "naive_recurrent_gdn",
    "naive_recurrent_gdn2",
    "naive_recurrent_kda",
]
