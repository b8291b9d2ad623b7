"""Row-wise L2 normalisation of q and k for ``use_qk_l2norm_in_kernel`` (docs/math.md "Recurrence").

    x_n = x / sqrt(sum_c x_c^2 + eps)       rstd = 1 / sqrt(sum_c x_c^2 + eps)

Input ``[..., D]`` viewed as rows; output in the input dtype plus ``rstd`` per row (fp32) for the
backward, whose VJP is ``dx = rstd * (dx_n - x_n * sum(dx_n * x_n))``.

Grid: ``(rows / BR,)``; each program normalises ``BR`` whole rows (D padded to a power of two).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gdn2_kernels import _launch

if TYPE_CHECKING:
    from gdn2_kernels.configs import KernelConfig

L2NORM_EPS = 1e-6


@triton.jit(do_not_specialize=["n_rows"])
def _l2norm_fwd_kernel(x, y, rstd, n_rows, eps, D: tl.constexpr, DP: tl.constexpr,
                       BR: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, DP)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    b_x = tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) + eps)
    tl.store(y + o_r[:, None] * D + o_d[None, :], (b_x * b_rstd[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, b_rstd, mask=o_r < n_rows)


@triton.jit(do_not_specialize=["n_rows"])
def _l2norm_bwd_kernel(y, rstd, dy, dx, n_rows, D: tl.constexpr, DP: tl.constexpr,
                       BR: tl.constexpr):
    i_r = tl.program_id(0)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, DP)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = o_r[:, None] * D + o_d[None, :]
    b_y = tl.load(y + p, mask=m, other=0.).to(tl.float32)
    b_dy = tl.load(dy + p, mask=m, other=0.).to(tl.float32)
    b_rstd = tl.load(rstd + o_r, mask=o_r < n_rows, other=0.)
    b_dx = b_rstd[:, None] * (b_dy - b_y * tl.sum(b_dy * b_y, axis=1)[:, None])
    tl.store(dx + p, b_dx.to(dx.dtype.element_ty), mask=m)


def l2norm_grid(n_rows: int, BR: int) -> tuple[int]:
    return (triton.cdiv(n_rows, BR),)


def l2norm_fwd(x: torch.Tensor, config: "KernelConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise the last axis of ``x``. Returns ``(x_n, rstd)``; rstd has x's shape minus D."""
    D = x.shape[-1]
    n_rows = x.numel() // D
    y = _launch.empty_as(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _launch.launch(_l2norm_fwd_kernel, l2norm_grid(n_rows, config["BR"]),
        x=x, y=y, rstd=rstd, n_rows=n_rows, eps=L2NORM_EPS,
        D=D, DP=triton.next_power_of_2(D), BR=config["BR"], **config.launch_options())
    return y, rstd


def l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
               config: "KernelConfig") -> torch.Tensor:
    """VJP of :func:`l2norm_fwd` given its output ``y`` and ``rstd``; returns dx (dtype of dy)."""
    D = y.shape[-1]
    n_rows = y.numel() // D
    dx = _launch.empty_as(dy)
    _launch.launch(_l2norm_bwd_kernel, l2norm_grid(n_rows, config["BR"]),
        y=y, rstd=rstd, dy=dy, dx=dx, n_rows=n_rows,
        D=D, DP=triton.next_power_of_2(D), BR=config["BR"], **config.launch_options())
    return dx
