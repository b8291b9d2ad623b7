"""Index tensors for packed variable-length batches (``cu_seqlens``)."""
from __future__ import annotations

import torch


def chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int,
                  cu_seqlens_cpu: torch.Tensor | None = None) -> torch.Tensor:
    """``[num_chunks, 2]`` int32 pairs (sequence index, chunk index within it), flattened row-major,
    on ``cu_seqlens``' device. The pairs are built on the host: from ``cu_seqlens_cpu`` (a host
    copy of the same boundaries) when given, else from ``cu_seqlens`` (a device-to-host copy)."""
    src = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens
    lens = (src[1:] - src[:-1]).tolist()
    pairs = [(n, c) for n, L in enumerate(lens) for c in range(-(-L // chunk_size))]
    return torch.tensor(pairs, dtype=torch.int32, device=cu_seqlens.device).reshape(-1, 2)


def chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[N + 1]`` int32: index of each sequence's first chunk in the flat chunk list."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = (lens + chunk_size - 1) // chunk_size
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def num_chunks(T: int, B: int, chunk_indices: torch.Tensor | None, chunk_size: int) -> int:
    """Chunks over all sequences: the rows of ``chunk_indices`` for a packed batch, else
    ``B * ceil(T / chunk_size)``. No host sync (``chunk_indices`` already holds the count)."""
    if chunk_indices is not None:
        return chunk_indices.shape[0]
    return B * (-(-T // chunk_size))
