"""One switch that runs flash-linear-attention models on gdn2_kernels' GDN-2 ops.

    from gdn2_kernels.integrations import fla
    fla.enable()          # or: GDN2_FLA=1 in the environment, then import gdn2_kernels
    ...                   # FLA's GatedDeltaNet2 layers (and any caller of fla.ops.gdn2) run ours
    fla.disable()         # back to FLA's kernels

What is routed (fla-core 0.6.0):

* ``fused_recurrent_gdn2_fwd``, which FLA dispatches through its backend registry: registered as
  the ``gdn2_kernels`` backend of the ``gdn2`` operation (``fla.backends.register``), whose
  verifier declines the calls we do not cover (FLA's own kernel runs them);
* ``chunk_gdn2`` and ``fused_recurrent_gdn2``, which FLA does not dispatch: rebound in
  ``fla.ops.gdn2`` and in every loaded module that imported them (``fla.layers.gdn2``); modules
  imported later pick up the rebound names. Each call goes through the same kind of verifier.

Declined calls (with the reason logged once at INFO): tensors not on a CUDA device (or the CPU
under our interpreter), dtypes or head dims outside ours, ``cp_context`` (context parallelism),
a ``chunk_size`` we do not have, and keywords our ops do not take (FLA ignores unknown ones; ours
would raise). Everything else runs our kernels with FLA's semantics (``validate_values=False``,
as FLA checks no values). The state, gate and layout conventions are the same, so a model's
weights, caches and outputs carry over; results agree to rounding.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Any, Callable

import torch

from gdn2_kernels import _device, _fla_args, ops
from gdn2_kernels.configs import CHUNK_SIZES, MAX_HEAD_DIM

log = logging.getLogger("gdn2_kernels.integrations.fla")

BACKEND_TYPE = "gdn2_kernels"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_state: dict[str, Any] = {"enabled": False, "originals": {}, "backend": None}
_declined: set[str] = set()


def enabled() -> bool:
    return bool(_state["enabled"])


# ------------------------------------------------------------------------------------------------
# Which calls we cover
# ------------------------------------------------------------------------------------------------

def covers(op: Callable, *args, **kwargs) -> tuple[bool, str | None]:
    """``(True, None)`` when our ``op`` can run this FLA call, else ``(False, reason)``."""
    try:
        bound = inspect.signature(op).bind(*args, **kwargs)
    except TypeError as exc:
        return False, f"arguments our {op.__name__} does not take: {exc}"
    a = bound.arguments
    tensors = [a.get(n) for n in ("q", "k", "v", "g", "b", "w")]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False, "q, k, v, g, b, w must be tensors"
    q, v = tensors[0], tensors[2]
    dev = q.device
    if not (dev.type == "cuda" or (dev.type == "cpu" and _device.interpreter_active())):
        return False, f"tensors on {dev}"
    if any(t.dtype not in _DTYPES for t in tensors):
        return False, "a dtype outside float32 / bfloat16 / float16"
    if q.ndim != 4 or v.ndim != 4 or q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False, f"head dims over {MAX_HEAD_DIM} or tensors not [B, T, H, D]"
    if a.get("cp_context") is not None:
        return False, "cp_context (context parallelism) is not supported by gdn2_kernels yet"
    size = a.get("chunk_size")
    if size is not None and size not in CHUNK_SIZES:
        return False, f"chunk_size={size!r} (ours: {CHUNK_SIZES})"
    if (op is not ops.chunk_gdn2 and torch.is_grad_enabled()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a.values())):
        return False, "inputs that require grad (FLA's recurrent kernel ignores them)"
    try:  # gate arguments FLA ignores or accepts unchecked, where ours raise
        _fla_args.gate_args(op.__name__, a.get("use_gate_in_kernel", False), a.get("A_log"),
                            a.get("dt_bias"), a.get("lower_bound"), a.get("safe_gate", False),
                            q, v)
    except (TypeError, ValueError) as exc:
        return False, str(exc)
    return True, None


def _route(name: str, ours: Callable, original: Callable) -> Callable:
    """``ours`` for the calls it covers, else FLA's ``original``."""

    @functools.wraps(original)
    def routed(*args, **kwargs):
        ok, reason = covers(ours, *args, **kwargs)
        if not ok:
            _decline(name, reason)
            return original(*args, **kwargs)
        return ours(*args, validate_values=False, **kwargs)

    routed.__gdn2_original__ = original
    return torch.compiler.disable(routed)


def _decline(name: str, reason: str | None) -> None:
    key = f"{name}: {reason}"
    if key not in _declined:
        _declined.add(key)
        log.info("gdn2_kernels declined fla.ops.gdn2.%s (%s); FLA's kernel runs it", name, reason)


# ------------------------------------------------------------------------------------------------
# FLA's backend registry (fused_recurrent_gdn2_fwd)
# ------------------------------------------------------------------------------------------------

def _make_backend():
    from fla.backends import BaseBackend, register

    class GDN2KernelsBackend(BaseBackend):
        """gdn2_kernels' implementation of FLA's dispatched GDN-2 entry points."""

        backend_type = BACKEND_TYPE
        package_name = None
        env_var = None
        priority = 1  # before FLA's own; Ascend's (0, NPU only) stays first

        @classmethod
        def is_available(cls) -> bool:
            return True

        def is_enabled(self) -> bool:
            return enabled()

        def fused_recurrent_gdn2_fwd_verifier(self, *args, **kwargs):
            return covers(ops.fused_recurrent_gdn2_fwd, *args, **kwargs)

        def fused_recurrent_gdn2_fwd(self, *args, **kwargs):
            return ops.fused_recurrent_gdn2_fwd(*args, **kwargs)

    register("gdn2")(GDN2KernelsBackend)
    return GDN2KernelsBackend


# ------------------------------------------------------------------------------------------------
# The switch
# ------------------------------------------------------------------------------------------------

_PUBLIC = {"chunk_gdn2": ops.chunk_gdn2, "fused_recurrent_gdn2": ops.fused_recurrent_gdn2}


def enable() -> None:
    """Route FLA's GDN-2 entry points to ours (idempotent). Raises ImportError without fla-core."""
    if enabled():
        return
    import fla.ops.gdn2 as fla_gdn2  # noqa: F401 - the modules whose names are rebound

    if _state["backend"] is None:
        _state["backend"] = _make_backend()
    originals = _state["originals"]
    for name, ours in _PUBLIC.items():
        original = getattr(fla_gdn2, name)
        original = getattr(original, "__gdn2_original__", original)
        originals[name] = original
        _rebind(original, _route(name, ours, original))
    _state["enabled"] = True


def disable() -> None:
    """Undo :func:`enable`: FLA's own kernels again (the backend stays registered, disabled)."""
    if not enabled():
        return
    import fla.ops.gdn2 as fla_gdn2

    for name, original in _state["originals"].items():
        _rebind(getattr(fla_gdn2, name), original)
    _state["originals"] = {}
    _state["enabled"] = False


def _rebind(old: Callable, new: Callable) -> None:
    """Point every loaded ``fla`` module's name bound to ``old`` at ``new``."""
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "fla" or mod_name.startswith("fla.")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)


__all__ = ["BACKEND_TYPE", "covers", "disable", "enable", "enabled"]
