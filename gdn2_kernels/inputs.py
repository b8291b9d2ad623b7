"""The one input factory: random GDN-2 problems with well-conditioned gates.

Shared by the tuner's verification and timing, the benchmarks and the tests (STYLE 25), so
references, shapes and gates cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


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


__all__ = ["DECAYS", "GDN2Inputs", "make_inputs"]
