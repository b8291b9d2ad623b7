"""gdn2_kernels.integrations.fla: the switch that routes flash-linear-attention's GDN-2 ops to ours.

Needs fla-core 0.6.0 importable (skipped otherwise); it imports on a CPU-only machine (with a
warning) and the routed calls run our kernels through the interpreter. To run these locally:
``pip install --no-deps --target DIR fla_core-0.6.0-py3-none-any.whl einops`` and put DIR on
PYTHONPATH for this test only.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

fla_gdn2 = pytest.importorskip("fla.ops.gdn2")
fla_recurrent = pytest.importorskip("fla.ops.gdn2.fused_recurrent")

from gdn2_kernels import ops  # noqa: E402
from gdn2_kernels.inputs import make_inputs  # noqa: E402
from gdn2_kernels.integrations import fla as integration  # noqa: E402


@pytest.fixture
def routed():
    integration.enable()
    yield
    integration.disable()


def test_enable_rebinds_and_disable_restores():
    import fla.ops.gdn2.chunk as fla_chunk

    before = (fla_gdn2.chunk_gdn2, fla_gdn2.fused_recurrent_gdn2, fla_chunk.chunk_gdn2)
    integration.enable()
    try:
        integration.enable()  # idempotent
        assert integration.enabled()
        assert fla_gdn2.chunk_gdn2 is not before[0] and fla_chunk.chunk_gdn2 is fla_gdn2.chunk_gdn2
        assert fla_gdn2.fused_recurrent_gdn2 is not before[1]
        assert fla_gdn2.chunk_gdn2.__gdn2_original__ is before[0]
    finally:
        integration.disable()
    assert (fla_gdn2.chunk_gdn2, fla_gdn2.fused_recurrent_gdn2, fla_chunk.chunk_gdn2) == before
    assert not integration.enabled()


def test_routed_chunk_is_ours_forward_and_backward(routed):
    x = make_inputs(1, 30, 2, 16, 16, with_h0=True)
    a = [t.clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w, x.h0)]
    b = [t.clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w, x.h0)]
    o1, h1 = fla_gdn2.chunk_gdn2(*a[:6], initial_state=a[6], output_final_state=True)
    o2, h2 = ops.chunk_gdn2(*b[:6], initial_state=b[6], output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(h1, h2)
    (o1.sum() + h1.sum()).backward()
    (o2.sum() + h2.sum()).backward()
    assert all(torch.equal(s.grad, t.grad) for s, t in zip(a, b))


def test_registry_routes_the_serving_entry(routed):
    x = make_inputs(3, 1, 2, 16, 8)
    pool = torch.randn(5, 2, 16, 8)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    work = pool.clone()
    with torch.no_grad():
        o, ht = fla_recurrent.fused_recurrent_gdn2_fwd(
            x.q, x.k, x.v, x.g, x.b, x.w, initial_state=work, inplace_final_state=True,
            ssm_state_indices=idx)
        o_ref, _ = ops.fused_recurrent_gdn2_fwd(x.q, x.k, x.v, x.g, x.b, x.w,
                                                initial_state=pool, inplace_final_state=True,
                                                ssm_state_indices=idx)
    assert ht is work and torch.equal(o, o_ref) and torch.equal(work, pool)
    # FLA's own fused_recurrent_gdn2 is rebound too (and calls the dispatched entry).
    with torch.no_grad():
        o2, _ = fla_gdn2.fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
        o3, _ = ops.fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    assert torch.equal(o2, o3)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(cp_context=object()), "cp_context"),
    (dict(chunk_size=48), "chunk_size=48"),
    (dict(head_first=False), "does not take"),
    (dict(A_log=torch.zeros(2)), "only act with use_gate_in_kernel=True"),
])
def test_declined_calls_run_flas_kernel(kwargs, reason):
    x = make_inputs(1, 8, 2, 16, 16)
    ok, why = integration.covers(ops.chunk_gdn2, x.q, x.k, x.v, x.g, x.b, x.w, **kwargs)
    assert not ok and reason in why
    seen = []
    routed = integration._route("chunk_gdn2", ops.chunk_gdn2,
                                lambda *a, **kw: seen.append(kw) or "fla")
    assert routed(x.q, x.k, x.v, x.g, x.b, x.w, **kwargs) == "fla" and seen == [kwargs]


def test_environment_variable_enables_on_import():
    code = ("import gdn2_kernels, fla.ops.gdn2 as m;"
            "from gdn2_kernels.integrations import fla;"
            "print(fla.enabled(), hasattr(m.chunk_gdn2, '__gdn2_original__'))")
    env = dict(os.environ, GDN2_FLA="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["True", "True"]
