"""Public ops: ``chunk_gdn2`` (training and prefill) and ``fused_recurrent_gdn2`` (decoding).

The API follows FLA's ``fla.ops.gdn2.chunk_gdn2`` so it can be swapped in: tensors
``[B, T, H, D]``, states ``[N, H, K, V]`` in fp32, varlen as ``B == 1`` plus ``cu_seqlens``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

from gdn2_kernels import _device, _env, _launch, dispatch
from gdn2_kernels._testing import dtype_name
from gdn2_kernels.configs import MAX_HEAD_DIM, ProblemKey
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


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------

def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens, validate_values: bool,
                  fn: str = "chunk_gdn2"):
    """Check every argument; a failure's message starts with ``fn``, the public op called."""
    try:
        _check_arguments(fn, q, k, v, g, b, w, scale, initial_state, cu_seqlens, validate_values)
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


def _check_arguments(fn, q, k, v, g, b, w, scale, initial_state, cu_seqlens,
                     validate_values: bool):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("w", w)):
        _require_tensor(name, x)
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K] (4-D), got shape {tuple(q.shape)}; "
                         "for one sequence use q[None]")
    B, T, H, K = q.shape
    for name, x in (("k", k), ("g", g), ("b", b)):
        if tuple(x.shape) != (B, T, H, K):
            raise ValueError(f"{name} must have q's shape [B, T, H, K] = {(B, T, H, K)}, "
                             f"got {tuple(x.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {(B, T, H)} as in q, "
                         f"got {tuple(v.shape)}")
    V = v.shape[-1]
    if tuple(w.shape) != tuple(v.shape):
        raise ValueError(f"w (write gate) must have v's shape [B, T, H, V] = {tuple(v.shape)}, "
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
        _require_tensor("cu_seqlens", cu_seqlens)
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), "
                             f"got B = {B}; flatten the batch: x.reshape(1, B * T, ...)")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.device != dev:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {dev}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}, got "
                             f"{bounds[0]} ... {bounds[-1]}")
        if any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError("cu_seqlens must be non-decreasing (sequence boundaries in order)")
        N = len(bounds) - 1
    if initial_state is not None:
        _require_tensor("initial_state", initial_state)
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(f"initial_state must be [N, H, K, V] = {(N, H, K, V)} "
                             f"(N = {'number of sequences' if cu_seqlens is not None else 'B'}), "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.dtype != torch.float32:
            raise TypeError(f"initial_state must be float32 (the state is kept in fp32), got "
                            f"{initial_state.dtype}")
        if initial_state.device != dev:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {dev}")
    if validate_values:
        bad = ~torch.isfinite(g) | (g > 0)
        if bool(bad.any()):
            raise ValueError("g (log-decay) has NaN, Inf or positive entries; it must be finite "
                             "and <= 0 (decay exp(g) in (0, 1]). Check the gate computation.")


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


def _run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts: GDN2Options,
                 pipe: dispatch.PipelineConfig) -> _Saved:
    """Every forward launch of one call (the autograd forward and the compile-ahead walk)."""
    q_rstd = k_rstd = None
    if opts.use_qk_l2norm_in_kernel:
        q, q_rstd = l2norm_fwd(q, pipe["l2norm_fwd"])
        k, k_rstd = l2norm_fwd(k, pipe["l2norm_fwd"])
    res = chunk_gdn2_fwd(q, k, v, g.float(), b, w, opts.scale, initial_state,
                         opts.output_final_state, cu_seqlens, pipe.as_dict(),
                         store_h=opts.disable_recompute)
    return _Saved(q, k, v, b, w, res, initial_state, cu_seqlens, q_rstd, k_rstd)


def _run_backward(s: _Saved, do, dht, opts: GDN2Options, pipe: dispatch.PipelineConfig,
                  need_dh0: bool) -> tuple[torch.Tensor, torch.Tensor, BwdResult]:
    """Every backward launch of one call: ``(dq, dk, the other gradients)``, dq/dk fp32."""
    f = s.fwd
    grads = chunk_gdn2_bwd(s.q, s.k, s.v, s.b, s.w, f.g_cum, f.A, f.A_qk, f.Y, f.U, f.Qg, f.Kt,
                           f.gC, f.h, opts.scale, s.initial_state, do, dht, s.cu_seqlens,
                           f.chunk_indices, f.chunk_offsets, pipe.as_dict(), need_dh0=need_dh0)
    dq, dk = grads.dq, grads.dk
    if opts.use_qk_l2norm_in_kernel:
        dq = l2norm_bwd(s.q, s.q_rstd, dq, pipe["l2norm_bwd"])
        dk = l2norm_bwd(s.k, s.k_rstd, dk, pipe["l2norm_bwd"])
    return dq, dk, grads


# Launch signatures already compiled ahead in this process (bounded: after that many distinct
# shapes, new ones compile lazily as usual).
_compiled_ahead: set[tuple] = set()
_MAX_COMPILE_AHEAD = 64


def _compile_ahead_walk(q, k, v, g, b, w, initial_state, opts: GDN2Options,
                        pipe: dispatch.PipelineConfig, with_backward: bool, need_dh0: bool):
    """The call's launches on meta tensors (same shapes, dtypes, configs and flags), for
    ``_launch.compile_ahead``."""
    def walk() -> None:
        m = _launch.meta_like
        saved = _run_forward(*(m(x) for x in (q, k, v, g, b, w, initial_state)), None, opts, pipe)
        if with_backward:
            _run_backward(saved, m(saved.fwd.o), m(saved.fwd.ht), opts, pipe, need_dh0)
    return walk


def _compile_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts: GDN2Options,
                   pipe: dispatch.PipelineConfig):
    """``_launch.compile_ahead`` on the first call of a launch signature on a GPU, else a no-op."""
    if (not q.is_cuda or cu_seqlens is not None or not _env.compile_ahead_enabled()
            or torch.compiler.is_compiling() or len(_compiled_ahead) >= _MAX_COMPILE_AHEAD):
        return contextlib.nullcontext(False)
    with_backward = any(ctx.needs_input_grad[:7])
    need_dh0 = initial_state is not None and ctx.needs_input_grad[6]
    key = (tuple(q.shape), tuple(v.shape), q.dtype, g.dtype, opts, with_backward, need_dh0,
           q.device, tuple((name, cfg.label()) for name, cfg in pipe.configs))
    if key in _compiled_ahead:
        return contextlib.nullcontext(False)
    _compiled_ahead.add(key)
    return _launch.compile_ahead(q.device, _compile_ahead_walk(
        q, k, v, g, b, w, initial_state, opts, pipe, with_backward, need_dh0))


_compile_ahead_broken: list[str] = []  # the first failure of compiling ahead, if any


def _forward_compiling_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens,
                             opts: GDN2Options, pipe: dispatch.PipelineConfig) -> _Saved:
    """``_run_forward`` inside ``_compile_ahead``. Compiling ahead only moves compilation: if
    the parallel path itself fails, the call is run again compiling lazily (a kernel that really
    fails then raises its own error), and this process stops compiling ahead (one warning)."""
    if _compile_ahead_broken:
        return _run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts, pipe)
    ahead = False
    try:
        with _compile_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts,
                            pipe) as ahead:
            return _run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts, pipe)
    except Exception as exc:  # noqa: BLE001 - re-raised below unless compiling ahead was on
        if not ahead:
            raise
        _compile_ahead_broken.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"gdn2_kernels: compiling ahead failed ({_compile_ahead_broken[0][:300]});"
                      " compiling each kernel at its first launch from now on", RuntimeWarning,
                      stacklevel=3)
        return _run_forward(q, k, v, g, b, w, initial_state, cu_seqlens, opts, pipe)


class _ChunkGDN2Function(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts: GDN2Options):
        with _device.guard(q):
            key = ProblemKey(q.shape[-1], v.shape[-1], dtype_name(q.dtype))
            pipe = dispatch.resolve(key)
            s = _forward_compiling_ahead(ctx, q, k, v, g, b, w, initial_state, cu_seqlens, opts,
                                         pipe)
        f = s.fwd
        ctx.save_for_backward(s.q, s.k, s.v, s.b, s.w, f.g_cum, f.A, f.A_qk, f.Y, f.U, f.Qg, f.Kt,
                              f.gC, f.h, s.initial_state, s.cu_seqlens, f.chunk_indices,
                              f.chunk_offsets, s.q_rstd, s.k_rstd)
        ctx.opts = opts
        ctx.pipe = pipe
        ctx.g_dtype = g.dtype
        return f.o, f.ht

    @staticmethod
    def backward(ctx, do, dht):
        (q, k, v, b, w, g_cum, A, A_qk, Y, U, Qg, Kt, gC, h, h0, cu_seqlens, idx, offs,
         q_rstd, k_rstd) = ctx.saved_tensors
        opts, pipe = ctx.opts, ctx.pipe
        fwd = FwdResult(None, None, g_cum, A, A_qk, Y, U, Qg, Kt, gC, h, idx, offs)
        saved = _Saved(q, k, v, b, w, fwd, h0, cu_seqlens, q_rstd, k_rstd)
        with _device.guard(q):
            dq, dk, grads = _run_backward(saved, do.contiguous(),
                                          dht.contiguous() if dht is not None else None, opts,
                                          pipe, need_dh0=h0 is not None and ctx.needs_input_grad[6])
        return (dq.to(q.dtype), dk.to(k.dtype), grads.dv, grads.dg.to(ctx.g_dtype),
                grads.db.to(b.dtype), grads.dw, grads.dh0, None, None)


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
    cu_seqlens: torch.Tensor | None = None,
    disable_recompute: bool = False,
    validate_values: bool = True,
    *,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise Gated Delta Rule-2 (MATH.md), FLA-compatible.

    Args:
        q: queries ``[B, T, H, K]``, float32 / bfloat16 / float16.
        k: keys ``[B, T, H, K]``, same dtype as q.
        v: values ``[B, T, H, V]``, same dtype as q.
        g: log-decay ``[B, T, H, K]``, float32 (bf16/fp16 upcast exactly), finite and <= 0.
        b: erase gate ``[B, T, H, K]`` in [0, 1] (or [0, 2] with negative eigenvalues), q's dtype.
        w: write gate ``[B, T, H, V]`` in [0, 1], q's dtype.
        scale: query scale; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` float32 state entering each sequence; default zeros.
        output_final_state: also return the state after the last token. Default False.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head inside the op. Default False.
        cu_seqlens: ``[N + 1]`` int32/int64 boundaries of sequences packed along T (needs B == 1).
        disable_recompute: keep the per-chunk states from the forward for the backward (more
            memory, less time). Default False.
        validate_values: check g for NaN/Inf/positive entries (one device sync). Default True.
        check_finite: keyword-only; also refuse NaN/Inf in q, k, v, b, w and initial_state
            (``ValueError`` naming them). Costs one isfinite reduction over each of those
            tensors and one host sync per call. Default False.

    Returns:
        o: ``[B, T, H, V]`` in q's dtype.
        final_state: ``[N, H, K, V]`` float32 if ``output_final_state`` else None.

    Raises:
        TypeError / ValueError naming the offending argument, for wrong types, shapes, dtypes,
        devices, head dims over 256, bad ``cu_seqlens`` or gates.
    """
    _check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens, validate_values)
    if check_finite:
        _check_finite("chunk_gdn2", (("q", q), ("k", k), ("v", v), ("b", b), ("w", w),
                                     ("initial_state", initial_state)))
    opts = GDN2Options(
        scale=float(scale) if scale is not None else q.shape[-1] ** -0.5,
        output_final_state=bool(output_final_state),
        use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel),
        has_initial_state=initial_state is not None,
        is_varlen=cu_seqlens is not None,
        disable_recompute=bool(disable_recompute),
    )
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return _ChunkGDN2Function.apply(q, k, v, g, b, w, initial_state, cu_seqlens, opts)


# ------------------------------------------------------------------------------------------------
# Decoding (forward only)
# ------------------------------------------------------------------------------------------------

def _check_no_grad(q, k, v, g, b, w, initial_state) -> None:
    """``fused_recurrent_gdn2`` has no backward: refuse inputs that would need one."""
    if not torch.is_grad_enabled():
        return
    named = (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("w", w),
             ("initial_state", initial_state))
    needs = [name for name, x in named if x is not None and x.requires_grad]
    if needs:
        raise ValueError(
            f"fused_recurrent_gdn2 is forward-only but {', '.join(needs)} require(s) grad; call "
            "it under torch.no_grad() / torch.inference_mode(), or use chunk_gdn2 for training")


def fused_recurrent_gdn2(
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
    validate_values: bool = True,
    *,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token Gated Delta Rule-2 (MATH.md "Recurrence") for decoding; forward only.

    Same arguments, layout and results as :func:`chunk_gdn2` (FLA-compatible), with the state kept
    in fp32 registers one token at a time: use it for decode steps (T = 1, any batch) and short
    prompts; use ``chunk_gdn2`` for training and long prefills.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g (float32 log-decay, <= 0), b: ``[B, T, H, K]``;
            w: ``[B, T, H, V]``. q, k, v, b, w share one dtype (float32 / bfloat16 / float16).
        scale: query scale; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` float32; default zeros.
        output_final_state: also return the state after the last token. Default False.
        use_qk_l2norm_in_kernel: L2-normalise q and k inside the kernel. Default False.
        cu_seqlens: ``[N + 1]`` int32/int64 boundaries of packed sequences (needs B == 1).
        validate_values: check g for NaN/Inf/positive entries (one device sync per call; pass
            False in a decode loop whose gates are correct by construction). Default True.
        check_finite: keyword-only; also refuse NaN/Inf in q, k, v, b, w and initial_state
            (one isfinite reduction over each and one host sync per call). Default False.

    Returns:
        o: ``[B, T, H, V]`` in q's dtype.
        final_state: ``[N, H, K, V]`` float32 if ``output_final_state`` else None.

    Raises:
        TypeError / ValueError as :func:`chunk_gdn2`, and ValueError when an input requires grad
        (this op has no backward: call it under ``torch.no_grad()`` or use ``chunk_gdn2``).
    """
    fn = "fused_recurrent_gdn2"
    _check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens, validate_values, fn)
    _check_no_grad(q, k, v, g, b, w, initial_state)
    if check_finite:
        _check_finite(fn, (("q", q), ("k", k), ("v", v), ("b", b), ("w", w),
                           ("initial_state", initial_state)))
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    with _device.guard(q):
        key = ProblemKey(q.shape[-1], v.shape[-1], dtype_name(q.dtype))
        config = dispatch.resolve(key)["recurrent_fwd"]
        return recurrent_fwd(q, k, v, g.float(), b, w,
                             float(scale) if scale is not None else q.shape[-1] ** -0.5,
                             initial_state, bool(output_final_state),
                             bool(use_qk_l2norm_in_kernel), cu_seqlens, config)
