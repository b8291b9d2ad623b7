"""recurrent_fwd (the decode kernel) and fused_recurrent_gdn2 against the fp64 token recurrence."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gdn2_kernels import chunk_gdn2, fused_recurrent_gdn2
from gdn2_kernels.accuracy import compare
from gdn2_kernels.configs import dtype_name, short_dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import ProblemKey, get_spec
from gdn2_kernels.kernels.recurrent_fwd import recurrent_fwd
from gdn2_kernels.reference import naive_recurrent_gdn2



@dataclass(frozen=True)
class RecCase:
    B: int
    T: int
    H: int
    K: int
    V: int
    BV: int = 32
    dtype: torch.dtype = torch.float32
    decay: str = "normal"
    b_max: float = 1.0
    h0: bool = True
    l2norm: bool = False
    cu_seqlens: tuple[int, ...] | None = None

    def label(self) -> str:
        s = (f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-BV{self.BV}"
             f"-{short_dtype_name(self.dtype)}-{self.decay}-b{self.b_max:g}")
        return (s + ("-h0" if self.h0 else "") + ("-l2" if self.l2norm else "")
                + ("-varlen" if self.cu_seqlens else ""))


CASES = [
    # decode steps (T = 1) at several batch sizes
    RecCase(1, 1, 2, 32, 32),
    RecCase(5, 1, 3, 64, 48, BV=16, dtype=torch.bfloat16),
    RecCase(16, 1, 2, 32, 64, BV=64, dtype=torch.float16, b_max=2.0),
    RecCase(3, 1, 1, 20, 24, BV=8, h0=False),
    # short prompts
    RecCase(2, 13, 2, 48, 40, BV=16, decay="strong"),
    RecCase(1, 20, 1, 24, 36, BV=32, decay="weak", h0=False, l2norm=True),
    RecCase(2, 9, 2, 32, 32, BV=8, dtype=torch.bfloat16, l2norm=True, b_max=2.0),
    # varlen, including an empty sequence and a one-token one
    RecCase(1, 17, 2, 32, 24, BV=16, cu_seqlens=(0, 5, 5, 6, 17)),
    RecCase(1, 12, 1, 16, 16, BV=16, dtype=torch.float16, h0=False, l2norm=True,
            cu_seqlens=(0, 1, 2, 12)),
]


def _run_case(c: RecCase, output_final_state: bool = True):
    x = make_inputs(c.B, c.T, c.H, c.K, c.V, c.dtype, decay=c.decay, b_max=c.b_max,
                    with_h0=c.h0, normalize_qk=not c.l2norm,
                    cu_seqlens=list(c.cu_seqlens) if c.cu_seqlens else None, seed=7)
    cfg = get_spec("recurrent_fwd").config({"BV": c.BV})
    o, ht = recurrent_fwd(x.q, x.k, x.v, x.g, x.b, x.w, c.K ** -0.5, x.h0, output_final_state,
                          c.l2norm, x.cu_seqlens, cfg)
    x64 = x.to(torch.float64)
    ref_o, ref_ht = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w,
                                         initial_state=x64.h0, output_final_state=True,
                                         use_qk_l2norm_in_kernel=c.l2norm,
                                         cu_seqlens=x.cu_seqlens)
    return x, o, ht, ref_o, ref_ht


@pytest.mark.parametrize("case", CASES)
def test_recurrent_fwd_matches_recurrence(case: RecCase):
    _, o, ht, ref_o, ref_ht = _run_case(case)
    assert o.dtype == case.dtype and ht.dtype == torch.float32
    assert o.shape == ref_o.shape and ht.shape == ref_ht.shape
    for r in compare({"o": o, "ht": ht}, {"o": ref_o, "ht": ref_ht}, dtype_name(case.dtype)):
        assert r.ok, f"{case.label()}: {r}"


def test_recurrent_fwd_without_final_state():
    _, o, ht, ref_o, _ = _run_case(RecCase(2, 3, 1, 16, 16), output_final_state=False)
    assert ht is None
    assert compare({"o": o}, {"o": ref_o}, "float32")[0].ok


def test_recurrent_fwd_spec_space():
    """Every BV the spec offers for a small problem is in range, and the default is among them."""
    spec = get_spec("recurrent_fwd")
    assert spec.direction == "fwd"
    space = spec.space(ProblemKey(128, 128, "bfloat16"))
    assert spec.default_config() in space.valid
    assert all(c["BV"] <= 128 for c in space.valid)
    assert any(p.rule == "recurrent_fwd_registers" for p in space.pruned)


# ---------------------------------------------------------------------------------------------
# The public op
# ---------------------------------------------------------------------------------------------

def test_fused_recurrent_matches_chunk_varlen():
    x = make_inputs(1, 40, 2, 32, 24, with_h0=True, cu_seqlens=[0, 13, 13, 40], seed=3)
    o_r, ht_r = fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                     output_final_state=True, cu_seqlens=x.cu_seqlens)
    o_c, ht_c = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                           output_final_state=True, cu_seqlens=x.cu_seqlens)
    for r in compare({"o": o_r, "ht": ht_r}, {"o": o_c, "ht": ht_c}, "float32"):
        assert r.ok, r


def test_fused_recurrent_scale_and_defaults():
    x = make_inputs(2, 4, 1, 16, 8, seed=1)
    o, ht = fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, scale=0.5)
    assert ht is None
    ref, _ = naive_recurrent_gdn2(*(t.double() for t in (x.q, x.k, x.v, x.g, x.b, x.w)), scale=0.5)
    assert compare({"o": o}, {"o": ref}, "float32")[0].ok


def test_fused_recurrent_refuses_grad():
    x = make_inputs(1, 2, 1, 8, 8, seed=0).to(requires_grad=True)
    with pytest.raises(ValueError, match="forward-only.*torch.no_grad"):
        fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    with torch.no_grad():
        o, _ = fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    assert torch.isfinite(o).all()


def test_fused_recurrent_input_checks():
    x = make_inputs(2, 3, 1, 8, 8, seed=0)
    with pytest.raises(ValueError, match="initial_state"):
        fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w,
                             initial_state=torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="w \\(write gate\\)"):
        fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w[..., :4])
    with pytest.raises(ValueError, match="g \\(log-decay\\)"):
        fused_recurrent_gdn2(x.q, x.k, x.v, -x.g, x.b, x.w)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 64, 256])
def test_fused_recurrent_decode_gpu(B: int):
    x = make_inputs(B, 1, 16, 128, 128, torch.bfloat16, device="cuda", with_h0=True, seed=B)
    o, ht = fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                 output_final_state=True)
    x64 = x.to(torch.float64)
    ref_o, ref_ht = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w,
                                         initial_state=x64.h0, output_final_state=True)
    for r in compare({"o": o, "ht": ht}, {"o": ref_o, "ht": ref_ht}, "bfloat16"):
        assert r.ok, r
