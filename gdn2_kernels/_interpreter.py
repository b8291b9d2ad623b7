"""Workarounds for Triton interpreter bugs; applied only when the interpreter is active.

* bf16 ``tl.dot``: the interpreter stores bf16 tensors as their uint16 bit patterns and its
  ``create_dot`` multiplies those integers (only fp8 operands are converted; seen with Triton 3.9),
  so every bf16 dot returns garbage on the CPU while the same kernel is right on a GPU. The patch
  widens bf16 operands to fp32 (exact) before the product, which is what the GPU's bf16 MMA with an
  fp32 accumulator computes.
* fp32 -> bf16 casts: the interpreter truncates (rounds toward zero), while GPUs round to nearest
  even; truncation biases every bf16 store and roughly doubles bf16 errors on the CPU. The patch
  rounds to nearest even, as the hardware does.
"""
from __future__ import annotations

import numpy as np


def _bf16_bits_to_fp32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits_rne(data: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(is_nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


def patch_bf16_cast() -> bool:
    """Make the interpreter's fp32 -> bf16 cast round to nearest even; False if not applicable."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_gdn2_bf16_fix", False):
        return False

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interp.TensorHandle(_fp32_to_bf16_bits_rne(src.data), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._gdn2_bf16_fix = True
    builder.cast_impl = cast_impl
    return True


def patch_bf16_dot() -> bool:
    """Install the bf16 dot fix into Triton's interpreter; returns False if not applicable."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or getattr(original, "_gdn2_bf16_fix", False):
        return False

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16:
            a = interp.TensorHandle(_bf16_bits_to_fp32(a.data), tl.float32)
        if b.dtype == tl.bfloat16:
            b = interp.TensorHandle(_bf16_bits_to_fp32(b.data), tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._gdn2_bf16_fix = True
    builder.create_dot = create_dot
    return True


def apply() -> None:
    """Install every workaround above (called once, when the interpreter is on)."""
    patch_bf16_dot()
    patch_bf16_cast()
