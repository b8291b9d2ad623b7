"""The keyword arguments of fla-core 0.6.0's GDN-2 ops beyond the tensors: their checks and their
translation into what our kernels take (``ops.py`` calls these; each names the op it serves).

* the in-kernel gate (``use_gate_in_kernel``, ``A_log``, ``dt_bias``, ``lower_bound``,
  ``safe_gate``) -> a :class:`~gdn2_kernels.kernels._gate.GateArgs`;
* the state layout (``state_v_first`` and its deprecated name ``transpose_state_layout``);
* ``chunk_size`` (one of our chunk sizes, ``configs.CHUNK_SIZES``), and what ``cp_context``
  (context parallelism, ``gdn2_kernels.cp``) does not cover yet: refused with a clear error
  rather than ignored.

Checks read shapes, dtypes and devices only; the values of the gate input and its parameters are
checked inside the forward kernels, after the activation (``_gate_check``).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from gdn2_kernels.configs import CHUNK_SIZES
from gdn2_kernels.kernels import _gate

# fla-core's bounded gate requires lower_bound in [-5, 0) (its safe-gate range).
LOWER_BOUND_MIN = -5.0
# FLA returns intermediate states at this chunk size (its only one).
FLA_CHUNK_SIZE = 64

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def state_layout(fn: str, state_v_first: bool, transpose_state_layout: bool | None) -> bool:
    """``state_v_first``, or the deprecated ``transpose_state_layout`` (FLA's warning) when given."""
    if transpose_state_layout is None:
        return bool(state_v_first)
    if state_v_first:
        raise ValueError(f"{fn}: pass either state_v_first or the deprecated "
                         "transpose_state_layout, not both")
    warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
                  DeprecationWarning, stacklevel=3)
    return bool(transpose_state_layout)


def cp_unsupported(fn: str, **given) -> None:
    """Context parallelism (``cp_context``) runs ``gdn2_kernels.cp.chunk_gdn2_cp``, which covers
    chunk_gdn2's core arguments: refuse the others when they are set, rather than ignore them."""
    bad = [name for name, value in given.items() if value]
    if bad:
        raise NotImplementedError(
            f"{fn}: with cp_context, {', '.join(bad)} is not supported yet (context parallelism "
            "covers q, k, v, g, b, w, scale, initial_state, output_final_state, "
            "use_qk_l2norm_in_kernel, cu_seqlens and disable_recompute); call without it")


def chunk_size(fn: str, size, return_intermediate_states: bool) -> int | None:
    """The chunk size to pin, or None for the tuned one. Intermediate states default to FLA's 64."""
    if size is None:
        return FLA_CHUNK_SIZE if return_intermediate_states else None
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size not in CHUNK_SIZES:
        raise ValueError(f"{fn}: chunk_size = {size!r} is not supported; use one of "
                         f"{CHUNK_SIZES}, or leave it unset for the tuned chunk size")
    return int(size)


def _gate_param(fn: str, name: str, x, numel: int, what: str, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() != numel:
        raise ValueError(f"{fn}: {name} must hold {what} = {numel} values (shape [{numel}]), got "
                         f"shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; use float32 (or bfloat16/float16)")
    if x.device != like.device:
        raise ValueError(f"{fn}: {name} is on {x.device} but q is on {like.device}")
    return x


def gate_args(fn: str, use_gate_in_kernel: bool, A_log, dt_bias, lower_bound, safe_gate: bool,
              q: torch.Tensor, v: torch.Tensor) -> _gate.GateArgs:
    """Check the gate arguments (FLA's rules, plus refusing arguments that would have no effect)
    and return the kernels' :class:`GateArgs` (A_log and dt_bias flattened and contiguous).

    Heads of A_log / dt_bias are the value heads HV = ``v.shape[2]`` (those of g), K = q's.
    """
    if not use_gate_in_kernel:
        given = [n for n, x in (("A_log", A_log), ("dt_bias", dt_bias)) if x is not None]
        if given:
            raise ValueError(f"{fn}: {' and '.join(given)} only act with use_gate_in_kernel=True "
                             "(g is then the raw gate input); pass use_gate_in_kernel=True, or "
                             "drop them when g is already the log-decay")
        if lower_bound is not None and not safe_gate:
            raise ValueError(f"{fn}: lower_bound only acts with use_gate_in_kernel=True (the "
                             "bounded gate) or safe_gate=True; pass one of them or drop it")
    if lower_bound is not None:
        if (isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real)
                or not math.isfinite(lower_bound)
                or not LOWER_BOUND_MIN <= float(lower_bound) < 0.0):
            raise ValueError(f"{fn}: lower_bound must be a number in [{LOWER_BOUND_MIN:g}, 0) "
                             f"(the bounded gate's range, as in FLA), got {lower_bound!r}")
    if not use_gate_in_kernel:
        return _gate.NO_GATE
    if safe_gate and lower_bound is None:
        raise ValueError(f"{fn}: safe_gate=True with use_gate_in_kernel=True needs lower_bound "
                         f"(in [{LOWER_BOUND_MIN:g}, 0)), as in FLA")
    if A_log is None and lower_bound is None:
        raise ValueError(f"{fn}: use_gate_in_kernel=True needs A_log (the softplus gate "
                         "-exp(A_log) * softplus(g + dt_bias)) or lower_bound (the bounded gate)")
    HV, K = v.shape[2], q.shape[-1]
    if A_log is not None:
        A_log = _gate_param(fn, "A_log", A_log, HV, "one per value head, HV",
                            q).reshape(HV).contiguous()
    if dt_bias is not None:
        dt_bias = _gate_param(fn, "dt_bias", dt_bias, HV * K, "one per value head and key "
                              "channel, HV * K", q).reshape(HV * K).contiguous()
    kind = _gate.GATE_SOFTPLUS if lower_bound is None else _gate.GATE_BOUNDED
    return _gate.GateArgs(kind, A_log, dt_bias,
                          0.0 if lower_bound is None else float(lower_bound))


def state_kv(fn: str, state: torch.Tensor | None, v_first: bool, what: str = "initial_state"):
    """A ``[.., K, V]`` view of a state given in the caller's layout (``[.., V, K]`` when
    ``v_first``), for the checks and kernels that take K-first states."""
    if state is None or not v_first:
        return state
    if not isinstance(state, torch.Tensor) or state.ndim < 2:
        raise TypeError(f"{fn}: {what} must be a torch.Tensor [N, HV, V, K] (state_v_first=True)")
    return state.transpose(-1, -2)


def state_out(state: torch.Tensor | None, v_first: bool) -> torch.Tensor | None:
    """A state from the kernels (``[.., K, V]``) in the caller's layout, contiguous."""
    if state is None or not v_first:
        return state
    return state.transpose(-1, -2).contiguous()


__all__ = ["FLA_CHUNK_SIZE", "LOWER_BOUND_MIN", "chunk_size", "gate_args",
           "cp_unsupported", "state_kv", "state_layout", "state_out"]
