"""Input checks of a context-parallel call: each rank's own, then that the ranks fit together.

A rank's own checks never raise before the ranks have talked: their message travels in the
agreement all-gather (comm.agree) and every rank then raises, so a bad input on one rank cannot
leave the others waiting in a collective. What the ranks must agree on is encoded as a fixed list
of integers per rank (:func:`meta`) and checked by :func:`cross_rank_problem`, a pure function.
"""
from __future__ import annotations

import torch

from gdn2_kernels.cp.context import LAYOUTS, CPContext, slots_of_rank
from gdn2_kernels.checks import check_rank_inputs

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_PARTS = 2
META_LEN = 10 + 4 * _MAX_PARTS


def local_problem(q, k, v, g, b, w, scale, initial_state, cu_seqlens, validate_values: bool,
                  ctx: CPContext) -> str | None:
    """This rank's input problem as a message (None: fine): chunk_gdn2's checks on the slice,
    plus what the context requires of it."""
    try:
        check_rank_inputs(q, k, v, g, b, w, scale, None, None, validate_values)
    except (TypeError, ValueError) as exc:
        return str(exc)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if B != 1:
        return (f"q has batch size {B}; context parallelism packs sequences along T: pass "
                "[1, T_local, H, K] slices with the sequence boundaries in the context")
    if T != ctx.local_len:
        return (f"q holds T = {T} tokens but cp_context gives this rank {ctx.local_len} "
                f"({len(ctx.parts)} slot(s) of {ctx.part_len}); pass ctx.local_slice(x) of the "
                "global tensors")
    if cu_seqlens is not None:
        given = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        if [int(c) for c in given] != list(ctx.boundaries):
            return ("cu_seqlens disagrees with cp_context's local boundaries "
                    f"{list(ctx.boundaries)[:8]}; pass cu_seqlens=None (the context holds them)")
    if initial_state is not None:
        return _initial_state_problem(initial_state, ctx, (ctx.num_seqs, H, K, V), q.device,
                                      validate_values)
    return None


def _initial_state_problem(h0, ctx: CPContext, shape, device, validate_values: bool) -> str | None:
    if not isinstance(h0, torch.Tensor):
        return f"initial_state must be a torch.Tensor, got {type(h0).__name__}"
    if tuple(h0.shape) != shape:
        return (f"initial_state must be [N_local, H, K, V] = {shape} (one state per local sequence"
                f" of cp_context), got {tuple(h0.shape)}")
    if h0.dtype != torch.float32:
        return f"initial_state must be float32 (the state is kept in fp32), got {h0.dtype}"
    if h0.device != device:
        return f"initial_state is on {h0.device} but q is on {device}"
    if validate_values:
        carried = [p.first for p in ctx.parts if p.pre > 0]
        if carried and bool(h0[carried].ne(0).any()):
            return (f"initial_state rows {carried} are not zero, but those local sequences "
                    "continue a sequence from an earlier rank, which hands over their entering "
                    "state; give a sequence's initial state on the rank where it starts and "
                    "zeros here")
    return None


def meta(q, v, ctx: CPContext | None, failed: bool) -> list[int]:
    """The integers the ranks must agree on (zeros after a local failure)."""
    if failed or ctx is None:
        return [0] * META_LEN
    B, T, H, K = q.shape
    parts = []
    for p in ctx.parts:
        parts += [p.slot, p.pre, p.post, p.last - p.first + 1]
    parts += [-1] * (4 * _MAX_PARTS - len(parts))
    return [T, H, K, v.shape[-1], _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
            LAYOUTS.index(ctx.layout), ctx.num_slots, ctx.part_len, ctx.world_size,
            len(ctx.parts), *parts]


def _differs(metas: list[list[int]], index: int) -> bool:
    return len({m[index] for m in metas}) > 1


def cross_rank_problem(metas: list[list[int]], world_size: int) -> str | None:
    """What makes the ranks' inputs not fit together (None: they do), from every rank's
    :func:`meta`, identical on every rank."""
    by_rank = ", ".join(f"rank {r}: {m[0]}" for r, m in enumerate(metas))
    if _differs(metas, 0):
        return (f"the ranks hold different numbers of tokens ({by_rank}); every rank must hold "
                "T_total / world_size tokens (cut the global batch with build_cp_context)")
    for index, what in ((1, "H"), (2, "K"), (3, "V"), (4, "dtype")):
        if _differs(metas, index):
            return (f"the ranks disagree on {what}; every rank must call with the same shapes "
                    "and dtype")
    if _differs(metas, 5) or _differs(metas, 6) or _differs(metas, 7):
        return ("the ranks' contexts disagree on the layout or the slot size; build every rank's "
                "context from the same cu_seqlens and layout")
    built_for = metas[0][8]
    if built_for != world_size:
        return (f"cp_context was built for {built_for} ranks but its group has {world_size}; build "
                "the context with the process group it runs with")
    layout = LAYOUTS[metas[0][5]]
    table: dict[int, tuple[int, int, int]] = {}
    for r, m in enumerate(metas):
        got = tuple(m[10 + 4 * i] for i in range(m[9]))
        if got != slots_of_rank(r, world_size, layout):
            return (f"rank {r} holds slot(s) {list(got)} but the {layout} layout gives it "
                    f"{list(slots_of_rank(r, world_size, layout))}; the group's rank order does "
                    "not match the contexts")
        for i in range(m[9]):
            table[m[10 + 4 * i]] = tuple(m[11 + 4 * i: 14 + 4 * i])
    return _chain_problem([table[s] for s in range(len(table))])


_REBUILD = "; rebuild every rank's context from the same global cu_seqlens"


def _chain_problem(slots: list[tuple[int, int, int]]) -> str | None:
    """Whether the slots' (pre, post, local sequences) describe one consistent packed batch."""
    if slots[0][0] != 0 or slots[-1][1] != 0:
        return ("the contexts say a sequence continues before the first slot or after the last"
                + _REBUILD)
    for s in range(len(slots) - 1):
        (pre, post, n), (pre_next, post_next, n_next) = slots[s], slots[s + 1]
        if (post > 0) != (pre_next > 0):
            return (f"slot {s} says its last sequence {'goes on' if post else 'ends there'} but "
                    f"slot {s + 1} says its first one "
                    f"{'continues' if pre_next else 'starts there'}" + _REBUILD)
        if post and pre_next != (pre + 1 if pre and n == 1 else 1):
            return (f"slots {s} and {s + 1} disagree on where their shared sequence starts"
                    + _REBUILD)
        if post and post != (post_next + 1 if post_next and n_next == 1 else 1):
            return (f"slots {s} and {s + 1} disagree on where their shared sequence ends"
                    + _REBUILD)
    return None
