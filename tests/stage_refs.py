"""Stage references for the backward kernels: autograd through the chunkwise math, in float64.

``reference.chunk_stages_fwd`` gives the forward intermediates (g_cum, A, A_qk, Y, U and the
states h entering every chunk). From them:

* :func:`state_bwd_reference` is autograd through the inter-chunk state recurrence alone
  (R = U - Y S, O = Q_gamma S + A_qk R, S' = Diag(gamma_C) S + K_tail^T R; docs/math.md "Chunkwise
  form"), with U and every state as leaves: dR = dL/dU, dh = dL/dS' per chunk, dh0 = dL/dS_0.
  These are exactly ``state_bwd``'s outputs.
* :func:`intra_bwd_reference` is, per chunk, autograd through the reference's one-chunk forward
  (``reference._chunk_forward``) with the state entering the chunk held fixed and the upstream
  gradients (dO, dh) given: the local VJP for q, k, v, g, b, w that ``intra_bwd`` computes.

Summed over chunks the two give the full gradients (checked against the token recurrence in
``tests/kernels/test_intra_bwd.py``), so each kernel is tested in isolation against pieces that
compose to the ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdn2_kernels import reference

Tensor = torch.Tensor


def sequences(T: int, B: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of every sequence (FLA varlen layout)."""
    if cu_seqlens is None:
        return [(i, 0, T) for i in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def chunks(T: int, B: int, cu_seqlens: Tensor | None, C: int) -> list[tuple[int, int, int, int]]:
    """(flat chunk index, batch index, start, end) of every chunk, in the kernels' chunk order."""
    out, i_ch = [], 0
    for i_b, bos, eos in sequences(T, B, cu_seqlens):
        for s in range(bos, eos, C):
            out.append((i_ch, i_b, s, min(s + C, eos)))
            i_ch += 1
    return out


@dataclass
class StateBwdRef:
    R: Tensor    # [B, T, H, V]
    dR: Tensor   # [B, T, H, V]
    dh: Tensor   # [NT_total, H, K, V]: gradient of the state leaving each chunk
    dh0: Tensor  # [N, H, K, V]


def state_bwd_reference(Qg: Tensor, Kt: Tensor, gC: Tensor, Y: Tensor, U: Tensor, A_qk: Tensor,
                        h0: Tensor | None, do: Tensor, dht: Tensor | None, chunk_size: int,
                        cu_seqlens: Tensor | None = None) -> StateBwdRef:
    """Autograd through the chunk-state recurrence, from the kernel's own (rounded) inputs.

    Qg = Q_gamma (scale included) and Kt = K_tail ``[B, T, H, K]``, gC = gamma_C
    ``[NT_total, H, K]``, in the layouts ``intra_fwd`` writes.
    """
    dt = torch.float64
    Qg, Kt, gC, Y, A_qk, do = (x.detach().to(dt) for x in (Qg, Kt, gC, Y, A_qk, do))
    U = U.detach().to(dt).requires_grad_()
    B, T, H, K = Y.shape
    V = U.shape[-1]
    R_all = torch.zeros(B, T, H, V, dtype=dt)
    loss = torch.zeros((), dtype=dt)
    leaves_h0, leaves_out = [], []   # per sequence; per chunk (state leaving it)
    i_ch = 0
    for n, (i_b, bos, eos) in enumerate(sequences(T, B, cu_seqlens)):
        S = (h0[n].detach().to(dt).clone() if h0 is not None
             else torch.zeros(H, K, V, dtype=dt)).requires_grad_()
        leaves_h0.append(S)
        for s in range(bos, eos, chunk_size):
            e = min(s + chunk_size, eos)
            m = e - s
            R = U[i_b, s:e] - torch.einsum("rhk,hkv->rhv", Y[i_b, s:e], S)
            Aqk = A_qk[i_b, s:e, :, :m].permute(1, 0, 2)                 # [H, m, m]
            O = (torch.einsum("rhk,hkv->rhv", Qg[i_b, s:e], S)
                 + torch.einsum("hrs,shv->rhv", Aqk, R))
            S = S * gC[i_ch][..., None] + torch.einsum("rhk,rhv->hkv", Kt[i_b, s:e], R)
            S.retain_grad()
            i_ch += 1
            leaves_out.append(S)
            R_all[i_b, s:e] = R.detach()
            loss = loss + (O * do[i_b, s:e]).sum()
        if dht is not None:
            loss = loss + (S * dht[n].detach().to(dt)).sum()
    loss.backward()
    zeros = torch.zeros(H, K, V, dtype=dt)
    dh = torch.stack([S.grad if S.grad is not None else zeros for S in leaves_out]) \
        if leaves_out else torch.zeros(0, H, K, V, dtype=dt)
    dh0 = torch.stack([S.grad if S.grad is not None else zeros for S in leaves_h0])
    return StateBwdRef(R_all, U.grad, dh, dh0)


def intra_bwd_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, b: Tensor, w: Tensor,
                        h: Tensor, dh: Tensor, do: Tensor, scale: float, chunk_size: int,
                        cu_seqlens: Tensor | None = None) -> dict[str, Tensor]:
    """Per-chunk VJP of the one-chunk forward with the entering state ``h`` fixed.

    ``g`` is the per-token log-decay (the chunk forward does its own cumsum), ``h`` the state
    entering each chunk and ``dh`` the gradient of the state leaving it. Returns float64
    dq, dk, dv, dg, db, dw in ``[B, T, H, D]``.
    """
    dt = torch.float64
    xs = {n: x.detach().to(dt) for n, x in dict(q=q, k=k, v=v, g=g, b=b, w=w).items()}
    grads = {n: torch.zeros_like(x) for n, x in xs.items()}
    B, T = k.shape[:2]
    for i_ch, i_b, s, e in chunks(T, B, cu_seqlens, chunk_size):
        leaf = {n: x[i_b, s:e].clone().requires_grad_() for n, x in xs.items()}
        # (G, A, A_qk, Y, U, O, S_out, ...): O and the state leaving the chunk are what we need.
        pieces = reference._chunk_forward(
            leaf["q"] * scale, leaf["k"], leaf["v"], leaf["g"], leaf["b"], leaf["w"],
            h[i_ch].detach().to(dt), chunk_size)
        O, S_out = pieces[5], pieces[6]
        loss = (O * do[i_b, s:e].to(dt)).sum() + (S_out * dh[i_ch].detach().to(dt)).sum()
        loss.backward()
        for n in xs:
            grads[n][i_b, s:e] = leaf[n].grad
    return {"d" + n: grads[n] for n in xs}


__all__ = ["StateBwdRef", "chunks", "intra_bwd_reference", "sequences", "state_bwd_reference"]
