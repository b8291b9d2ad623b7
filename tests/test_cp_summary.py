"""Span summaries against the float64 recurrence, and context parallelism's accuracy at 8 ranks.

``chunk_gdn2_summary``: H is the final state from zero (or from the given initial state), and for
a random entering state S0 the recurrence ends in M^T S0 + H. ``span_summary_bwd``: G is the
gradient of the entering state for (dO, dht), and M from the backward pass equals M from the
forward one. At 8 ranks (``emulate_cp``: the ranks' steps in one process), o, the final states and
every gradient agree with the single-process op and with the float64 recurrence within the
tolerance table.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gdn2_kernels import _varlen, chunk_gdn2, dispatch
from gdn2_kernels.accuracy import TOLERANCES, rel_rms
from gdn2_kernels.configs import dtype_name, short_dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.cp import chunk_gdn2_summary
from gdn2_kernels.cp.emulate import emulate_cp
from gdn2_kernels.kernels.intra_fwd import intra_fwd
from gdn2_kernels.kernels.summary import span_summary_bwd, span_summary_fwd
from gdn2_kernels.reference import naive_recurrent_gdn2


@dataclass(frozen=True)
class SpanCase:
    B: int
    T: int
    H: int
    K: int
    V: int
    chunk: int
    dtype: torch.dtype = torch.float32
    cu_seqlens: tuple[int, ...] | None = None
    decay: str = "normal"
    l2norm: bool = False

    def label(self) -> str:
        return (f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-C{self.chunk}-"
                f"{short_dtype_name(self.dtype)}-{self.decay}"
                + ("-varlen" if self.cu_seqlens else "") + ("-l2norm" if self.l2norm else ""))


SPAN_CASES = [
    SpanCase(2, 70, 2, 16, 24, 16),
    SpanCase(1, 90, 1, 32, 20, 32, cu_seqlens=(0, 7, 7, 60, 90), decay="strong"),
    SpanCase(1, 80, 2, 24, 16, 16, torch.bfloat16, cu_seqlens=(0, 50, 80), l2norm=True),
]


def _inputs(case: SpanCase):
    cu = list(case.cu_seqlens) if case.cu_seqlens else None
    x = make_inputs(case.B, case.T, case.H, case.K, case.V, case.dtype, decay=case.decay,
                    with_h0=True, cu_seqlens=cu, normalize_qk=not case.l2norm)
    return x, x.to(torch.float64)


def _ref(x64, h0, case: SpanCase, **kw):
    return naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, initial_state=h0,
                                output_final_state=True, cu_seqlens=x64.cu_seqlens,
                                use_qk_l2norm_in_kernel=case.l2norm, **kw)


@pytest.mark.parametrize("case", SPAN_CASES)
def test_summary_is_the_affine_map_of_the_entering_state(case: SpanCase):
    x, x64 = _inputs(case)
    tol = TOLERANCES[dtype_name(case.dtype)]["ht"]
    with dispatch.override(dispatch.default_pipeline(case.chunk)):
        Hs, M = chunk_gdn2_summary(x.k, x.v, x.g, x.b, x.w, cu_seqlens=x.cu_seqlens,
                                   use_qk_l2norm_in_kernel=case.l2norm)
        H0, _ = chunk_gdn2_summary(x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                   cu_seqlens=x.cu_seqlens, use_qk_l2norm_in_kernel=case.l2norm,
                                   output_transition=False)
    _, H_ref = _ref(x64, None, case)
    _, S_ref = _ref(x64, x64.h0, case)
    assert rel_rms(Hs, H_ref) <= tol
    assert rel_rms(H0, S_ref) <= tol
    # the state's response to S0 alone: M^T S0 (what the chain multiplies)
    assert rel_rms(M.double().transpose(-1, -2) @ x64.h0, S_ref - H_ref) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("case", [SpanCase(1, 4096, 4, 128, 128, 64, torch.bfloat16,
                                           cu_seqlens=(0, 1000, 4096)),
                                  SpanCase(2, 2048, 2, 128, 128, 64, torch.float32)])
def test_summary_on_gpu(case: SpanCase):
    x, x64 = _inputs(case)
    x, x64 = x.to(device="cuda"), x64.to(device="cuda")
    Hs, M = chunk_gdn2_summary(x.k, x.v, x.g, x.b, x.w, cu_seqlens=x.cu_seqlens)
    _, H_ref = _ref(x64, None, case)
    _, S_ref = _ref(x64, x64.h0, case)
    tol = TOLERANCES[dtype_name(case.dtype)]["ht"]
    assert rel_rms(Hs, H_ref) <= tol
    # The chained state a rank hands on, H + M^T S0. Over thousands of tokens the response to S0
    # alone, M^T S0, decays to ~1e-12 of |S| (measured on the CPU at T = 1024): its relative error
    # measures rounding of a vanishing quantity (5.4e-3 in bf16 there, failing "ht" on the H200 at
    # this shape on 2026-12-01), so M alone is checked on short spans (the tests above).
    assert rel_rms(Hs.double() + M.double().transpose(-1, -2) @ x64.h0, S_ref) <= tol


@pytest.mark.parametrize("case", SPAN_CASES)
def test_backward_summary_is_the_gradient_of_the_entering_state(case: SpanCase):
    x, x64 = _inputs(case)
    q, k = x.q, x.k
    if case.l2norm:
        q, k = (t / (t.float().square().sum(-1, keepdim=True) + 1e-6).sqrt().to(t.dtype)
                for t in (q, k))
    scale = case.K ** -0.5
    N = x.h0.shape[0]
    do = torch.randn(case.B, case.T, case.H, case.V).to(case.dtype)
    dht = torch.randn(N, case.H, case.K, case.V)
    pipe = dispatch.default_pipeline(case.chunk)
    cu = x.cu_seqlens
    idx = _varlen.chunk_indices(cu, case.chunk) if cu is not None else None
    offs = _varlen.chunk_offsets(cu, case.chunk) if cu is not None else None
    g_cum, _, A_qk, Y, U, Qg, Kt, gC = intra_fwd(q.contiguous(), k.contiguous(), x.v, x.g, x.b,
                                                 x.w, scale, cu, idx, pipe["intra_fwd"])
    G, M_bwd = span_summary_bwd(q, k, g_cum, Qg, Kt, gC, Y, A_qk, do, dht, scale, cu, offs,
                                pipe["state_bwd"], transition=True)
    _, M_fwd = span_summary_fwd(Qg, Kt, gC, Y, U, A_qk, None, cu, offs, pipe["state_fwd"])

    h0 = x64.h0.clone().requires_grad_()
    o, ht = _ref(x64, h0, case)
    ((o * do.double()).sum() + (ht * dht.double()).sum()).backward()
    tol = TOLERANCES[dtype_name(case.dtype)]
    assert rel_rms(G, h0.grad) <= tol["dh0"]
    assert rel_rms(M_bwd, M_fwd) <= tol["ht"]
    # M alone carries a leaving gradient back: dS_start = M dS_end (no dO)
    h0.grad = None
    _, ht = _ref(x64, h0, case)
    (ht * dht.double()).sum().backward()
    assert rel_rms(M_bwd.double() @ dht.double(), h0.grad) <= tol["dh0"]


@dataclass(frozen=True)
class RanksCase:
    world: int
    layout: str
    cu_seqlens: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    T: int = 128
    H: int = 2
    K: int = 16
    V: int = 24
    chunk: int = 16

    def label(self) -> str:
        return (f"W{self.world}-{self.layout}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-C{self.chunk}"
                f"-{short_dtype_name(self.dtype)}-N{len(self.cu_seqlens) - 1}")


RANKS_CASES = [
    RanksCase(8, "contiguous", (0, 128)),
    RanksCase(8, "zigzag", (0, 3, 70, 77, 128), torch.bfloat16),
]


def _check_ranks(case: RanksCase, device: str = "cpu") -> None:
    """The emulated ranks against the single-process op and the float64 recurrence."""
    cu = list(case.cu_seqlens)
    x = make_inputs(1, case.T, case.H, case.K, case.V, case.dtype, device, with_h0=True,
                    cu_seqlens=cu)
    do = torch.randn(1, case.T, case.H, case.V, device=device).to(case.dtype)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w, x.h0)]
    with dispatch.override(dispatch.default_pipeline(case.chunk)):
        run = emulate_cp(x.q, x.k, x.v, x.g, x.b, x.w, cu, case.world, case.layout, do=do,
                         initial_state=x.h0)
        o, ht = chunk_gdn2(*leaves[:6], initial_state=leaves[6], output_final_state=True,
                           cu_seqlens=cu_t)
        (o.float() * do.float()).sum().backward()
    single = {"o": o, "ht": ht} | {n: t.grad for n, t in zip(
        ("dq", "dk", "dv", "dg", "db", "dw", "dh0"), leaves)}
    x64 = x.to(torch.float64)
    leaves64 = [t.detach().clone().requires_grad_()
                for t in (x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, x64.h0)]
    o64, ht64 = naive_recurrent_gdn2(*leaves64[:6], initial_state=leaves64[6],
                                     output_final_state=True, cu_seqlens=cu_t)
    (o64 * do.double()).sum().backward()
    exact = {"o": o64, "ht": ht64} | {n: t.grad for n, t in zip(
        ("dq", "dk", "dv", "dg", "db", "dw", "dh0"), leaves64)}
    got = {"o": run.o, "ht": run.final_state, **run.grads}
    tol = TOLERANCES[dtype_name(case.dtype)]
    over = {f"{n} vs {which}": rel_rms(got[n], ref[n]) for n in got
            for which, ref in (("single", single), ("fp64", exact))
            if not rel_rms(got[n], ref[n]) <= tol[n]}
    assert not over, f"{case.label()}: rel RMS over tolerance {over}"


@pytest.mark.parametrize("case", RANKS_CASES)
def test_eight_ranks_match_the_single_process_op(case: RanksCase):
    _check_ranks(case)


GPU_RANKS_CASES = [
    RanksCase(8, "contiguous", (0, 8192), torch.bfloat16, T=8192, H=4, K=128, V=128, chunk=64),
    RanksCase(8, "zigzag", (0, 1000, 5000, 5001, 8192), torch.bfloat16, T=8192, H=4, K=128,
              V=128, chunk=64),
    RanksCase(8, "contiguous", (0, 4096), torch.float32, T=4096, H=2, K=128, V=128, chunk=64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_RANKS_CASES)
def test_eight_ranks_match_the_single_process_op_on_gpu(case: RanksCase):
    _check_ranks(case, "cuda")
