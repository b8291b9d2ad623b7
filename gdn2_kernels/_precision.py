"""Default dot precision of the chunk kernels for fp32 inputs.

Triton runs an fp32 ``tl.dot`` on TF32 tensor cores unless told otherwise (a 10-bit mantissa).
With fp32 inputs that left ``chunk_gdn2`` about 1.8e-3 relative RMS from the fp64 reference at
T = 1000 on an H200 (``gdn2 verify --backward``, 2026-11-26), above the fp32 tolerance of 1e-3.
For fp32 storage the launchers therefore compile the kernels with ``tf32x3`` (split precision,
fp32-level accuracy) as the default dot precision; dots that name a precision
(``SOLVE_PRECISION``) keep theirs, and bf16 / fp16 operands are not affected. The interpreter
computes fp32 dots exactly and ignores the option.
"""
from __future__ import annotations

import torch

FP32_DOT_PRECISION = "tf32x3"


def launch_options(dtype: torch.dtype) -> dict[str, str]:
    """Extra compile options for a launch whose inputs are stored in ``dtype``."""
    if dtype == torch.float32:
        return {"default_dot_input_precision": FP32_DOT_PRECISION}
    return {}
