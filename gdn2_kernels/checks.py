"""Argument checks of the public ops, made before any launch.

Every failure raises ``TypeError`` / ``ValueError`` naming the argument, the op called and the fix
(STYLE 6). Only shapes, dtypes and devices are read, plus the values of ``cu_seqlens`` (never a
tensor's data otherwise; g is checked inside the kernels, ``_gate_check``), except where a check
says it syncs (``check_finite``, the context-parallel host check of g).
"""
from __future__ import annotations

import math

import torch

from gdn2_kernels import _device, _gate_check
from gdn2_kernels.configs import MAX_HEAD_DIM

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens, cu_seqlens_cpu=None,
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


def check_finite(fn: str, named: tuple[tuple[str, torch.Tensor | None], ...]) -> None:
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
        raise ValueError("inputs are on the CPU but Triton's interpreter is off (a CUDA device is "
                         "present, or TRITON_INTERPRET=0); move them to a CUDA device, or set "
                         "TRITON_INTERPRET=1 before importing gdn2_kernels")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"inputs are on {dev}; {fn} runs on CUDA devices (or the CPU "
                         "through Triton's interpreter)")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None (for K**-0.5), got "
                         f"{scale!r}")

    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens_layout(cu_seqlens, B, dev)
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


def check_cu_seqlens_layout(cu_seqlens, B: int, dev: torch.device, prefix: str = "") -> int:
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


def check_rank_inputs(q, k, v, g, b, w, scale, initial_state, cu_seqlens,
                      validate_values: bool) -> None:
    """The boundary checks of ``chunk_gdn2`` (TypeError / ValueError naming the argument and
    the fix; the caller prefixes the op's name), run on each rank's slice by ``gdn2_kernels.cp``.
    With ``validate_values`` g's
    values are read here, on the host: a context-parallel call synchronises its ranks anyway, and
    its kernels run without the in-kernel check of :func:`chunk_gdn2`."""
    _check_arguments("chunk_gdn2_cp", q, k, v, g, b, w, scale, initial_state, cu_seqlens, None)
    if validate_values and bool((~torch.isfinite(g) | (g > 0)).any()):
        raise _gate_check.InvalidGateError(_gate_check.MESSAGE)


def check_no_grad(q, k, v, g, b, w, initial_state, *, fn: str = "fused_recurrent_gdn2",
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


def check_serving(fn: str, q, v, initial_state, cu_seqlens, inplace_final_state: bool,
                   output_final_state: bool, ssm_state_indices, num_accepted_tokens, out,
                   v_first: bool) -> None:
    """Shapes, dtypes and devices of the serving entry's state, index and output arguments (no
    value is read: the call stays free of host syncs)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    dev = q.device
    N = B if cu_seqlens is None else check_cu_seqlens_layout(cu_seqlens, B, dev, f"{fn}: ")
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


__all__ = ["check_cu_seqlens_layout", "check_finite", "check_inputs", "check_no_grad",
           "check_rank_inputs", "check_serving"]
