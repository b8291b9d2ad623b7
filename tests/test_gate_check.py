"""The in-kernel check of the log-decay g (``_gate_check``, ``validate_values``).

A bad g entry (NaN, +-Inf or > 0) must never give finite garbage: the forward kernels turn the
outputs of its (sequence, head) NaN from its chunk (chunk_gdn2) or token (fused_recurrent_gdn2)
on, leave every other output equal to the float64 reference, and raise the device's error flag,
which the op reports without a host sync on CUDA (at a later call) and at once on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels import (InvalidGateError, _gate_check, check_gates, chunk_gdn2, dispatch,
                          fused_recurrent_gdn2)
from gdn2_kernels.accuracy import compare
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.kernels.chunk_fwd import chunk_gdn2_fwd
from gdn2_kernels.kernels.recurrent_fwd import recurrent_fwd
from gdn2_kernels.reference import naive_recurrent_gdn2

BAD_VALUES = {"nan": float("nan"), "pos-inf": float("inf"), "neg-inf": -float("inf"),
              "positive": 0.25}
CHUNK = 16


def _bad_inputs(value: float, t_bad: int, *, B=2, T=50, H=2, K=24, V=20):
    """Fresh inputs with one bad g entry at (sequence 1, token t_bad, head 1, a random channel)."""
    x = make_inputs(B, T, H, K, V, with_h0=True)
    x.g[1, t_bad, 1, int(torch.randint(0, K, ()))] = value
    return x


def _reference(x):
    """fp64 outputs with g made harmless where it is bad (only the unaffected parts are compared)."""
    g = torch.where(torch.isfinite(x.g) & (x.g <= 0), x.g, torch.zeros_like(x.g))
    return naive_recurrent_gdn2(x.q.double(), x.k.double(), x.v.double(), g.double(),
                                x.b.double(), x.w.double(), initial_state=x.h0.double(),
                                output_final_state=True)


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_chunk_forward_poisons_from_the_bad_chunk_on(value: float):
    t_bad = 37                                      # chunk 2 of 16 tokens: rows 32..47
    x = _bad_inputs(value, t_bad)
    flag = torch.zeros(1, dtype=torch.int32)
    pipe = dispatch.default_pipeline(CHUNK)
    res = chunk_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, 24 ** -0.5, x.h0, True, None,
                         pipe, g_err=flag)
    assert int(flag) == 1
    start = t_bad // CHUNK * CHUNK
    assert torch.isnan(res.o[1, start:, 1]).all()           # from the bad chunk on: NaN
    assert torch.isnan(res.ht[1, 1]).all()
    ro, rht = _reference(x)
    clean_o = {"before": (res.o[1, :start, 1], ro[1, :start, 1]),     # same head, earlier
               "seq0": (res.o[0], ro[0]), "head0": (res.o[1, :, 0], ro[1, :, 0])}
    for name, (got, want) in clean_o.items():
        assert all(e.ok for e in compare({"o": got}, {"o": want}, "float32")), name
    assert all(e.ok for e in compare({"ht": res.ht[0]}, {"ht": rht[0]}, "float32"))


def test_chunk_forward_flag_stays_clear_on_good_g():
    x = make_inputs(1, 40, 2, 16, 16)
    flag = torch.zeros(1, dtype=torch.int32)
    res = chunk_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w, 0.25, None, False, None,
                         dispatch.default_pipeline(CHUNK), g_err=flag)
    assert int(flag) == 0 and torch.isfinite(res.o).all()


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_recurrent_forward_poisons_from_the_bad_token_on(value: float):
    t_bad = 7
    x = _bad_inputs(value, t_bad, T=12)
    flag = torch.zeros(1, dtype=torch.int32)
    config = dispatch.default_pipeline(CHUNK)["recurrent_fwd"]
    o, ht = recurrent_fwd(x.q, x.k, x.v, x.g, x.b, x.w, 24 ** -0.5, x.h0, True, False, None,
                          config, g_err=flag)
    assert int(flag) == 1
    assert torch.isnan(o[1, t_bad:, 1]).all() and torch.isnan(ht[1, 1]).all()
    ro, rht = _reference(x)
    assert all(e.ok for e in compare({"o": o[1, :t_bad, 1]}, {"o": ro[1, :t_bad, 1]}, "float32"))
    assert all(e.ok for e in compare({"o": o[0], "ht": ht[0]}, {"o": ro[0], "ht": rht[0]},
                                     "float32"))


@pytest.mark.parametrize("op", [chunk_gdn2, fused_recurrent_gdn2], ids=lambda f: f.__name__)
@pytest.mark.parametrize("validate", [True, "sync"], ids=["default", "sync"])
def test_op_raises_on_the_cpu_and_clears_the_flag(op, validate):
    x = _bad_inputs(float("nan"), 3, T=20)
    with pytest.raises(InvalidGateError, match=rf"^{op.__name__}: g \(log-decay\) has NaN"):
        with torch.no_grad():
            op(x.q, x.k, x.v, x.g, x.b, x.w, validate_values=validate)
    good = make_inputs(1, 20, 2, 24, 20)
    with torch.no_grad():
        o, _ = op(good.q, good.k, good.v, good.g, good.b, good.w)   # the flag was cleared
    assert torch.isfinite(o).all()
    check_gates()                                                    # nothing pending


def test_invalid_gate_error_is_a_value_error():
    assert issubclass(InvalidGateError, ValueError)


@pytest.mark.parametrize("op", [chunk_gdn2, fused_recurrent_gdn2], ids=lambda f: f.__name__)
def test_validate_values_false_runs_without_the_check(op):
    x = _bad_inputs(0.5, 3, T=20)
    with torch.no_grad():
        o, _ = op(x.q, x.k, x.v, x.g, x.b, x.w, validate_values=False)
    assert o.shape == x.v.shape
    assert int(_gate_check.flag(torch.device("cpu"))) == 0


@pytest.mark.parametrize("bad", ["yes", 1, None, "SYNC"])
def test_validate_values_must_be_true_false_or_sync(bad):
    x = make_inputs(1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match=r"validate_values must be True, False or 'sync'"):
        chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, validate_values=bad)


# ------------------------------------------------------------------------------------------------
# On the GPU: no host sync, reported at a later call, capturable in a CUDA graph
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_default_call_reports_a_bad_g_at_a_later_call():
    x = _bad_inputs(float("nan"), 100, B=2, T=300, H=2, K=64, V=64).to(device="cuda")
    o, _ = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)       # returns: no sync, outputs poisoned
    torch.cuda.synchronize()
    assert torch.isnan(o[1, 100:, 1]).all() and torch.isfinite(o[0]).all()
    good = make_inputs(1, 64, 2, 64, 64, device="cuda")
    with pytest.raises(InvalidGateError, match=r"an earlier chunk_gdn2 call"):
        chunk_gdn2(good.q, good.k, good.v, good.g, good.b, good.w)
    o2, _ = chunk_gdn2(good.q, good.k, good.v, good.g, good.b, good.w)
    check_gates()
    assert torch.isfinite(o2).all()


@pytest.mark.gpu
def test_gpu_check_gates_raises_at_once():
    x = _bad_inputs(0.5, 5, T=40, K=64, V=64).to(device="cuda")
    with torch.no_grad():
        fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    with pytest.raises(InvalidGateError):
        check_gates("cuda")              # the device without an index means the current one
    check_gates()


@pytest.mark.gpu
def test_gpu_default_decode_call_is_capturable():
    """The default fused_recurrent_gdn2 call captures in a CUDA graph (no sync in the call), and
    the replayed graph still poisons a bad g."""
    x = make_inputs(4, 1, 4, 128, 128, torch.bfloat16, device="cuda", with_h0=True)
    static = {n: t.clone() for n, t in x.tensors().items()}
    with torch.no_grad():
        fused_recurrent_gdn2(**_decode_args(static))           # warm-up (compiles)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, ht = fused_recurrent_gdn2(**_decode_args(static))
    graph.replay()
    torch.cuda.synchronize()
    ro, rht = naive_recurrent_gdn2(*(static[n].double() for n in "qkvgbw"),
                                   initial_state=static["h0"].double(), output_final_state=True)
    assert all(e.ok for e in compare({"o": o, "ht": ht}, {"o": ro, "ht": rht}, "bfloat16"))
    static["g"][2, 0, 3, 5] = float("nan")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(o[2, 0, 3]).all() and torch.isfinite(o[:2]).all()
    with pytest.raises(InvalidGateError):
        check_gates()


def _decode_args(t):
    return dict(q=t["q"], k=t["k"], v=t["v"], g=t["g"], b=t["b"], w=t["w"],
                initial_state=t["h0"], output_final_state=True)
