"""fla-core 0.6.0's GDN-2 API on our ops: signatures, every FLA keyword, the in-kernel gate, grouped
value heads, state layouts, intermediate states and the serving entry, against the fp64 references.

FLA itself is not needed: its signatures are written out below from its 0.6.0 sources
(``fla/ops/gdn2/chunk.py``, ``fused_recurrent.py``); where fla-core is importable the live
signatures are compared too.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch

from gdn2_kernels import InvalidGateError, dispatch, ops
from gdn2_kernels.accuracy import compare
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import CHUNK_SIZES
from gdn2_kernels.reference import chunk_stages_fwd, naive_gate, naive_recurrent_gdn2

_E = inspect.Parameter.empty

# (name, default) in positional order, then FLA's **kwargs keywords, from fla-core 0.6.0.
FLA_CHUNK = [("q", _E), ("k", _E), ("v", _E), ("g", _E), ("b", _E), ("w", _E), ("scale", None),
             ("initial_state", None), ("output_final_state", False),
             ("use_qk_l2norm_in_kernel", False), ("use_gate_in_kernel", False),
             ("cu_seqlens", None), ("cu_seqlens_cpu", None), ("safe_gate", False),
             ("lower_bound", None), ("disable_recompute", False),
             ("return_intermediate_states", False), ("state_v_first", False),
             ("cp_context", None)]
FLA_CHUNK_KWARGS = ["A_log", "dt_bias", "chunk_size", "transpose_state_layout"]
FLA_RECURRENT = [("q", _E), ("k", _E), ("v", _E), ("g", _E), ("b", _E), ("w", _E),
                 ("A_log", None), ("dt_bias", None), ("scale", None), ("initial_state", None),
                 ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                 ("use_gate_in_kernel", False), ("lower_bound", None), ("state_v_first", False),
                 ("cu_seqlens", None)]
FLA_RECURRENT_KWARGS = ["transpose_state_layout"]
FLA_SERVING = [("q", _E), ("k", _E), ("v", _E), ("g", _E), ("b", _E), ("w", _E),
               ("A_log", None), ("dt_bias", None), ("initial_state", None), ("scale", None),
               ("output_final_state", False), ("inplace_final_state", False),
               ("state_v_first", False), ("cu_seqlens", None), ("ssm_state_indices", None),
               ("num_accepted_tokens", None), ("use_qk_l2norm_in_kernel", False),
               ("use_gate_in_kernel", False), ("lower_bound", None), ("out", None)]

SIGNATURES = [(ops.chunk_gdn2, FLA_CHUNK, FLA_CHUNK_KWARGS),
              (ops.fused_recurrent_gdn2, FLA_RECURRENT, FLA_RECURRENT_KWARGS),
              (ops.fused_recurrent_gdn2_fwd, FLA_SERVING, [])]


@pytest.mark.parametrize("fn,fla,fla_kwargs", SIGNATURES, ids=lambda x: getattr(x, "__name__", ""))
def test_signature_is_flas(fn, fla, fla_kwargs):
    params = list(inspect.signature(fn).parameters.values())
    positional = [(p.name, p.default) for p in params
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == fla
    keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(fla_kwargs) <= keyword_only
    assert "validate_values" in keyword_only
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def test_signature_matches_installed_fla():
    fla_chunk = pytest.importorskip("fla.ops.gdn2.chunk")
    fla_rec = pytest.importorskip("fla.ops.gdn2.fused_recurrent")
    for ours, theirs in ((ops.chunk_gdn2, fla_chunk.chunk_gdn2),
                         (ops.fused_recurrent_gdn2, fla_rec.fused_recurrent_gdn2),
                         (ops.fused_recurrent_gdn2_fwd, fla_rec.fused_recurrent_gdn2_fwd)):
        def positional(f):
            return [(p.name, p.default) for p in inspect.signature(inspect.unwrap(f))
                    .parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional(ours) == positional(theirs)


def _x(B=1, T=20, H=2, K=16, V=16, **kw):
    return make_inputs(B, T, H, K, V, **kw)


# ------------------------------------------------------------------------------------------------
# Every keyword at FLA's defaults: bitwise today's call
# ------------------------------------------------------------------------------------------------

def test_chunk_fla_defaults_are_bitwise_the_default_call():
    x = _x(2, 40, with_h0=True)
    o0, ht0 = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                             output_final_state=True)
    args = [x.q, x.k, x.v, x.g, x.b, x.w, None, x.h0, True] + [d for _, d in FLA_CHUNK[9:]]
    o1, ht1 = ops.chunk_gdn2(*args, A_log=None, dt_bias=None)
    assert torch.equal(o0, o1) and torch.equal(ht0, ht1)
    # chunk_size=64 pins the default pipeline's own chunk size here (CPU: spec defaults).
    o2, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0, chunk_size=64)
    assert torch.equal(o0, o2)


def test_recurrent_fla_defaults_are_bitwise_the_default_call():
    x = _x(2, 5, with_h0=True)
    o0, ht0 = ops.fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                       output_final_state=True)
    o1, ht1 = ops.fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, None, None, None, x.h0, True,
                                       False, False, None, False, None)
    assert torch.equal(o0, o1) and torch.equal(ht0, ht1)
    o2, ht2 = ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, None, None, x.h0, None,
                                           True)
    assert torch.equal(o0, o2) and torch.equal(ht0, ht2)


@pytest.mark.parametrize("fn", [ops.chunk_gdn2, ops.fused_recurrent_gdn2,
                                ops.fused_recurrent_gdn2_fwd], ids=lambda f: f.__name__)
def test_unknown_keyword_raises_naming_it(fn):
    x = _x(1, 4)
    with pytest.raises(TypeError, match="head_first"):
        fn(x.q, x.k, x.v, x.g, x.b, x.w, head_first=False)


def test_positional_use_gate_in_kernel_is_not_cu_seqlens():
    """FLA's position 11 is use_gate_in_kernel: a positional True there turns the gate on."""
    x = _x(1, 4)
    with pytest.raises(ValueError, match="use_gate_in_kernel=True needs A_log"):
        ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, None, None, False, False, True)


# ------------------------------------------------------------------------------------------------
# State layout, transpose_state_layout, cp_context, chunk_size, cu_seqlens_cpu
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["chunk", "recurrent"])
def test_state_v_first_transposes_initial_and_final_state(op):
    fn = ops.chunk_gdn2 if op == "chunk" else ops.fused_recurrent_gdn2
    x = _x(2, 12, 2, 16, 24, with_h0=True)
    o, ht = fn(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0, output_final_state=True)
    h0_vk = x.h0.transpose(-1, -2).contiguous()
    o2, ht2 = fn(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=h0_vk, output_final_state=True,
                 state_v_first=True)
    assert ht2.shape == (2, 2, 24, 16)
    assert torch.equal(o, o2) and torch.equal(ht, ht2.transpose(-1, -2))
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        o3, ht3 = fn(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=h0_vk, output_final_state=True,
                     transpose_state_layout=True)
    assert torch.equal(o2, o3) and torch.equal(ht2, ht3)
    with pytest.raises(ValueError, match="either state_v_first or the deprecated"):
        fn(x.q, x.k, x.v, x.g, x.b, x.w, state_v_first=True, transpose_state_layout=True)
    with pytest.raises(ValueError, match=r"initial_state must be \[N, HV, K, V\]"):
        fn(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0, state_v_first=True)


def test_state_v_first_gradient_of_initial_state():
    x = _x(1, 20, 1, 16, 8, with_h0=True)
    h0 = x.h0.transpose(-1, -2).contiguous().requires_grad_()
    o, ht = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=h0,
                           output_final_state=True, state_v_first=True)
    (o.sum() + ht.square().sum()).backward()
    h0r = x.h0.double().requires_grad_()
    ro, rht = naive_recurrent_gdn2(*(t.double() for t in (x.q, x.k, x.v, x.g, x.b, x.w)),
                                   initial_state=h0r, output_final_state=True)
    (ro.sum() + rht.square().sum()).backward()
    assert compare({"dh0": h0.grad.transpose(-1, -2)}, {"dh0": h0r.grad}, "float32")[0].ok


def test_cp_context_runs_the_context_parallel_op(monkeypatch: pytest.MonkeyPatch):
    """cp_context routes to gdn2_kernels.cp.chunk_gdn2_cp (tested across gloo ranks in
    tests/test_cp.py) with chunk_gdn2's core arguments."""
    import gdn2_kernels.cp as cp

    x = _x(1, 4)
    seen = {}

    def fake(*args, cp_context):
        seen.update(n_args=len(args), ctx=cp_context, scale=args[6], validate=args[12])
        return "routed"
    monkeypatch.setattr(cp, "chunk_gdn2_cp", fake)
    ctx = object()
    assert ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, 0.5, cp_context=ctx) == "routed"
    assert seen == {"n_args": 13, "ctx": ctx, "scale": 0.5, "validate": True}


@pytest.mark.parametrize("kw,name", [
    (dict(use_gate_in_kernel=True, A_log=torch.zeros(2)), "use_gate_in_kernel"),
    (dict(chunk_size=32), "chunk_size"),
    (dict(state_v_first=True), "state_v_first"),
])
def test_cp_context_refuses_what_it_does_not_cover(kw, name):
    x = _x(1, 4)
    with pytest.raises(NotImplementedError, match=rf"chunk_gdn2: with cp_context, .*{name}"):
        ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, cp_context=object(), **kw)


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_chunk_size_pins_the_pipeline(size: int, monkeypatch: pytest.MonkeyPatch):
    seen = []
    real = dispatch.with_chunk_size

    def spy(pipe, chunk_size, key):
        out = real(pipe, chunk_size, key)
        seen.append(out.chunk_size)
        return out

    monkeypatch.setattr(dispatch, "with_chunk_size", spy)
    x = _x(1, 40, 1, 16, 16)
    o, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, chunk_size=size)
    assert seen == [size]
    ref, _ = naive_recurrent_gdn2(*(t.double() for t in (x.q, x.k, x.v, x.g, x.b, x.w)))
    assert compare({"o": o}, {"o": ref}, "float32")[0].ok


@pytest.mark.parametrize("bad", [48, 256, 0, True, "64", 64.0])
def test_unsupported_chunk_size_raises(bad):
    x = _x(1, 4)
    with pytest.raises(ValueError, match=r"chunk_gdn2: chunk_size = .* is not supported; use one of"):
        ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, chunk_size=bad)


def test_cu_seqlens_cpu_reads_no_boundaries_from_the_device(monkeypatch: pytest.MonkeyPatch):
    x = _x(1, 30, with_h0=True, cu_seqlens=[0, 7, 7, 30])
    cu = x.cu_seqlens
    want, wht = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                               output_final_state=True, cu_seqlens=cu)
    listed = []
    real = torch.Tensor.tolist

    def tolist(self):
        listed.append(self.data_ptr())
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    o, ht = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                           output_final_state=True, cu_seqlens=cu, cu_seqlens_cpu=cu.clone())
    assert cu.data_ptr() not in listed
    assert torch.equal(o, want) and torch.equal(ht, wht)


@pytest.mark.parametrize("bad,pattern", [
    (torch.tensor([0, 30]), r"cu_seqlens_cpu must have cu_seqlens' shape"),
    (torch.empty(3, dtype=torch.int32, device="meta"), r"cu_seqlens_cpu must be on the CPU"),
    (torch.tensor([0.0, 7.0, 30.0]), r"cu_seqlens_cpu must be int32 or int64"),
    ([0, 7, 30], r"cu_seqlens_cpu must be a torch.Tensor"),
])
def test_bad_cu_seqlens_cpu_raises(bad, pattern):
    x = _x(1, 30, cu_seqlens=[0, 7, 30])
    with pytest.raises((ValueError, TypeError), match=pattern):
        ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, cu_seqlens=x.cu_seqlens, cu_seqlens_cpu=bad)


# ------------------------------------------------------------------------------------------------
# Intermediate states
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("varlen,v_first", [(False, False), (True, True)])
def test_intermediate_states_are_the_chunk_pre_states(varlen: bool, v_first: bool):
    cu = [0, 70, 75, 150] if varlen else None
    x = _x(1 if varlen else 2, 150, 2, 16, 24, with_h0=True, cu_seqlens=cu)
    h0 = x.h0.transpose(-1, -2).contiguous() if v_first else x.h0
    with torch.inference_mode():
        o, ht, h = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=h0,
                                  output_final_state=True, cu_seqlens=x.cu_seqlens,
                                  return_intermediate_states=True, state_v_first=v_first)
    st = chunk_stages_fwd(*(t.double() for t in (x.q, x.k, x.v, x.g, x.b, x.w)),
                          initial_state=x.h0.double(), chunk_size=64, cu_seqlens=x.cu_seqlens)
    B = x.q.shape[0]
    NT = st.h.shape[0] // B
    assert h.shape == ((B, NT, 2, 24, 16) if v_first else (B, NT, 2, 16, 24))
    assert h.dtype == x.k.dtype
    hk = h.transpose(-1, -2) if v_first else h
    htk = ht.transpose(-1, -2) if v_first else ht
    got = {"ht": hk.reshape(st.h.shape), "o": o}
    assert all(r.ok for r in compare(got, {"ht": st.h, "o": st.o}, "float32"))
    assert compare({"ht": htk}, {"ht": st.final}, "float32")[0].ok


def test_intermediate_states_need_inference_mode():
    x = _x(1, 8)
    with pytest.raises(ValueError, match="only runs under torch.inference_mode"):
        ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, return_intermediate_states=True)


# ------------------------------------------------------------------------------------------------
# The in-kernel gate: forward and gradients of g, A_log, dt_bias against the fp64 reference
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateCase:
    kind: str                       # 'softplus' or 'bounded'
    has_A: bool = True
    has_bias: bool = True
    lower_bound: float | None = None
    varlen: bool = False
    phase_d: str = "fused"
    chunk: int = 32

    def label(self) -> str:
        s = f"{self.kind}-A{int(self.has_A)}-bias{int(self.has_bias)}-{self.phase_d}-C{self.chunk}"
        return s + ("-varlen" if self.varlen else "")


GATE_CASES = [
    GateCase("softplus"),
    GateCase("softplus", has_bias=False, phase_d="split", varlen=True, chunk=16),
    GateCase("bounded", lower_bound=-5.0),
    GateCase("bounded", has_A=False, lower_bound=-2.5, phase_d="split"),
    GateCase("bounded", has_bias=False, lower_bound=-0.5, varlen=True, chunk=64),
]


def _gate_inputs(case: GateCase, B: int, T: int, HV: int, K: int, V: int, H: int | None = None):
    cu = [0, 9, 9, 50] if case.varlen else None
    x = make_inputs(1 if case.varlen else B, T, HV, K, V, with_h0=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,)).item()))
    g_raw = torch.randn(x.g.shape, generator=gen)
    A_log = (torch.rand(HV, generator=gen) * 1.5 - 1.0) if case.has_A else None
    dt_bias = torch.randn(HV * K, generator=gen) * 0.5 if case.has_bias else None
    q, k = x.q, x.k
    if H is not None:
        q, k = q[:, :, :H].contiguous(), k[:, :, :H].contiguous()
    return q, k, x, g_raw, A_log, dt_bias


@pytest.mark.parametrize("case", GATE_CASES)
def test_gate_in_kernel_forward_and_gradients(case: GateCase):
    q, k, x, g_raw, A_log, dt_bias = _gate_inputs(case, 2, 50, 2, 16, 24)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, x.v, g_raw, x.b, x.w, x.h0)]
    params = [p.detach().clone().requires_grad_() if p is not None else None
              for p in (A_log, dt_bias)]
    pipe = dispatch.default_pipeline(case.chunk)
    pipe = dispatch.complete_pipeline(
        {**pipe.as_dict(), "intra_bwd": pipe["intra_bwd"].replace(PHASE_D=case.phase_d)}, "test")
    with dispatch.override(pipe):
        o, ht = ops.chunk_gdn2(*leaves[:6], initial_state=leaves[6], output_final_state=True,
                               use_gate_in_kernel=True, lower_bound=case.lower_bound,
                               cu_seqlens=x.cu_seqlens, A_log=params[0], dt_bias=params[1])
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    torch.autograd.backward((o, ht), (do, dht))

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, x.v, g_raw, x.b, x.w, x.h0)]
    ref_params = [p.detach().double().requires_grad_() if p is not None else None
                  for p in (A_log, dt_bias)]
    g_act = naive_gate(ref_leaves[3], ref_params[0], ref_params[1], case.lower_bound)
    ro, rht = naive_recurrent_gdn2(*ref_leaves[:3], g_act, *ref_leaves[4:6],
                                   initial_state=ref_leaves[6], output_final_state=True,
                                   cu_seqlens=x.cu_seqlens)
    torch.autograd.backward((ro, rht), (do.double(), dht.double()))

    names = ["dq", "dk", "dv", "dg", "db", "dw", "dh0"]
    got = {"o": o, "ht": ht} | {n: t.grad for n, t in zip(names, leaves)}
    ref = {"o": ro, "ht": rht} | {n: t.grad for n, t in zip(names, ref_leaves)}
    for name, p, rp in zip(("dA_log", "ddt_bias"), params, ref_params):
        if p is not None:
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
            got[name], ref[name] = p.grad, rp.grad
    bad = [r for r in compare(got, ref, "float32") if not r.ok]
    assert not bad, bad


@pytest.mark.parametrize("case", [GATE_CASES[0], GATE_CASES[3]])
def test_gate_in_kernel_recurrent(case: GateCase):
    q, k, x, g_raw, A_log, dt_bias = _gate_inputs(case, 3, 6, 2, 16, 8)
    o, ht = ops.fused_recurrent_gdn2(q, k, x.v, g_raw, x.b, x.w, A_log, dt_bias,
                                     initial_state=x.h0, output_final_state=True,
                                     use_gate_in_kernel=True, lower_bound=case.lower_bound,
                                     cu_seqlens=x.cu_seqlens)
    g_act = naive_gate(g_raw.double(), *(p.double() if p is not None else None
                                         for p in (A_log, dt_bias)), case.lower_bound)
    ro, rht = naive_recurrent_gdn2(q.double(), k.double(), x.v.double(), g_act, x.b.double(),
                                   x.w.double(), initial_state=x.h0.double(),
                                   output_final_state=True, cu_seqlens=x.cu_seqlens)
    assert all(r.ok for r in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, "float32"))


def test_gate_values_are_checked_for_finiteness_not_sign():
    x = _x(1, 8)
    A_log = torch.zeros(2)
    o, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g.abs() + 1.0, x.b, x.w, use_gate_in_kernel=True,
                          A_log=A_log)
    assert torch.isfinite(o).all()
    g = x.g.clone()
    g[0, 0, 0, 0] = float("nan")
    # The activated log-decay is checked inside the kernel (_gate_check): NaN in, NaN out.
    with pytest.raises(InvalidGateError, match=r"chunk_gdn2: g \(log-decay\) has NaN"):
        ops.chunk_gdn2(x.q, x.k, x.v, g, x.b, x.w, use_gate_in_kernel=True, A_log=A_log)
    with pytest.raises(InvalidGateError, match=r"chunk_gdn2: g \(log-decay\) has NaN"):
        ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, use_gate_in_kernel=True,
                       A_log=torch.tensor([0.0, float("inf")]))


_H, _K = 2, 16
BAD_GATE_ARGS = [
    ("lb-below", dict(use_gate_in_kernel=True, lower_bound=-5.5), ValueError,
     r"lower_bound must be a number in \[-5, 0\)"),
    ("lb-zero", dict(use_gate_in_kernel=True, lower_bound=0.0), ValueError, r"in \[-5, 0\)"),
    ("lb-positive", dict(use_gate_in_kernel=True, lower_bound=1.0), ValueError, r"in \[-5, 0\)"),
    ("lb-nan", dict(use_gate_in_kernel=True, lower_bound=float("nan")), ValueError,
     r"in \[-5, 0\)"),
    ("lb-bool", dict(use_gate_in_kernel=True, lower_bound=True), ValueError, r"in \[-5, 0\)"),
    ("lb-safe-gate", dict(safe_gate=True, lower_bound=-7.0), ValueError, r"in \[-5, 0\)"),
    ("A_log-shape", dict(use_gate_in_kernel=True, A_log=torch.zeros(_H + 1)), ValueError,
     r"A_log must hold one per value head, HV = 2 values \(shape \[2\]\), got shape \(3,\)"),
    ("A_log-per-channel", dict(use_gate_in_kernel=True, A_log=torch.zeros(_H, _K)), ValueError,
     r"A_log must hold"),
    ("dt_bias-shape", dict(use_gate_in_kernel=True, A_log=torch.zeros(_H),
                           dt_bias=torch.zeros(_K)), ValueError,
     r"dt_bias must hold one per value head and key channel, HV \* K = 32 values"),
    ("A_log-int", dict(use_gate_in_kernel=True, A_log=torch.zeros(_H, dtype=torch.int64)),
     TypeError, r"A_log has dtype torch.int64"),
    ("A_log-not-tensor", dict(use_gate_in_kernel=True, A_log=[0.0, 0.0]), TypeError,
     r"A_log must be a torch.Tensor"),
    ("A_log-other-device", dict(use_gate_in_kernel=True,
                                A_log=torch.empty(_H, device="meta")), ValueError,
     r"A_log is on meta"),
    ("no-A_log-no-lb", dict(use_gate_in_kernel=True), ValueError,
     r"use_gate_in_kernel=True needs A_log"),
    ("safe-gate-no-lb", dict(use_gate_in_kernel=True, safe_gate=True, A_log=torch.zeros(_H)),
     ValueError, r"safe_gate=True with use_gate_in_kernel=True needs lower_bound"),
    ("A_log-without-gate", dict(A_log=torch.zeros(_H)), ValueError,
     r"A_log only act with use_gate_in_kernel=True"),
    ("lb-without-gate", dict(lower_bound=-1.0), ValueError,
     r"lower_bound only acts with use_gate_in_kernel=True"),
]


@pytest.mark.parametrize("changes,exc,pattern", [c[1:] for c in BAD_GATE_ARGS],
                         ids=[c[0] for c in BAD_GATE_ARGS])
@pytest.mark.parametrize("fn", [ops.chunk_gdn2, ops.fused_recurrent_gdn2],
                         ids=lambda f: f.__name__)
def test_bad_gate_arguments_raise(fn, changes: dict, exc: type, pattern: str):
    if fn is ops.fused_recurrent_gdn2 and "safe_gate" in changes:
        pytest.skip("fused_recurrent_gdn2 has no safe_gate (as in FLA)")
    x = _x(1, 4, _H, _K, 8)
    with pytest.raises(exc, match=f"{fn.__name__}: .*{pattern}"):
        fn(x.q, x.k, x.v, x.g, x.b, x.w, **changes)


def test_safe_gate_with_precomputed_gate_matches_the_plain_call():
    x = _x(1, 30)
    o, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    o2, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, safe_gate=True, lower_bound=-5.0)
    assert torch.equal(o, o2)


# ------------------------------------------------------------------------------------------------
# Grouped value heads
# ------------------------------------------------------------------------------------------------

def _gva_inputs(B=2, T=40, H=1, G=2, K=16, V=24, cu=None):
    x = make_inputs(B, T, H * G, K, V, with_h0=True, cu_seqlens=cu)
    return x.q[:, :, :H].contiguous(), x.k[:, :, :H].contiguous(), x


def test_gva_chunk_forward_and_gradients():
    q, k, x = _gva_inputs(cu=None)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, x.v, x.g, x.b, x.w, x.h0)]
    o, ht = ops.chunk_gdn2(*leaves[:6], initial_state=leaves[6], output_final_state=True)
    assert o.shape == x.v.shape and ht.shape == x.h0.shape
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    torch.autograd.backward((o, ht), (do, dht))
    ref = [t.detach().double().requires_grad_() for t in (q, k, x.v, x.g, x.b, x.w, x.h0)]
    ro, rht = naive_recurrent_gdn2(*ref[:6], initial_state=ref[6], output_final_state=True)
    torch.autograd.backward((ro, rht), (do.double(), dht.double()))
    names = ["dq", "dk", "dv", "dg", "db", "dw", "dh0"]
    got = {"o": o, "ht": ht} | {n: t.grad for n, t in zip(names, leaves)}
    want = {"o": ro, "ht": rht} | {n: t.grad for n, t in zip(names, ref)}
    assert leaves[0].grad.shape == q.shape
    bad = [r for r in compare(got, want, "float32") if not r.ok]
    assert not bad, bad


def test_gva_recurrent_matches_reference_and_chunk():
    q, k, x = _gva_inputs(1, 20, 2, 3, 16, 8, cu=[0, 5, 20])
    o, ht = ops.fused_recurrent_gdn2(q, k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                     output_final_state=True, cu_seqlens=x.cu_seqlens)
    ro, rht = naive_recurrent_gdn2(*(t.double() for t in (q, k, x.v, x.g, x.b, x.w)),
                                   initial_state=x.h0.double(), output_final_state=True,
                                   cu_seqlens=x.cu_seqlens)
    assert all(r.ok for r in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, "float32"))


def test_gva_heads_must_be_a_multiple():
    x = make_inputs(1, 4, 3, 8, 8)
    q, k = x.q[:, :, :2].contiguous(), x.k[:, :, :2].contiguous()
    for fn in (ops.chunk_gdn2, ops.fused_recurrent_gdn2):
        with pytest.raises(ValueError, match=r"v must be \[B, T, HV, V\] .* HV a multiple"):
            fn(q, k, x.v, x.g, x.b, x.w)


# ------------------------------------------------------------------------------------------------
# The serving entry: paged state pool, in-place states, speculative decoding, out=
# ------------------------------------------------------------------------------------------------

def _reference_step(q, k, v, g, b, w, h0, cu=None):
    ro, rht = naive_recurrent_gdn2(*(t.double() for t in (q, k, v, g, b, w)),
                                   initial_state=h0.double(), output_final_state=True,
                                   cu_seqlens=cu)
    return ro, rht


@pytest.mark.parametrize("v_first", [False, True])
def test_serving_pool_in_place(v_first: bool):
    """Decode step of 3 sequences (one a padding slot) against a pool of 5 slots, GVA 2x."""
    N, slots, H, G, K, V = 3, 5, 1, 2, 16, 8
    x = make_inputs(N, 1, H * G, K, V)
    q, k = x.q[:, :, :H].contiguous(), x.k[:, :, :H].contiguous()
    pool = torch.randn(slots, H * G, K, V)
    pool_in = pool.transpose(-1, -2).contiguous() if v_first else pool.clone()
    before = pool_in.clone()
    idx = torch.tensor([3, -1, 0], dtype=torch.int32)
    out = torch.empty_like(x.v)
    o, ht = ops.fused_recurrent_gdn2_fwd(q, k, x.v, x.g, x.b, x.w, initial_state=pool_in,
                                         inplace_final_state=True, state_v_first=v_first,
                                         ssm_state_indices=idx, out=out)
    assert o is out and ht is pool_in
    h0 = torch.stack([pool[3], torch.zeros(H * G, K, V), pool[0]])
    ro, rht = _reference_step(q, k, x.v, x.g, x.b, x.w, h0)
    after = pool_in.transpose(-1, -2) if v_first else pool_in
    assert all(r.ok for r in compare({"o": o, "ht": after[[3, 0]]},
                                     {"o": ro, "ht": rht[[0, 2]]}, "float32"))
    untouched = [1, 2, 4]
    assert torch.equal(pool_in[untouched], before[untouched])


def test_serving_speculative_decoding_per_token_slots():
    """Two sequences of 3 draft tokens (varlen), per-token slots, resumed from accepted slots."""
    N, T, H, K, V = 2, 3, 2, 16, 8
    x = make_inputs(1, N * T, H, K, V, cu_seqlens=[0, T, 2 * T])
    pool = torch.randn(8, H, K, V)
    work = pool.clone()
    idx = torch.tensor([[0, 1, 2], [5, 6, 7]], dtype=torch.int64)
    acc = torch.tensor([2, 1], dtype=torch.int32)       # start from slots 1 and 5
    o, _ = ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=work,
                                        inplace_final_state=True, cu_seqlens=x.cu_seqlens,
                                        ssm_state_indices=idx, num_accepted_tokens=acc)
    for n, start in ((0, 1), (1, 5)):
        sl = slice(n * T, (n + 1) * T)
        args = [t[:, sl] for t in (x.q, x.k, x.v, x.g, x.b, x.w)]
        for t in range(1, T + 1):
            ro, rht = _reference_step(*(a[:, :t] for a in args), pool[start:start + 1])
            assert compare({"ht": work[idx[n, t - 1]][None]}, {"ht": rht}, "float32")[0].ok
        assert compare({"o": o[:, sl]}, {"o": ro}, "float32")[0].ok
    assert torch.equal(work[[3, 4]], pool[[3, 4]])


def test_serving_one_slot_per_sequence_new_final_state():
    x = make_inputs(2, 4, 2, 16, 8)
    pool = torch.randn(4, 2, 16, 8)
    idx = torch.tensor([2, 1])
    o, ht = ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=pool,
                                         output_final_state=True, ssm_state_indices=idx)
    ro, rht = _reference_step(x.q, x.k, x.v, x.g, x.b, x.w, pool[[2, 1]])
    assert ht.shape == (2, 2, 16, 8)
    assert all(r.ok for r in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, "float32"))


def test_serving_dense_in_place_and_gate():
    x = make_inputs(2, 3, 2, 16, 8, with_h0=True)
    g_raw, A_log = torch.randn(x.g.shape), torch.zeros(2)
    state = x.h0.clone()
    o, ht = ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, g_raw, x.b, x.w, A_log, None, state,
                                         inplace_final_state=True, use_gate_in_kernel=True)
    assert ht is state
    ro, rht = _reference_step(x.q, x.k, x.v, naive_gate(g_raw.double(), A_log.double()), x.b,
                              x.w, x.h0)
    assert all(r.ok for r in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, "float32"))


_P = torch.zeros(4, 2, 16, 8)
BAD_SERVING = [
    ("inplace-no-state", dict(inplace_final_state=True), r"inplace_final_state=True updates"),
    ("pool-shape", dict(initial_state=torch.zeros(4, 2, 8, 16), ssm_state_indices=torch.tensor(
        [0, 1])), r"initial_state must be \[slots, HV, K, V\]"),
    ("pool-dtype", dict(initial_state=_P.double(), ssm_state_indices=torch.tensor([0, 1])),
     r"initial_state must be float32"),
    ("pool-strided", dict(initial_state=torch.zeros(4, 2, 8, 16).transpose(-1, -2),
                          ssm_state_indices=torch.tensor([0, 1])), r"must be contiguous"),
    ("indices-float", dict(initial_state=_P, ssm_state_indices=torch.tensor([0.0, 1.0])),
     r"ssm_state_indices must be int32/int64"),
    ("indices-count", dict(initial_state=_P, ssm_state_indices=torch.tensor([0, 1, 2])),
     r"ssm_state_indices must be \[N\] .* N = 2"),
    ("indices-short", dict(initial_state=_P, inplace_final_state=True,
                           ssm_state_indices=torch.zeros(2, 2, dtype=torch.int64)),
     r"T_max >= T = 3"),
    ("per-token-not-inplace", dict(initial_state=_P, output_final_state=True,
                                   ssm_state_indices=torch.zeros(2, 3, dtype=torch.int64)),
     r"pass inplace_final_state=True"),
    ("accepted-without-2d", dict(initial_state=_P, ssm_state_indices=torch.tensor([0, 1]),
                                 num_accepted_tokens=torch.tensor([1, 1])),
     r"num_accepted_tokens selects"),
    ("accepted-shape", dict(initial_state=_P, inplace_final_state=True,
                            ssm_state_indices=torch.zeros(2, 3, dtype=torch.int64),
                            num_accepted_tokens=torch.tensor([1, 1, 1])),
     r"num_accepted_tokens must be int32/int64 \[N\]"),
    ("out-shape", dict(out=torch.zeros(2, 3, 2, 4)), r"out must be a contiguous floating"),
    ("out-int", dict(out=torch.zeros(2, 3, 2, 8, dtype=torch.int32)), r"out must be"),
    ("cu-batch", dict(cu_seqlens=torch.tensor([0, 3])), r"batch size must be 1"),
]


@pytest.mark.parametrize("changes,pattern", [c[1:] for c in BAD_SERVING],
                         ids=[c[0] for c in BAD_SERVING])
def test_bad_serving_arguments_raise(changes: dict, pattern: str):
    x = make_inputs(2, 3, 2, 16, 8)
    with pytest.raises(ValueError, match=f"fused_recurrent_gdn2_fwd: .*{pattern}"):
        ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, **changes)


@pytest.mark.gpu
def test_serving_step_captures_in_a_cuda_graph():
    N, slots, H, K, V = 8, 32, 4, 128, 128
    x = make_inputs(N, 1, H, K, V, torch.bfloat16, device="cuda", seed=0)
    pool = torch.randn(slots, H, K, V, device="cuda")
    idx = torch.randperm(slots, device="cuda")[:N].to(torch.int32)
    out = torch.empty_like(x.v)
    want_pool = pool.clone()
    want_o, _ = ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w,
                                             initial_state=want_pool, inplace_final_state=True,
                                             ssm_state_indices=idx)
    work = pool.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=pool.clone(),
                                     inplace_final_state=True, ssm_state_indices=idx, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=work,
                                     inplace_final_state=True, ssm_state_indices=idx, out=out)
    work.copy_(pool)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want_o) and torch.equal(work, want_pool)
