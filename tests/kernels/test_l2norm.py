"""l2norm_fwd / l2norm_bwd against ``reference.l2norm`` and its float64 autograd VJP."""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels.accuracy import compare
from gdn2_kernels.configs import dtype_name
from gdn2_kernels.configs import get_spec
from gdn2_kernels.kernels.l2norm import l2norm_bwd, l2norm_fwd
from gdn2_kernels.reference import l2norm

# (leading shape, D): row counts that are not multiples of BR, D not a power of two.
SHAPES = [((2, 37, 3), 48), ((1, 50, 2), 40), ((3, 7, 1), 64), ((1, 1, 1), 100), ((1, 20, 2), 256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _id(shape_d) -> str:
    shape, D = shape_d
    return "x".join(map(str, shape)) + f"-D{D}"


@pytest.mark.parametrize("BR", get_spec("l2norm_fwd").param("BR").values, ids=lambda v: f"BR{v}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_d", SHAPES, ids=_id)
def test_l2norm_fwd_bwd(shape_d, dtype: torch.dtype, BR: int):
    shape, D = shape_d
    x = torch.randn(*shape, D, dtype=torch.float64).to(dtype)
    dy = torch.randn(*shape, D, dtype=torch.float64).to(dtype)
    y, rstd = l2norm_fwd(x, get_spec("l2norm_fwd").config({"BR": BR}))
    dx = l2norm_bwd(y, rstd, dy, get_spec("l2norm_bwd").config({"BR": BR}))
    assert y.dtype == dtype and dx.dtype == dtype and rstd.dtype == torch.float32
    assert rstd.shape == x.shape[:-1]

    x64 = x.double().requires_grad_(True)
    y64 = l2norm(x64)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    rstd64 = torch.rsqrt((x64.detach() ** 2).sum(-1) + 1e-6)
    errs = compare({"qn": y, "dq": dx}, {"qn": y64, "dq": dx64}, dtype_name(dtype))
    errs += compare({"qn": rstd}, {"qn": rstd64}, "float32")
    bad = [e for e in errs if not e.ok]
    assert not bad, bad
