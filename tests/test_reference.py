"""The references against each other (docs/math.md "Recurrence" vs "Chunkwise form") and the
special cases.

Everything here is float64 PyTorch: no kernels run. The token recurrence is the ground truth of
the whole suite, so it is checked three ways: against the independently written chunkwise form,
against separately written KDA and Gated DeltaNet recurrences (tied gates), and its autograd
against finite differences (the gradient tests of the op trust it).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gdn2_kernels.accuracy import rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.reference import (
    chunk_stages_fwd,
    naive_chunk_gdn2,
    naive_recurrent_gdn,
    naive_recurrent_gdn2,
    naive_recurrent_kda,
)

F64 = torch.float64
AGREE = 1e-10  # the two float64 references differ only by rounding


@dataclass(frozen=True)
class RefCase:
    B: int
    T: int
    H: int
    K: int
    V: int
    chunk: int
    decay: str = "normal"
    b_max: float = 1.0
    h0: bool = False
    cu_seqlens: tuple[int, ...] | None = None
    l2norm: bool = False

    def label(self) -> str:
        s = f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-C{self.chunk}-{self.decay}"
        s += f"-b{self.b_max:g}" + ("-h0" if self.h0 else "") + ("-l2" if self.l2norm else "")
        return s + ("-varlen" if self.cu_seqlens else "")


REF_CASES = [
    RefCase(2, 50, 2, 8, 6, 16, h0=True),
    RefCase(1, 37, 1, 5, 7, 8, decay="strong", b_max=2.0),
    RefCase(1, 64, 2, 6, 6, 64, decay="weak", h0=True),
    RefCase(1, 45, 1, 4, 5, 32, decay="normal", b_max=2.0, l2norm=True),
    RefCase(1, 60, 2, 6, 4, 16, h0=True, cu_seqlens=(0, 5, 5, 40, 60)),
    RefCase(1, 33, 1, 7, 3, 8, decay="strong", cu_seqlens=(0, 1, 20, 33)),
]


def _inputs(c: RefCase):
    return make_inputs(c.B, c.T, c.H, c.K, c.V, F64, decay=c.decay, b_max=c.b_max, with_h0=c.h0,
                       cu_seqlens=list(c.cu_seqlens) if c.cu_seqlens else None,
                       normalize_qk=not c.l2norm)


@pytest.mark.parametrize("case", REF_CASES)
def test_recurrence_matches_chunkwise(case: RefCase):
    x = _inputs(case)
    kw = dict(initial_state=x.h0, output_final_state=True, use_qk_l2norm_in_kernel=case.l2norm,
              cu_seqlens=x.cu_seqlens)
    o, ht = naive_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, **kw)
    oc, htc = naive_chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, chunk_size=case.chunk, **kw)
    assert o.dtype == F64 and ht.dtype == F64
    assert rel_rms(oc, o) < AGREE
    assert rel_rms(htc, ht) < AGREE


def test_chunk_stages_are_consistent():
    """A is the inverse of I + T (row layout), and h holds the state entering each chunk."""
    C = 8
    x = make_inputs(1, 20, 1, 4, 3, F64, with_h0=True)
    st = chunk_stages_fwd(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0, chunk_size=C)
    assert st.h.shape == (3, 1, 4, 3)
    assert torch.equal(st.h[0], x.h0[0])
    A0 = st.A[0, :C, 0, :]                                       # first chunk's C x C inverse
    assert torch.equal(A0, A0.tril()) and torch.allclose(A0.diagonal(), torch.ones(C, dtype=F64))
    # The state entering chunk 1 is the recurrence's state after token C - 1.
    _, h_after = naive_recurrent_gdn2(x.q[:, :C], x.k[:, :C], x.v[:, :C], x.g[:, :C], x.b[:, :C],
                                      x.w[:, :C], initial_state=x.h0, output_final_state=True)
    assert rel_rms(st.h[1], h_after[0]) < AGREE


def test_scale_and_default_scale():
    x = make_inputs(1, 12, 1, 9, 4, F64)
    o_def, _ = naive_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    o_exp, _ = naive_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, scale=9 ** -0.5)
    o_two, _ = naive_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, scale=2.0)
    assert torch.equal(o_def, o_exp)
    assert rel_rms(o_two, o_def * (2.0 * 3.0)) < AGREE          # o is linear in q


@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("decay", ["normal", "strong"])
def test_tied_gates_reproduce_kda(decay: str, h0: bool):
    """b = w = beta * 1 turns GDN-2 into Kimi Delta Attention."""
    x = make_inputs(2, 30, 2, 6, 5, F64, decay=decay, with_h0=h0)
    beta = torch.rand(2, 30, 2, dtype=F64)
    b = beta[..., None].expand_as(x.k)
    w = beta[..., None].expand_as(x.v)
    o, ht = naive_recurrent_gdn2(x.q, x.k, x.v, x.g, b, w, initial_state=x.h0,
                                 output_final_state=True)
    o_kda, ht_kda = naive_recurrent_kda(x.q, x.k, x.v, x.g, beta, initial_state=x.h0,
                                        output_final_state=True)
    assert rel_rms(o, o_kda) < AGREE
    assert rel_rms(ht, ht_kda) < AGREE
    oc, _ = naive_chunk_gdn2(x.q, x.k, x.v, x.g, b, w, initial_state=x.h0, chunk_size=8)
    assert rel_rms(oc, o_kda) < AGREE


@pytest.mark.parametrize("h0", [False, True], ids=["zero-h0", "h0"])
def test_tied_gates_and_scalar_decay_reproduce_gated_deltanet(h0: bool):
    """Additionally a scalar decay per head turns GDN-2 into Gated DeltaNet."""
    x = make_inputs(2, 30, 2, 6, 5, F64, with_h0=h0)
    beta = torch.rand(2, 30, 2, dtype=F64)
    alpha_log = -torch.rand(2, 30, 2, dtype=F64)
    g = alpha_log[..., None].expand_as(x.k)
    b = beta[..., None].expand_as(x.k)
    w = beta[..., None].expand_as(x.v)
    o, ht = naive_recurrent_gdn2(x.q, x.k, x.v, g, b, w, initial_state=x.h0,
                                 output_final_state=True)
    o_gdn, ht_gdn = naive_recurrent_gdn(x.q, x.k, x.v, alpha_log, beta, initial_state=x.h0,
                                        output_final_state=True)
    assert rel_rms(o, o_gdn) < AGREE
    assert rel_rms(ht, ht_gdn) < AGREE


def test_untied_gates_differ_from_kda():
    """Guard against a recurrence that ignores b or w: untied gates must not equal KDA."""
    x = make_inputs(1, 20, 1, 6, 5, F64)
    beta = torch.rand(1, 20, 1, dtype=F64)
    o, _ = naive_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    o_kda, _ = naive_recurrent_kda(x.q, x.k, x.v, x.g, beta)
    assert rel_rms(o, o_kda) > 1e-3


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_recurrence_gradcheck(varlen: bool):
    """Autograd through naive_recurrent_gdn2 matches finite differences (float64, tiny shape)."""
    cu = [0, 2, 5] if varlen else None
    x = make_inputs(1 if varlen else 2, 5, 1, 3, 2, F64, with_h0=True, b_max=2.0, cu_seqlens=cu,
                    normalize_qk=False)
    leaves = [t.clone().requires_grad_(True) for t in (x.q, x.k, x.v, x.g, x.b, x.w, x.h0)]

    def fn(q, k, v, g, b, w, h0):
        o, ht = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True,
                                     use_qk_l2norm_in_kernel=True, cu_seqlens=x.cu_seqlens)
        return o, ht

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
