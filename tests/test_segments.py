"""The two-level scan's bookkeeping (gdn2_kernels/_segments.py): segment boundaries and chaining."""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels import _segments


def test_segments_of_equal_sequences():
    # NT = 7 chunks of 16 per sequence, 3 chunks per segment: 3 + 3 + 1 (the last one partial).
    cu, firsts, S = _segments.segments(2, 100, 16, 3, torch.device("cpu"))
    assert S == 3
    assert cu.tolist() == [0, 48, 96, 100, 148, 196, 200]
    assert firsts.tolist() == [0, 3, 6, 7, 10, 13, 14]
    assert cu.dtype == firsts.dtype == torch.int32


def test_chain_forward_and_reverse_match_the_affine_recurrence():
    B, S, H, K, V = 2, 4, 3, 5, 6
    P = torch.randn(B * S, H, K, K, dtype=torch.float64).float()
    Q = torch.randn(B * S, H, K, V)
    first = torch.randn(B, H, K, V)
    Pv, Qv = P.view(B, S, H, K, K), Q.view(B, S, H, K, V)
    for reverse in (False, True):
        got = _segments.chain(P, Q, first, reverse).view(B, S, H, K, V)
        order = list(range(S))[::-1] if reverse else list(range(S))
        x = first.clone()
        for s in order:
            torch.testing.assert_close(got[:, s], x, rtol=1e-5, atol=1e-5)
            x = Pv[:, s] @ x + Qv[:, s]


def test_identity_states():
    eye = _segments.identity_states(3, 2, 4, torch.device("cpu"))
    assert eye.shape == (3, 2, 4, 4) and eye.is_contiguous()
    assert torch.equal(eye[2, 1], torch.eye(4))


def test_segment_rule(monkeypatch):
    from gdn2_kernels import _device
    from gdn2_kernels._parallel import MIN_SEGMENT, segment_chunks

    cpu = torch.device("cpu")
    assert segment_chunks(32, 512, cpu) is None                       # no SM count: serial
    monkeypatch.setattr(_device, "sm_count", lambda device: 132)
    assert segment_chunks(200, 512, cpu) is None                      # fills the GPU already
    L = segment_chunks(32, 512, cpu)                                  # 32 programs
    assert MIN_SEGMENT <= L and 512 >= 2 * L and 32 * -(-512 // L) >= 2 * 132 * 0.9
    assert segment_chunks(32, 20, cpu) is None                        # too short to split


def test_scan_segments_counts_the_narrowed_programs(monkeypatch):
    """The two-level scan acts only when the serial pass would leave half the SMs idle even with
    its value tile narrowed: one 16K sequence with 16 heads gets 128 programs at BV=16 (serial),
    4 heads only 32 (segmented)."""
    from gdn2_kernels import _device
    from gdn2_kernels._parallel import scan_segments
    from gdn2_kernels.configs import get_spec

    cpu = torch.device("cpu")
    config = get_spec("state_fwd").config({"BT": 32, "BV": 64, "SCAN": "segmented"})
    monkeypatch.setattr(_device, "sm_count", lambda device: 132)
    assert scan_segments(config, 1, 16, 16384, 128, None, cpu) is None
    assert scan_segments(config, 1, 4, 16384, 128, None, cpu) is not None
    assert scan_segments(config.replace(SCAN="serial"), 1, 4, 16384, 128, None, cpu) is None


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 3000])
def test_segmented_scans_match_the_serial_ones_on_gpu(T, monkeypatch):
    """On the GPU with its real SM count: chunk_gdn2 with SCAN="segmented" in both state passes
    against SCAN="serial" (same inputs, fwd + bwd), within rounding."""
    from gdn2_kernels import _parallel, chunk_gdn2, dispatch
    from gdn2_kernels.accuracy import rel_rms
    from gdn2_kernels.inputs import make_inputs
    from gdn2_kernels.configs import ProblemKey

    x = make_inputs(1, T, 4, 128, 128, torch.bfloat16, "cuda", with_h0=True)
    base = dispatch.resolve(ProblemKey(128, 128, "bfloat16")).as_dict()
    seen = []
    real_rule = _parallel.segment_chunks

    def rule(programs, num_chunks, device):
        seen.append(real_rule(programs, num_chunks, device))
        return seen[-1]

    monkeypatch.setattr(_parallel, "segment_chunks", rule)
    outs = []
    for scan in ("serial", "segmented"):
        pipe = dict(base)
        for name in ("state_fwd", "state_bwd"):
            pipe[name] = pipe[name].replace(SCAN=scan)
        leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w)]
        with dispatch.override(pipe):
            o, ht = chunk_gdn2(*leaves, initial_state=x.h0, output_final_state=True)
            (o.float().square().sum() + ht.sum()).backward()
        outs.append([o, ht] + [t.grad for t in leaves])
    assert any(L is not None for L in seen), "4 heads should leave the GPU under-filled"
    for a, b in zip(*outs):
        assert rel_rms(b, a) < 5e-3
