"""The two-level scan's bookkeeping (gdn2_kernels/_segments.py): segment boundaries and chaining."""
from __future__ import annotations

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
