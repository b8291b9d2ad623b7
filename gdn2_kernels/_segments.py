"""The two-level scan of the state passes (``SCAN="segmented"``): segments and their chaining.

A state pass is a chain of affine chunk steps, x' = M x + c (the state forward, the state
gradient backward). Cutting each sequence into segments of L chunks, a segment maps the x entering
it to ``P x + Q``; the kernels compute every segment's Q (from x = 0) and P (from x = I, with the
inputs that make c zero) in parallel, :func:`chain` finds the x entering every segment, and a last
pass over all segments from those gives the per-chunk results. The segments run through the
kernels' varlen path: :func:`segments` gives their token boundaries and first chunks.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


@functools.lru_cache(maxsize=64)
def segments(B: int, T: int, BT: int, L: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token boundaries ``[B*S + 1]`` and first chunks ``[B*S + 1]`` (int32, as ``cu_seqlens`` and
    ``chunk_offsets``) of the segments of ``L`` chunks (the last one shorter) of B sequences of
    T tokens laid end to end, and S, the segments per sequence."""
    NT = -(-T // BT)
    S = -(-NT // L)
    bounds = [b * T + min(s * L * BT, T) for b in range(B) for s in range(S)] + [B * T]
    firsts = [b * NT + s * L for b in range(B) for s in range(S)] + [B * NT]
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_tensor(bounds), as_tensor(firsts), S


def identity_states(n: int, H: int, K: int, device: torch.device) -> torch.Tensor:
    """``[n, H, K, K]`` fp32 identities: the entering state whose end state is the segment's P."""
    return torch.eye(K, dtype=torch.float32, device=device).expand(n, H, K, K).contiguous()


def chain(P: torch.Tensor, Q: torch.Tensor, first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The x entering each segment, ``[B*S, H, K, V]`` fp32, from the segments' P ``[B*S, H, K, K]``
    and Q ``[B*S, H, K, V]`` and the x entering each sequence's first segment in scan order
    (``first`` ``[B, H, K, V]``); ``reverse`` walks the segments last to first."""
    B = first.shape[0]
    S = Q.shape[0] // B
    H, K, V = Q.shape[1:]
    out = torch.empty(Q.shape, dtype=torch.float32, device=Q.device)
    P, Q, seg_out = (t.view(B, S, *t.shape[1:]) for t in (P, Q, out))
    cur = first.float()
    order = range(S - 1, -1, -1) if reverse else range(S)
    for i, s in enumerate(order):
        seg_out[:, s] = cur
        if i + 1 < S:
            cur = torch.baddbmm(Q[:, s].reshape(B * H, K, V), P[:, s].reshape(B * H, K, K),
                                cur.reshape(B * H, K, V)).view(B, H, K, V)
    return out


def as_one_sequence(B: int, T: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[B, T, ...]`` tensors viewed as one packed sequence ``[1, B*T, ...]`` (for the varlen path
    over :func:`segments`)."""
    return tuple(x.reshape(1, B * T, *x.shape[2:]) for x in xs)


def entering_states(run_pass: Callable[[torch.Tensor | None, torch.Tensor], None],
                    first: torch.Tensor | None, shape: tuple[int, int, int, int, int],
                    reverse: bool, device: torch.device) -> torch.Tensor:
    """Steps 1 and 2 of the two-level scan: the x entering every segment, ``[B*S, H, K, V]``.

    ``run_pass(start, out)`` runs every segment and writes its end state to ``out``: with
    ``start=None`` from x = 0 with the real inputs (-> Q, ``[B*S, H, K, V]``), with ``start`` the
    identities from x = I with the inputs that make c zero (-> P, ``[B*S, H, K, K]``). ``first``
    is the x entering each sequence's first segment in scan order (None: zeros); ``shape`` is
    (B, S, H, K, V).
    """
    B, S, H, K, V = shape
    Q = torch.empty(B * S, H, K, V, dtype=torch.float32, device=device)
    run_pass(None, Q)
    P = torch.empty(B * S, H, K, K, dtype=torch.float32, device=device)
    run_pass(identity_states(B * S, H, K, device), P)
    if first is None:
        first = torch.zeros(B, H, K, V, dtype=torch.float32, device=device)
    return chain(P, Q, first, reverse)
