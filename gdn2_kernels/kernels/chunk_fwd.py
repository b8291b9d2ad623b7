"""Forward orchestration of ``chunk_gdn2``: launcher calls only, tensors in and out.

Pipeline (docs/math.md "Chunkwise form"):

    [l2norm_fwd]  q, k -> normalised q, k                    (optional)
    intra_fwd     q, k, v, g, b, w -> g_cum, A, A_qk, Y, U, Qg, Kt, gC  (per chunk and head;
                  the in-kernel gate, when asked, activates g where it is loaded)
    state_fwd     -> o, ht [, h, R]                           (serial over chunks, parallel over V)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gdn2_kernels import _varlen
from gdn2_kernels.kernels import _gate
from gdn2_kernels.kernels.intra_fwd import intra_fwd
from gdn2_kernels.kernels.state_fwd import state_fwd

if TYPE_CHECKING:
    from gdn2_kernels.dispatch import PipelineConfig


@dataclass
class FwdResult:
    """Outputs of the forward and the intermediates the backward reads."""

    o: torch.Tensor
    ht: torch.Tensor | None
    g_cum: torch.Tensor
    A: torch.Tensor
    A_qk: torch.Tensor
    Y: torch.Tensor
    U: torch.Tensor
    Qg: torch.Tensor
    Kt: torch.Tensor
    gC: torch.Tensor
    h: torch.Tensor | None
    R: torch.Tensor | None
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None


def chunk_gdn2_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    pipe: "PipelineConfig",
    store_h: bool = False,
    store_r: bool = False,
    g_err: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    gate: _gate.GateArgs = _gate.NO_GATE,
) -> FwdResult:
    """Run the forward kernels with the resolved ``pipe`` (its chunk size and the configs of
    'intra_fwd' and 'state_fwd').

    ``store_h`` keeps the chunk states and ``store_r`` the residuals (both for a backward that
    skips their recomputation, ``disable_recompute``); ``g_err`` turns on
    intra_fwd's check of g; ``cu_seqlens_cpu``: a host copy of ``cu_seqlens`` (the chunk indices
    are built from it, with no device-to-host copy); ``gate``: the in-kernel gate (``g`` is then
    the raw gate input)."""
    BT = pipe.chunk_size
    B, T = k.shape[:2]
    idx = offs = None
    if cu_seqlens is not None:
        idx = _varlen.chunk_indices(cu_seqlens, BT, cu_seqlens_cpu)
        offs = _varlen.chunk_offsets(cu_seqlens, BT)
    g_cum, A, A_qk, Y, U, Qg, Kt, gC = intra_fwd(q, k, v, g, b, w, scale, cu_seqlens, idx,
                                                 pipe["intra_fwd"], g_err, gate)
    o, ht, h, R = state_fwd(Qg, Kt, gC, Y, U, A_qk, initial_state, output_final_state, store_h,
                            cu_seqlens, offs, _varlen.num_chunks(T, B, idx, BT),
                            pipe["state_fwd"], store_r=store_r)
    return FwdResult(o, ht, g_cum, A, A_qk, Y, U, Qg, Kt, gC, h, R, idx, offs)
