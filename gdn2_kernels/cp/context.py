"""Who holds which tokens: the context of one context-parallel call (docs/context_parallel.md).

The packed token axis of the global batch (``cu_seqlens`` over ``T_total`` tokens) is cut into
``num_slots`` equal intervals, the *slots*, numbered in token order. ``layout="contiguous"``:
rank r holds slot r (``num_slots = world_size``). ``layout="zigzag"``: rank r holds slots r and
``2 * world_size - 1 - r`` (``num_slots = 2 * world_size``, so causal work is balanced), laid out
``[front; back]`` in its local buffer. These are the layouts of FLA's ``FLACPContext``.

Within its slots a rank sees *local sequences* (``boundaries``, the local ``cu_seqlens``): the
global sequences cut at the slot edges. A slot's first local sequence may continue one that
started ``pre`` slots earlier, and its last may go on for ``post`` more slots; a slot whose
single local sequence does both is a *middle* slot of that sequence.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class CPPart:
    """One slot held by this rank.

    Attributes:
        slot: its position among all slots, in token order (0 .. num_slots - 1).
        first: index of its first local sequence (into the rank's local boundaries).
        last: index of its last local sequence.
        pre: earlier slots that its first local sequence spans (0: the sequence starts here).
        post: later slots that its last local sequence spans (0: the sequence ends here).
    """

    slot: int
    first: int
    last: int
    pre: int
    post: int

    @property
    def is_middle(self) -> bool:
        """One local sequence that both continues an earlier slot and goes on into a later one
        (only then does the chain need this slot's transition)."""
        return self.pre > 0 and self.post > 0 and self.first == self.last


@dataclass(frozen=True)
class CPContext:
    """One rank's share of a context-parallel batch (see the module docstring).

    Build it with :func:`build_cp_context` from the global ``cu_seqlens`` (every rank passes the
    same), or from FLA's ``FLACPContext`` with :meth:`from_fla`; ``chunk_gdn2_cp`` also accepts
    an ``FLACPContext`` as is.

    Attributes:
        group: the process group of the ranks that share the sequences (None: the default group).
        rank: this rank's index in ``group``.
        world_size: the number of ranks in ``group``.
        layout: "contiguous" or "zigzag".
        part_len: tokens per slot; the local length is ``part_len * len(parts)``.
        boundaries: the local ``cu_seqlens`` (host ints, from 0 to the local length).
        parts: the rank's slots in local-buffer order (one, or two with zigzag).
    """

    group: Any
    rank: int
    world_size: int
    layout: str
    part_len: int
    boundaries: tuple[int, ...]
    parts: tuple[CPPart, ...]

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if len(self.parts) != (1 if self.layout == "contiguous" else 2):
            want = 1 if self.layout == "contiguous" else 2
            raise ValueError(f"a {self.layout} context holds {want} part(s) per rank, got "
                             f"{len(self.parts)}")

    @property
    def num_slots(self) -> int:
        return self.world_size * len(self.parts)

    @property
    def num_seqs(self) -> int:
        """Local sequences (the rows of ``initial_state`` and of the final state)."""
        return len(self.boundaries) - 1

    @property
    def local_len(self) -> int:
        return self.boundaries[-1]

    def cu_seqlens(self, device: torch.device | str) -> torch.Tensor:
        """The local boundaries as an int32 tensor on ``device`` (cached)."""
        return _as_tensor(self.boundaries, torch.device(device))

    def global_ranges(self) -> list[tuple[int, int]]:
        """``(start, end)`` on the global token axis of each part, in local-buffer order."""
        return [(p.slot * self.part_len, (p.slot + 1) * self.part_len) for p in self.parts]

    def local_slice(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a global tensor (``dim`` is the token axis of ``T_total``)."""
        return torch.cat([x.narrow(dim, a, b - a) for a, b in self.global_ranges()], dim)

    def row_spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` on the global token axis of each local sequence."""
        spans = []
        for part, (a, _) in zip(self.parts, self.global_ranges()):
            base = self.boundaries[part.first]
            spans += [(a + self.boundaries[i] - base, a + self.boundaries[i + 1] - base)
                      for i in range(part.first, part.last + 1)]
        return spans

    def local_initial_state(self, initial_state: torch.Tensor,
                            cu_seqlens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """``chunk_gdn2_cp``'s ``initial_state`` from the global one ``[N, H, K, V]`` (one state
        per sequence of the global ``cu_seqlens``): each local sequence that starts a sequence
        gets its state, one that continues a sequence gets zeros. Differentiable."""
        bounds = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor)
                                   else cu_seqlens)]
        rows = []
        for s, _ in self.row_spans():
            n = bisect.bisect_right(bounds, s) - 1
            rows.append(initial_state[n] if bounds[n] == s else
                        torch.zeros_like(initial_state[0]))
        return torch.stack(rows)

    def final_rows(self) -> list[int]:
        """Local sequences that end on this rank: the rows of the final state that are a global
        sequence's final state (the others are the state handed to the next slot)."""
        going_on = {p.last for p in self.parts if p.post > 0}
        return [i for i in range(self.num_seqs) if i not in going_on]

    @classmethod
    def from_fla(cls, ctx: Any, rank: int, world_size: int) -> "CPContext":
        """Our context from FLA's ``FLACPContext`` (duck-typed: fla need not be installed), for
        ``rank`` of ``world_size`` in ``ctx.group``. Raises ValueError naming a missing or
        inconsistent field."""
        layout = getattr(ctx, "layout", "contiguous") or "contiguous"
        cu = getattr(ctx, "cu_seqlens_cpu", None)
        if cu is None:
            cu = getattr(ctx, "cu_seqlens", None)
        if cu is None:
            raise ValueError("cp_context.cu_seqlens is None: build the FLA context with "
                             "fla.ops.cp.build_cp_context(cu_seqlens, group)")
        bounds = tuple(int(c) for c in (cu.tolist() if isinstance(cu, torch.Tensor) else cu))
        n = len(bounds) - 1

        def need(name: str):
            value = getattr(ctx, name, None)
            if value is None:
                raise ValueError(f"cp_context.{name} is None; build the FLA context with "
                                 "fla.ops.cp.build_cp_context, which fills it")
            return value

        if layout == "contiguous":
            pre, post = int(need("pre_num_ranks")), int(need("post_num_ranks"))
            _check_flag(ctx, "is_first_rank", pre == 0)
            _check_flag(ctx, "is_last_rank", post == 0)
            parts = (CPPart(rank, 0, n - 1, pre, post),)
            part_len = bounds[-1]
        elif layout == "zigzag":
            front = int(need("front_num_seqs"))
            pre, post = need("pre_num_ranks_by_part"), need("post_num_ranks_by_part")
            parts = (CPPart(rank, 0, front - 1, int(pre[0]), int(post[0])),
                     CPPart(2 * world_size - 1 - rank, front, n - 1, int(pre[1]), int(post[1])))
            part_len = int(need("part_len"))
        else:
            raise ValueError(f"cp_context.layout must be one of {LAYOUTS}, got {layout!r}")
        return cls(ctx.group, rank, world_size, layout, part_len, bounds, parts)


def _check_flag(ctx: Any, name: str, expected: bool) -> None:
    value = getattr(ctx, name, None)
    if value is not None and bool(value) != expected:
        raise ValueError(f"cp_context.{name} = {value} contradicts its rank counts; rebuild the "
                         "context with fla.ops.cp.build_cp_context")


@functools.lru_cache(maxsize=64)
def _as_tensor(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def slots_of_rank(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The slots rank ``rank`` holds, in local-buffer order."""
    if layout == "contiguous":
        return (rank,)
    if layout == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _part(bounds: Sequence[int], slot: int, part_len: int, first: int
          ) -> tuple[list[int], CPPart]:
    """Local boundaries (relative to the slot's start) and the CPPart of one slot."""
    a, e = slot * part_len, (slot + 1) * part_len
    inside = sorted({a, e, *(c for c in bounds if a < c < e)})
    start = bounds[bisect.bisect_right(bounds, a) - 1]   # start of the sequence holding token a
    end = bounds[bisect.bisect_left(bounds, e)]          # end of the sequence holding token e-1
    pre = slot - start // part_len
    post = (end - 1) // part_len - slot
    local = [c - a for c in inside]
    return local, CPPart(slot, first, first + len(local) - 2, pre, post)


def build_cp_context(
    cu_seqlens: torch.Tensor | Sequence[int],
    group: Any = None,
    layout: str = "contiguous",
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> CPContext:
    """This rank's :class:`CPContext` for a packed global batch.

    Args:
        cu_seqlens: the global sequence boundaries ``[N + 1]`` (0 ... T_total; every rank passes
            the same); for one long sequence, ``[0, T_total]``.
        group: the process group that shares the sequences; None for the default group.
        layout: "contiguous" (rank r holds slot r) or "zigzag" (slots r and 2W-1-r).
        rank, world_size: this rank and the group size; default from ``group`` (needs
            ``torch.distributed`` initialised). Given explicitly, no process group is consulted.

    Returns:
        The context; ``ctx.local_slice(x)`` cuts a global ``[1, T_total, ...]`` tensor to this
        rank's tokens.

    Raises:
        ValueError: bad boundaries, or T_total not divisible by the number of slots.
    """
    if rank is None or world_size is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("build_cp_context: torch.distributed is not initialised; call "
                             "dist.init_process_group first, or pass rank= and world_size=")
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"build_cp_context: rank {rank} is not in a group of {world_size} ranks "
                         "(is this process a member of the group?)")
    bounds = [int(c) for c in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor)
                               else cu_seqlens)]
    if len(bounds) < 2 or bounds[0] != 0 or any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
        shown = f"{bounds[:8]}{'...' if len(bounds) > 8 else ''}"
        raise ValueError("build_cp_context: cu_seqlens must be the non-decreasing global "
                         f"boundaries [0, ..., T_total], got {shown}")
    slots = slots_of_rank(rank, world_size, layout)
    num_slots = world_size * len(slots)
    total = bounds[-1]
    if total < num_slots or total % num_slots:
        raise ValueError(f"build_cp_context: T_total = {total} tokens must be a positive multiple "
                         f"of the {num_slots} slots ({layout} layout over {world_size} ranks); "
                         "pad the packed batch")
    part_len = total // num_slots
    local: list[int] = [0]
    parts = []
    for i, slot in enumerate(slots):
        piece, part = _part(bounds, slot, part_len, len(local) - 1)
        local += [c + i * part_len for c in piece[1:]]
        parts.append(part)
    return CPContext(group, rank, world_size, layout, part_len, tuple(local), tuple(parts))
