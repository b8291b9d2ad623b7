"""Backward orchestration of ``chunk_gdn2``: launcher calls only, tensors in and out.

Pipeline (docs/math.md "Backward"):

    [state_fwd]  recompute the chunk states h and residuals R (unless the forward kept them:
                 disable_recompute)
    state_bwd    reverse pass over chunks -> dR, dh (per chunk), dh0
    intra_bwd    per chunk -> dq, dk, dv, dg, db, dw (with the in-kernel gate: dg of the raw
                 input and per-chunk partials of dA_log, ddt_bias, summed here)
    [l2norm_bwd] through the in-kernel q/k normalisation (done by the op)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gdn2_kernels import _varlen
from gdn2_kernels.kernels import _gate
from gdn2_kernels.kernels.intra_bwd import intra_bwd
from gdn2_kernels.kernels.state_bwd import state_bwd
from gdn2_kernels.kernels.state_fwd import state_fwd

if TYPE_CHECKING:
    from gdn2_kernels.dispatch import PipelineConfig


@dataclass
class BwdResult:
    dq: torch.Tensor  # grad_dtypes[0]
    dk: torch.Tensor  # grad_dtypes[1]
    dv: torch.Tensor
    dg: torch.Tensor  # fp32
    db: torch.Tensor  # grad_dtypes[2]
    dw: torch.Tensor
    dh0: torch.Tensor | None
    dA_log: torch.Tensor | None = None    # fp32 [H], with the in-kernel gate
    ddt_bias: torch.Tensor | None = None  # fp32 [H * K], with the in-kernel gate and a dt_bias


def chunk_gdn2_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    g_cum: torch.Tensor,
    A: torch.Tensor,
    A_qk: torch.Tensor,
    Y: torch.Tensor,
    U: torch.Tensor,
    Qg: torch.Tensor,
    Kt: torch.Tensor,
    gC: torch.Tensor,
    h: torch.Tensor | None,
    R: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    pipe: "PipelineConfig",
    need_dh0: bool,
    grad_dtypes: tuple[torch.dtype, torch.dtype, torch.dtype] | None = None,
    gate: _gate.GateArgs = _gate.NO_GATE,
) -> BwdResult:
    """Gradients of every input from ``do`` (and ``dht``) and the forward's intermediates;
    dq, dk, db in ``grad_dtypes`` (default fp32), dg fp32.

    With the in-kernel ``gate`` (its ``g_raw`` set), dg is the gradient of the raw gate input,
    and the gradients of A_log and dt_bias come back too."""
    B, T, H, K = k.shape
    BT = pipe.chunk_size
    if h is None or R is None:
        _, _, h, R = state_fwd(Qg, Kt, gC, Y, U, A_qk, initial_state, False, True, cu_seqlens,
                               chunk_offsets, _varlen.num_chunks(T, B, chunk_indices, BT),
                               pipe["state_fwd"], store_o=False, store_r=True)
    dR, dh, dh0 = state_bwd(q, k, g_cum, Qg, Kt, gC, Y, A_qk, do, dht, scale, need_dh0,
                            cu_seqlens, chunk_offsets, pipe["state_bwd"])
    if gate.kind != _gate.GATE_NONE:
        parts = (_varlen.num_chunks(T, B, chunk_indices, BT), H, K)
        def partials(param):
            return (None if param is None
                    else torch.empty(parts, dtype=torch.float32, device=k.device))

        gate = gate._replace(dA_log=partials(gate.A_log), ddt_bias=partials(gate.dt_bias))
    dq, dk, dv, dg, db, dw = intra_bwd(q, k, v, b, w, g_cum, A, h, dh, do, R, dR, scale,
                                       cu_seqlens, chunk_indices, chunk_offsets,
                                       pipe["intra_bwd"], grad_dtypes, gate)
    dA_log, ddt_bias = (_gate.reduce_partials(gate, H, K) if gate.kind != _gate.GATE_NONE
                        else (None, None))
    return BwdResult(dq, dk, dv, dg, db, dw, dh0, dA_log, ddt_bias)
