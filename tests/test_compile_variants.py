"""Compiled variants across sequence lengths (GPU): a new T reuses the compiled chunk kernels.

The chunk kernels and the L2 norm take their lengths with ``do_not_specialize``, so after the
first call at one T, calls at T divisible by 16, not divisible, and T = 1 add no compiled variant.
Run on the device: ``python -m pytest -q -m gpu tests/test_compile_variants.py``.
"""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.kernels import intra_bwd, intra_fwd, l2norm, state_bwd, state_fwd
from gdn2_kernels.ops import chunk_gdn2

KERNELS = {
    "intra_fwd": intra_fwd._intra_fwd_kernel,
    "state_fwd": state_fwd._state_fwd_kernel,
    "state_bwd": state_bwd._state_bwd_kernel,
    "intra_bwd": intra_bwd._intra_bwd_kernel,
    "l2norm_fwd": l2norm._l2norm_fwd_kernel,
    "l2norm_bwd": l2norm._l2norm_bwd_kernel,
}


def _variants(kernel, device: torch.device) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no device_caches on its JITFunction")
    entry = caches.get(device.index) if hasattr(caches, "get") else None
    if entry is None:
        entry = caches[device.index]
    return len(entry[0])


def _call(T: int) -> None:
    x = make_inputs(1, T, 4, 64, 64, torch.bfloat16, "cuda", seed=T).to(
        torch.bfloat16, "cuda", requires_grad=True)
    o, _ = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, use_qk_l2norm_in_kernel=True)
    o.float().sum().backward()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_new_sequence_lengths_compile_nothing_new():
    device = torch.device("cuda", torch.cuda.current_device())
    _call(2048)
    first = {name: _variants(k, device) for name, k in KERNELS.items()}
    assert all(n >= 1 for n in first.values()), first
    for T in (4096, 4095, 333, 1, 17):
        _call(T)
    after = {name: _variants(k, device) for name, k in KERNELS.items()}
    assert after == first, f"new variants compiled for new T: {first} -> {after}"
