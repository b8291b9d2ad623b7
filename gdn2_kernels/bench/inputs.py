"""Benchmark inputs for every provider, all derived from ``gdn2_kernels.inputs.make_inputs``.

One :class:`ProblemInputs` per shape draws the GDN-2 tensors once (same seed for every
provider) and derives the other problems' tensors from them, so all implementations see the
same numbers where their inputs overlap:

- KDA (tied gates): ``beta = b[..., 0]``; our op gets ``b = beta`` over K and ``w = beta`` over V.
- Gated DeltaNet: scalar ``g = g[..., 0]`` and ``beta`` as for KDA.
- Attention: q, k, v as they are (SDPA takes the ``[B, H, T, D]`` transposed views).
- Mamba-2 SSD (sizes in :func:`gdn2_kernels.bench.model.mamba_dims`): ``x = cat(v, q)`` viewed as
  ``[B, T, 4H, D/2]``; ``dt = -g`` over 4H (in (0, 2]); ``B = k`` and ``C = q`` of head 0 cut to
  ``d_state``; ``A`` from -1 to -16 over the heads (Mamba-2's init range).
- Decode: one token per sequence with the factory's ``h0`` as the state; the attention KV cache
  is one factory sequence of ``context`` tokens repeated over the batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from gdn2_kernels.bench.model import Shape, mamba_dims
from gdn2_kernels.inputs import GDN2Inputs, make_inputs

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


class ProblemInputs:
    """Tensors of one shape, built on first use and cached; ``grad=True`` gives fresh leaves."""

    def __init__(self, shape: Shape, device: torch.device | str, seed: int = 0):
        self.shape = shape
        self.device = torch.device(device)
        self.seed = seed
        self._cache: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}

    def _cached(self, kind: str, grad: bool, build: Callable[[], dict[str, torch.Tensor]]):
        key = (kind, grad)
        if key not in self._cache:
            tensors = build()
            if grad:
                tensors = {n: t.detach().clone().requires_grad_(t.is_floating_point())
                           for n, t in tensors.items()}
            self._cache[key] = tensors
        return self._cache[key]

    def base(self) -> GDN2Inputs:
        """The factory's GDN-2 tensors (``h0`` included in decode)."""
        def build():
            s = self.shape
            x = make_inputs(s.B, s.T, s.H, s.D, s.D, torch_dtype(s.dtype), self.device,
                            with_h0=s.T == 1, seed=self.seed)
            return x.tensors()
        return GDN2Inputs(**self._cached("base", False, build))

    def gdn2(self, grad: bool = False) -> dict[str, torch.Tensor]:
        return self._cached("gdn2", grad, lambda: dict(self.base().tensors()))

    def kda(self, grad: bool = False) -> dict[str, torch.Tensor]:
        def build():
            x = self.base()
            beta = x.b[..., 0].contiguous()
            return {"q": x.q, "k": x.k, "v": x.v, "g": x.g, "beta": beta, **self._h0(x)}
        return self._cached("kda", grad, build)

    def kda_tied(self, grad: bool = False) -> dict[str, torch.Tensor]:
        """GDN-2 inputs with both gates equal to KDA's beta (the KDA special case of our op)."""
        def build():
            x = self.kda()
            beta = x["beta"][..., None]
            return {"q": x["q"], "k": x["k"], "v": x["v"], "g": x["g"],
                    "b": beta.expand_as(x["k"]).contiguous(),
                    "w": beta.expand_as(x["v"]).contiguous(), **self._h0(self.base())}
        return self._cached("kda_tied", grad, build)

    def gdn(self, grad: bool = False) -> dict[str, torch.Tensor]:
        def build():
            x = self.kda()
            return {**x, "g": x["g"][..., 0].contiguous()}
        return self._cached("gdn", grad, build)

    def attention(self, grad: bool = False) -> dict[str, torch.Tensor]:
        """q, k, v in ``[B, T, H, D]``; decode: k, v are the KV cache of ``context`` tokens."""
        def build():
            x = self.base()
            if self.shape.T != 1:
                return {"q": x.q, "k": x.k, "v": x.v}
            s = self.shape
            cache = make_inputs(1, s.context, s.H, s.D, s.D, torch_dtype(s.dtype), self.device,
                                seed=self.seed + 1)
            rep = (s.B, 1, 1, 1)
            return {"q": x.q, "k": cache.k.repeat(*rep), "v": cache.v.repeat(*rep)}
        return self._cached("attention", grad, build)

    def mamba(self, grad: bool = False) -> dict[str, torch.Tensor]:
        def build():
            x, s, m = self.base(), self.shape, mamba_dims(self.shape)
            B, T = s.B, s.T
            xs = torch.cat([x.v, x.q], dim=-1).reshape(B, T, m.heads, m.headdim)
            dt = (-x.g[..., :4]).reshape(B, T, m.heads).float()
            A = -torch.linspace(1.0, 16.0, m.heads, device=self.device, dtype=torch.float32)
            Bm = x.k[:, :, :m.ngroups, :m.dstate].contiguous()
            Cm = x.q[:, :, :m.ngroups, :m.dstate].contiguous()
            out = {"x": xs.contiguous(), "dt": dt.contiguous(), "A": A, "B": Bm, "C": Cm}
            if x.h0 is not None:
                out["state"] = x.h0.reshape(B, m.heads, m.headdim, m.dstate).contiguous()
            return out
        return self._cached("mamba", grad, build)

    @staticmethod
    def _h0(x: GDN2Inputs) -> dict[str, torch.Tensor]:
        return {"h0": x.h0} if x.h0 is not None else {}
