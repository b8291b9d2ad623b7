"""state_bwd (reverse inter-chunk state pass) against its stage reference.

The kernel is fed the float64 stage intermediates of ``reference.chunk_stages_fwd`` (g_cum, Q_gamma,
K_tail, gamma_C, Y and A_qk, cast to the storage dtypes the pipeline uses), a random dO and a
random upstream gradient of the final state; its outputs dR, dh (per chunk) and dh0 are compared
with autograd through the chunk-state recurrence (``stage_refs.state_bwd_reference``), with both
ways of getting the gated operands (``OPERANDS``: formed on chip or loaded).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from stage_refs import state_bwd_reference
from test_state_fwd import StateCase

from gdn2_kernels import _varlen
from gdn2_kernels.accuracy import compare
from gdn2_kernels.configs import dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import get_spec
from gdn2_kernels.kernels.state_bwd import state_bwd
from gdn2_kernels.reference import chunk_stages_fwd


@dataclass(frozen=True)
class StateBwdCase(StateCase):
    """The forward state stage's case plus whether the final state gets an upstream gradient."""

    dht: bool = True

    def label(self) -> str:
        return super().label() + ("-dht" if self.dht else "")


CASES = [
    StateBwdCase(2, 50, 2, 48, 40, BT=16, BV=16),
    StateBwdCase(1, 70, 2, 32, 48, BT=32, BV=32, decay="strong", b_max=2.0),
    StateBwdCase(1, 100, 1, 40, 24, BT=64, BV=16, decay="weak", h0=False),
    StateBwdCase(1, 130, 1, 24, 32, BT=128, BV=32, dht=False),
    StateBwdCase(1, 90, 2, 32, 40, BT=32, BV=16, cu_seqlens=(0, 7, 7, 60, 90)),
    StateBwdCase(1, 100, 1, 20, 32, BT=64, BV=64, cu_seqlens=(0, 1, 66, 100), decay="strong",
                 h0=False),
    StateBwdCase(1, 70, 2, 48, 32, BT=32, BV=16, dtype=torch.float16, decay="strong"),
]


def _stage_inputs(case: StateBwdCase):
    cu = list(case.cu_seqlens) if case.cu_seqlens else None
    x = make_inputs(case.B, case.T, case.H, case.K, case.V, case.dtype, decay=case.decay,
                    b_max=case.b_max, with_h0=case.h0, cu_seqlens=cu)
    scale = case.K ** -0.5
    x64 = x.to(torch.float64)
    ref = chunk_stages_fwd(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, scale=scale,
                           initial_state=x64.h0, chunk_size=case.BT, cu_seqlens=x64.cu_seqlens)
    do = torch.randn(case.B, case.T, case.H, case.V).to(case.dtype)
    N = ref.final.shape[0]
    dht = torch.randn(N, case.H, case.K, case.V) if case.dht else None
    return x, scale, ref, do, dht


# The two-level reverse scan (SCAN="segmented", forced with L chunks per segment).
SEGMENTED_CASES = [
    (StateBwdCase(2, 200, 2, 32, 48, BT=16, BV=16, decay="strong", b_max=2.0), 4),
    (StateBwdCase(1, 130, 1, 48, 32, BT=32, BV=32, h0=False, dht=False), 2),
    (StateBwdCase(2, 90, 1, 32, 32, BT=16, BV=32, dtype=torch.bfloat16), 3),
]


@pytest.mark.parametrize("operands", ["formed", "loaded"])
@pytest.mark.parametrize("case", CASES)
def test_state_bwd_matches_stage_reference(case: StateBwdCase, operands: str):
    _check_against_reference(case, OPERANDS=operands)


@pytest.mark.parametrize("case,L", SEGMENTED_CASES,
                         ids=[f"{c.label()}-L{L}" for c, L in SEGMENTED_CASES])
def test_segmented_reverse_scan_matches_stage_reference(case: StateBwdCase, L: int,
                                                        force_segments):
    asked = force_segments(L)
    _check_against_reference(case, SCAN="segmented")
    assert asked


def _check_against_reference(case: StateBwdCase, **config):
    x, scale, ref, do, dht = _stage_inputs(case)
    # Storage dtypes of the pipeline: fp32 g_cum and A_qk; Y, U and the states h in q's dtype.
    g_cum, A_qk, gC = ref.g_cum.float(), ref.A_qk.float(), ref.gC.float()
    Y, U, Qg, Kt = (t.to(case.dtype) for t in (ref.Y, ref.U, ref.Qg, ref.Kt))
    offs = _varlen.chunk_offsets(x.cu_seqlens, case.BT) if case.cu_seqlens else None
    cfg = get_spec("state_bwd").config({"BT": case.BT, "BV": case.BV, **config})
    dR, dh, dh0 = state_bwd(x.q, x.k, g_cum, Qg, Kt, gC, Y, A_qk, do, dht, scale, True,
                            x.cu_seqlens, offs, cfg)
    # "formed" builds Q_gamma, K_tail and gamma_C on chip; the reference takes them exactly.
    want = state_bwd_reference(ref.Qg, ref.Kt, ref.gC, Y, U, A_qk, x.h0, do, dht, case.BT,
                               x.cu_seqlens)
    assert dR.dtype == case.dtype and dh.dtype == Y.dtype and dh0.dtype == torch.float32
    assert dh.shape == want.dh.shape and dh0.shape == want.dh0.shape
    # dR and dh take the tolerance of the gradients they carry (dv's and dh0's).
    tol = dtype_name(case.dtype)
    errs = compare({"dv": dR}, {"dv": want.dR}, tol)
    errs += compare({"dh0": dh}, {"dh0": want.dh}, tol) + compare({"dh0": dh0}, {"dh0": want.dh0},
                                                                  tol)
    labelled = [(name, e) for name, e in zip(("dR", "dh", "dh0"), errs)]
    bad = [(name, e) for name, e in labelled if not e.ok]
    assert not bad, bad


def test_state_bwd_without_dh0():
    case = StateBwdCase(1, 40, 1, 16, 16, BT=16, BV=16)
    x, scale, ref, do, dht = _stage_inputs(case)
    cfg = get_spec("state_bwd").config({"BT": 16, "BV": 16})
    dR, dh, dh0 = state_bwd(x.q, x.k, *(t.float() for t in (ref.g_cum, ref.Qg, ref.Kt, ref.gC,
                                                            ref.Y, ref.A_qk)),
                            do, dht, scale, False, None, None, cfg)
    assert dh0 is None
    assert all(torch.isfinite(t).all() for t in (dR, dh))


def test_state_bwd_every_spec_chunk_size_is_covered():
    assert {c.BT for c in CASES} == set(get_spec("state_bwd").param("BT").values)
