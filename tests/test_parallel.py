"""The launch-time value-tile rule of the serial passes (``gdn2_kernels._parallel``).

Three properties: the rule only narrows BV when the programs would cover less than half the SMs,
a narrowed launch runs at most NARROW_MAX_WARPS warps (never more than tuned), and a narrower BV
gives bitwise the same results (value tiles are independent recurrences), run
on the real kernels through the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels import _device, _parallel, fused_recurrent_gdn2
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import get_spec
from gdn2_kernels.kernels.recurrent_fwd import recurrent_fwd


@pytest.mark.parametrize("BV, rows, V, sms, expected", [
    (64, 128, 128, 132, 64),    # 8 x 2048, H = 16: 256 programs, left alone
    (64, 64, 128, 132, 64),     # 4 x 4096: 128 programs >= 66
    (64, 32, 128, 132, 32),     # 2 x 8192: 64 programs -> 128
    (64, 16, 128, 132, 16),     # 1 x 16384: 32 -> 64 -> 128 programs
    (128, 1, 128, 132, 16),     # never below MIN_BV
    (8, 1, 128, 132, 8),        # a tuned tile below MIN_BV is kept
    (32, 16, 48, 132, 16),      # V not a multiple of the tile
])
def test_narrowed_value_tile(BV, rows, V, sms, expected):
    assert _parallel.narrowed_value_tile(BV, rows, V, sms) == expected


def test_value_tile_leaves_cpu_launches_alone():
    assert _parallel.value_tile(64, 1, 128, torch.device("cpu")) == 64
    assert _device.sm_count(torch.device("cpu")) is None


@pytest.mark.parametrize("rows, warps, expected", [
    (128, 8, (64, 8)),   # enough programs: the tuned tile and warps
    (32, 8, (32, 4)),    # narrowed: at most NARROW_MAX_WARPS warps
    (16, 8, (16, 4)),
    (16, 2, (16, 2)),    # fewer tuned warps are kept
])
def test_serial_launch_caps_warps_only_when_narrowed(monkeypatch, rows, warps, expected):
    monkeypatch.setattr(_device, "sm_count", lambda device: 132)
    config = get_spec("state_fwd").config({"BV": 64, "num_warps": warps, "num_stages": 4})
    BV, options = _parallel.serial_launch(config, rows, 128, torch.device("cpu"))
    assert (BV, options["num_warps"]) == expected
    assert options["num_stages"] == 4


def test_narrower_value_tile_is_bitwise_identical():
    """Value tiles are independent: BV = 16 and BV = 64 give the same bits (interpreter)."""
    x = make_inputs(2, 5, 2, 32, 64, torch.float32, with_h0=True)
    spec = get_spec("recurrent_fwd")
    args = (x.q, x.k, x.v, x.g, x.b, x.w, 32 ** -0.5, x.h0, True, False, None)
    o16, ht16 = recurrent_fwd(*args, spec.config({"BV": 16}))
    o64, ht64 = recurrent_fwd(*args, spec.config({"BV": 64}))
    assert torch.equal(o16, o64) and torch.equal(ht16, ht64)
    o, ht = fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                 output_final_state=True)
    assert torch.equal(o, o64) and torch.equal(ht, ht64)
