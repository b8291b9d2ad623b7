"""Chaining the slots' summaries: each rank's true entering states and leaving gradients.

Every slot s exchanges one summary, packed ``[H, K, V + K]`` fp32 (``[..., :V]`` and
``[..., V:]``):

- forward: ``H_s | M_s`` of the slot's last local sequence when it goes on into later slots
  (H from its true entering state when it starts in s, else from zero; M only for a middle slot,
  zeros otherwise: a chain never multiplies by the M of the slot where its sequence starts);
- backward: ``G_s | M_s`` of the slot's first local sequence when it continues earlier slots
  (G with the gradient of that sequence's own final-state row, if any; M as in the forward).

A part whose first local sequence started ``pre`` slots earlier enters with

    S = H_(s-pre);  S = M_j^T S + H_j  for j = s-pre+1 .. s-1

and a part whose last local sequence goes on for ``post`` slots leaves with the gradient

    D = G_(s+post);  D = M_j D + G_j  for j = s+post-1 .. s+1

(kernels/summary.py for S_end = M^T S_start + H and dS_start = M dS_end + G). The maps stay fp32
and the products run in IEEE fp32 whatever the process's TF32 setting (``ieee_fp32_matmuls``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from gdn2_kernels.cp.context import CPContext, slots_of_rank


@contextlib.contextmanager
def ieee_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls at full IEEE precision inside the block (no TF32), restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def slot_order(gathered: torch.Tensor, ctx: CPContext) -> torch.Tensor:
    """``[num_slots, ...]``: the all-gathered ``[world_size, parts, ...]`` summaries in slot
    order."""
    out = gathered.new_empty(ctx.num_slots, *gathered.shape[2:])
    for r in range(ctx.world_size):
        for i, slot in enumerate(slots_of_rank(r, ctx.world_size, ctx.layout)):
            out[slot] = gathered[r, i]
    return out


def entering_states(slots: torch.Tensor, ctx: CPContext, V: int) -> list[torch.Tensor | None]:
    """Per part of this rank, the ``[H, K, V]`` state entering its first local sequence when that
    continues an earlier slot (else None), from the forward summaries in slot order."""
    out: list[torch.Tensor | None] = []
    with ieee_fp32_matmuls():
        for part in ctx.parts:
            if part.pre == 0:
                out.append(None)
                continue
            S = slots[part.slot - part.pre, ..., :V]
            for j in range(part.slot - part.pre + 1, part.slot):
                S = torch.baddbmm(slots[j, ..., :V], slots[j, ..., V:].transpose(-1, -2), S)
            out.append(S)
    return out


def leaving_gradients(slots: torch.Tensor, ctx: CPContext, V: int) -> list[torch.Tensor | None]:
    """Per part of this rank, the ``[H, K, V]`` gradient that later slots send back to the state
    leaving its last local sequence when that goes on (else None), from the backward summaries in
    slot order."""
    out: list[torch.Tensor | None] = []
    with ieee_fp32_matmuls():
        for part in ctx.parts:
            if part.post == 0:
                out.append(None)
                continue
            D = slots[part.slot + part.post, ..., :V]
            for j in range(part.slot + part.post - 1, part.slot, -1):
                D = torch.baddbmm(slots[j, ..., :V], slots[j, ..., V:], D)
            out.append(D)
    return out
