"""``chunk_gdn2_summary``: a span's end state from zero and its transition, as a standalone op.

The building block of context parallelism (kernels/summary.py has the equations), offered alone
for users who chain spans themselves (their own pipeline or sequence parallelism) and for timing.
"""
from __future__ import annotations

import torch

from gdn2_kernels import _device, _varlen, dispatch
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.kernels.intra_fwd import intra_fwd
from gdn2_kernels.kernels.l2norm import l2norm_fwd
from gdn2_kernels.kernels.summary import span_summary_fwd
from gdn2_kernels.checks import check_rank_inputs


@torch.no_grad()
def chunk_gdn2_summary(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    output_transition: bool = True,
    validate_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summary of each sequence (span) as an affine map of the state entering it:
    ``S_end = M^T S_start + H`` (docs/context_parallel.md), so that ``chunk_gdn2``'s final
    state from any initial state S0 is ``M^T S0 + H``. Not differentiable.

    Args:
        k, v, g, b, w: as in :func:`~gdn2_kernels.chunk_gdn2` (no q: the output is not formed).
        initial_state: ``[N, H, K, V]`` float32; H is then the end state from it. Default zeros.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (needs B == 1), as in chunk_gdn2.
        use_qk_l2norm_in_kernel: L2-normalise k first, as chunk_gdn2 does with this flag.
        output_transition: also compute M (one more state pass with K columns). Default True.
        validate_values: check g for NaN/Inf/positive entries (one device sync). Default True.

    Returns:
        H: ``[N, H, K, V]`` float32, the state after each sequence.
        M: ``[N, H, K, K]`` float32 (M^T is the product of the chunk transitions, the last chunk
        leftmost; cuDNN's stored-domain ``M_buf``), or None without ``output_transition``.

    Raises:
        TypeError / ValueError as chunk_gdn2 for bad shapes, dtypes, devices or boundaries.
    """
    check_rank_inputs(k, k, v, g, b, w, None, initial_state, cu_seqlens, validate_values)
    k, v, g, b, w = (x.contiguous() for x in (k, v, g, b, w))
    with _device.guard(k):
        pipe = dispatch.resolve(ProblemKey.of(k, v))
        if use_qk_l2norm_in_kernel:
            k, _ = l2norm_fwd(k, pipe["l2norm_fwd"])
        idx = offs = None
        if cu_seqlens is not None:
            idx = _varlen.chunk_indices(cu_seqlens, pipe.chunk_size)
            offs = _varlen.chunk_offsets(cu_seqlens, pipe.chunk_size)
        # k stands in for q: the intra-chunk forward also forms q's factors, which go unused.
        _, _, A_qk, Y, U, Qg, Kt, gC = intra_fwd(k, k, v, g.float(), b, w, 1.0, cu_seqlens, idx,
                                                 pipe["intra_fwd"])
        start = initial_state.contiguous() if initial_state is not None else None
        return span_summary_fwd(Qg, Kt, gC, Y, U, A_qk, start, cu_seqlens, offs,
                                pipe["state_fwd"], transition=output_transition)
