"""``torch.library`` registration of the ops, so ``torch.compile(..., fullgraph=True)`` traces them.

Three custom ops in the ``gdn2`` namespace, each with a fake (meta) implementation that gives the
output shapes without running anything:

* ``gdn2::chunk_gdn2``: the chunkwise forward (``pipeline.run_forward``, as the eager op), with
  autograd registered through ``gdn2::chunk_gdn2_bwd``.
* ``gdn2::chunk_gdn2_bwd``: the gradients of ``chunk_gdn2``. It delegates to the autograd of
  :func:`gdn2_kernels.ops.chunk_gdn2` by recomputing the forward under ``enable_grad`` and calling
  ``torch.autograd.grad``: one extra forward per backward, in exchange for a single source of
  truth for the backward.
* ``gdn2::fused_recurrent_gdn2``: the decoding forward; its registered backward raises.

Custom ops cannot return None, so an absent final state travels as an empty tensor and the
Python wrappers below turn it back into None. Input checks that read tensor values
(``cu_seqlens`` bounds) run inside the real implementations, where they are opaque to the
compiler; the check of g runs inside the forward kernels (``_gate_check``).

The wrappers :func:`chunk_gdn2` and :func:`fused_recurrent_gdn2` take the same arguments as the
eager ops in :mod:`gdn2_kernels.ops`; ``GatedDeltaNet2`` calls them while compiling.
"""
# No ``from __future__ import annotations``: torch.library reads the annotations at runtime.
import contextlib
from typing import Iterator, Optional

import torch

from gdn2_kernels import _device, _gate_check, checks, ops, pipeline

Tensor = torch.Tensor
# The kernels read contiguous rows; saying so lets Inductor hand over contiguous buffers instead
# of pinning the traced strides (which fails on symbolic strides with dynamic shapes).
_TAGS = (torch.Tag.needs_contiguous_strides,)


# Both forward ops share one schema and one fake: (o, final state or an empty tensor).
_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor b, Tensor w, Tensor? initial_state, "
    "Tensor? cu_seqlens, float scale, bool output_final_state, bool use_qk_l2norm_in_kernel, "
    "bool validate_values) -> (Tensor, Tensor)")


def _fwd_fake(q, k, v, g, b, w, initial_state, cu_seqlens, scale, output_final_state,
              use_qk_l2norm_in_kernel, validate_values):
    if not output_final_state:
        return v.new_empty(v.shape), q.new_empty(0, dtype=torch.float32)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return v.new_empty(v.shape), q.new_empty(N, v.shape[2], q.shape[3], v.shape[3],
                                             dtype=torch.float32)


def _state_or_empty(ht: Optional[Tensor], like: Tensor) -> Tensor:
    return ht if ht is not None else like.new_empty(0, dtype=torch.float32)


def _call_fwd(op, q, k, v, g, b, w, scale, initial_state, output_final_state,
              use_qk_l2norm_in_kernel, cu_seqlens, validate_values):
    if validate_values == "sync":
        raise ValueError("validate_values='sync' (a host sync) is for eager calls; the compiled "
                         "op takes True (the in-kernel check, raised at a later call or at "
                         "gdn2_kernels.check_gates()) or False")
    o, ht = op(q, k, v, g, b, w, initial_state, cu_seqlens,
               float(scale) if scale is not None else q.shape[-1] ** -0.5,
               bool(output_final_state), bool(use_qk_l2norm_in_kernel), bool(validate_values))
    return o, (ht if output_final_state else None)


@contextlib.contextmanager
def _autograd_enabled() -> Iterator[None]:
    """Record autograd graphs inside a custom op's implementation.

    torch.library runs implementations below the Autograd dispatch key (a thread-local exclude
    set), where ``enable_grad`` alone records nothing; lift that exclusion for the block.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(
        torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


# ------------------------------------------------------------------------------------------------
# chunk_gdn2
# ------------------------------------------------------------------------------------------------

def _chunk_gdn2_impl(q, k, v, g, b, w, initial_state, cu_seqlens, scale, output_final_state,
                     use_qk_l2norm_in_kernel, validate_values):
    checks.check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    opts = pipeline.GDN2Options(scale, output_final_state, use_qk_l2norm_in_kernel,
                                initial_state is not None, cu_seqlens is not None,
                                disable_recompute=False, check_g=validate_values)
    with _device.guard(q), _gate_check.checked(q.device, validate_values, "chunk_gdn2"):
        res = pipeline.run_forward(q, k, v, g, b, w,
                                   None if initial_state is None else initial_state.contiguous(),
                                   cu_seqlens, opts, pipeline.resolve(q, v, opts, cu_seqlens)).fwd
    return res.o, _state_or_empty(res.ht, q)


_chunk_gdn2_op = torch.library.custom_op("gdn2::chunk_gdn2", _chunk_gdn2_impl, mutates_args=(),
                                         schema=_FWD_SCHEMA, tags=_TAGS)
_chunk_gdn2_op.register_fake(_fwd_fake)


@torch.library.custom_op("gdn2::chunk_gdn2_bwd", mutates_args=(), tags=_TAGS)
def _chunk_gdn2_bwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    b: Tensor,
    w: Tensor,
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    do: Tensor,
    dht: Optional[Tensor],
    scale: float,
    use_qk_l2norm_in_kernel: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    has_dht = dht is not None and dht.numel() > 0
    with _autograd_enabled():
        leaves = [x.detach().requires_grad_() for x in (q, k, v, g, b, w)]
        h0 = None if initial_state is None else initial_state.detach().requires_grad_()
        o, ht = ops.chunk_gdn2(*leaves, scale=scale, initial_state=h0,
                               output_final_state=has_dht,
                               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                               cu_seqlens=cu_seqlens, validate_values=False)
        outs, grads_out = [o], [do]
        if has_dht:
            outs.append(ht)
            grads_out.append(dht)
        inputs = leaves + ([h0] if h0 is not None else [])
        grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
    grads = [x.new_zeros(x.shape) if d is None else d.contiguous() for x, d in zip(inputs, grads)]
    dh0 = grads[6] if h0 is not None else q.new_empty(0, dtype=torch.float32)
    return (*grads[:6], dh0)


@_chunk_gdn2_bwd_op.register_fake
def _(q, k, v, g, b, w, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm_in_kernel):
    dh0 = (initial_state.new_empty(initial_state.shape) if initial_state is not None
           else q.new_empty(0, dtype=torch.float32))
    return (*(x.new_empty(x.shape) for x in (q, k, v, g, b, w)), dh0)


def _chunk_setup_context(ctx, inputs, output):
    (q, k, v, g, b, w, initial_state, cu_seqlens, scale, _output_final_state,
     use_qk_l2norm_in_kernel, _validate_values) = inputs
    ctx.save_for_backward(q, k, v, g, b, w, initial_state, cu_seqlens)
    ctx.scale = scale
    ctx.use_qk_l2norm_in_kernel = use_qk_l2norm_in_kernel


def _chunk_backward(ctx, do, dht):
    q, k, v, g, b, w, initial_state, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg, db, dw, dh0 = torch.ops.gdn2.chunk_gdn2_bwd(
        q, k, v, g, b, w, initial_state, cu_seqlens, do, dht, ctx.scale,
        ctx.use_qk_l2norm_in_kernel)
    return (dq, dk, dv, dg, db, dw, dh0 if initial_state is not None else None,
            None, None, None, None, None)


_chunk_gdn2_op.register_autograd(_chunk_backward, setup_context=_chunk_setup_context)


def chunk_gdn2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    b: Tensor,
    w: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    validate_values: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`gdn2_kernels.ops.chunk_gdn2` as a compilable custom op (same Args and Returns)."""
    return _call_fwd(torch.ops.gdn2.chunk_gdn2, q, k, v, g, b, w, scale, initial_state,
                     output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, validate_values)


# ------------------------------------------------------------------------------------------------
# fused_recurrent_gdn2
# ------------------------------------------------------------------------------------------------

def _fused_recurrent_gdn2_impl(q, k, v, g, b, w, initial_state, cu_seqlens, scale,
                               output_final_state, use_qk_l2norm_in_kernel, validate_values):
    with torch.no_grad():
        o, ht = ops.fused_recurrent_gdn2(q, k, v, g, b, w, scale=scale,
                                         initial_state=initial_state,
                                         output_final_state=output_final_state,
                                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                         cu_seqlens=cu_seqlens, validate_values=validate_values)
    return o, _state_or_empty(ht, q)


def _fused_recurrent_backward(ctx, do, dht):
    raise RuntimeError("fused_recurrent_gdn2 is forward-only (decoding); use chunk_gdn2 to train")


_fused_recurrent_gdn2_op = torch.library.custom_op(
    "gdn2::fused_recurrent_gdn2", _fused_recurrent_gdn2_impl, mutates_args=(),
    schema=_FWD_SCHEMA, tags=_TAGS)
_fused_recurrent_gdn2_op.register_fake(_fwd_fake)
_fused_recurrent_gdn2_op.register_autograd(_fused_recurrent_backward)


def fused_recurrent_gdn2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    b: Tensor,
    w: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    validate_values: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`gdn2_kernels.ops.fused_recurrent_gdn2` as a compilable custom op (same Args)."""
    checks.check_no_grad(q, k, v, g, b, w, initial_state)
    return _call_fwd(torch.ops.gdn2.fused_recurrent_gdn2, q, k, v, g, b, w, scale, initial_state,
                     output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, validate_values)


__all__ = ["chunk_gdn2", "fused_recurrent_gdn2"]
