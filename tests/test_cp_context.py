"""Context parallelism's pure parts: who holds which tokens (contiguous, zigzag, FLA's context),
the cross-rank agreement checks, and the chain of summaries (gdn2_kernels/cp/)."""
from __future__ import annotations

import pytest
import torch
from cp_worker import fla_context, row_spans

from gdn2_kernels.cp import CPContext, CPPart, build_cp_context
from gdn2_kernels.cp import chain, checks


def test_contiguous_context_of_a_packed_batch():
    # 4 ranks x 16 tokens: [0,5) [5,40) [40,44) [44,64)
    ctxs = [build_cp_context([0, 5, 40, 44, 64], rank=r, world_size=4) for r in range(4)]
    assert [c.boundaries for c in ctxs] == [(0, 5, 16), (0, 16), (0, 8, 12, 16), (0, 16)]
    assert [c.parts for c in ctxs] == [
        (CPPart(0, 0, 1, 0, 2),), (CPPart(1, 0, 0, 1, 1),), (CPPart(2, 0, 2, 2, 1),),
        (CPPart(3, 0, 0, 1, 0),)]
    assert [p.is_middle for c in ctxs for p in c.parts] == [False, True, False, False]
    assert ctxs[2].row_spans() == [(32, 40), (40, 44), (44, 48)]
    assert ctxs[0].final_rows() == [0] and ctxs[1].final_rows() == []
    assert ctxs[2].final_rows() == [0, 1]
    x = torch.arange(64)[None]
    assert torch.equal(ctxs[2].local_slice(x), x[:, 32:48])
    assert torch.equal(ctxs[1].cu_seqlens("cpu"), torch.tensor([0, 16], dtype=torch.int32))


def test_zigzag_context_holds_slots_r_and_2W_minus_1_minus_r():
    ctxs = [build_cp_context([0, 10, 50, 64], layout="zigzag", rank=r, world_size=2)
            for r in range(2)]
    assert ctxs[0].global_ranges() == [(0, 16), (48, 64)]
    assert ctxs[1].global_ranges() == [(16, 32), (32, 48)]
    assert ctxs[0].boundaries == (0, 10, 16, 18, 32)
    assert ctxs[0].parts == (CPPart(0, 0, 1, 0, 3), CPPart(3, 2, 3, 3, 0))
    assert ctxs[1].parts == (CPPart(1, 0, 0, 1, 2), CPPart(2, 1, 1, 2, 1))
    assert ctxs[0].row_spans() == [(0, 10), (10, 16), (48, 50), (50, 64)]
    x = torch.arange(64)[None]
    assert torch.equal(ctxs[0].local_slice(x), torch.cat([x[:, :16], x[:, 48:]], 1))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("cu", [[0, 64], [0, 5, 40, 44, 64], [0, 8, 16, 17, 64], [0, 3, 3, 64]])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_fla_context_converts_to_the_same_context(layout, cu, world):
    """FLA's fields (written from their documented meaning in cp_worker.fla_context) give the
    context that build_cp_context builds from the global boundaries."""
    for r in range(world):
        ours = build_cp_context(cu, layout=layout, rank=r, world_size=world)
        fla = CPContext.from_fla(fla_context(None, cu, r, world, layout), r, world)
        assert fla == ours
        assert row_spans(ours) == ours.row_spans()


def test_local_initial_state_gives_starting_rows_their_state():
    h0 = torch.randn(4, 2, 3, 5)
    ctx = build_cp_context([0, 5, 40, 44, 64], rank=2, world_size=4)  # (32,40) (40,44) (44,48)
    rows = ctx.local_initial_state(h0, [0, 5, 40, 44, 64])
    assert torch.equal(rows[0], torch.zeros(2, 3, 5))
    assert torch.equal(rows[1], h0[2]) and torch.equal(rows[2], h0[3])


def test_build_errors():
    with pytest.raises(ValueError, match="multiple of the 8 slots"):
        build_cp_context([0, 60], layout="zigzag", rank=0, world_size=4)
    with pytest.raises(ValueError, match="non-decreasing"):
        build_cp_context([0, 40, 30, 64], rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        build_cp_context([0, 64], rank=2, world_size=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        build_cp_context([0, 64], layout="ring", rank=0, world_size=2)
    with pytest.raises(ValueError, match="not initialised"):
        build_cp_context([0, 64])


def test_fla_context_errors():
    ns = fla_context(None, [0, 64], 0, 2, "contiguous")
    ns.pre_num_ranks = None
    with pytest.raises(ValueError, match="cp_context.pre_num_ranks is None"):
        CPContext.from_fla(ns, 0, 2)
    ns = fla_context(None, [0, 64], 1, 2, "contiguous")
    ns.is_first_rank = True
    with pytest.raises(ValueError, match="is_first_rank = True contradicts"):
        CPContext.from_fla(ns, 1, 2)


def _metas(cus: list[list[int]], layout: str = "contiguous", T: int | None = None):
    world = len(cus)
    out = []
    for r, cu in enumerate(cus):
        ctx = build_cp_context(cu, layout=layout, rank=r, world_size=world)
        q = torch.zeros(1, T or ctx.local_len, 2, 16)
        out.append(checks.meta(q, torch.zeros(1, 1, 2, 24), ctx, False))
    return out


def test_cross_rank_checks():
    assert checks.cross_rank_problem(_metas([[0, 5, 40, 44, 64]] * 4), 4) is None
    assert checks.cross_rank_problem(_metas([[0, 10, 50, 64]] * 2, "zigzag"), 2) is None
    assert "different numbers of tokens" in checks.cross_rank_problem(
        _metas([[0, 64], [0, 32]]), 2)
    assert "built for 2 ranks but its group has 3" in checks.cross_rank_problem(
        _metas([[0, 64]] * 2), 3)
    assert "rebuild every rank's context" in checks.cross_rank_problem(
        _metas([[0, 64], [0, 64], [0, 30, 64], [0, 64]]), 4)
    assert "rebuild every rank's context" in checks.cross_rank_problem(
        _metas([[0, 32, 64], [0, 64]]), 2)
    swapped = _metas([[0, 64]] * 2)[::-1]                   # ranks listed in the wrong order
    assert "holds slot(s) [1]" in checks.cross_rank_problem(swapped, 2)
    wider = _metas([[0, 64]] * 2)
    wider[1][3] = 32
    assert "disagree on V" in checks.cross_rank_problem(wider, 2)


def _affine(S_or_D, M, H_or_G, forward: bool):
    return (M.transpose(-1, -2) if forward else M) @ S_or_D + H_or_G


def test_chain_matches_the_affine_recursion():
    H, K, V, world = 2, 5, 7, 4
    cu = [0, 5, 40, 44, 64]
    slots = torch.randn(world, H, K, V + K)
    ctxs = [build_cp_context(cu, rank=r, world_size=world) for r in range(world)]
    gathered = slots[:, None]
    # slot 2 enters with the sequence [5, 40): from slot 0 through middle slot 1
    S = chain.entering_states(chain.slot_order(gathered, ctxs[2]), ctxs[2], V)[0]
    want = _affine(slots[0, ..., :V], slots[1, ..., V:], slots[1, ..., :V], True)
    torch.testing.assert_close(S, want)
    assert chain.entering_states(slots, ctxs[0], V) == [None]
    # slot 0 leaves [5, 40) with the gradient from slot 2 through middle slot 1
    D = chain.leaving_gradients(chain.slot_order(gathered, ctxs[0]), ctxs[0], V)[0]
    torch.testing.assert_close(D, _affine(slots[2, ..., :V], slots[1, ..., V:],
                                          slots[1, ..., :V], False))


def test_slot_order_of_zigzag():
    ctx = build_cp_context([0, 64], layout="zigzag", rank=0, world_size=2)
    gathered = torch.arange(4.0).view(2, 2, 1)              # [rank, part]: slots 0,3 | 1,2
    assert chain.slot_order(gathered, ctx).flatten().tolist() == [0.0, 2.0, 3.0, 1.0]


def test_ieee_guard_restores_the_precision_setting():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with chain.ieee_fp32_matmuls():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_op_errors_that_need_no_collective():
    from gdn2_kernels.inputs import make_inputs
    from gdn2_kernels.cp import chunk_gdn2_cp

    x = make_inputs(1, 32, 1, 16, 16)
    args = (x.q, x.k, x.v, x.g, x.b, x.w)
    with pytest.raises(TypeError, match="cp_context must be a gdn2_kernels.cp.CPContext"):
        chunk_gdn2_cp(*args, cp_context={"group": None})
    ctx = build_cp_context([0, 64], rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        chunk_gdn2_cp(*args, cp_context=ctx)


def test_fla_context_without_group_is_the_local_op():
    """FLA's "CP disabled" (group None): chunk_gdn2 on the slice with the context's boundaries."""
    from gdn2_kernels import chunk_gdn2
    from gdn2_kernels.inputs import make_inputs
    from gdn2_kernels.cp import chunk_gdn2_cp

    ns = fla_context(None, [0, 10, 64], 0, 2, "contiguous")     # local boundaries [0, 10, 32]
    x = make_inputs(1, 32, 1, 16, 16, cu_seqlens=[0, 10, 32], with_h0=True)
    args = (x.q, x.k, x.v, x.g, x.b, x.w)
    o, ht = chunk_gdn2_cp(*args, initial_state=x.h0, output_final_state=True, cp_context=ns)
    o_ref, ht_ref = chunk_gdn2(*args, initial_state=x.h0, output_final_state=True,
                               cu_seqlens=x.cu_seqlens)
    assert torch.equal(o, o_ref) and torch.equal(ht, ht_ref)
