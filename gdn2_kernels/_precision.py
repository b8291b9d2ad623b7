"""Precision of the chunk kernels' dots that have no tuned precision (``DOT_PRECISION``).

Triton runs an fp32 ``tl.dot`` on TF32 tensor cores unless the call names another precision (a
10-bit mantissa). With fp32 inputs that left ``chunk_gdn2`` 1.8e-3 relative RMS from the fp64
reference at B=2, T=1000, H=4, K=64, V=96 on an H200, above the fp32 tolerance of 1e-3; with
every dot at IEEE precision it was 2.5e-7 (``lab/device_fp32_check.py``, 2026-11-26; a
compile option ``default_dot_input_precision`` had no effect: ``tl.dot`` resolves its default
before the backend sees it). So each such dot names ``DOT_PRECISION`` explicitly: ``tf32x3``
(split precision, fp32-level accuracy) for fp32 storage, and for bf16 / fp16 storage ``tf32``,
which is what those kernels compiled with before (their fp32-operand dots were tuned and
verified that way). Dots with a tuned precision (``SOLVE_PRECISION``) keep it.
"""
from __future__ import annotations

import torch

FP32_DOT_PRECISION = "tf32x3"
DEFAULT_DOT_PRECISION = "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PRECISION`` for a launch whose inputs are stored in ``dtype``."""
    return FP32_DOT_PRECISION if dtype == torch.float32 else DEFAULT_DOT_PRECISION
