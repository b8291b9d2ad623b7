"""The FLOP/byte model and the metrics, against hand counts (docs/bench_model.md)."""
from __future__ import annotations

import math

import pytest

from gdn2_kernels.bench import model
from gdn2_kernels.bench.model import Ceilings, Shape, Work


def test_delta_stage_flops_hand_count():
    C, K, V = 64, 128, 128
    assert model.intra_fwd_flops(C, K, V) == 3 * 64 * 64 * 128 + 64 * 64 * 128 + 64 ** 3 / 3
    assert model.state_fwd_flops(C, K, V) == 6 * 64 * 128 * 128 + 64 * 64 * 128
    assert model.intra_bwd_flops(C, K, V) == 6 * 64 * 64 * 128 + 2 * 64 * 64 * 128 + 2 * 64 ** 3 / 3
    assert model.state_bwd_flops(C, K, V) == 12 * 64 * 128 * 128 + 2 * 64 * 64 * 128


def test_gdn2_fwd_work_at_16k_tokens():
    s = Shape(1, 16384, 16, 128)
    w = model.work("gdn2", "fwd", s)
    per_token_head = (model.intra_fwd_flops(64, 128, 128) + model.state_fwd_flops(64, 128, 128)) / 64
    assert w.flops == pytest.approx(16384 * 16 * per_token_head)
    # q, k, v, b, w in bf16 (5 x 128 x 2 B), g fp32 (128 x 4 B), o bf16 (128 x 2 B)
    assert w.bytes == 16384 * 16 * (5 * 256 + 512 + 256)


def test_backward_is_about_twice_the_forward():
    s = Shape(2, 8192)
    fwd, both = model.work("gdn2", "fwd", s), model.work("gdn2", "fwdbwd", s)
    assert 2.8 < both.flops / fwd.flops < 3.2
    assert both.bytes > 2 * fwd.bytes


def test_gate_shapes_change_bytes_not_flops():
    s = Shape(4, 4096)
    g2, kda, gdn = (model.work(f, "fwd", s) for f in ("gdn2", "kda", "gdn"))
    assert g2.flops == kda.flops == gdn.flops
    assert g2.bytes > kda.bytes > gdn.bytes


def test_token_budget_keeps_delta_work_constant_and_attention_grows():
    shapes = [Shape(8, 2048), Shape(1, 16384)]
    d = [model.work("gdn2", "fwdbwd", s).flops for s in shapes]
    a = [model.work("attention", "fwdbwd", s).flops for s in shapes]
    assert d[0] == pytest.approx(d[1])
    assert a[1] / a[0] == pytest.approx(8.0)


def test_attention_counts():
    s = Shape(1, 1024, 2, 64)
    assert model.work("attention", "fwd", s).flops == 2 * 2 * 1024 * 1024 * 64
    assert model.work("attention", "fwdbwd", s).flops == 3.5 * 2 * 2 * 1024 * 1024 * 64
    dec = model.work("attention", "decode", Shape(8, 1, 2, 64, context=4096))
    assert dec.flops == 4 * 8 * 2 * 4096 * 64
    assert dec.bytes >= 2 * 8 * 2 * 4096 * 64 * 2          # the KV cache is read once


def test_mamba_state_matches_gdn2():
    s = Shape(1, 4096)
    m = model.mamba_dims(s)
    assert (m.heads, m.headdim, m.dstate) == (64, 64, 64)
    assert m.heads * m.headdim * m.dstate == s.H * s.D * s.D
    w = model.work("mamba2", "fwd", s)
    assert w.flops == 4096 * (256 * 64 + 64 * (256 * 64 + 4 * 64 * 64))


def test_decode_is_memory_bound_on_the_state():
    s = Shape(32, 1, context=4096)
    w = model.work("gdn2", "decode", s)
    assert w.bytes > 2 * 32 * 16 * 128 * 128 * 4
    assert model.bound(w, Ceilings(800.0, 3000.0)) == "memory"


def test_metrics():
    s = Shape(2, 1000)
    w = Work(flops=2e12, bytes=3e9)
    assert model.tokens_per_s(2.0, s) == pytest.approx(1e6)
    assert model.tflops(w, 2.0) == pytest.approx(1000.0)
    assert model.gbps(w, 2.0) == pytest.approx(1500.0)
    c = Ceilings(matmul_tflops=1000.0, copy_gbps=1000.0)
    assert model.roofline_ms(w, c) == pytest.approx(3.0)           # memory: 3 GB at 1 TB/s
    assert model.bound(w, c) == "memory"
    assert model.pct_roofline(w, 6.0, c) == pytest.approx(50.0)
    assert model.speedup(1.0, 2.5) == pytest.approx(2.5)
    assert model.matmul_tflops(1000, 2.0) == pytest.approx(1.0)
    assert model.copy_gbps(10 ** 9, 1.0) == pytest.approx(2000.0)


def test_stage_flops_known_and_unknown():
    f = model.stage_flops("state_fwd", 1, 128, 2, 64, 64, 64)
    assert f == pytest.approx(model.state_fwd_flops(64, 64, 64) * 2 * 2)
    assert model.stage_flops("l2norm_fwd", 1, 128, 2, 64, 64, 64) is None


def test_bad_mode_and_family():
    with pytest.raises(ValueError, match="mode"):
        model.work("gdn2", "train", Shape(1, 64))
    with pytest.raises(ValueError, match="family"):
        model.work("rwkv", "fwd", Shape(1, 64))
    assert math.isfinite(model.work("kda", "decode", Shape(1, 1)).bytes)
