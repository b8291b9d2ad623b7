"""chunk_gdn2 against the float64 token recurrence, and every input-validation error path.

The forward matrix is :data:`FWD_CASES` (module level, so gradient tests can reuse it through
:func:`case_params`, :func:`case_inputs` and :func:`case_pipeline`). Every run draws fresh random
inputs from ``inputs.make_inputs``; errors are compared per named tensor with the tolerances of
``accuracy.TOLERANCES`` for the input dtype, never relaxed.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import pytest
import torch

from gdn2_kernels import _device, chunk_gdn2, dispatch, fused_recurrent_gdn2
from gdn2_kernels.accuracy import compare
from gdn2_kernels.configs import dtype_name, short_dtype_name
from gdn2_kernels.inputs import GDN2Inputs, make_inputs
from gdn2_kernels.configs import CHUNK_SIZES, MAX_HEAD_DIM
from gdn2_kernels.reference import naive_recurrent_gdn, naive_recurrent_gdn2, naive_recurrent_kda


@dataclass(frozen=True)
class OpCase:
    """One problem of the op matrix: shape, chunk size (pipeline BT), dtype and input flavour."""

    B: int
    T: int
    H: int
    K: int
    V: int
    chunk: int = 64
    dtype: torch.dtype = torch.float32
    decay: str = "normal"
    b_max: float = 1.0
    h0: bool = False
    cu_seqlens: tuple[int, ...] | None = None
    l2norm: bool = False
    scale: float | None = None

    def label(self) -> str:
        dt = short_dtype_name(self.dtype)
        s = f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-{dt}-C{self.chunk}-{self.decay}"
        s += f"-b{self.b_max:g}" if self.b_max != 1.0 else ""
        s += "-h0" if self.h0 else ""
        s += "-varlen" if self.cu_seqlens else ""
        s += "-l2norm" if self.l2norm else ""
        return s + (f"-scale{self.scale:g}" if self.scale is not None else "")


FWD_CASES: list[OpCase] = [
    # every chunk size; T not a multiple of it; K != V; K, V not powers of two
    OpCase(2, 100, 2, 32, 48, chunk=64, h0=True),
    OpCase(1, 150, 1, 64, 40, chunk=16),
    OpCase(2, 70, 1, 48, 64, chunk=32, decay="strong", h0=True),
    OpCase(1, 130, 2, 40, 32, chunk=128, decay="weak", b_max=2.0, h0=True),
    OpCase(1, 33, 1, 20, 12, chunk=16, b_max=2.0),
    OpCase(1, 20, 1, MAX_HEAD_DIM, 16, chunk=16, h0=True),
    # shorter than one chunk; a single token; T a multiple of the chunk with a custom scale
    OpCase(1, 9, 1, 16, 24, chunk=64, h0=True),
    OpCase(1, 1, 2, 32, 32, chunk=16),
    OpCase(1, 64, 1, 32, 32, chunk=16, h0=True, scale=0.5),
    # varlen: a sequence shorter than a chunk, an empty one, a length-1 one, several per chunk size
    OpCase(1, 120, 2, 32, 32, chunk=32, h0=True, cu_seqlens=(0, 10, 75, 120)),
    OpCase(1, 100, 1, 48, 40, chunk=64, decay="strong", cu_seqlens=(0, 1, 1, 66, 100)),
    OpCase(1, 90, 2, 32, 48, chunk=16, b_max=2.0, h0=True, cu_seqlens=(0, 45, 50, 90)),
    OpCase(1, 140, 1, 24, 32, chunk=128, decay="weak", h0=True, cu_seqlens=(0, 3, 140)),
    # q/k L2 norm inside the op (inputs not normalised)
    OpCase(2, 60, 2, 32, 48, chunk=64, h0=True, l2norm=True),
    OpCase(1, 100, 1, 64, 64, chunk=32, decay="strong", l2norm=True, cu_seqlens=(0, 30, 100)),
    # low-precision inputs
    OpCase(2, 100, 2, 32, 48, chunk=64, dtype=torch.bfloat16, h0=True),
    OpCase(1, 90, 1, 32, 32, chunk=32, dtype=torch.bfloat16, decay="strong",
           cu_seqlens=(0, 10, 75, 90)),
    OpCase(2, 50, 1, 40, 24, chunk=32, dtype=torch.float16, b_max=2.0, h0=True),
    OpCase(1, 70, 2, 32, 48, chunk=16, dtype=torch.float16, decay="strong", l2norm=True),
]


def case_params(cases: list[OpCase]) -> list:
    """pytest params of ``cases`` (ids from each case's label)."""
    return list(cases)


def case_inputs(case: OpCase) -> GDN2Inputs:
    """Fresh random inputs for ``case`` in its dtype (g and h0 float32)."""
    return make_inputs(case.B, case.T, case.H, case.K, case.V, case.dtype, decay=case.decay,
                       b_max=case.b_max, with_h0=case.h0, normalize_qk=not case.l2norm,
                       cu_seqlens=list(case.cu_seqlens) if case.cu_seqlens else None)


def case_pipeline(case: OpCase) -> contextlib.AbstractContextManager:
    """Every kernel's default config at the case's chunk size, for the launches in the block."""
    return dispatch.override(dispatch.default_pipeline(case.chunk))


def _call(fn, case: OpCase, x: GDN2Inputs):
    return fn(x.q, x.k, x.v, x.g, x.b, x.w, scale=case.scale, initial_state=x.h0,
              output_final_state=True, use_qk_l2norm_in_kernel=case.l2norm,
              cu_seqlens=x.cu_seqlens)


@pytest.mark.parametrize("case", case_params(FWD_CASES))
def test_forward_matches_recurrence(case: OpCase):
    x = case_inputs(case)
    with case_pipeline(case):
        o, ht = _call(chunk_gdn2, case, x)
    N = case.B if case.cu_seqlens is None else len(case.cu_seqlens) - 1
    assert o.shape == (case.B, case.T, case.H, case.V) and o.dtype == case.dtype
    assert ht.shape == (N, case.H, case.K, case.V) and ht.dtype == torch.float32
    ro, rht = _call(naive_recurrent_gdn2, case, x.to(torch.float64))
    bad = [e for e in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, dtype_name(case.dtype))
           if not e.ok]
    assert not bad, bad


def test_forward_matrix_covers_every_chunk_size():
    assert {c.chunk for c in FWD_CASES} == set(CHUNK_SIZES)


def test_forward_default_dispatch_and_no_final_state():
    """Without an override the op resolves its own configs; final_state is None unless asked."""
    x = make_inputs(1, 40, 1, 32, 32)
    o, ht = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    assert ht is None
    ro, _ = naive_recurrent_gdn2(*(t.double() for t in (x.q, x.k, x.v, x.g, x.b, x.w)))
    assert all(e.ok for e in compare({"o": o}, {"o": ro}, "float32"))


def test_forward_tied_gates_match_kda():
    """b = w = beta * 1 through the kernels equals the separately written KDA recurrence."""
    x = make_inputs(1, 70, 2, 32, 32, with_h0=True)
    beta = torch.rand(1, 70, 2)
    b, w = beta[..., None].expand_as(x.k), beta[..., None].expand_as(x.v)
    with dispatch.override(dispatch.default_pipeline(32)):
        o, ht = chunk_gdn2(x.q, x.k, x.v, x.g, b, w, initial_state=x.h0, output_final_state=True)
    ro, rht = naive_recurrent_kda(x.q.double(), x.k.double(), x.v.double(), x.g.double(),
                                  beta.double(), initial_state=x.h0.double(),
                                  output_final_state=True)
    bad = [e for e in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, "float32") if not e.ok]
    assert not bad, bad


def test_forward_non_contiguous_inputs():
    x = make_inputs(2, 30, 2, 16, 24, with_h0=True)
    # The same values in [B, H, T, D] memory, viewed back as [B, T, H, D] (non-contiguous).
    q, k, v, g, b, w = (t.transpose(1, 2).contiguous().transpose(1, 2)
                        for t in (x.q, x.k, x.v, x.g, x.b, x.w))
    assert not q.is_contiguous()
    o, ht = chunk_gdn2(q, k, v, g, b, w, initial_state=x.h0, output_final_state=True)
    ro, rht = naive_recurrent_gdn2(*(t.double() for t in (x.q, x.k, x.v, x.g, x.b, x.w)),
                                   initial_state=x.h0.double(), output_final_state=True)
    bad = [e for e in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, "float32") if not e.ok]
    assert not bad, bad


def test_outputs_are_nan_poisoned_before_launch():
    """The conftest fixture is active: fresh floating allocations hold NaN, integer ones don't."""
    assert torch.isnan(torch.empty(3)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, dtype=torch.bfloat16))).all()
    torch.empty(3, dtype=torch.int32)  # integer allocations are left alone


# ------------------------------------------------------------------------------------------------
# Input validation (checks.check_inputs): every error names the argument
# ------------------------------------------------------------------------------------------------

B_, T_, H_, K_, V_ = 2, 6, 2, 8, 4


def _args(device: str = "cpu", **changes) -> dict:
    x = make_inputs(B_, T_, H_, K_, V_, with_h0=True).to(device=device)
    args = dict(q=x.q, k=x.k, v=x.v, g=x.g, b=x.b, w=x.w, initial_state=x.h0)
    args.update(changes)
    return args


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


BAD_INPUTS = [
    # (id, changes to a valid call, exception, message pattern)
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, r"^q must be a torch.Tensor"),
    ("w-not-tensor", dict(w=None), TypeError, r"^w must be a torch.Tensor"),
    ("q-rank", dict(q=torch.zeros(T_, H_, K_)), ValueError, r"^q must be \[B, T, H, K\]"),
    ("k-shape", dict(k=torch.zeros(B_, T_, H_, K_ + 1)), ValueError, r"^k must have q's shape"),
    ("g-shape", dict(g=torch.zeros(B_, T_ - 1, H_, K_)), ValueError, r"^g must have q's shape"),
    ("b-shape", dict(b=torch.zeros(B_, T_, H_ + 1, K_)), ValueError, r"^b must have q's shape"),
    ("v-rank", dict(v=torch.zeros(B_, T_, H_ * V_)), ValueError, r"^v must be \[B, T, HV, V\]"),
    ("v-batch", dict(v=torch.zeros(B_ + 1, T_, H_, V_)), ValueError, r"^v must be \[B, T, HV, V\]"),
    ("w-shape", dict(w=torch.zeros(B_, T_, H_, V_ + 1)), ValueError, r"^w \(write gate\) must"),
    ("K-too-large", dict(q=_meta(1, 2, 1, MAX_HEAD_DIM + 1), k=_meta(1, 2, 1, MAX_HEAD_DIM + 1),
                         g=_meta(1, 2, 1, MAX_HEAD_DIM + 1), b=_meta(1, 2, 1, MAX_HEAD_DIM + 1),
                         v=_meta(1, 2, 1, 4), w=_meta(1, 2, 1, 4)),
     ValueError, r"^K \(head dim of q/k\) = 257"),
    ("V-too-large", dict(q=_meta(1, 2, 1, 4), k=_meta(1, 2, 1, 4), g=_meta(1, 2, 1, 4),
                         b=_meta(1, 2, 1, 4), v=_meta(1, 2, 1, 300), w=_meta(1, 2, 1, 300)),
     ValueError, r"^V \(head dim of v\) = 300"),
    ("q-int", dict(q=torch.zeros(B_, T_, H_, K_, dtype=torch.int32)), TypeError, r"^q has dtype"),
    ("v-int64", dict(v=torch.zeros(B_, T_, H_, V_, dtype=torch.int64)), TypeError,
     r"^v has dtype"),
    ("q-float64", dict(q=torch.zeros(B_, T_, H_, K_, dtype=torch.float64)), TypeError,
     r"^q has dtype torch.float64"),
    ("mixed-k-bf16", dict(k=torch.zeros(B_, T_, H_, K_, dtype=torch.bfloat16)), TypeError,
     r"^k has dtype torch.bfloat16 but q has torch.float32"),
    ("mixed-w-fp16", dict(w=torch.zeros(B_, T_, H_, V_, dtype=torch.float16)), TypeError,
     r"^w has dtype"),
    ("g-float64", dict(g=-torch.ones(B_, T_, H_, K_, dtype=torch.float64)), TypeError,
     r"^g has dtype torch.float64"),
    ("g-int", dict(g=torch.zeros(B_, T_, H_, K_, dtype=torch.int32)), TypeError, r"^g has dtype"),
    ("k-other-device", dict(k=_meta(B_, T_, H_, K_)), ValueError, r"^k is on meta but q is on"),
    ("g-other-device", dict(g=_meta(B_, T_, H_, K_)), ValueError, r"^g is on meta"),
    ("scale-negative", dict(scale=-1.0), ValueError, r"^scale must be a positive finite number"),
    ("scale-string", dict(scale="0.5"), ValueError, r"^scale must be"),
    ("g-nan", dict(g=torch.full((B_, T_, H_, K_), float("nan"))), ValueError, r"^g \(log-decay\)"),
    ("g-positive", dict(g=torch.full((B_, T_, H_, K_), 0.1)), ValueError, r"^g \(log-decay\)"),
    ("g-inf", dict(g=torch.full((B_, T_, H_, K_), -float("inf"))), ValueError, r"^g \(log-decay\)"),
    ("h0-shape", dict(initial_state=torch.zeros(B_, H_, V_, K_)), ValueError,
     r"^initial_state must be \[N, HV, K, V\]"),
    ("h0-bf16", dict(initial_state=torch.zeros(B_, H_, K_, V_, dtype=torch.bfloat16)), TypeError,
     r"^initial_state must be float32"),
    ("h0-other-device", dict(initial_state=_meta(B_, H_, K_, V_)), ValueError,
     r"^initial_state is on meta"),
    ("h0-not-tensor", dict(initial_state=1.0), TypeError, r"^initial_state must be a torch.Tensor"),
]


OPS = {"chunk": chunk_gdn2, "recurrent": fused_recurrent_gdn2}


def _named(op, pattern: str) -> str:
    """Every input error starts with the public function that was called."""
    return pattern.replace("^", f"^{op.__name__}: ", 1) if pattern.startswith("^") else pattern


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("changes,exc,pattern", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_invalid_inputs_raise(op, changes: dict, exc: type, pattern: str):
    with pytest.raises(exc, match=_named(op, pattern)) as info:
        op(**_args(**changes))
    assert str(info.value).startswith(f"{op.__name__}: ")
    assert op is chunk_gdn2 or "chunk_gdn2" not in str(info.value)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("scale", [float("inf"), -float("inf"), float("nan"), 0.0, -0.5, True])
def test_non_finite_or_non_positive_scale_is_refused(op, scale):
    with pytest.raises(ValueError, match=rf"^{op.__name__}: scale must be a positive finite "
                                         rf"number or None \(for K\*\*-0.5\), got "):
        op(**_args(scale=scale))


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("name", ["b", "q"])
def test_a_bool_input_is_told_to_cast_to_a_real_dtype(op, name):
    shape = (B_, T_, H_, K_)
    with pytest.raises(TypeError) as info:
        op(**_args(**{name: torch.ones(shape, dtype=torch.bool)}))
    msg = str(info.value)
    assert msg.startswith(f"{op.__name__}: {name} has dtype torch.bool; {op.__name__} takes "
                          "float32, bfloat16 or float16 inputs")
    to = "torch.bfloat16" if name == "q" else "q.dtype"
    assert f"cast it with {name}.to({to})" in msg and "float64" not in msg


def test_a_bool_g_is_told_to_cast_to_float32():
    with pytest.raises(TypeError, match=r"^chunk_gdn2: g has dtype torch.bool; .*cast it with "
                                        r"g.to\(torch.float32\)"):
        chunk_gdn2(**_args(g=torch.zeros(B_, T_, H_, K_, dtype=torch.bool)))


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
@pytest.mark.parametrize("name", ["q", "k", "v", "b", "w", "initial_state"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_tensor_holding_nan_or_inf(op, name, value):
    args = _args()
    bad = args[name].clone()
    bad.view(-1)[bad.numel() // 2] = value
    args[name] = bad
    with pytest.raises(ValueError, match=rf"^{op.__name__}: {name} contain\(s\) NaN or Inf "
                                         r"\(check_finite=True\)"):
        op(**args, check_finite=True)


@pytest.mark.parametrize("op", OPS.values(), ids=OPS.keys())
def test_check_finite_passes_finite_inputs_and_changes_nothing(op):
    args = _args()
    o, ht = op(**args, output_final_state=True, check_finite=True)
    o2, ht2 = op(**args, output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
    # keyword-only: after FLA's positional arguments
    assert inspect.signature(op).parameters["check_finite"].kind is inspect.Parameter.KEYWORD_ONLY


def _varlen_args(cu, B: int = 1, **changes) -> dict:
    x = make_inputs(B, 10, H_, K_, V_, with_h0=False)
    args = dict(q=x.q, k=x.k, v=x.v, g=x.g, b=x.b, w=x.w, cu_seqlens=cu)
    args.update(changes)
    return args


BAD_CU_SEQLENS = [
    ("batch-not-1", dict(B=2), torch.tensor([0, 10]), ValueError,
     r"batch size must be 1"),
    ("not-tensor", {}, [0, 10], TypeError, r"^cu_seqlens must be a torch.Tensor"),
    ("2d", {}, torch.tensor([[0, 10]]), ValueError, r"^cu_seqlens must be 1-D"),
    ("one-entry", {}, torch.tensor([0]), ValueError, r"^cu_seqlens must be 1-D \[N \+ 1\]"),
    ("float", {}, torch.tensor([0.0, 10.0]), TypeError, r"^cu_seqlens must be int32 or int64"),
    ("other-device", {}, torch.empty(2, dtype=torch.int32, device="meta"), ValueError,
     r"^cu_seqlens is on meta"),
    ("not-from-0", {}, torch.tensor([1, 10]), ValueError, r"must start at 0 and end at T = 10"),
    ("past-T", {}, torch.tensor([0, 4, 11]), ValueError, r"must start at 0 and end at T = 10"),
    ("short-of-T", {}, torch.tensor([0, 4, 9]), ValueError, r"end at T = 10"),
    ("non-monotone", {}, torch.tensor([0, 6, 4, 10]), ValueError, r"must be non-decreasing"),
    ("negative", {}, torch.tensor([0, -2, 10]), ValueError, r"must be non-decreasing"),
    ("h0-per-batch-not-sequence", dict(initial_state=torch.zeros(1, H_, K_, V_)),
     torch.tensor([0, 4, 10]), ValueError, r"initial_state must be \[N, HV, K, V\] = \(2,"),
]


@pytest.mark.parametrize("changes,cu,exc,pattern", [c[1:] for c in BAD_CU_SEQLENS],
                         ids=[c[0] for c in BAD_CU_SEQLENS])
def test_invalid_cu_seqlens_raise(changes: dict, cu, exc: type, pattern: str):
    with pytest.raises(exc, match=_named(chunk_gdn2, pattern)):
        chunk_gdn2(**_varlen_args(cu, **changes))


def test_all_inputs_on_unsupported_device_raise():
    args = {n: _meta(*t.shape, dtype=t.dtype) for n, t in _args().items()}
    with pytest.raises(ValueError, match=r"^chunk_gdn2: inputs are on meta"):
        chunk_gdn2(**args)
    with pytest.raises(ValueError, match=r"^fused_recurrent_gdn2: inputs are on meta; "
                                         r"fused_recurrent_gdn2 runs on CUDA"):
        fused_recurrent_gdn2(**args)


def test_cpu_inputs_without_interpreter_raise(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_device, "interpreter_active", lambda: False)
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
        chunk_gdn2(**_args())


def test_validate_values_false_skips_the_gate_check():
    """validate_values=False runs without the in-kernel check of g (test_gate_check.py)."""
    args = _args(g=torch.full((B_, T_, H_, K_), 0.01), initial_state=None)
    o, _ = chunk_gdn2(**args, validate_values=False)
    assert o.shape == (B_, T_, H_, V_)


# ================================================================================================
# Gradients: every input's gradient against autograd through the float64 token recurrence
# ================================================================================================
#
# The gradient matrix reuses OpCase (and case_inputs); a GradCase adds what only the backward
# sees: the upstream gradient of the final state, disable_recompute, and the sub-chunk size BC of
# the intra stages. Each run draws fresh inputs, a random dO and (when the final state is
# returned) a random dL/d(final state); every gradient is compared by name with TOLERANCES.

GRAD_NAMES = {"q": "dq", "k": "dk", "v": "dv", "g": "dg", "b": "db", "w": "dw", "h0": "dh0"}

@dataclass(frozen=True)
class GradCase(OpCase):
    """An OpCase plus the backward's knobs."""

    dht: bool = True                # return the final state and give it an upstream gradient
    recompute: bool = True          # False: disable_recompute=True (forward keeps chunk states)
    bc: int | None = None           # BC of intra_fwd / intra_bwd; None keeps the spec default
    phase_d: str = "fused"          # intra_bwd's PHASE_D
    phase_b: str = "fused"          # intra_bwd's PHASE_B
    scan: str = "serial"            # state_fwd's SCAN

    def label(self) -> str:
        s = super().label() + ("-dht" if self.dht else "")
        s += "" if self.recompute else "-keep_h"
        s += "" if self.phase_d == "fused" else f"-D{self.phase_d}"
        s += "" if self.phase_b == "fused" else f"-B{self.phase_b}"
        return s + (f"-BC{self.bc}" if self.bc else "")


GRAD_CASES: list[GradCase] = [
    # every chunk size; T not a multiple of it; K != V; K, V not powers of two
    GradCase(2, 100, 2, 32, 48, chunk=64, h0=True, phase_d="split"),
    GradCase(1, 130, 1, 40, 24, chunk=16, recompute=False, phase_b="split"),
    GradCase(1, 130, 2, 40, 32, chunk=128, decay="weak", b_max=2.0, h0=True, bc=32),
    GradCase(1, 33, 1, 20, 12, chunk=16, b_max=2.0, dht=False),
    # strong decay (g down to -20: the exact diagonal-block paths); sequences end on a BC boundary
    GradCase(1, 64, 1, 48, 32, chunk=32, decay="strong", h0=True),
    GradCase(1, 97, 1, 48, 40, chunk=64, decay="strong", cu_seqlens=(0, 1, 1, 65, 97), bc=32,
             recompute=False, phase_d="split"),
    # shorter than one chunk; a single token; a custom scale
    GradCase(1, 9, 1, 16, 24, chunk=64, h0=True),
    GradCase(1, 1, 2, 32, 32, chunk=16, h0=True),
    GradCase(1, 64, 1, 32, 32, chunk=16, h0=True, scale=0.5, recompute=False),
    # varlen: a sequence shorter than a chunk, an empty one, initial states per sequence
    GradCase(1, 120, 2, 32, 32, chunk=32, h0=True, cu_seqlens=(0, 10, 75, 120), bc=32,
             recompute=False),
    GradCase(1, 90, 2, 32, 48, chunk=16, b_max=2.0, h0=True, cu_seqlens=(0, 45, 50, 90),
             phase_b="split", phase_d="split"),
    # q/k L2 norm inside the op
    GradCase(2, 60, 2, 32, 48, chunk=64, h0=True, l2norm=True),
    GradCase(1, 96, 1, 48, 32, chunk=32, decay="strong", l2norm=True, cu_seqlens=(0, 32, 96),
             recompute=False),
    # float16 inputs (g and h0 stay float32)
    GradCase(2, 50, 1, 40, 24, chunk=32, dtype=torch.float16, b_max=2.0, h0=True),
    GradCase(1, 64, 2, 32, 48, chunk=16, dtype=torch.float16, decay="strong", l2norm=True,
             phase_d="split"),
]

# Strong decay with a sequence ending inside a BC sub-block: the known intra_bwd bug above.
GRAD_CASES_MASKED_OVERFLOW: list[GradCase] = [
    GradCase(1, 70, 1, 48, 32, chunk=32, decay="strong", h0=True),
    GradCase(1, 100, 1, 48, 40, chunk=64, decay="strong", cu_seqlens=(0, 1, 1, 66, 100)),
]


def grad_pipeline(case: GradCase) -> contextlib.AbstractContextManager:
    """The case's chunk size with every default, and its BC in both intra stages."""
    pipe = dispatch.default_pipeline(case.chunk).as_dict()
    if case.bc is not None:
        for name in ("intra_fwd", "intra_bwd"):
            pipe[name] = pipe[name].replace(BC=case.bc)
    pipe["intra_bwd"] = pipe["intra_bwd"].replace(PHASE_D=case.phase_d, PHASE_B=case.phase_b)
    pipe["state_fwd"] = pipe["state_fwd"].replace(SCAN=case.scan)
    pipe["state_bwd"] = pipe["state_bwd"].replace(SCAN=case.scan)
    return dispatch.override(pipe)


def _upstream(case: GradCase, o: torch.Tensor, ht: torch.Tensor | None):
    do = torch.randn(o.shape).to(o.dtype)
    dht = torch.randn(ht.shape) if ht is not None else None
    return do, dht


def _grads(x: GDN2Inputs) -> dict[str, torch.Tensor]:
    return {GRAD_NAMES[n]: t.grad for n, t in x.tensors().items()}


def run_grad_case(case: GradCase) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(chunk_gdn2's gradients, the float64 recurrence's) for one fresh draw of ``case``."""
    x = case_inputs(case)
    leaves = x.to(case.dtype, requires_grad=True)
    ref_leaves = x.to(torch.float64, requires_grad=True)
    kw = dict(scale=case.scale, output_final_state=case.dht,
              use_qk_l2norm_in_kernel=case.l2norm, cu_seqlens=x.cu_seqlens)
    with grad_pipeline(case):
        o, ht = chunk_gdn2(leaves.q, leaves.k, leaves.v, leaves.g, leaves.b, leaves.w,
                           initial_state=leaves.h0, disable_recompute=not case.recompute, **kw)
        do, dht = _upstream(case, o, ht)
        torch.autograd.backward([t for t in (o, ht) if t is not None],
                                [t for t in (do, dht) if t is not None])
    ro, rht = naive_recurrent_gdn2(ref_leaves.q, ref_leaves.k, ref_leaves.v, ref_leaves.g,
                                   ref_leaves.b, ref_leaves.w, initial_state=ref_leaves.h0, **kw)
    torch.autograd.backward([t for t in (ro, rht) if t is not None],
                            [t.double() for t in (do, dht) if t is not None])
    got, want = _grads(leaves), _grads(ref_leaves)
    for name, t in got.items():
        assert t is not None and t.shape == want[name].shape, name
        assert t.dtype == (torch.float32 if name in ("dg", "dh0") else case.dtype), name
    return got, want


@pytest.mark.parametrize("case", GRAD_CASES + GRAD_CASES_MASKED_OVERFLOW)
def test_gradients_match_recurrence(case: GradCase):
    got, want = run_grad_case(case)
    bad = [e for e in compare(got, want, dtype_name(case.dtype)) if not e.ok]
    assert not bad, bad


def test_gradient_matrix_covers_the_backward_knobs():
    cases = GRAD_CASES
    assert {c.chunk for c in cases} == set(CHUNK_SIZES)
    assert {c.bc for c in cases} >= {None, 32}
    assert {c.recompute for c in cases} == {True, False}
    assert {c.phase_d for c in cases} == {"fused", "split"}
    assert {c.decay for c in cases} == {"normal", "weak", "strong"}
    assert any(c.cu_seqlens and c.h0 for c in cases) and any(c.l2norm for c in cases)
    assert any(c.T % c.chunk for c in cases) and any(not c.dht for c in cases)
    assert any(c.b_max == 2.0 for c in cases) and any(c.dtype == torch.float16 for c in cases)


def test_disable_recompute_gives_identical_gradients():
    """Keeping the chunk states or recomputing them runs the same state kernel: same bits."""
    x = make_inputs(1, 40, 1, 24, 16, with_h0=True)
    do = torch.randn(1, 40, 1, 16)
    dht = torch.randn(1, 1, 24, 16)
    grads = []
    for keep in (False, True):
        leaves = x.to(torch.float32, requires_grad=True)
        with dispatch.override(dispatch.default_pipeline(16)):
            o, ht = chunk_gdn2(leaves.q, leaves.k, leaves.v, leaves.g, leaves.b, leaves.w,
                               initial_state=leaves.h0, output_final_state=True,
                               disable_recompute=keep)
            torch.autograd.backward((o, ht), (do, dht))
        grads.append(_grads(leaves))
    for name in GRAD_NAMES.values():
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_gradients_tied_gates_match_kda():
    """b = w = beta * 1 (shared through expand): d(beta) sums both gates' gradients, as in KDA."""
    x = make_inputs(1, 50, 2, 24, 32, with_h0=True)
    beta = torch.rand(1, 50, 2)
    leaves = x.to(torch.float32, requires_grad=True)
    ref = x.to(torch.float64, requires_grad=True)
    beta_k, beta_r = beta.clone().requires_grad_(), beta.double().requires_grad_()
    with dispatch.override(dispatch.default_pipeline(32)):
        o, ht = chunk_gdn2(leaves.q, leaves.k, leaves.v, leaves.g,
                           beta_k[..., None].expand_as(x.k), beta_k[..., None].expand_as(x.v),
                           initial_state=leaves.h0, output_final_state=True)
    do, dht = torch.randn(o.shape), torch.randn(ht.shape)
    torch.autograd.backward((o, ht), (do, dht))
    ro, rht = naive_recurrent_kda(ref.q, ref.k, ref.v, ref.g, beta_r, initial_state=ref.h0,
                                  output_final_state=True)
    torch.autograd.backward((ro, rht), (do.double(), dht.double()))
    names = {"dq": "q", "dk": "k", "dv": "v", "dg": "g", "dh0": "h0"}
    got = {d: getattr(leaves, n).grad for d, n in names.items()} | {"db": beta_k.grad}
    want = {d: getattr(ref, n).grad for d, n in names.items()} | {"db": beta_r.grad}
    bad = [e for e in compare(got, want, "float32") if not e.ok]
    assert not bad, bad


def test_gradients_tied_gates_and_scalar_decay_match_gated_deltanet():
    """Also g = alpha_log * 1 per head: d(alpha_log) sums dg over the key channels."""
    x = make_inputs(2, 40, 1, 16, 24, with_h0=True)
    beta, alpha_log = torch.rand(2, 40, 1), -torch.rand(2, 40, 1)
    leaves = x.to(torch.float32, requires_grad=True)
    ref = x.to(torch.float64, requires_grad=True)
    ins = [t.clone().requires_grad_() for t in (beta, alpha_log)]
    ins_r = [t.double().requires_grad_() for t in (beta, alpha_log)]
    with dispatch.override(dispatch.default_pipeline(16)):
        o, ht = chunk_gdn2(leaves.q, leaves.k, leaves.v, ins[1][..., None].expand_as(x.k),
                           ins[0][..., None].expand_as(x.k), ins[0][..., None].expand_as(x.v),
                           initial_state=leaves.h0, output_final_state=True)
    do, dht = torch.randn(o.shape), torch.randn(ht.shape)
    torch.autograd.backward((o, ht), (do, dht))
    ro, rht = naive_recurrent_gdn(ref.q, ref.k, ref.v, ins_r[1], ins_r[0], initial_state=ref.h0,
                                  output_final_state=True)
    torch.autograd.backward((ro, rht), (do.double(), dht.double()))
    names = {"dq": "q", "dk": "k", "dv": "v", "dh0": "h0"}
    got = {d: getattr(leaves, n).grad for d, n in names.items()}
    want = {d: getattr(ref, n).grad for d, n in names.items()}
    got |= {"db": ins[0].grad, "dg": ins[1].grad}
    want |= {"db": ins_r[0].grad, "dg": ins_r[1].grad}
    bad = [e for e in compare(got, want, "float32") if not e.ok]
    assert not bad, bad


def test_gradients_only_for_inputs_that_require_them():
    """Leaves without requires_grad get none; dh0 is skipped when h0 does not need it."""
    x = make_inputs(1, 20, 1, 16, 16, with_h0=True)
    v = x.v.clone().requires_grad_()
    o, _ = chunk_gdn2(x.q, x.k, v, x.g, x.b, x.w, initial_state=x.h0)
    o.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    assert all(t.grad is None for t in (x.q, x.k, x.g, x.b, x.w, x.h0))


def test_gradients_with_the_segmented_state_scan(monkeypatch: pytest.MonkeyPatch, force_segments):
    """SCAN="segmented" (forced: 2 chunks per segment) in state_fwd (the forward and the
    backward's recomputation of h) and in state_bwd gives the recurrence's output and gradients."""
    from gdn2_kernels.kernels import state_bwd as state_bwd_module
    from gdn2_kernels.kernels import state_fwd as state_fwd_module

    calls = []

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counting(state_fwd_module, "state_fwd_segmented")
    counting(state_bwd_module, "state_bwd_segmented")
    force_segments(2)
    case = GradCase(2, 100, 2, 32, 48, chunk=16, h0=True, decay="strong", scan="segmented")
    got, want = run_grad_case(case)
    assert calls == ["state_fwd_segmented", "state_fwd_segmented", "state_bwd_segmented"]
    bad = [e for e in compare(got, want, dtype_name(case.dtype)) if not e.ok]
    assert not bad, bad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_inputs_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: the op makes the inputs' GPU current (fwd, bwd,
    decode), so cuda:1 inputs give cuda:0's results while cuda:0 is current."""
    from gdn2_kernels import fused_recurrent_gdn2

    x = make_inputs(1, 200, 2, 64, 64, torch.bfloat16, "cuda:0", with_h0=True)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        leaves = [t.detach().to(dev).requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w)]
        with torch.cuda.device(0):
            o, ht = chunk_gdn2(*leaves, initial_state=x.h0.to(dev), output_final_state=True)
            o.float().sum().backward()
            with torch.no_grad():
                od, _ = fused_recurrent_gdn2(*(t.detach() for t in leaves),
                                             initial_state=x.h0.to(dev))
        results.append([t.cpu() for t in [o, ht, od] + [t.grad for t in leaves]])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_device_guard_is_a_no_op_for_cpu_tensors():
    from gdn2_kernels import _device

    with _device.guard(torch.zeros(1)):
        pass
    assert _device.current_index() == 0 or torch.cuda.is_available()
