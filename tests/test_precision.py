"""fp32 inputs run the chunk kernels' dots at split precision (``gdn2_kernels._precision``)."""
from __future__ import annotations

import torch

from gdn2_kernels import _precision, chunk_gdn2
from gdn2_kernels.accuracy import rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.reference import naive_recurrent_gdn2


def test_fp32_launches_ask_for_split_precision_dots():
    assert _precision.dot_precision(torch.float32) == "tf32x3"
    # 16-bit storage keeps the precision its kernels were tuned and verified with.
    assert _precision.dot_precision(torch.bfloat16) == "tf32"
    assert _precision.dot_precision(torch.float16) == "tf32"


def test_fp32_forward_and_backward_run_with_dot_precision():
    """DOT_PRECISION reaches every chunk launcher (the interpreter accepts it); fp32 stays exact."""
    x = make_inputs(1, 40, 2, 32, 32, torch.float32, with_h0=True)
    xi = x.to(torch.float32, requires_grad=True)
    o, ht = chunk_gdn2(xi.q, xi.k, xi.v, xi.g, xi.b, xi.w, initial_state=xi.h0,
                       output_final_state=True)
    (o.square().sum() + ht.sum()).backward()
    x64 = x.to(torch.float64)
    ro, rht = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w,
                                   initial_state=x64.h0, output_final_state=True)
    assert rel_rms(o, ro) < 1e-5 and rel_rms(ht, rht) < 1e-5
    assert all(torch.isfinite(t.grad).all() for t in (xi.q, xi.k, xi.v, xi.g, xi.b, xi.w))
