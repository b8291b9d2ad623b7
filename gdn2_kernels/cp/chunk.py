"""``chunk_gdn2_cp``: ``chunk_gdn2`` over one packed batch whose token axis is split across ranks.

Per call (docs/context_parallel.md): the ranks agree that their inputs fit together (one small
all-gather, unless ``validate_values=False``); forward = intra-chunk forward -> each rank's
summaries -> all-gather -> each rank's true entering states -> the ordinary state pass and
output; backward = the gradient summaries -> all-gather -> each rank's leaving gradients -> the
ordinary backward once. The steps live in ``steps.py``, the collectives in ``comm.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from gdn2_kernels import _device, _gate_check, dispatch, pipeline
from gdn2_kernels.checks import check_inputs
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.cp import checks, comm, steps
from gdn2_kernels.cp.context import CPContext
from gdn2_kernels.kernels import _gate
from gdn2_kernels.kernels.chunk_fwd import FwdResult
from gdn2_kernels.pipeline import GDN2Options


class _ChunkGDN2CPFunction(torch.autograd.Function):

    @staticmethod
    def forward(actx, q, k, v, g, b, w, initial_state, cp: CPContext, opts: GDN2Options):
        V = v.shape[-1]
        with _device.guard(q):
            pipe = dispatch.resolve(ProblemKey.of(q, v))
            layout = steps.local_layout(cp, pipe.chunk_size, q.device)
            x = steps.prepare(q, k, v, g, b, w, opts, pipe, layout)
            mine = steps.summarize_forward(x, initial_state, cp, pipe)
            steps.finish_forward(x, initial_state, comm.all_gather(mine, cp.group), cp, opts,
                                 pipe)
        f = x.fwd
        actx.save_for_backward(x.q, x.k, x.v, x.b, x.w, x.q_rstd, x.k_rstd, f.g_cum, f.A, f.A_qk,
                               f.Y, f.U, f.Qg, f.Kt, f.gC, f.h, f.R, x.h0,
                               steps.own_maps(mine, cp, V))
        actx.cp, actx.opts, actx.pipe, actx.layout = cp, opts, pipe, layout
        actx.g_dtype = g.dtype
        actx.need_dh0 = initial_state is not None and actx.needs_input_grad[6]
        return f.o, f.ht

    @staticmethod
    def backward(actx, do, dht):
        (q, k, v, b, w, q_rstd, k_rstd, g_cum, A, A_qk, Y, U, Qg, Kt, gC, h, R, h0,
         maps) = actx.saved_tensors
        cp, opts, pipe, layout = actx.cp, actx.opts, actx.pipe, actx.layout
        fwd = FwdResult(None, None, g_cum, A, A_qk, Y, U, Qg, Kt, gC, h, R, layout.chunk_indices,
                        layout.chunk_offsets)
        x = steps.Local(q, k, v, b, w, q_rstd, k_rstd, fwd, layout, h0)
        with _device.guard(q):
            do = do.contiguous()
            dht = dht.contiguous() if dht is not None else None
            mine = steps.summarize_backward(x, maps, do, dht, cp, opts, pipe)
            dq, dk, grads = steps.finish_backward(x, do, dht, comm.all_gather(mine, cp.group), cp,
                                                  opts, pipe, actx.need_dh0)
        return (dq.to(q.dtype), dk.to(k.dtype), grads.dv, grads.dg.to(actx.g_dtype),
                grads.db.to(b.dtype), grads.dw, grads.dh0, None, None)


def _local_call(q, k, v, g, b, w, scale, initial_state, output_final_state,
                use_qk_l2norm_in_kernel, cu_seqlens, disable_recompute, validate_values):
    """FLA's "CP disabled" context (its group None): ``chunk_gdn2`` on the local slice."""
    fn = "chunk_gdn2"
    check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens, fn=fn)
    validate_values = _gate_check.mode(validate_values)
    opts = dataclasses.replace(
        GDN2Options.of_call(q, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                            cu_seqlens is not None, disable_recompute),
        check_g=validate_values is not False)
    return pipeline.run(q, k, v, g, b, w, initial_state, cu_seqlens, None, opts, _gate.NO_GATE,
                        validate_values, fn)


def _is_fla_context(obj: Any) -> bool:
    return all(hasattr(obj, name) for name in ("group", "cu_seqlens", "pre_num_ranks"))


def _resolve(cp_context: Any) -> tuple[Any, int, int, CPContext | None, str | None]:
    """``(group, rank, world_size, our context or None, problem or None)``. Raises at once only
    where no collective could run (not a context, no process group, not a member)."""
    if not isinstance(cp_context, CPContext) and not _is_fla_context(cp_context):
        raise TypeError("chunk_gdn2_cp: cp_context must be a gdn2_kernels.cp.CPContext (see "
                        "build_cp_context) or FLA's FLACPContext, got "
                        f"{type(cp_context).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("chunk_gdn2_cp: torch.distributed is not initialised; call "
                           "dist.init_process_group (torchrun sets up its environment) first")
    group = cp_context.group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("chunk_gdn2_cp: this process is not a member of cp_context.group; call "
                         "the op only on the ranks of the group")
    try:
        ctx = (cp_context if isinstance(cp_context, CPContext)
               else CPContext.from_fla(cp_context, rank, world))
    except ValueError as exc:
        return group, rank, world, None, str(exc)
    if (ctx.rank, ctx.world_size) != (rank, world):
        return group, rank, world, ctx, (
            f"cp_context was built for rank {ctx.rank} of {ctx.world_size} ranks, but its group "
            f"makes this process rank {rank} of {world}; build the context with the process "
            "group it runs with")
    return group, rank, world, ctx, None


def _agree(group, world: int, ctx: CPContext | None, problem: str | None, q, v) -> None:
    """Raise the same ValueError on every rank when any rank's input is bad or the ranks' inputs
    do not fit together."""
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    errors, metas = comm.agree(group, problem, checks.meta(q, v, ctx, problem is not None),
                               device)
    failing = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failing:
        raise ValueError("chunk_gdn2_cp: bad input on " + "; ".join(failing))
    mismatch = checks.cross_rank_problem(metas, world)
    if mismatch is not None:
        raise ValueError(f"chunk_gdn2_cp: {mismatch}")


def chunk_gdn2_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    disable_recompute: bool = False,
    validate_values: bool = True,
    *,
    cp_context: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context-parallel :func:`~gdn2_kernels.chunk_gdn2`: called on every rank of
    ``cp_context.group`` with that rank's slice of the packed token axis; together the ranks
    compute what ``chunk_gdn2`` computes on the whole batch (docs/context_parallel.md).

    Args:
        q, k, v, g, b, w: this rank's slice, ``[1, T_local, H, D]`` as in ``chunk_gdn2``
            (``ctx.local_slice(x)`` of the global tensors); same H, K, V and dtype on every rank.
        scale, use_qk_l2norm_in_kernel, disable_recompute: as in ``chunk_gdn2``.
        initial_state: ``[N_local, H, K, V]`` float32, one state per local sequence (the
            context's local boundaries): the state entering each sequence that starts on this
            rank. Rows of local sequences that continue a sequence from an earlier rank must be
            zero (that rank hands over their state; their gradient is zero). Default zeros.
        output_final_state: also return ``[N_local, H, K, V]`` float32, the state after each
            local sequence: a sequence's final state where it ends on this rank
            (``ctx.final_rows()``), else the state handed to the next rank. Default False.
        cu_seqlens: None, or the context's local boundaries (they come from the context).
        validate_values: check g's values and, through one small all-gather, that every rank's
            input is valid and that the ranks' inputs fit together, raising the same error on
            every rank. Default True. With False, a rank with bad input raises alone and the
            others wait in the next collective until the process group's timeout.
        cp_context: a :class:`~gdn2_kernels.cp.CPContext` (:func:`build_cp_context`), or FLA's
            ``FLACPContext`` as is (with its ``group`` None, FLA's "CP disabled": this is
            ``chunk_gdn2`` on the local slice with the context's boundaries).

    Returns:
        o: ``[1, T_local, H, V]`` in q's dtype; final_state as described, or None.

    Raises:
        TypeError: cp_context is neither context type.
        RuntimeError: torch.distributed is not initialised.
        ValueError: on every rank, when any rank's input is bad (naming the rank and the
            argument) or the ranks' inputs do not fit together (lengths, shapes, contexts).

    Every rank must call the op and, when training, its backward (each runs one all-gather).
    """
    if _is_fla_context(cp_context) and cp_context.group is None:
        return _local_call(q, k, v, g, b, w, scale, initial_state, output_final_state,
                           use_qk_l2norm_in_kernel, cp_context.cu_seqlens, disable_recompute,
                           validate_values)
    group, rank, world, ctx, problem = _resolve(cp_context)
    if problem is None:
        problem = checks.local_problem(q, k, v, g, b, w, scale, initial_state, cu_seqlens,
                                       validate_values, ctx)
    if validate_values:
        _agree(group, world, ctx, problem, q, v)
    elif problem is not None:
        raise ValueError(f"chunk_gdn2_cp (rank {rank} of {world}): {problem}")
    opts = GDN2Options.of_call(q, scale, initial_state, output_final_state,
                               use_qk_l2norm_in_kernel, True, disable_recompute)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return _ChunkGDN2CPFunction.apply(q, k, v, g, b, w, initial_state, ctx, opts)
