"""Public ops: ``chunk_gdn2`` (training and prefill), ``fused_recurrent_gdn2`` (decoding) and
``fused_recurrent_gdn2_fwd`` (the serving entry: state pools, in-place states, CUDA graphs).

Signatures are fla-core 0.6.0's (``fla.ops.gdn2``): same names, positional order, defaults and
returns, every FLA keyword honoured (docs/api.md lists each with its status); our extras are
keyword-only after FLA's arguments. Tensors ``[B, T, H, D]`` (v, w, g, b with HV = G * H heads
for grouped value heads), states ``[N, HV, K, V]`` fp32, varlen as ``B == 1`` plus ``cu_seqlens``.
"""
from __future__ import annotations

import torch

from gdn2_kernels import _device, _fla_args, _gate_check, checks, dispatch, pipeline
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels import cp
from gdn2_kernels.kernels import _gate
from gdn2_kernels.kernels.recurrent_fwd import recurrent_fwd
from gdn2_kernels.pipeline import GDN2Options


def chunk_gdn2(
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
    use_gate_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cp_context=None,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    transpose_state_layout: bool | None = None,
    validate_values: bool | str = True,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None,
                                                      torch.Tensor]:
    """Chunkwise Gated Delta Rule-2 (docs/math.md), with fla-core 0.6.0's signature.

    Args:
        q: queries ``[B, T, H, K]``, float32 / bfloat16 / float16.
        k: keys ``[B, T, H, K]``, same dtype as q.
        v: values ``[B, T, HV, V]``, same dtype as q; HV = G * H (G > 1: grouped value heads,
            value head j reads key head j // G; q and k are then repeated G times, a copy).
        g: log-decay ``[B, T, HV, K]``, float32 (bf16/fp16 upcast exactly), finite and <= 0;
            with ``use_gate_in_kernel`` the raw gate input (any finite value).
        b: erase gate ``[B, T, HV, K]`` in [0, 1] (or [0, 2] with negative eigenvalues), q's dtype.
        w: write gate ``[B, T, HV, V]`` in [0, 1], q's dtype.
        scale: query scale; default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``) float32 state
            entering each sequence; default zeros.
        output_final_state: also return the state after the last token. Default False.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head inside the op. Default False.
        use_gate_in_kernel: g is the raw gate input; the kernels apply
            ``-exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound`` set
            ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (A_log optional there), with
            gradients for g, A_log and dt_bias. Default False.
        cu_seqlens: ``[N + 1]`` int32/int64 boundaries of sequences packed along T (needs B == 1).
        cu_seqlens_cpu: a host copy of ``cu_seqlens``: the op then reads the boundaries from it,
            with no device-to-host copy (trusted to match ``cu_seqlens``). Default None.
        safe_gate: FLA's promise that the gate stays in ``[lower_bound, 0)``; with
            ``use_gate_in_kernel`` it requires ``lower_bound``, as in FLA. Our kernels are exact
            for any g <= 0, so it selects no other kernel. Default False.
        lower_bound: the bounded gate's bound, in [-5, 0). Default None.
        disable_recompute: keep the per-chunk states from the forward for the backward (more
            memory, less time). Default False.
        return_intermediate_states: also return the state entering every chunk, ``h``
            ``[B, NT, HV, K, V]`` (``[.., V, K]`` with ``state_v_first``) in k's dtype, at chunk
            size 64 unless ``chunk_size`` says otherwise (varlen: B = 1 and NT counts the chunks
            of all sequences). Only under ``torch.inference_mode()``. Default False.
        state_v_first: states (initial, final, intermediate) in ``[.., V, K]`` layout. Default
            False.
        cp_context: context parallelism: this rank's slice of a token axis split across the
            ranks of a ``torch.distributed`` group, FLA's ``FLACPContext`` or ours
            (``gdn2_kernels.cp.build_cp_context``); runs ``gdn2_kernels.cp.chunk_gdn2_cp``
            (docs/context_parallel.md). The in-kernel gate, ``return_intermediate_states``,
            ``state_v_first``, ``chunk_size`` and grouped value heads are refused with it.
        A_log: ``[HV]`` (any shape with HV values) decay rate of the in-kernel gate.
        dt_bias: ``[HV * K]`` bias of the in-kernel gate (optional).
        chunk_size: pin the chunk size to one of ``configs.CHUNK_SIZES`` (default: the tuned one).
        transpose_state_layout: deprecated name of ``state_v_first`` (DeprecationWarning).
        validate_values: check the log-decay (after the in-kernel gate, when asked) for NaN,
            Inf and positive entries inside the forward kernel, at no measurable cost and without
            a host sync. A bad entry makes that sequence and head's outputs (and final state) NaN
            from its chunk on, and raises ``InvalidGateError`` (a ValueError): on CUDA
            asynchronously, at a later call or at ``gdn2_kernels.check_gates()``; on the CPU at
            once. ``"sync"`` raises in this call (one device sync); ``False`` skips the check.
            Default True. Keyword-only.
        check_finite: keyword-only; also refuse NaN/Inf in q, k, v, b, w and initial_state
            (``ValueError`` naming them). Costs one isfinite reduction over each of those
            tensors and one host sync per call. Default False.

    Returns:
        o: ``[B, T, HV, V]`` in q's dtype.
        final_state: ``[N, HV, K, V]`` float32 if ``output_final_state`` else None.
        h: with ``return_intermediate_states`` only (see there).

    Raises:
        TypeError / ValueError naming the offending argument, for wrong types, shapes, dtypes,
        devices, head dims over 256, bad ``cu_seqlens``, gates, gate parameters or chunk sizes;
        TypeError for unknown keywords; NotImplementedError for what ``cp_context`` does not
        cover.
    """
    fn = "chunk_gdn2"
    v_first = _fla_args.state_layout(fn, state_v_first, transpose_state_layout)
    if cp_context is not None:
        _fla_args.cp_unsupported(
            fn, use_gate_in_kernel=use_gate_in_kernel, cu_seqlens_cpu=cu_seqlens_cpu is not None,
            safe_gate=safe_gate, lower_bound=lower_bound is not None,
            return_intermediate_states=return_intermediate_states, state_v_first=v_first,
            A_log=A_log is not None, dt_bias=dt_bias is not None,
            chunk_size=chunk_size is not None,
            grouped_value_heads=isinstance(v, torch.Tensor) and isinstance(q, torch.Tensor)
            and v.ndim == 4 and q.ndim == 4 and v.shape[2] != q.shape[2])
        return cp.chunk_gdn2_cp(q, k, v, g, b, w, scale, initial_state, output_final_state,
                                use_qk_l2norm_in_kernel, cu_seqlens, disable_recompute,
                                validate_values is not False, cp_context=cp_context)
    pinned = _fla_args.chunk_size(fn, chunk_size, return_intermediate_states)
    if return_intermediate_states and not torch.is_inference_mode_enabled():
        raise ValueError(f"{fn}: return_intermediate_states=True only runs under "
                         "torch.inference_mode() (the states are not differentiable), as in FLA")
    initial_state = _fla_args.state_kv(fn, initial_state, v_first)
    checks.check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens,
                        cu_seqlens_cpu=cu_seqlens_cpu)
    if check_finite:
        checks.check_finite(fn, (("q", q), ("k", k), ("v", v), ("b", b), ("w", w),
                                 ("initial_state", initial_state)))
    validate_values = _gate_check.mode(validate_values)
    gate = _fla_args.gate_args(fn, use_gate_in_kernel, A_log, dt_bias, lower_bound, safe_gate, q,
                               v)
    opts = GDN2Options(
        scale=float(scale) if scale is not None else q.shape[-1] ** -0.5,
        output_final_state=bool(output_final_state),
        use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel),
        has_initial_state=initial_state is not None,
        is_varlen=cu_seqlens is not None,
        disable_recompute=bool(disable_recompute),
        gate=gate.kind,
        lower_bound=gate.lower_bound,
        chunk_size=pinned,
        return_intermediate_states=bool(return_intermediate_states),
        check_g=validate_values is not False,
    )
    out = pipeline.run(q, k, v, g, b, w, initial_state, cu_seqlens, cu_seqlens_cpu, opts, gate,
                       validate_values, fn)
    return tuple(out[:1]) + tuple(_fla_args.state_out(s, v_first) for s in out[1:])


# ------------------------------------------------------------------------------------------------
# Decoding (forward only)
# ------------------------------------------------------------------------------------------------

def _recurrent_config(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
    pipe = dispatch.resolve(ProblemKey.of(q, v))
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dispatch.log_launch(pipe, N, v.shape[2], q.shape[1], v.shape[-1], q.device,
                        cu_seqlens is not None, op="recurrent")
    return pipe["recurrent_fwd"]


def fused_recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    transpose_state_layout: bool | None = None,
    validate_values: bool | str = True,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token Gated Delta Rule-2 (docs/math.md "Recurrence") for decoding, with fla-core
    0.6.0's signature; forward only.

    The same recurrence as :func:`chunk_gdn2` with the state kept in fp32 registers one token at
    a time: use it for decode steps (T = 1, any batch) and short prompts; use ``chunk_gdn2`` for
    training and long prefills. Grouped value heads are read in place (no copy of q, k).

    Args:
        q, k: ``[B, T, H, K]``; v, w: ``[B, T, HV, V]``; g, b: ``[B, T, HV, K]``, HV = G * H
            (value head j reads key head j // G). q, k, v, b, w share one dtype
            (float32 / bfloat16 / float16); g is the float32 log-decay (<= 0), or the raw gate
            input with ``use_gate_in_kernel``.
        A_log: ``[HV]`` decay rate of the in-kernel gate. Default None.
        dt_bias: ``[HV * K]`` bias of the in-kernel gate. Default None.
        scale: query scale; default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` float32 (``[N, HV, V, K]`` with ``state_v_first``);
            default zeros.
        output_final_state: also return the state after the last token. Default False.
        use_qk_l2norm_in_kernel: L2-normalise q and k inside the kernel. Default False.
        use_gate_in_kernel: apply the gate activation in the kernel (see :func:`chunk_gdn2`).
        lower_bound: the bounded gate's bound, in [-5, 0). Default None.
        state_v_first: states in ``[.., V, K]`` layout (read and written so, no copy).
        cu_seqlens: ``[N + 1]`` int32/int64 boundaries of packed sequences (needs B == 1).
        transpose_state_layout: deprecated name of ``state_v_first`` (DeprecationWarning).
        validate_values: as :func:`chunk_gdn2` (in-kernel, no host sync: CUDA-graph
            capturable); a bad entry makes that sequence and head's outputs NaN from its token
            on. Default True. Keyword-only.
        check_finite: keyword-only; also refuse NaN/Inf in q, k, v, b, w and initial_state
            (one isfinite reduction over each and one host sync per call). Default False.

    Returns:
        o: ``[B, T, HV, V]`` in v's dtype.
        final_state: ``[N, HV, K, V]`` (or ``[N, HV, V, K]``) float32 if ``output_final_state``
            else None.

    Raises:
        TypeError / ValueError as :func:`chunk_gdn2`, and ValueError when an input requires grad
        (this op has no backward: call it under ``torch.no_grad()`` or use ``chunk_gdn2``).
    """
    fn = "fused_recurrent_gdn2"
    v_first = _fla_args.state_layout(fn, state_v_first, transpose_state_layout)
    checks.check_inputs(q, k, v, g, b, w, scale, _fla_args.state_kv(fn, initial_state, v_first),
                  cu_seqlens, fn=fn)
    if check_finite:
        checks.check_finite(fn, (("q", q), ("k", k), ("v", v), ("b", b), ("w", w),
                                 ("initial_state", initial_state)))
    validate_values = _gate_check.mode(validate_values)
    gate = _fla_args.gate_args(fn, use_gate_in_kernel, A_log, dt_bias, lower_bound, False, q, v)
    checks.check_no_grad(q, k, v, g, b, w, initial_state, fn=fn, A_log=A_log, dt_bias=dt_bias)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    with _device.guard(q), _gate_check.checked(q.device, validate_values, fn):
        return recurrent_fwd(q, k, v, g if gate.kind != _gate.GATE_NONE else g.float(), b, w,
                             float(scale) if scale is not None else q.shape[-1] ** -0.5,
                             initial_state, bool(output_final_state),
                             bool(use_qk_l2norm_in_kernel), cu_seqlens,
                             _recurrent_config(q, v, cu_seqlens),
                             gate=gate, state_v_first=v_first,
                             g_err=_gate_check.error_flag(q.device, validate_values))


# ------------------------------------------------------------------------------------------------
# Serving (forward only, no host syncs)
# ------------------------------------------------------------------------------------------------
def fused_recurrent_gdn2_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    output_final_state: bool = False,
    inplace_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    lower_bound: float | None = None,
    out: torch.Tensor | None = None,
    *,
    validate_values: bool | str = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The serving entry (fla-core 0.6.0's ``fused_recurrent_gdn2_fwd``): the token recurrence
    of :func:`fused_recurrent_gdn2` with states in a pool, updated in place, and no host syncs,
    so a call can be captured in a CUDA graph (inputs of fixed shapes, nothing allocated from
    tensor values).

    Args (beyond :func:`fused_recurrent_gdn2`'s; note FLA's order: initial_state before scale):
        initial_state: without ``ssm_state_indices`` ``[N, HV, K, V]`` float32; with it, a state
            pool ``[slots, HV, K, V]`` (strided along slots only). ``[.., V, K]`` with
            ``state_v_first``.
        inplace_final_state: write the final state(s) into ``initial_state`` (needs it) and
            return it. Default False.
        ssm_state_indices: ``[N]`` int: sequence n starts from pool slot ``[n]`` and its final
            state goes back there (with ``inplace_final_state``). ``[N, T_max]``: it starts from
            slot ``[n, a_n - 1]`` and the state after its token t goes to slot ``[n, t]`` (needs
            ``inplace_final_state``; speculative decoding keeps every draft position). A negative
            slot (vLLM's padding id) reads a zero state and is never written. Slots must be below
            the pool size (not checked: that would need a host sync).
        num_accepted_tokens: ``[N]`` int, a_n above (with ``[N, T_max]`` indices); default 1.
        out: the output buffer, v's shape, contiguous (any float dtype); default a new tensor in
            v's dtype.
        validate_values: as :func:`chunk_gdn2`: in-kernel, no host sync, so the default call is
            capturable ("sync" is not). Default True. Keyword-only.

    Returns:
        o: ``out`` or a new ``[B, T, HV, V]`` tensor.
        final_state: ``initial_state`` with ``inplace_final_state``; a new ``[N, HV, K, V]``
            float32 tensor with ``output_final_state`` (per sequence, after its last token);
            else None.
    """
    fn = "fused_recurrent_gdn2_fwd"
    checks.check_inputs(q, k, v, g, b, w, scale, None, None, fn=fn)
    checks.check_serving(fn, q, v, initial_state, cu_seqlens, inplace_final_state,
                   output_final_state, ssm_state_indices, num_accepted_tokens, out,
                   bool(state_v_first))
    validate_values = _gate_check.mode(validate_values)
    gate = _fla_args.gate_args(fn, use_gate_in_kernel, A_log, dt_bias, lower_bound, False, q, v)
    checks.check_no_grad(q, k, v, g, b, w, initial_state, fn=fn, A_log=A_log, dt_bias=dt_bias)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if ssm_state_indices is not None:
        ssm_state_indices = ssm_state_indices.contiguous()
    if num_accepted_tokens is not None:
        num_accepted_tokens = num_accepted_tokens.contiguous()
    store = bool(inplace_final_state or output_final_state)
    final_state = initial_state if inplace_final_state else None
    with _device.guard(q), _gate_check.checked(q.device, validate_values, fn):
        return recurrent_fwd(q, k, v, g if gate.kind != _gate.GATE_NONE else g.float(), b, w,
                             float(scale) if scale is not None else q.shape[-1] ** -0.5,
                             initial_state, store, bool(use_qk_l2norm_in_kernel), cu_seqlens,
                             _recurrent_config(q, v, cu_seqlens), gate=gate,
                             state_v_first=bool(state_v_first), out=out, final_state=final_state,
                             state_indices=ssm_state_indices,
                             num_accepted_tokens=num_accepted_tokens,
                             g_err=_gate_check.error_flag(q.device, validate_values))
