"""Shared by tests, the tuner's verification and the benchmarks: inputs, error metrics, tolerances.

One input factory (:func:`make_inputs`) with well-conditioned gates, so references, tests, tuning
and benchmarks cannot drift apart, and one tolerance table (:data:`TOLERANCES`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

# Relative RMS error (||x - ref|| / ||ref||) allowed per named tensor, against the float64
# reference. bf16/fp16 values follow FLA's test tolerances (issue 3); fp32 allows for tf32 dots on
# GPUs. Never relaxed to make a test pass.
_LOW_PRECISION = {
    "o": 5e-3, "ht": 5e-3,
    "dq": 1e-2, "dk": 1e-2, "dv": 1e-2, "dh0": 1e-2,
    "db": 2e-2, "dw": 2e-2, "dg": 2e-2,
    # the in-kernel gate's parameters: sums of dg terms, held to dg's allowance
    "dA_log": 2e-2, "ddt_bias": 2e-2,
    "g_cum": 1e-5, "A": 5e-3, "A_qk": 5e-3, "Y": 5e-3, "U": 5e-3, "qn": 5e-3,
    "Qg": 5e-3, "Kt": 5e-3, "gC": 1e-5,
}
# gC = exp(G_C): its relative error is the absolute error of the fp32 cumsum G_C, which grows with
# |G_C| (hundreds of nats under strong decay), so it gets g_cum's absolute-scale allowance, 1e-5.
_FP32 = {name: 1e-3 for name in _LOW_PRECISION} | {"g_cum": 1e-6, "gC": 1e-5}
TOLERANCES: dict[str, dict[str, float]] = {
    "bfloat16": _LOW_PRECISION,
    "float16": _LOW_PRECISION,
    "float32": _FP32,
    "float64": {name: 1e-9 for name in _FP32},
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def short_dtype_name(dtype: torch.dtype) -> str:
    """'fp32', 'bf16', 'fp16', 'fp64': the dtype in readable test ids and labels."""
    return dtype_name(dtype).replace("float", "fp").replace("bfp", "bf")


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x has a NaN or Inf (unwritten or broken)."""
    x64, r64 = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x64).all():
        return float("inf")
    denom = r64.norm().item()
    num = (x64 - r64).norm().item()
    return num / denom if denom > 0 else num


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| in float64; inf when x has a NaN or Inf."""
    x64, r64 = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x64).all():
        return float("inf")
    scale = r64.abs().max().item()
    err = (x64 - r64).abs().max().item() if x64.numel() else 0.0
    return err / scale if scale > 0 else err


@dataclass(frozen=True)
class ErrorReport:
    name: str
    rel_rms: float
    max_rel_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_rms <= self.tolerance


def compare(outputs: dict[str, torch.Tensor], refs: dict[str, torch.Tensor],
            dtype: str) -> list[ErrorReport]:
    """Per-tensor errors of ``outputs`` against ``refs`` with the tolerance for ``dtype``."""
    return [ErrorReport(n, rel_rms(outputs[n], refs[n]), max_rel_err(outputs[n], refs[n]),
                        TOLERANCES[dtype][n]) for n in outputs]


@dataclass
class GDN2Inputs:
    """One problem's tensors in FLA's layout. ``h0`` is None unless asked for."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    h0: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None and f.name != "cu_seqlens"}

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
           requires_grad: bool = False) -> "GDN2Inputs":
        """A copy; g and h0 stay float32 (or float64) as the op requires; leaves if asked."""

        def conv(name: str, x: torch.Tensor | None):
            if x is None:
                return None
            dt = dtype
            if name in ("g", "h0") and dtype in (torch.bfloat16, torch.float16):
                dt = torch.float32
            y = x.detach().to(device=device, dtype=dt).clone()
            return y.requires_grad_(requires_grad)

        cu = self.cu_seqlens.to(device) if self.cu_seqlens is not None else None
        return GDN2Inputs(**{f.name: conv(f.name, getattr(self, f.name))
                             for f in fields(self) if f.name != "cu_seqlens"}, cu_seqlens=cu)


DECAYS = ("normal", "weak", "strong")


def make_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    decay: str = "normal",
    b_max: float = 1.0,
    with_h0: bool = False,
    cu_seqlens: list[int] | None = None,
    normalize_qk: bool = True,
    seed: int | None = None,
) -> GDN2Inputs:
    """Random GDN-2 inputs with well-conditioned gates.

    q and k are L2-normalised (as the layer does) unless ``normalize_qk`` is False; g is the
    log-decay in float32: 'normal' spans about [-2, -0.002], 'weak' [-0.02, 0), 'strong' down to
    -20 per token; b is uniform in [0, b_max] (b_max=2 for negative eigenvalues); w in [0, 1].
    With ``cu_seqlens`` (sequence boundaries, last one equal to T) B must be 1 and h0 has one state
    per sequence. ``seed=None`` draws fresh random numbers every call.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if gen is None:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    if normalize_qk:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
    if decay == "normal":
        g = F.logsigmoid(randn(B, T, H, K) * 1.5 + 3.0)
    elif decay == "weak":
        g = -0.02 * rand(B, T, H, K)
    else:
        g = -20.0 * rand(B, T, H, K)
    b = b_max * rand(B, T, H, K)
    w = rand(B, T, H, V)
    cu = None
    N = B
    if cu_seqlens is not None:
        if B != 1 or cu_seqlens[0] != 0 or cu_seqlens[-1] != T:
            raise ValueError("cu_seqlens needs B == 1, cu_seqlens[0] == 0 and cu_seqlens[-1] == T")
        cu = torch.tensor(cu_seqlens, dtype=torch.int32)
        N = len(cu_seqlens) - 1
    h0 = randn(N, H, K, V) * 0.5 if with_h0 else None
    raw = GDN2Inputs(q, k, v, g, b, w, h0, cu)
    return raw.to(dtype=dtype, device=device)


__all__ = [
    "DECAYS",
    "ErrorReport",
    "GDN2Inputs",
    "TOLERANCES",
    "compare",
    "dtype_name",
    "make_inputs",
    "max_rel_err",
    "rel_rms",
    "short_dtype_name",
]
