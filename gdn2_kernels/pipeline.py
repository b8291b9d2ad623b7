"""One ``chunk_gdn2`` call's pipeline: its options, the forward's and the backward's launches
(through the orchestrators in ``kernels/``), compiling them ahead on a first call, and the
autograd Function that ties them together.

The public ops (``ops.py``), the compilable custom op (``custom_ops.py``) and context parallelism
(``cp/``) all run a call through here, after their own argument checks (``checks.py``).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from gdn2_kernels import _device, _env, _gate_check, _launch, dispatch
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.kernels import _gate
from gdn2_kernels.kernels.chunk_bwd import BwdResult, chunk_gdn2_bwd
from gdn2_kernels.kernels.chunk_fwd import FwdResult, chunk_gdn2_fwd
from gdn2_kernels.kernels.l2norm import l2norm_bwd, l2norm_fwd


@dataclass(frozen=True)
class GDN2Options:
    """Flags of one ``chunk_gdn2`` call, stored on the autograd ctx."""

    scale: float
    output_final_state: bool
    use_qk_l2norm_in_kernel: bool
    has_initial_state: bool
    is_varlen: bool
    disable_recompute: bool
    gate: int = _gate.GATE_NONE            # the in-kernel gate activation (_gate.GATE_*)
    lower_bound: float = 0.0               # of the bounded gate
    chunk_size: int | None = None          # pinned chunk size (None: the resolved pipeline's)
    return_intermediate_states: bool = False
    check_g: bool = True                   # the in-kernel check of g (``_gate_check``)

    @classmethod
    def of_call(cls, q, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                is_varlen: bool, disable_recompute) -> "GDN2Options":
        """The options of a call with these arguments (``scale`` None: ``K ** -0.5``)."""
        return cls(scale=float(scale) if scale is not None else q.shape[-1] ** -0.5,
                   output_final_state=bool(output_final_state),
                   use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel),
                   has_initial_state=initial_state is not None, is_varlen=is_varlen,
                   disable_recompute=bool(disable_recompute))


@dataclass
class Saved:
    """What the forward keeps for the backward (saved through ``ctx.save_for_backward``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    fwd: FwdResult
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    q_rstd: torch.Tensor | None
    k_rstd: torch.Tensor | None
    gate: _gate.GateArgs = _gate.NO_GATE  # with g_raw set when the gate is in the kernel


def run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts: GDN2Options,
                 pipe: dispatch.PipelineConfig, gate: _gate.GateArgs = _gate.NO_GATE,
                 cu_seqlens_cpu: torch.Tensor | None = None) -> Saved:
    """Every forward launch of one call (the autograd forward and the compile-ahead walk)."""
    q_rstd = k_rstd = None
    if opts.use_qk_l2norm_in_kernel:
        q, q_rstd = l2norm_fwd(q, pipe["l2norm_fwd"])
        k, k_rstd = l2norm_fwd(k, pipe["l2norm_fwd"])
    g_in = g if gate.kind != _gate.GATE_NONE else g.float()
    res = chunk_gdn2_fwd(q, k, v, g_in, b, w, opts.scale, initial_state,
                         opts.output_final_state, cu_seqlens, pipe,
                         store_h=opts.disable_recompute or opts.return_intermediate_states,
                         store_r=opts.disable_recompute,
                         g_err=_gate_check.error_flag(q.device, opts.check_g),
                         cu_seqlens_cpu=cu_seqlens_cpu, gate=gate)
    if gate.kind != _gate.GATE_NONE:
        gate = gate._replace(g_raw=g)
    return Saved(q, k, v, b, w, res, initial_state, cu_seqlens, q_rstd, k_rstd, gate)


def run_backward(s: Saved, do, dht, opts: GDN2Options, pipe: dispatch.PipelineConfig,
                  need_dh0: bool) -> tuple[torch.Tensor, torch.Tensor, BwdResult]:
    """Every backward launch of one call: ``(dq, dk, the other gradients)`` in the inputs'
    dtypes (dg fp32)."""
    f = s.fwd
    # The in-op L2 norm's backward still reads dq and dk: keep them fp32 for it.
    qk_dtype = torch.float32 if opts.use_qk_l2norm_in_kernel else s.q.dtype
    grads = chunk_gdn2_bwd(s.q, s.k, s.v, s.b, s.w, f.g_cum, f.A, f.A_qk, f.Y, f.U, f.Qg, f.Kt,
                           f.gC, f.h, f.R, opts.scale, s.initial_state, do, dht, s.cu_seqlens,
                           f.chunk_indices, f.chunk_offsets, pipe, need_dh0=need_dh0,
                           grad_dtypes=(qk_dtype, qk_dtype, s.b.dtype), gate=s.gate)
    dq, dk = grads.dq, grads.dk
    if opts.use_qk_l2norm_in_kernel:
        dq = l2norm_bwd(s.q, s.q_rstd, dq, pipe["l2norm_bwd"])
        dk = l2norm_bwd(s.k, s.k_rstd, dk, pipe["l2norm_bwd"])
    return dq, dk, grads


def resolve(q: torch.Tensor, v: torch.Tensor, opts: GDN2Options,
            cu_seqlens: torch.Tensor | None = None) -> dispatch.PipelineConfig:
    """The resolved configs of one call, with the caller's ``chunk_size`` when pinned (and the
    configs as they launch at this shape logged: ``dispatch.log_launch``)."""
    key = ProblemKey.of(q, v)
    pipe = dispatch.resolve(key)
    if opts.chunk_size is not None:
        pipe = dispatch.with_chunk_size(pipe, opts.chunk_size, key)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dispatch.log_launch(pipe, N, v.shape[2], q.shape[1], v.shape[-1], q.device,
                        cu_seqlens is not None)
    return pipe


# Launch signatures already compiled ahead in this process (bounded: after that many distinct
# shapes, new ones compile lazily as usual).
_compiled_ahead: set[tuple] = set()
_MAX_COMPILE_AHEAD = 64

# Positions of ChunkGDN2Function.forward's inputs (ctx.needs_input_grad).
_H0_INPUT = 6
_GRAD_INPUTS = 9  # q, k, v, g, b, w, initial_state, A_log, dt_bias


def compile_ahead_walk(q, k, v, g, b, w, initial_state, opts: GDN2Options,
                        pipe: dispatch.PipelineConfig, with_backward: bool, need_dh0: bool,
                        gate: _gate.GateArgs = _gate.NO_GATE):
    """The call's launches on meta tensors (same shapes, dtypes, configs and flags), for
    ``_launch.compile_ahead``."""
    def walk() -> None:
        m = _launch.meta_like
        mgate = gate._replace(A_log=m(gate.A_log), dt_bias=m(gate.dt_bias))
        saved = run_forward(*(m(x) for x in (q, k, v, g, b, w, initial_state)), None, opts, pipe,
                             mgate)
        if with_backward:
            run_backward(saved, m(saved.fwd.o), m(saved.fwd.ht), opts, pipe, need_dh0)
    return walk


def compile_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts: GDN2Options,
                   pipe: dispatch.PipelineConfig, gate: _gate.GateArgs = _gate.NO_GATE):
    """``_launch.compile_ahead`` on the first call of a launch signature on a GPU, else a no-op."""
    if (not q.is_cuda or cu_seqlens is not None or not _env.compile_ahead_enabled()
            or torch.compiler.is_compiling() or len(_compiled_ahead) >= _MAX_COMPILE_AHEAD):
        return contextlib.nullcontext(False)
    with_backward = any(ctx.needs_input_grad[:_GRAD_INPUTS])
    need_dh0 = initial_state is not None and ctx.needs_input_grad[_H0_INPUT]
    key = (tuple(q.shape), tuple(v.shape), q.dtype, g.dtype, opts, with_backward, need_dh0,
           q.device, gate.A_log is not None, gate.dt_bias is not None,
           tuple((name, cfg.label()) for name, cfg in pipe.configs))
    if key in _compiled_ahead:
        return contextlib.nullcontext(False)
    _compiled_ahead.add(key)
    return _launch.compile_ahead(q.device, compile_ahead_walk(
        q, k, v, g, b, w, initial_state, opts, pipe, with_backward, need_dh0, gate))


_compile_ahead_broken: list[str] = []  # the first failure of compiling ahead, if any


def _forward_compiling_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens,
                             opts: GDN2Options, pipe: dispatch.PipelineConfig,
                             gate: _gate.GateArgs, cu_seqlens_cpu) -> Saved:
    """``run_forward`` inside ``_compile_ahead``. Compiling ahead only moves compilation: if
    the parallel path itself fails, the call is run again compiling lazily (a kernel that really
    fails then raises its own error), and this process stops compiling ahead (one warning)."""
    def run() -> Saved:
        return run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts, pipe, gate,
                            cu_seqlens_cpu)

    if _compile_ahead_broken:
        return run()
    ahead = False
    try:
        with compile_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts,
                            pipe, gate) as ahead:
            return run()
    except Exception as exc:  # noqa: BLE001 - re-raised below unless compiling ahead was on
        if not ahead:
            raise
        _compile_ahead_broken.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"gdn2_kernels: compiling ahead failed ({_compile_ahead_broken[0][:300]});"
                      " compiling each kernel at its first launch from now on", RuntimeWarning,
                      stacklevel=3)
        return run()


class ChunkGDN2Function(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, b, w, initial_state, A_log, dt_bias, cu_seqlens, cu_seqlens_cpu,
                opts: GDN2Options):
        gate = _gate.GateArgs(opts.gate, A_log, dt_bias, opts.lower_bound)
        with _device.guard(q):
            pipe = resolve(q, v, opts, cu_seqlens)
            s = _forward_compiling_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts,
                                         pipe, gate, cu_seqlens_cpu)
        f = s.fwd
        ctx.save_for_backward(s.q, s.k, s.v, s.b, s.w, f.g_cum, f.A, f.A_qk, f.Y, f.U, f.Qg, f.Kt,
                              f.gC, f.h, f.R, s.initial_state, s.cu_seqlens, f.chunk_indices,
                              f.chunk_offsets, s.q_rstd, s.k_rstd, s.gate.g_raw, A_log, dt_bias)
        ctx.opts = opts
        ctx.pipe = pipe
        ctx.g_dtype = g.dtype
        return f.o, f.ht

    @staticmethod
    def backward(ctx, do, dht):
        (q, k, v, b, w, g_cum, A, A_qk, Y, U, Qg, Kt, gC, h, R, h0, cu_seqlens, idx, offs,
         q_rstd, k_rstd, g_raw, A_log, dt_bias) = ctx.saved_tensors
        opts, pipe = ctx.opts, ctx.pipe
        fwd = FwdResult(None, None, g_cum, A, A_qk, Y, U, Qg, Kt, gC, h, R, idx, offs)
        gate = _gate.GateArgs(opts.gate, A_log, dt_bias, opts.lower_bound, g_raw)
        saved = Saved(q, k, v, b, w, fwd, h0, cu_seqlens, q_rstd, k_rstd, gate)
        with _device.guard(q):
            dq, dk, grads = run_backward(saved, do.contiguous(),
                                          dht.contiguous() if dht is not None else None, opts,
                                          pipe, need_dh0=h0 is not None
                                          and ctx.needs_input_grad[_H0_INPUT])
        dA_log = grads.dA_log.to(A_log.dtype) if grads.dA_log is not None else None
        ddt_bias = grads.ddt_bias.to(dt_bias.dtype) if grads.ddt_bias is not None else None
        return (dq.to(q.dtype), dk.to(k.dtype), grads.dv, grads.dg.to(ctx.g_dtype),
                grads.db.to(b.dtype), grads.dw, grads.dh0, dA_log, ddt_bias, None, None, None)


def expand_qk_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Grouped value heads (HV = G * H) in ``chunk_gdn2``: q and k repeated G times along the
    heads (value head j reads key head j // G), so the chunk kernels see HV heads throughout;
    autograd sums the gradients of each group back. A copy of q and k, not of v, g, b, w."""
    G = v.shape[2] // q.shape[2]
    if G == 1:
        return q, k
    return q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)


def forward_with_states(q, k, v, g, b, w, initial_state, gate: _gate.GateArgs, cu_seqlens,
                         cu_seqlens_cpu, opts: GDN2Options):
    """``return_intermediate_states``: ``(o, final state, h)`` with h the state entering every
    chunk, ``[B, NT, HV, K, V]`` in k's dtype (FLA's convention; varlen: B = 1, NT over all
    sequences)."""
    with _device.guard(q):
        s = run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts,
                         resolve(q, v, opts, cu_seqlens), gate, cu_seqlens_cpu)
    h = s.fwd.h
    return s.fwd.o, s.fwd.ht, h.view(q.shape[0], -1, *h.shape[1:]).to(k.dtype)



def run(q, k, v, g, b, w, initial_state, cu_seqlens, cu_seqlens_cpu, opts: GDN2Options,
        gate: _gate.GateArgs, validate_values, fn: str):
    """A checked call's launches: ``(o, final state)``, or ``(o, final state, h)`` with
    ``opts.return_intermediate_states``; states in ``[.., K, V]`` layout. ``fn`` names the public
    op in a bad g's error (``validate_values``)."""
    q, k = expand_qk_heads(q, k, v)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    with _gate_check.checked(q.device, validate_values, fn):
        if opts.return_intermediate_states:
            return forward_with_states(q, k, v, g, b, w, initial_state, gate, cu_seqlens,
                                       cu_seqlens_cpu, opts)
        return ChunkGDN2Function.apply(q, k, v, g, b, w, initial_state, gate.A_log, gate.dt_bias,
                                       cu_seqlens, cu_seqlens_cpu, opts)


__all__ = ["ChunkGDN2Function", "GDN2Options", "Saved", "compile_ahead", "compile_ahead_walk",
           "expand_qk_heads", "forward_with_states", "resolve", "run", "run_backward",
           "run_forward"]
