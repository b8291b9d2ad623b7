"""The collectives of a context-parallel call, through ``torch.distributed`` only.

One all-gather per direction carries every rank's summaries (:func:`all_gather`), and, unless the
caller opts out, one small all-gather before any work lets the ranks agree that their inputs fit
together (:func:`agree`), so that bad input raises the same error on every rank instead of
leaving some ranks waiting in a collective.

Why an all-gather and not a ring: a rank's entering state depends on every earlier slot of its
sequence, so a ring (send the state to the next rank once it is known) is W - 1 dependent
hops, each a message latency plus a K x K by K x V product, with later ranks idle until the
chain reaches them; the all-gather is one collective after which every rank chains the (at most
2W - 1) summaries itself, redundantly but in parallel, with products of microseconds. The price is
bandwidth: every rank receives all W summaries (W * parts * H * K * (K + V) * 4 bytes) where a
ring would pass one state along. gdn2_kernels/bench/cp_scaling.py reports the exchange time apart.

NCCL groups get CUDA tensors; gloo groups get CPU tensors (CUDA tensors are staged through host
memory); a group with both backends picks by device.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _backend(group: Any) -> str:
    return str(dist.get_backend(group)).lower()


def transport_device(group: Any, device: torch.device) -> torch.device:
    """Where a tensor for ``group``'s collectives must live, for data that lives on ``device``."""
    backend = _backend(group)
    if backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda",
                                                                 torch.cuda.current_device())
    if "nccl" in backend and device.type == "cuda":
        return device
    return torch.device("cpu")


def all_gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[world_size, *x.shape]``: every rank's ``x`` (same shape and dtype on every rank), on
    ``x``'s device."""
    world = dist.get_world_size(group)
    dev = transport_device(group, x.device)
    send = x.contiguous().to(dev)
    out = torch.empty(world, *x.shape, dtype=x.dtype, device=dev)
    dist.all_gather(list(out.unbind(0)), send, group=group)
    return out.to(x.device)


# Bytes of a rank's error message carried by the agreement (longer ones are cut).
MESSAGE_BYTES = 1024


def agree(group: Any, error: str | None, meta: list[int], device: torch.device
          ) -> tuple[list[str | None], list[list[int]]]:
    """All-gather each rank's error (None: its input passed its own checks) and its ``meta``
    integers (same length on every rank): ``(errors by rank, metas by rank)``."""
    text = (error or "").encode("utf-8")[:MESSAGE_BYTES]
    row = [1 if error is not None else 0, len(text), *meta, *text,
           *([0] * (MESSAGE_BYTES - len(text)))]
    dev = transport_device(group, device)
    rows = all_gather(torch.tensor(row, dtype=torch.int64, device=dev), group).tolist()
    errors: list[str | None] = []
    metas = []
    for r in rows:
        n_meta = len(meta)
        msg = bytes(r[2 + n_meta: 2 + n_meta + r[1]]).decode("utf-8", errors="replace")
        errors.append(msg if r[0] else None)
        metas.append(r[2: 2 + n_meta])
    return errors, metas
