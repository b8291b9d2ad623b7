"""Public ops: ``chunk_gdn2`` (training and prefill), ``fused_recurrent_gdn2`` (decoding) and
``fused_recurrent_gdn2_fwd`` (the serving entry: state pools, in-place states, CUDA graphs).

Signatures are fla-core 0.6.0's (``fla.ops.gdn2``): same names, positional order, defaults and
returns, every FLA keyword honoured (docs/api.md lists each with its status); our extras are
keyword-only after FLA's arguments. Tensors ``[B, T, H, D]`` (v, w, g, b with HV = G * H heads
for grouped value heads), states ``[N, HV, K, V]`` fp32, varlen as ``B == 1`` plus ``cu_seqlens``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

from gdn2_kernels import _device, _env, _fla_args, _gate_check, _launch, dispatch
from gdn2_kernels.configs import MAX_HEAD_DIM, ProblemKey
from gdn2_kernels.kernels import _gate
from gdn2_kernels.kernels.chunk_fwd import FwdResult, chunk_gdn2_fwd
from gdn2_kernels.kernels.chunk_bwd import BwdResult, chunk_gdn2_bwd
from gdn2_kernels.kernels.l2norm import l2norm_bwd, l2norm_fwd
from gdn2_kernels.kernels.recurrent_fwd import recurrent_fwd

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------

def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens, cu_seqlens_cpu=None,
                  fn: str = "chunk_gdn2"):
    """Check every argument; a failure's message starts with ``fn``, the public op called."""
    try:
        _check_arguments(fn, q, k, v, g, b, w, scale, initial_state, cu_seqlens, cu_seqlens_cpu)
    except (TypeError, ValueError) as exc:
        if type(exc) not in (TypeError, ValueError):
            raise
        raise type(exc)(f"{fn}: {exc}") from None


def _cast_hint(name: str, dtype: torch.dtype, to: str) -> str:
    if dtype == torch.float64:
        return f"cast float64 to float32: {name}.float()"
    return f"a {dtype} {name} is not a real-valued input: cast it with {name}.to({to})"


def _check_finite(fn: str, named: tuple[tuple[str, torch.Tensor | None], ...]) -> None:
    """``check_finite``: one isfinite reduction per tensor and a single host sync for all."""
    named = tuple((n, x) for n, x in named if x is not None)
    flags = torch.stack([torch.isfinite(x).all() for _, x in named]).tolist()
    bad = [n for (n, _), ok in zip(named, flags) if not ok]
    if bad:
        raise ValueError(f"{fn}: {', '.join(bad)} contain(s) NaN or Inf (check_finite=True); "
                         "find where they first appear, e.g. with torch.autograd.detect_anomaly()")


def _check_arguments(fn, q, k, v, g, b, w, scale, initial_state, cu_seqlens, cu_seqlens_cpu):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("w", w)):
        _require_tensor(name, x)
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K] (4-D), got shape {tuple(q.shape)}; "
                         "for one sequence use q[None]")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have q's shape [B, T, H, K] = {(B, T, H, K)}, "
                         f"got {tuple(k.shape)}")
    if (v.ndim != 4 or tuple(v.shape[:2]) != (B, T) or v.shape[2] < H
            or (H > 0 and v.shape[2] % H != 0)):
        raise ValueError(f"v must be [B, T, HV, V] with B, T = {(B, T)} as in q and HV a multiple "
                         f"of q's H = {H} (grouped value heads), got {tuple(v.shape)}")
    HV = v.shape[2]
    for name, x in (("g", g), ("b", b)):
        if tuple(x.shape) != (B, T, HV, K):
            raise ValueError(f"{name} must have q's shape with v's heads, [B, T, HV, K] = "
                             f"{(B, T, HV, K)}, got {tuple(x.shape)}")
    V = v.shape[-1]
    if tuple(w.shape) != tuple(v.shape):
        raise ValueError(f"w (write gate) must have v's shape [B, T, HV, V] = {tuple(v.shape)}, "
                         f"got {tuple(w.shape)}")
    for name, d in (("K (head dim of q/k)", K), ("V (head dim of v)", V)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} = {d} is not supported: it must be between 1 and "
                             f"{MAX_HEAD_DIM}; split larger heads into several heads")
    for name, x in (("q", q), ("k", k), ("v", v), ("b", b), ("w", w)):
        if x.dtype not in _INPUT_DTYPES:
            to = "torch.bfloat16" if name == "q" else "q.dtype"
            raise TypeError(f"{name} has dtype {x.dtype}; {fn} takes float32, bfloat16 or "
                            f"float16 inputs ({_cast_hint(name, x.dtype, to)})")
    for name, x in (("k", k), ("v", v), ("b", b), ("w", w)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k, v, b, w must "
                            "share one dtype (cast them before the call)")
    if g.dtype not in _GATE_DTYPES:
        raise TypeError(f"g has dtype {g.dtype}; the log-decay must be float32 (bfloat16/float16 "
                        "are accepted and upcast exactly); " + (
                            "a float64 g is not representable in float32: cast it with g.float() "
                            "if that is intended" if g.dtype == torch.float64
                            else _cast_hint("g", g.dtype, "torch.float32")))
    dev = q.device
    for name, x in (("k", k), ("v", v), ("g", g), ("b", b), ("w", w)):
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but q is on {dev}; move all inputs to one "
                             "device")
    if dev.type == "cpu" and not _device.interpreter_active():
        raise ValueError("inputs are on the CPU but Triton's interpreter is off; move them to a "
                         "CUDA device, or set TRITON_INTERPRET=1 before importing gdn2_kernels")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"inputs are on {dev}; {fn} runs on CUDA devices (or the CPU "
                         "through Triton's interpreter)")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None (for K**-0.5), got "
                         f"{scale!r}")

    N = B
    if cu_seqlens is not None:
        N = _check_cu_seqlens_layout(cu_seqlens, B, dev)
        _check_cu_seqlens_cpu(cu_seqlens, cu_seqlens_cpu)
        # The host copy, when given, spares a device-to-host copy.
        bounds = (cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu).tolist()
        if bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got "
                             f"{bounds[0]} ... {bounds[-1]}")
        if any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError("cu_seqlens must be non-decreasing (sequence boundaries in order)")
        N = len(bounds) - 1
    if initial_state is not None:
        _require_tensor("initial_state", initial_state)
        if tuple(initial_state.shape) != (N, HV, K, V):
            raise ValueError(f"initial_state must be [N, HV, K, V] = {(N, HV, K, V)} "
                             f"(N = {'number of sequences' if cu_seqlens is not None else 'B'}), "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.dtype != torch.float32:
            raise TypeError(f"initial_state must be float32 (the state is kept in fp32), got "
                            f"{initial_state.dtype}")
        if initial_state.device != dev:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {dev}")


def _check_cu_seqlens_layout(cu_seqlens, B: int, dev: torch.device, prefix: str = "") -> int:
    """Type, shape, dtype and device of ``cu_seqlens`` (no value is read); returns N."""
    _require_tensor("cu_seqlens", cu_seqlens)
    if B != 1:
        raise ValueError(f"{prefix}with cu_seqlens the batch size must be 1 (sequences packed "
                         f"along T), got B = {B}; flatten the batch: x.reshape(1, B * T, ...)")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{prefix}cu_seqlens must be 1-D [N + 1] with N >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{prefix}cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != dev:
        raise ValueError(f"{prefix}cu_seqlens is on {cu_seqlens.device} but q is on {dev}")
    return cu_seqlens.numel() - 1


def _check_cu_seqlens_cpu(cu_seqlens: torch.Tensor, cu_seqlens_cpu) -> None:
    """``cu_seqlens_cpu`` must be a host tensor shaped like ``cu_seqlens``; it is trusted to hold
    the same values (comparing them would need the device-to-host copy it exists to avoid)."""
    if cu_seqlens_cpu is None:
        return
    _require_tensor("cu_seqlens_cpu", cu_seqlens_cpu)
    if cu_seqlens_cpu.device.type != "cpu":
        raise ValueError(f"cu_seqlens_cpu must be on the CPU (a host copy of cu_seqlens), got "
                         f"{cu_seqlens_cpu.device}")
    if tuple(cu_seqlens_cpu.shape) != tuple(cu_seqlens.shape):
        raise ValueError(f"cu_seqlens_cpu must have cu_seqlens' shape {tuple(cu_seqlens.shape)}, "
                         f"got {tuple(cu_seqlens_cpu.shape)}")
    if cu_seqlens_cpu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens_cpu must be int32 or int64, got {cu_seqlens_cpu.dtype}")


@contextlib.contextmanager
def gate_checked(device: torch.device, validate_values, op: str):
    """Around one call's launches: report an earlier call's bad g before (never waiting), and
    read or start reading this call's error flag after (``_gate_check``)."""
    if validate_values is not False:
        _gate_check.before_call(device)
    yield
    _gate_check.after_call(device, validate_values, op)


def _g_err(device: torch.device, validate_values) -> torch.Tensor | None:
    """The error flag the forward kernels set on a bad g, or None without the check."""
    return _gate_check.flag(device) if validate_values is not False else None


def check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens,
                 validate_values: bool) -> None:
    """The boundary checks of :func:`chunk_gdn2` (TypeError / ValueError naming the argument and
    the fix; the caller prefixes the op's name), run on each rank's slice by ``gdn2_kernels.cp``.
    With ``validate_values`` g's
    values are read here, on the host: a context-parallel call synchronises its ranks anyway, and
    its kernels run without the in-kernel check of :func:`chunk_gdn2`."""
    _check_arguments("chunk_gdn2_cp", q, k, v, g, b, w, scale, initial_state, cu_seqlens, None)
    if validate_values and bool((~torch.isfinite(g) | (g > 0)).any()):
        raise _gate_check.InvalidGateError(_gate_check.MESSAGE)


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------

@dataclass
class _Saved:
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


def _run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts: GDN2Options,
                 pipe: dispatch.PipelineConfig, gate: _gate.GateArgs = _gate.NO_GATE,
                 cu_seqlens_cpu: torch.Tensor | None = None) -> _Saved:
    """Every forward launch of one call (the autograd forward and the compile-ahead walk)."""
    q_rstd = k_rstd = None
    if opts.use_qk_l2norm_in_kernel:
        q, q_rstd = l2norm_fwd(q, pipe["l2norm_fwd"])
        k, k_rstd = l2norm_fwd(k, pipe["l2norm_fwd"])
    g_in = g if gate.kind != _gate.GATE_NONE else g.float()
    res = chunk_gdn2_fwd(q, k, v, g_in, b, w, opts.scale, initial_state,
                         opts.output_final_state, cu_seqlens, pipe.as_dict(),
                         store_h=opts.disable_recompute or opts.return_intermediate_states,
                         g_err=_g_err(q.device, opts.check_g), cu_seqlens_cpu=cu_seqlens_cpu,
                         gate=gate)
    if gate.kind != _gate.GATE_NONE:
        gate = gate._replace(g_raw=g)
    return _Saved(q, k, v, b, w, res, initial_state, cu_seqlens, q_rstd, k_rstd, gate)


def _run_backward(s: _Saved, do, dht, opts: GDN2Options, pipe: dispatch.PipelineConfig,
                  need_dh0: bool) -> tuple[torch.Tensor, torch.Tensor, BwdResult]:
    """Every backward launch of one call: ``(dq, dk, the other gradients)`` in the inputs'
    dtypes (dg fp32)."""
    f = s.fwd
    # The in-op L2 norm's backward still reads dq and dk: keep them fp32 for it.
    qk_dtype = torch.float32 if opts.use_qk_l2norm_in_kernel else s.q.dtype
    grads = chunk_gdn2_bwd(s.q, s.k, s.v, s.b, s.w, f.g_cum, f.A, f.A_qk, f.Y, f.U, f.Qg, f.Kt,
                           f.gC, f.h, f.R, opts.scale, s.initial_state, do, dht, s.cu_seqlens,
                           f.chunk_indices, f.chunk_offsets, pipe.as_dict(), need_dh0=need_dh0,
                           grad_dtypes=(qk_dtype, qk_dtype, s.b.dtype), gate=s.gate)
    dq, dk = grads.dq, grads.dk
    if opts.use_qk_l2norm_in_kernel:
        dq = l2norm_bwd(s.q, s.q_rstd, dq, pipe["l2norm_bwd"])
        dk = l2norm_bwd(s.k, s.k_rstd, dk, pipe["l2norm_bwd"])
    return dq, dk, grads


def _pipeline(q: torch.Tensor, v: torch.Tensor, opts: GDN2Options) -> dispatch.PipelineConfig:
    """The resolved configs of one call, with the caller's ``chunk_size`` when pinned."""
    key = ProblemKey.of(q, v)
    pipe = dispatch.resolve(key)
    return pipe if opts.chunk_size is None else dispatch.with_chunk_size(pipe, opts.chunk_size,
                                                                         key)


# Launch signatures already compiled ahead in this process (bounded: after that many distinct
# shapes, new ones compile lazily as usual).
_compiled_ahead: set[tuple] = set()
_MAX_COMPILE_AHEAD = 64

# Positions of _ChunkGDN2Function.forward's inputs (ctx.needs_input_grad).
_H0_INPUT = 6
_GRAD_INPUTS = 9  # q, k, v, g, b, w, initial_state, A_log, dt_bias


def _compile_ahead_walk(q, k, v, g, b, w, initial_state, opts: GDN2Options,
                        pipe: dispatch.PipelineConfig, with_backward: bool, need_dh0: bool,
                        gate: _gate.GateArgs = _gate.NO_GATE):
    """The call's launches on meta tensors (same shapes, dtypes, configs and flags), for
    ``_launch.compile_ahead``."""
    def walk() -> None:
        m = _launch.meta_like
        mgate = gate._replace(A_log=m(gate.A_log), dt_bias=m(gate.dt_bias))
        saved = _run_forward(*(m(x) for x in (q, k, v, g, b, w, initial_state)), None, opts, pipe,
                             mgate)
        if with_backward:
            _run_backward(saved, m(saved.fwd.o), m(saved.fwd.ht), opts, pipe, need_dh0)
    return walk


def _compile_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts: GDN2Options,
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
    return _launch.compile_ahead(q.device, _compile_ahead_walk(
        q, k, v, g, b, w, initial_state, opts, pipe, with_backward, need_dh0, gate))


_compile_ahead_broken: list[str] = []  # the first failure of compiling ahead, if any


def _forward_compiling_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens,
                             opts: GDN2Options, pipe: dispatch.PipelineConfig,
                             gate: _gate.GateArgs, cu_seqlens_cpu) -> _Saved:
    """``_run_forward`` inside ``_compile_ahead``. Compiling ahead only moves compilation: if
    the parallel path itself fails, the call is run again compiling lazily (a kernel that really
    fails then raises its own error), and this process stops compiling ahead (one warning)."""
    def run() -> _Saved:
        return _run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts, pipe, gate,
                            cu_seqlens_cpu)

    if _compile_ahead_broken:
        return run()
    ahead = False
    try:
        with _compile_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts,
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


class _ChunkGDN2Function(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, b, w, initial_state, A_log, dt_bias, cu_seqlens, cu_seqlens_cpu,
                opts: GDN2Options):
        gate = _gate.GateArgs(opts.gate, A_log, dt_bias, opts.lower_bound)
        with _device.guard(q):
            pipe = _pipeline(q, v, opts)
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
        saved = _Saved(q, k, v, b, w, fwd, h0, cu_seqlens, q_rstd, k_rstd, gate)
        with _device.guard(q):
            dq, dk, grads = _run_backward(saved, do.contiguous(),
                                          dht.contiguous() if dht is not None else None, opts,
                                          pipe, need_dh0=h0 is not None
                                          and ctx.needs_input_grad[_H0_INPUT])
        dA_log = grads.dA_log.to(A_log.dtype) if grads.dA_log is not None else None
        ddt_bias = grads.ddt_bias.to(dt_bias.dtype) if grads.ddt_bias is not None else None
        return (dq.to(q.dtype), dk.to(k.dtype), grads.dv, grads.dg.to(ctx.g_dtype),
                grads.db.to(b.dtype), grads.dw, grads.dh0, dA_log, ddt_bias, None, None, None)


def _expand_qk_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Grouped value heads (HV = G * H) in ``chunk_gdn2``: q and k repeated G times along the
    heads (value head j reads key head j // G), so the chunk kernels see HV heads throughout;
    autograd sums the gradients of each group back. A copy of q and k, not of v, g, b, w."""
    G = v.shape[2] // q.shape[2]
    if G == 1:
        return q, k
    return q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)


def _forward_with_states(q, k, v, g, b, w, initial_state, gate: _gate.GateArgs, cu_seqlens,
                         cu_seqlens_cpu, opts: GDN2Options):
    """``return_intermediate_states``: ``(o, final state, h)`` with h the state entering every
    chunk, ``[B, NT, HV, K, V]`` in k's dtype (FLA's convention; varlen: B = 1, NT over all
    sequences)."""
    with _device.guard(q):
        s = _run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts,
                         _pipeline(q, v, opts), gate, cu_seqlens_cpu)
    h = s.fwd.h
    return s.fwd.o, s.fwd.ht, h.view(q.shape[0], -1, *h.shape[1:]).to(k.dtype)


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
    """Chunkwise Gated Delta Rule-2 (MATH.md), with fla-core 0.6.0's signature.

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
        from gdn2_kernels.cp import chunk_gdn2_cp  # gdn2_kernels.cp imports this module

        return chunk_gdn2_cp(q, k, v, g, b, w, scale, initial_state, output_final_state,
                             use_qk_l2norm_in_kernel, cu_seqlens, disable_recompute,
                             validate_values is not False, cp_context=cp_context)
    pinned = _fla_args.chunk_size(fn, chunk_size, return_intermediate_states)
    if return_intermediate_states and not torch.is_inference_mode_enabled():
        raise ValueError(f"{fn}: return_intermediate_states=True only runs under "
                         "torch.inference_mode() (the states are not differentiable), as in FLA")
    initial_state = _fla_args.state_kv(fn, initial_state, v_first)
    _check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens,
                  cu_seqlens_cpu=cu_seqlens_cpu)
    if check_finite:
        _check_finite(fn, (("q", q), ("k", k), ("v", v), ("b", b), ("w", w),
                           ("initial_state", initial_state)))
    validate_values = _gate_check.mode(validate_values)
    gate = _fla_args.gate_args(fn, use_gate_in_kernel, A_log, dt_bias, lower_bound, safe_gate, q,
                               v)
    has_gate = gate.kind != _gate.GATE_NONE
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
    q, k = _expand_qk_heads(q, k, v)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if has_gate:
        gate = gate._replace(A_log=None if gate.A_log is None else gate.A_log.contiguous(),
                             dt_bias=None if gate.dt_bias is None else gate.dt_bias.contiguous())
    with gate_checked(q.device, validate_values, fn):
        if return_intermediate_states:
            o, ht, h = _forward_with_states(q, k, v, g, b, w, initial_state, gate, cu_seqlens,
                                            cu_seqlens_cpu, opts)
            return (o, _fla_args.state_out(ht, v_first),
                    _fla_args.state_out(h, v_first))
        o, ht = _ChunkGDN2Function.apply(q, k, v, g, b, w, initial_state, gate.A_log,
                                         gate.dt_bias, cu_seqlens, cu_seqlens_cpu, opts)
    return o, _fla_args.state_out(ht, v_first)


# ------------------------------------------------------------------------------------------------
# Decoding (forward only)
# ------------------------------------------------------------------------------------------------

def _check_no_grad(q, k, v, g, b, w, initial_state, *, fn: str = "fused_recurrent_gdn2",
                   A_log=None, dt_bias=None) -> None:
    """The recurrent ops have no backward: refuse inputs that would need one."""
    if not torch.is_grad_enabled():
        return
    named = (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("w", w),
             ("initial_state", initial_state), ("A_log", A_log), ("dt_bias", dt_bias))
    needs = [name for name, x in named if isinstance(x, torch.Tensor) and x.requires_grad]
    if needs:
        raise ValueError(
            f"{fn} is forward-only but {', '.join(needs)} require(s) grad; call "
            "it under torch.no_grad() / torch.inference_mode(), or use chunk_gdn2 for training")


def _recurrent_config(q: torch.Tensor, v: torch.Tensor):
    return dispatch.resolve(ProblemKey.of(q, v))["recurrent_fwd"]


def _contiguous_gate(gate: _gate.GateArgs) -> _gate.GateArgs:
    if gate.kind == _gate.GATE_NONE:
        return gate
    return gate._replace(A_log=None if gate.A_log is None else gate.A_log.contiguous(),
                         dt_bias=None if gate.dt_bias is None else gate.dt_bias.contiguous())


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
    """Token-by-token Gated Delta Rule-2 (MATH.md "Recurrence") for decoding, with fla-core
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
    _check_inputs(q, k, v, g, b, w, scale, _fla_args.state_kv(fn, initial_state, v_first),
                  cu_seqlens, fn=fn)
    if check_finite:
        _check_finite(fn, (("q", q), ("k", k), ("v", v), ("b", b), ("w", w),
                           ("initial_state", initial_state)))
    validate_values = _gate_check.mode(validate_values)
    gate = _fla_args.gate_args(fn, use_gate_in_kernel, A_log, dt_bias, lower_bound, False, q, v)
    _check_no_grad(q, k, v, g, b, w, initial_state, fn=fn, A_log=A_log, dt_bias=dt_bias)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    with _device.guard(q), gate_checked(q.device, validate_values, fn):
        return recurrent_fwd(q, k, v, g if gate.kind != _gate.GATE_NONE else g.float(), b, w,
                             float(scale) if scale is not None else q.shape[-1] ** -0.5,
                             initial_state, bool(output_final_state),
                             bool(use_qk_l2norm_in_kernel), cu_seqlens, _recurrent_config(q, v),
                             gate=_contiguous_gate(gate), state_v_first=v_first,
                             g_err=_g_err(q.device, validate_values))


# ------------------------------------------------------------------------------------------------
# Serving (forward only, no host syncs)
# ------------------------------------------------------------------------------------------------

def _check_serving(fn: str, q, v, initial_state, cu_seqlens, inplace_final_state: bool,
                   output_final_state: bool, ssm_state_indices, num_accepted_tokens, out,
                   v_first: bool) -> None:
    """Shapes, dtypes and devices of the serving entry's state, index and output arguments (no
    value is read: the call stays free of host syncs)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dev = q.device
    N = B if cu_seqlens is None else _check_cu_seqlens_layout(cu_seqlens, B, dev, f"{fn}: ")
    state = (HV, V, K) if v_first else (HV, K, V)
    pooled = ssm_state_indices is not None
    if inplace_final_state and initial_state is None:
        raise ValueError(f"{fn}: inplace_final_state=True updates initial_state in place; pass "
                         "initial_state (the state pool, with ssm_state_indices)")
    if initial_state is not None:
        _require_tensor("initial_state", initial_state)
        what = "[slots, " + ", ".join(("HV", "V", "K") if v_first else ("HV", "K", "V")) + "]"
        if pooled:
            ok = initial_state.ndim == 4 and tuple(initial_state.shape[1:]) == state
        else:
            ok = tuple(initial_state.shape) == (N, *state)
            what = what.replace("slots", "N")
        if not ok:
            raise ValueError(f"{fn}: initial_state must be {what} = "
                             f"{('slots' if pooled else N, *state)}, got "
                             f"{tuple(initial_state.shape)}")
        if initial_state.dtype != torch.float32 or initial_state.device != dev:
            raise ValueError(f"{fn}: initial_state must be float32 on {dev}, got "
                             f"{initial_state.dtype} on {initial_state.device}")
        if initial_state.numel() and not initial_state[0].is_contiguous():
            raise ValueError(f"{fn}: each state of initial_state must be contiguous (the pool "
                             "may be strided along its first axis only)")
    if pooled:
        _require_tensor("ssm_state_indices", ssm_state_indices)
        if (ssm_state_indices.dtype not in (torch.int32, torch.int64)
                or ssm_state_indices.device != dev):
            raise ValueError(f"{fn}: ssm_state_indices must be int32/int64 on {dev}, got "
                             f"{ssm_state_indices.dtype} on {ssm_state_indices.device}")
        if ssm_state_indices.ndim not in (1, 2) or ssm_state_indices.shape[0] != N:
            raise ValueError(f"{fn}: ssm_state_indices must be [N] (one slot per sequence) or "
                             f"[N, T_max] (one per token) with N = {N}, got shape "
                             f"{tuple(ssm_state_indices.shape)}")
        if ssm_state_indices.ndim == 2:
            if cu_seqlens is None and ssm_state_indices.shape[1] < T:
                raise ValueError(f"{fn}: ssm_state_indices [N, T_max] needs T_max >= T = {T}, "
                                 f"got {ssm_state_indices.shape[1]}")
            if output_final_state and not inplace_final_state:
                raise ValueError(f"{fn}: with per-token slots (ssm_state_indices [N, T_max]) the "
                                 "states are written into the pool: pass "
                                 "inplace_final_state=True")
    if num_accepted_tokens is not None:
        _require_tensor("num_accepted_tokens", num_accepted_tokens)
        if not pooled or ssm_state_indices.ndim != 2:
            raise ValueError(f"{fn}: num_accepted_tokens selects each sequence's starting slot "
                             "in ssm_state_indices [N, T_max]; pass that too")
        if (tuple(num_accepted_tokens.shape) != (N,)
                or num_accepted_tokens.dtype not in (torch.int32, torch.int64)
                or num_accepted_tokens.device != dev):
            raise ValueError(f"{fn}: num_accepted_tokens must be int32/int64 [N] = [{N}] on "
                             f"{dev}, got {num_accepted_tokens.dtype} "
                             f"{tuple(num_accepted_tokens.shape)} on "
                             f"{num_accepted_tokens.device}")
    if out is not None:
        _require_tensor("out", out)
        if (tuple(out.shape) != tuple(v.shape) or out.device != dev or not out.is_contiguous()
                or not out.is_floating_point()):
            raise ValueError(f"{fn}: out must be a contiguous floating tensor of v's shape "
                             f"{tuple(v.shape)} on {dev}, got {out.dtype} {tuple(out.shape)} on "
                             f"{out.device}")


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
    _check_inputs(q, k, v, g, b, w, scale, None, None, fn=fn)
    _check_serving(fn, q, v, initial_state, cu_seqlens, inplace_final_state,
                   output_final_state, ssm_state_indices, num_accepted_tokens, out,
                   bool(state_v_first))
    validate_values = _gate_check.mode(validate_values)
    gate = _fla_args.gate_args(fn, use_gate_in_kernel, A_log, dt_bias, lower_bound, False, q, v)
    _check_no_grad(q, k, v, g, b, w, initial_state, fn=fn, A_log=A_log, dt_bias=dt_bias)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if ssm_state_indices is not None:
        ssm_state_indices = ssm_state_indices.contiguous()
    if num_accepted_tokens is not None:
        num_accepted_tokens = num_accepted_tokens.contiguous()
    store = bool(inplace_final_state or output_final_state)
    final_state = initial_state if inplace_final_state else None
    with _device.guard(q), gate_checked(q.device, validate_values, fn):
        return recurrent_fwd(q, k, v, g if gate.kind != _gate.GATE_NONE else g.float(), b, w,
                             float(scale) if scale is not None else q.shape[-1] ** -0.5,
                             initial_state, store, bool(use_qk_l2norm_in_kernel), cu_seqlens,
                             _recurrent_config(q, v), gate=_contiguous_gate(gate),
                             state_v_first=bool(state_v_first), out=out, final_state=final_state,
                             state_indices=ssm_state_indices,
                             num_accepted_tokens=num_accepted_tokens,
                             g_err=_g_err(q.device, validate_values))
