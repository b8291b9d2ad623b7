"""FLOP and byte model of the benchmarked problems, and every metric derived from a latency.

The derivation (per stage, from docs/math.md) is in ``docs/bench_model.md``; this module is its only
implementation. Conventions:

- FLOPs count matrix products only (2 per multiply-add); a product with a triangular factor
  counts half; elementwise work (exp, cumsum, gating) is not counted. Recomputation that an
  implementation chooses to do is not counted either, so every implementation of one problem is
  credited with the same work and TFLOP/s compare like for like.
- The delta-rule family (GDN-2, KDA, Gated DeltaNet) is counted at the reference chunk size
  ``C = 64`` (the paper's), whatever chunk size an implementation runs.
- Bytes are compulsory traffic: each input read once, each output written once, at the dtypes the
  benchmark passes. Intermediates are not counted (a perfect fusion would keep them on chip).
- Roofline time is ``max(flops / peak matmul FLOP/s, bytes / peak copy bandwidth)`` with both
  ceilings measured in the same run.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("fwd", "fwdbwd", "decode")
FAMILIES = ("gdn2", "kda", "gdn", "attention", "mamba2")
REFERENCE_CHUNK = 64          # the delta-rule chunk size C the model counts at
MAMBA_CHUNK = 256             # mamba_chunk_scan_combined's usual chunk size
STATE_BYTES = 4               # recurrent states are fp32 everywhere in the benchmark


@dataclass(frozen=True)
class Shape:
    """One benchmark problem. ``T`` is 1 in decode; ``context`` is then the tokens already seen
    (the attention KV-cache length; the recurrent models carry a fixed-size state instead)."""

    B: int
    T: int
    H: int = 16
    D: int = 128
    dtype: str = "bfloat16"
    context: int = 0

    @property
    def tokens(self) -> int:
        return self.B * self.T

    @property
    def elem_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def label(self) -> str:
        return f"{self.B}x{self.T}" + (f"@{self.context}" if self.context else "")


@dataclass(frozen=True)
class MambaDims:
    """Mamba-2 SSD sizes with the recurrent state matched to GDN-2's ``H * D * D`` per layer:
    head dim P = d_state N = D / 2 and 4H heads (16 x 128 x 128 = 64 x 64 x 64), one group.
    The input x is then ``4H * D/2 = 2 * H * D`` wide (Mamba-2's expand = 2)."""

    heads: int
    headdim: int
    dstate: int
    ngroups: int = 1
    chunk: int = MAMBA_CHUNK


def mamba_dims(shape: Shape) -> MambaDims:
    return MambaDims(heads=4 * shape.H, headdim=shape.D // 2, dstate=shape.D // 2)


@dataclass(frozen=True)
class Work:
    """Model FLOPs and compulsory bytes of one call."""

    flops: float
    bytes: float


@dataclass(frozen=True)
class Ceilings:
    """Measured in the same run: large bf16 matmul and large device-to-device copy."""

    matmul_tflops: float
    copy_gbps: float


# ------------------------------------------------------------------------------------------------
# Delta-rule family (GDN-2; KDA and Gated DeltaNet have the same products)
# ------------------------------------------------------------------------------------------------

def intra_fwd_flops(C: int, K: int, V: int) -> float:
    """One chunk, one head: T = Ē K̄ᵀ, A_qk = Q K̄ᵀ (strict/lower, C²K each), the triangular
    inverse (C³/3), Y = A Ē (C²K) and U = A Z (C²V)."""
    return 3 * C * C * K + C * C * V + C ** 3 / 3


def state_fwd_flops(C: int, K: int, V: int) -> float:
    """One chunk, one head: Y S, Q_γ S, K_tailᵀ R (2CKV each) and A_qk R (C²V)."""
    return 6 * C * K * V + C * C * V


def intra_bwd_flops(C: int, K: int, V: int) -> float:
    """One chunk, one head: dA from dU Zᵀ and dY Ēᵀ and dZ, dĒ through Aᵀ (2C²V + 2C²K),
    dT = -Aᵀ dA Aᵀ (2 · C³/3), dĒ, dK̄ from dT and dQ_γ, dK̄ from dA_qk (4C²K)."""
    return 6 * C * C * K + 2 * C * C * V + 2 * C ** 3 / 3


def state_bwd_flops(C: int, K: int, V: int) -> float:
    """One chunk, one head: two gradient products for each of the four forward products
    Y S, Q_γ S, K_tailᵀ R (12CKV) and A_qk R (2C²V)."""
    return 12 * C * K * V + 2 * C * C * V


def recurrent_step_flops(K: int, V: int) -> float:
    """One token, one head of the recurrence: decay (KV), r = S̄ᵀe (2KV), rank-1 update (2KV),
    o = Sᵀq (2KV)."""
    return 7 * K * V


# Model FLOPs of a pipeline stage of ours, by launcher name, per chunk and head (``gdn2 profile``
# divides by the real chunk size). A stage missing here is shown with GB/s only.
STAGE_FLOPS = {
    "intra_fwd": intra_fwd_flops,
    "state_fwd": state_fwd_flops,
    "intra_bwd": intra_bwd_flops,
    "state_bwd": state_bwd_flops,
}


def stage_flops(stage: str, B: int, T: int, H: int, K: int, V: int, C: int) -> float | None:
    """Model FLOPs of one launch of ``stage`` at chunk size ``C``; None if the model has none."""
    fn = STAGE_FLOPS.get(stage)
    return None if fn is None else fn(C, K, V) * B * H * T / C


def _delta_gate_elems(family: str, K: int, V: int) -> tuple[int, int]:
    """Per token and head: (fp32 decay elements, input-dtype gate elements)."""
    if family == "gdn2":
        return K, K + V          # g [K]; b [K], w [V]
    if family == "kda":
        return K, 1              # g [K]; beta scalar
    return 1, 1                  # gdn: scalar g and beta


def _delta_work(family: str, mode: str, s: Shape) -> Work:
    K = V = s.D
    C = REFERENCE_CHUNK
    e = s.elem_bytes
    n_g, n_gate = _delta_gate_elems(family, K, V)
    rows = s.tokens * s.H
    inputs = rows * ((2 * K + V + n_gate) * e + n_g * 4)          # q, k, v, gates; g fp32
    out = rows * V * e
    fwd_flops = rows * (intra_fwd_flops(C, K, V) + state_fwd_flops(C, K, V)) / C
    if mode == "fwd":
        return Work(fwd_flops, inputs + out)
    if mode == "fwdbwd":
        bwd_flops = rows * (intra_bwd_flops(C, K, V) + state_bwd_flops(C, K, V)) / C
        # backward reads the inputs and dO, writes one gradient per input
        return Work(fwd_flops + bwd_flops, 3 * inputs + 2 * out)
    state = s.B * s.H * K * V * STATE_BYTES
    return Work(rows * recurrent_step_flops(K, V), inputs + out + 2 * state)


# ------------------------------------------------------------------------------------------------
# Causal attention and Mamba-2 SSD
# ------------------------------------------------------------------------------------------------

def _attention_work(mode: str, s: Shape) -> Work:
    e, D = s.elem_bytes, s.D
    if mode == "decode":
        L = s.context
        flops = 4 * s.B * s.H * L * D                             # q Kᵀ and P V over L keys
        cache = 2 * s.B * s.H * L * D * e
        return Work(flops, cache + 2 * s.B * s.H * D * e)
    fwd_flops = 2 * s.B * s.H * s.T * s.T * D                     # 4 B H T² D, halved (causal)
    tensor = s.tokens * s.H * D * e
    lse = s.tokens * s.H * 4
    if mode == "fwd":
        return Work(fwd_flops, 4 * tensor + lse)                  # q, k, v -> o (+ lse)
    # backward: 5 products vs 2 (FlashAttention's 2.5x); reads q k v o dO lse, writes dq dk dv
    return Work(3.5 * fwd_flops, 4 * tensor + lse + 8 * tensor + lse)


def _mamba_work(mode: str, s: Shape) -> Work:
    m = mamba_dims(s)
    e = s.elem_bytes
    P, N, Q, Hm, G = m.headdim, m.dstate, m.chunk, m.heads, m.ngroups
    if mode == "decode":
        state = s.B * Hm * P * N * STATE_BYTES
        io = s.B * (2 * Hm * P * e + Hm * 4 + 2 * G * N * e)
        return Work(s.B * Hm * 5 * P * N, io + 2 * state)
    # per token: C Bᵀ per group (Q N, causal half of 2 Q N), per head the masked (C Bᵀ) X
    # (Q P), the chunk states Bᵀ X (2 N P) and the state output C S (2 N P)
    fwd_flops = s.tokens * (G * Q * N + Hm * (Q * P + 4 * N * P))
    inputs = s.tokens * (Hm * P * e + Hm * 4 + 2 * G * N * e)     # x, dt (fp32), B, C
    out = s.tokens * Hm * P * e
    if mode == "fwd":
        return Work(fwd_flops, inputs + out)
    return Work(3 * fwd_flops, 3 * inputs + 2 * out)              # bwd: 2 products per product


def work(family: str, mode: str, shape: Shape) -> Work:
    """Model FLOPs and compulsory bytes of one call of ``family`` in ``mode`` at ``shape``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if family in ("gdn2", "kda", "gdn"):
        return _delta_work(family, mode, shape)
    if family == "attention":
        return _attention_work(mode, shape)
    if family == "mamba2":
        return _mamba_work(mode, shape)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


# ------------------------------------------------------------------------------------------------
# Metrics: each a function of latency and shape (or work), defined here once
# ------------------------------------------------------------------------------------------------

def tokens_per_s(ms: float, shape: Shape) -> float:
    """Tokens processed per second (decode: one new token per sequence per call)."""
    return shape.tokens / (ms * 1e-3)


def tflops(w: Work, ms: float) -> float:
    return w.flops / (ms * 1e-3) / 1e12


def gbps(w: Work, ms: float) -> float:
    return w.bytes / (ms * 1e-3) / 1e9


def roofline_ms(w: Work, c: Ceilings) -> float:
    """The fastest the model allows: compute- or memory-bound, whichever is slower."""
    return max(w.flops / (c.matmul_tflops * 1e12), w.bytes / (c.copy_gbps * 1e9)) * 1e3


def pct_roofline(w: Work, ms: float, c: Ceilings) -> float:
    """Roofline time over measured time, in percent (100 = at the roofline)."""
    return 100.0 * roofline_ms(w, c) / ms


def bound(w: Work, c: Ceilings) -> str:
    """'compute' or 'memory': which ceiling sets the roofline."""
    return "compute" if w.flops / (c.matmul_tflops * 1e12) >= w.bytes / (c.copy_gbps * 1e9) \
        else "memory"


def speedup(ms: float, baseline_ms: float) -> float:
    """How many times faster than the baseline (> 1: faster)."""
    return baseline_ms / ms


def matmul_tflops(n: int, ms: float) -> float:
    """Ceiling probe: an n x n x n matmul in ``ms``."""
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_gbps(nbytes: int, ms: float) -> float:
    """Ceiling probe: a device-to-device copy of ``nbytes``, counting read and write."""
    return 2 * nbytes / (ms * 1e-3) / 1e9
