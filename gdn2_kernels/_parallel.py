"""Launch-time parallelism of the serial passes: the value tile of the state kernels.

``state_fwd``, ``state_bwd`` and ``recurrent_fwd`` run one program per (sequence, head, value
tile) and walk the sequence serially, so with few sequences x heads (one 16K-token sequence,
batch-1 decoding) the tuned ``BV`` can leave most SMs idle while each program walks a long chain.
The launcher then halves ``BV`` (never below ``MIN_BV``) until the programs cover at least half
of the SMs. Value tiles are independent (each column of the state is its own recurrence over the
key axis), so the results are bitwise the same; only the schedule changes.

Measured on an H200 (``bench/results/2026-11-26_NVIDIA_H200_variants.json``): at 1 x 16384,
H = 16, BV 64 -> 16 took state_bwd from 2.56 to 1.97 ms and state_fwd from 0.86 to 0.65 ms; at
8 x 2048 (256 programs at BV = 64) BV = 16 was 2.7x slower, which the rule leaves alone.

A narrowed launch also runs at most ``NARROW_MAX_WARPS`` warps: the tuned ``num_warps`` was chosen
at the tune problem's full-width tile, and a quarter of that tile spread over as many warps leaves
each warp too little work to hide the chain's latency. Measured on an H200 (profile of
2026-11-27, 8 warps tuned; ``bench/results/2026-11-27_NVIDIA_H200_state_warps.json``): state_fwd
0.42 -> 0.29 ms at 2 x 8192 (BV 32) and 0.68 -> 0.54 ms at 1 x 16384 (BV 16) with 4 warps, 2 warps
slower than 8 at both; state_bwd 1.65 -> 1.54 ms at 1 x 16384 and 0.94 -> 0.96 ms at 2 x 8192.
"""
from __future__ import annotations

import torch
import triton

from gdn2_kernels import _device

MIN_BV = 16


def narrowed_value_tile(BV: int, rows: int, V: int, sms: int) -> int:
    """Halve ``BV`` while ``rows * cdiv(V, BV)`` programs cover fewer than ``sms / 2`` SMs."""
    while BV > MIN_BV and rows * triton.cdiv(V, BV) * 2 < sms:
        BV //= 2
    return BV


def value_tile(BV: int, rows: int, V: int, device: torch.device) -> int:
    """The ``BV`` to launch with: the tuned one, narrowed when ``rows`` (N * H) is small."""
    sms = _device.sm_count(device)
    return BV if sms is None else narrowed_value_tile(BV, rows, V, sms)


NARROW_MAX_WARPS = 4


def serial_launch(config, rows: int, V: int, device: torch.device) -> tuple[int, dict[str, int]]:
    """``(BV, launch options)`` of a serial pass with ``config`` over ``rows`` (N * H) rows: the
    tuned ones, or when the value tile is narrowed, the narrower tile with at most
    ``NARROW_MAX_WARPS`` warps."""
    BV = value_tile(config["BV"], rows, V, device)
    options = config.launch_options()
    if BV < config["BV"]:
        options["num_warps"] = min(options["num_warps"], NARROW_MAX_WARPS)
    return BV, options


# The two-level scan (state_fwd SCAN="segmented"): segments of at least this many chunks.
MIN_SEGMENT = 16


def segment_chunks(programs: int, num_chunks: int, device: torch.device) -> int | None:
    """Chunks per segment for the two-level state scan, or None to keep the serial pass.

    Segments are used when the ``programs`` of the serial pass (N * H * V / BV) cover fewer than
    half the SMs: the sequence is cut so that segments x programs make about two waves, each
    segment at least ``MIN_SEGMENT`` chunks and at least two segments per sequence.
    """
    sms = _device.sm_count(device)
    if sms is None or programs * 2 >= sms:
        return None
    segments = -(-2 * sms // programs)
    L = max(MIN_SEGMENT, -(-num_chunks // segments))
    return L if num_chunks >= 2 * L else None


def scan_segments(config, N: int, H: int, T: int, V: int, cu_seqlens: torch.Tensor | None,
                  device: torch.device) -> int | None:
    """Chunks per segment when a state pass with ``config`` runs as the two-level scan
    (``SCAN="segmented"``, dense input, :func:`segment_chunks` says the GPU is under-filled even
    with the value tile narrowed as the serial launch would narrow it), else None (the serial
    pass). One rule for state_fwd and state_bwd."""
    if config["SCAN"] != "segmented" or cu_seqlens is not None:
        return None
    BV = value_tile(config["BV"], N * H, V, device)     # the serial pass's programs, narrowed
    return segment_chunks(N * H * triton.cdiv(V, BV), triton.cdiv(T, config["BT"]), device)
