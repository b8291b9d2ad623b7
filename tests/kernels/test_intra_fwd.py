"""intra_fwd (cumsum, T / A_qk, the WY inverse, Y and U) against its PyTorch stage reference.

The stage reference is ``reference.chunk_stages_fwd`` in float64 on the same (rounded) inputs; each
output is compared by name with the tolerance of ``accuracy.TOLERANCES`` for the input dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gdn2_kernels import _varlen
from gdn2_kernels.accuracy import compare
from gdn2_kernels.configs import dtype_name, short_dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import get_spec
from gdn2_kernels.kernels.intra_fwd import intra_fwd
from gdn2_kernels.reference import chunk_stages_fwd



@dataclass(frozen=True)
class IntraCase:
    B: int
    T: int
    H: int
    K: int
    V: int
    BT: int
    BC: int = 16
    BK: int = 32
    BV: int = 32
    dtype: torch.dtype = torch.float32
    decay: str = "normal"
    b_max: float = 1.0
    cu_seqlens: tuple[int, ...] | None = None
    precision: str = "ieee"
    inverse: str = "substitution"

    def label(self) -> str:
        s = (f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-BT{self.BT}-BC{self.BC}"
             f"-BK{self.BK}-BV{self.BV}-{short_dtype_name(self.dtype)}-{self.decay}-b{self.b_max:g}")
        if self.precision != "ieee":
            s += f"-{self.precision}"
        if self.inverse != "substitution":
            s += f"-{self.inverse}"
        return s + ("-varlen" if self.cu_seqlens else "")


CASES = [
    # every chunk size, T not a multiple of it, K != V, K and V not powers of two
    IntraCase(2, 50, 2, 48, 40, BT=16, BK=16, BV=16),
    IntraCase(1, 70, 2, 32, 48, BT=32, BC=16, BK=32, BV=16, b_max=2.0),
    IntraCase(1, 70, 1, 40, 24, BT=32, BC=32, BK=16, BV=32, decay="strong"),
    IntraCase(1, 100, 2, 32, 48, BT=64, BC=16, BK=32, BV=64, decay="weak"),
    IntraCase(1, 90, 1, 64, 32, BT=64, BC=32, BK=64, BV=16, decay="strong", b_max=2.0),
    IntraCase(1, 150, 1, 24, 40, BT=128, BC=32, BK=16, BV=32),
    IntraCase(1, 130, 1, 32, 16, BT=128, BC=16, BK=32, BV=16, decay="strong"),
    # varlen: sequences shorter than a chunk, an empty one, one spanning chunks
    IntraCase(1, 90, 2, 32, 40, BT=32, cu_seqlens=(0, 7, 7, 60, 90)),
    IntraCase(1, 100, 1, 48, 32, BT=64, BC=32, BK=16, cu_seqlens=(0, 1, 66, 100), decay="strong"),
    # low-precision storage and the solve precisions the spec offers
    IntraCase(2, 40, 1, 32, 48, BT=32, dtype=torch.bfloat16),
    IntraCase(1, 50, 1, 32, 32, BT=16, dtype=torch.float16, decay="strong"),
    IntraCase(1, 70, 1, 32, 32, BT=64, precision="tf32x3"),
    # the doubling inverse of the diagonal blocks, on the same range of cases
    IntraCase(2, 50, 2, 48, 40, BT=16, BK=16, BV=16, inverse="doubling"),
    IntraCase(1, 70, 1, 40, 24, BT=32, BC=32, BK=16, BV=32, decay="strong", b_max=2.0,
              inverse="doubling"),
    IntraCase(1, 150, 1, 24, 40, BT=128, BC=32, BK=16, BV=32, inverse="doubling"),
    IntraCase(1, 100, 1, 48, 32, BT=64, BC=32, BK=16, cu_seqlens=(0, 1, 66, 100), decay="strong",
              inverse="doubling"),
    IntraCase(2, 40, 1, 32, 48, BT=32, BC=32, dtype=torch.bfloat16, precision="tf32x3",
              inverse="doubling"),
]


def run_stage(case: IntraCase):
    x = make_inputs(case.B, case.T, case.H, case.K, case.V, case.dtype, decay=case.decay,
                    b_max=case.b_max, cu_seqlens=list(case.cu_seqlens) if case.cu_seqlens else None)
    cfg = get_spec("intra_fwd").config({"BT": case.BT, "BC": case.BC, "BK": case.BK,
                                        "BV": case.BV, "SOLVE_PRECISION": case.precision,
                                        "DIAG_INVERSE": case.inverse})
    scale = case.K ** -0.5
    idx = _varlen.chunk_indices(x.cu_seqlens, case.BT) if x.cu_seqlens is not None else None
    g_cum, A, A_qk, Y, U, Qg, Kt, gC = intra_fwd(x.q, x.k, x.v, x.g, x.b, x.w, scale,
                                                 x.cu_seqlens, idx, cfg)
    x64 = x.to(torch.float64)
    ref = chunk_stages_fwd(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, scale=scale,
                           chunk_size=case.BT, cu_seqlens=x64.cu_seqlens)
    outs = {"g_cum": g_cum, "A": A, "A_qk": A_qk, "Y": Y, "U": U, "Qg": Qg, "Kt": Kt, "gC": gC}
    refs = {"g_cum": ref.g_cum, "A": ref.A, "A_qk": ref.A_qk, "Y": ref.Y, "U": ref.U,
            "Qg": ref.Qg, "Kt": ref.Kt,
            # exp(G_C) under strong decay is far below fp32's range (~1e-260): compare with the
            # reference as fp32 can hold it (both 0 there) instead of against unrepresentable values.
            "gC": ref.gC.float().double()}
    return outs, refs


@pytest.mark.parametrize("case", CASES)
def test_intra_fwd_matches_stage_reference(case: IntraCase):
    outs, refs = run_stage(case)
    assert outs["A"].dtype == torch.float32 and outs["g_cum"].dtype == torch.float32
    for name in ("Y", "U", "Qg", "Kt"):
        assert outs[name].dtype == case.dtype, name
    assert outs["gC"].dtype == torch.float32
    for name, out in outs.items():
        assert out.shape == refs[name].shape, name
    bad = [e for e in compare(outs, refs, dtype_name(case.dtype)) if not e.ok]
    assert not bad, bad


def test_intra_fwd_every_spec_chunk_size_is_covered():
    assert {c.BT for c in CASES} == set(get_spec("intra_fwd").param("BT").values)
    assert {c.BC for c in CASES} == set(get_spec("intra_fwd").param("BC").values)
    assert {c.inverse for c in CASES} == set(get_spec("intra_fwd").param("DIAG_INVERSE").values)
