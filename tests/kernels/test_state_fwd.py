"""state_fwd (residuals, output, inter-chunk state) against its PyTorch stage reference.

The kernel is fed the stage reference's own g_cum, Y, U and A_qk (cast to the storage dtypes the
pipeline uses), so this test sees only the state pass: o, the final state ht, the per-chunk
states h and the residuals R (what the backward's recomputation stores).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from stage_refs import state_bwd_reference

from gdn2_kernels import _varlen
from gdn2_kernels.accuracy import compare
from gdn2_kernels.configs import dtype_name, short_dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import get_spec
from gdn2_kernels.kernels.state_fwd import state_fwd
from gdn2_kernels.reference import chunk_stages_fwd



@dataclass(frozen=True)
class StateCase:
    B: int
    T: int
    H: int
    K: int
    V: int
    BT: int
    BV: int = 32
    dtype: torch.dtype = torch.float32
    decay: str = "normal"
    b_max: float = 1.0
    h0: bool = True
    cu_seqlens: tuple[int, ...] | None = None

    def label(self) -> str:
        s = (f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-BT{self.BT}-BV{self.BV}"
             f"-{short_dtype_name(self.dtype)}-{self.decay}-b{self.b_max:g}")
        return s + ("-h0" if self.h0 else "") + ("-varlen" if self.cu_seqlens else "")


CASES = [
    StateCase(2, 50, 2, 48, 40, BT=16, BV=16),
    StateCase(1, 70, 2, 32, 48, BT=32, BV=32, decay="strong", b_max=2.0),
    StateCase(1, 100, 1, 40, 64, BT=64, BV=64, decay="weak", h0=False),
    StateCase(1, 150, 1, 64, 24, BT=128, BV=16),
    StateCase(1, 90, 2, 32, 40, BT=32, BV=16, cu_seqlens=(0, 7, 7, 60, 90)),
    StateCase(1, 100, 1, 24, 32, BT=64, BV=32, cu_seqlens=(0, 1, 66, 100), decay="strong",
              h0=False),
]
# Storage-dtype dots: bf16 and fp16.
LOW_PRECISION_CASES = [
    StateCase(2, 40, 1, 32, 48, BT=32, BV=32, dtype=torch.bfloat16),
    StateCase(1, 70, 2, 48, 32, BT=64, BV=16, dtype=torch.float16, decay="strong"),
]


# The two-level scan (SCAN="segmented", forced with L chunks per segment): segments that end
# inside the sequence's last partial chunk, a last segment of one chunk, low precision.
SEGMENTED_CASES = [
    (StateCase(2, 200, 2, 32, 48, BT=16, BV=16, decay="strong", b_max=2.0), 4),
    (StateCase(1, 130, 1, 48, 32, BT=32, BV=32, h0=False), 2),
    (StateCase(2, 90, 1, 32, 32, BT=16, BV=32, dtype=torch.bfloat16), 3),
]


@pytest.mark.parametrize("case", CASES + LOW_PRECISION_CASES)
def test_state_fwd_matches_stage_reference(case: StateCase):
    _check_against_reference(case)


@pytest.mark.parametrize("case,L", SEGMENTED_CASES,
                         ids=[f"{c.label()}-L{L}" for c, L in SEGMENTED_CASES])
def test_segmented_scan_matches_stage_reference(case: StateCase, L: int, force_segments):
    """The launcher takes the two-level path when segment_chunks says so (on a GPU: too few
    programs for the SMs); here it is forced, and must reproduce o, ht and every chunk state."""
    asked = force_segments(L)
    _check_against_reference(case, SCAN="segmented")
    assert asked  # the segmented path ran


def _check_against_reference(case: StateCase, **config):
    cu = list(case.cu_seqlens) if case.cu_seqlens else None
    x = make_inputs(case.B, case.T, case.H, case.K, case.V, case.dtype, decay=case.decay,
                    b_max=case.b_max, with_h0=case.h0, cu_seqlens=cu)
    scale = case.K ** -0.5
    x64 = x.to(torch.float64)
    ref = chunk_stages_fwd(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, scale=scale,
                           initial_state=x64.h0, chunk_size=case.BT, cu_seqlens=x64.cu_seqlens)
    # Stage inputs in the layouts and dtypes intra_fwd writes (fp32 A_qk, gC; the rest in k's).
    A_qk, gC = ref.A_qk.float(), ref.gC.float()
    Y, U, Qg, Kt = (t.to(case.dtype) for t in (ref.Y, ref.U, ref.Qg, ref.Kt))
    offs = _varlen.chunk_offsets(x.cu_seqlens, case.BT) if cu else None
    idx = _varlen.chunk_indices(x.cu_seqlens, case.BT) if cu else None
    nc = _varlen.num_chunks(case.T, case.B, idx, case.BT)
    cfg = get_spec("state_fwd").config({"BT": case.BT, "BV": case.BV, **config})
    o, ht, h, R = state_fwd(Qg, Kt, gC, Y, U, A_qk, x.h0, True, True, x.cu_seqlens, offs, nc,
                            cfg, store_r=True)
    assert o.dtype == case.dtype and ht.dtype == torch.float32 and h.dtype == case.dtype
    assert o.shape == ref.o.shape and ht.shape == ref.final.shape and h.shape == ref.h.shape
    assert R.dtype == case.dtype and R.shape == U.shape
    errs = compare({"o": o, "ht": ht}, {"o": ref.o, "ht": ref.final}, dtype_name(case.dtype))
    errs += [e.__class__("h", e.rel_rms, e.max_rel_err, e.tolerance)
             for e in compare({"ht": h}, {"ht": ref.h}, dtype_name(case.dtype))]
    want_R = state_bwd_reference(Qg, Kt, gC, Y, U, A_qk, x.h0, torch.zeros_like(U), None, case.BT,
                                 x.cu_seqlens).R
    errs += [e.__class__("R", e.rel_rms, e.max_rel_err, e.tolerance)
             for e in compare({"dv": R}, {"dv": want_R}, dtype_name(case.dtype))]
    bad = [e for e in errs if not e.ok]
    assert not bad, bad


def test_state_fwd_optional_outputs_are_none():
    x = make_inputs(1, 20, 1, 16, 16)
    ref = chunk_stages_fwd(x.q, x.k, x.v, x.g, x.b, x.w, chunk_size=16)
    cfg = get_spec("state_fwd").config({"BT": 16, "BV": 16})
    o, ht, h, R = state_fwd(ref.Qg, ref.Kt, ref.gC, ref.Y, ref.U, ref.A_qk, None, False, False,
                            None, None, 2, cfg)
    assert ht is None and h is None and R is None
    assert torch.isfinite(o).all()


def test_state_fwd_every_spec_chunk_size_is_covered():
    assert {c.BT for c in CASES} == set(get_spec("state_fwd").param("BT").values)
