"""The in-kernel gate activation (``use_gate_in_kernel``) and its chain rule, as ``@triton.jit``
helpers the kernels call where they load g (forward) and where they write the final dg (backward).

With the gate in the kernel, the tensor ``g`` holds the raw pre-activation; with x = g + dt_bias
the log-decay the recurrence uses is (fla-core 0.6.0's ``fla/ops/kda/gate.py`` definitions)

    SOFTPLUS   g' = -exp(A_log) * softplus(x)
    BOUNDED    g' = lower_bound * sigmoid(a * x),   a = exp(A_log), or 1 without A_log

A_log holds one value per head ``[H]``, dt_bias one per head and key channel ``[H * K]`` (both
optional in BOUNDED; dt_bias optional in SOFTPLUS). The chain rule, with dg' = dL/dg':

    SOFTPLUS   dx = dg' * (-exp(A_log) * sigmoid(x))           dA_log += dg' * g'
    BOUNDED    dx = dg' * lower_bound * a * s * (1 - s)         dA_log += dx * x      (s = sigmoid(a x))
    dL/dg = dx,   ddt_bias += dx

dA_log and ddt_bias are sums over tokens (and, for dA_log, channels). :func:`chain_rule` writes
each program's sums over its rows as partials ``[NT, H, K]`` (chunk, head, key channel); the op
adds them up with one small torch reduction. Partials rather than atomics keep the sums
deterministic, and the reduction reads NT * H * K values, not another pass over g.

:class:`GateArgs` carries the gate's tensors to the launchers; ``NO_GATE`` compiles the helpers
away (``GATE`` is a constexpr), so kernels without the gate are unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

GATE_NONE = 0
GATE_SOFTPLUS = 1
GATE_BOUNDED = 2
# The same values for the jit helpers (globals they read must be constexprs).
_NONE = tl.constexpr(GATE_NONE)
_SOFTPLUS = tl.constexpr(GATE_SOFTPLUS)
_BOUNDED = tl.constexpr(GATE_BOUNDED)


class GateArgs(NamedTuple):
    """The gate of one call, as launch arguments.

    ``kind``: GATE_NONE / GATE_SOFTPLUS / GATE_BOUNDED. ``g_raw`` (the raw gate input),
    ``dA_log`` and ``ddt_bias`` (the ``[NT, H, K]`` fp32 partials) are set for the backward only.
    """

    kind: int = GATE_NONE
    A_log: torch.Tensor | None = None
    dt_bias: torch.Tensor | None = None
    lower_bound: float = 0.0
    g_raw: torch.Tensor | None = None
    dA_log: torch.Tensor | None = None
    ddt_bias: torch.Tensor | None = None

    def forward_args(self) -> dict:
        """Keyword arguments of a kernel that applies the gate where it loads g."""
        return dict(A_log=self.A_log, dt_bias=self.dt_bias, lower_bound=float(self.lower_bound),
                    GATE=self.kind, GATE_HAS_A=self.A_log is not None,
                    GATE_HAS_BIAS=self.dt_bias is not None)

    def backward_args(self) -> dict:
        """Keyword arguments of a kernel that applies the chain rule where it writes dg."""
        return dict(self.forward_args(), g_raw=self.g_raw, dA_log_part=self.dA_log,
                    ddt_bias_part=self.ddt_bias)


NO_GATE = GateArgs()


@triton.jit
def _softplus(x):
    # Stable for any x: max(x, 0) + log(1 + exp(-|x|)).
    return tl.maximum(x, 0.) + tl.log(1. + tl.exp(-tl.abs(x)))


@triton.jit
def _pre_activation(b_g, A_log, dt_bias, i_h, o_k, m_k, K: tl.constexpr,
                    GATE_HAS_A: tl.constexpr, GATE_HAS_BIAS: tl.constexpr):
    """x = g + dt_bias (broadcast over rows) and exp(A_log) (1 without A_log), fp32."""
    b_x = b_g.to(tl.float32)
    if GATE_HAS_BIAS:
        b_x = b_x + tl.load(dt_bias + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32)
    if GATE_HAS_A:
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    else:
        b_a = 1.
    return b_x, b_a


@triton.jit
def activate(b_g, A_log, dt_bias, lower_bound, i_h, o_k, m_k, K: tl.constexpr,
             GATE: tl.constexpr, GATE_HAS_A: tl.constexpr, GATE_HAS_BIAS: tl.constexpr):
    """The log-decay g' from a tile of raw g (rows x key channels ``o_k``, or one row) of head
    ``i_h``; ``b_g`` itself when ``GATE`` is GATE_NONE."""
    b_out = b_g
    if GATE == _SOFTPLUS:
        b_x, b_a = _pre_activation(b_g, A_log, dt_bias, i_h, o_k, m_k, K, GATE_HAS_A,
                                   GATE_HAS_BIAS)
        b_out = -b_a * _softplus(b_x)
    elif GATE == _BOUNDED:
        b_x, b_a = _pre_activation(b_g, A_log, dt_bias, i_h, o_k, m_k, K, GATE_HAS_A,
                                   GATE_HAS_BIAS)
        b_out = lower_bound * tl.sigmoid(b_a * b_x)
    return b_out


@triton.jit
def chain_rule(b_dg, g_raw, p_t, m_tk, A_log, dt_bias, lower_bound, dA_log_part, ddt_bias_part,
               i_part, i_h, o_k, m_k, K: tl.constexpr, GATE: tl.constexpr,
               GATE_HAS_A: tl.constexpr, GATE_HAS_BIAS: tl.constexpr):
    """dL/dg (raw) from ``b_dg`` = dL/dg' on the ``[rows, BK]`` tile at offsets ``p_t`` of
    ``g_raw`` (valid where ``m_tk``; ``g_raw`` is only read when ``GATE`` is set, so it may be
    None otherwise); stores the tile's dA_log / ddt_bias sums over rows at
    ``i_part + o_k`` of the partials. ``b_dg`` itself when ``GATE`` is GATE_NONE."""
    b_out = b_dg
    if GATE != _NONE:
        b_g = tl.load(g_raw + p_t, mask=m_tk, other=0.)
        b_x, b_a = _pre_activation(b_g, A_log, dt_bias, i_h, o_k, m_k, K, GATE_HAS_A,
                                   GATE_HAS_BIAS)
        if GATE == _SOFTPLUS:
            b_dx = b_dg * (-b_a * tl.sigmoid(b_x))
            b_dA = b_dg * (-b_a * _softplus(b_x))
        else:
            b_s = tl.sigmoid(b_a * b_x)
            b_dx = b_dg * (lower_bound * b_a * b_s * (1. - b_s))
            b_dA = b_dx * b_x
        b_out = tl.where(m_tk, b_dx, 0.)
        if GATE_HAS_A:
            tl.store(dA_log_part + i_part + o_k, tl.sum(tl.where(m_tk, b_dA, 0.), 0), mask=m_k)
        if GATE_HAS_BIAS:
            tl.store(ddt_bias_part + i_part + o_k, tl.sum(b_out, 0), mask=m_k)
    return b_out


@triton.jit
def chain_rule_tiles(dg, g_raw, A_log, dt_bias, lower_bound, dA_log_part, ddt_bias_part, for_k,
                     i_part, i_h, r_t, m_t, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                     GATE: tl.constexpr, GATE_HAS_A: tl.constexpr, GATE_HAS_BIAS: tl.constexpr):
    """:func:`chain_rule` over every key tile of one chunk's final dg (rows ``r_t``, valid where
    ``m_t``), in place; ``dg`` is at the program's sequence and head, ``g_raw`` at ``for_k``. The
    caller orders this after the stores of dg (a barrier)."""
    if GATE != _NONE:
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_tk = m_t[:, None] & m_k[None, :]
            p_t = r_t[:, None] * (H * K) + o_k[None, :]
            b_dg = tl.load(dg + p_t, mask=m_tk, other=0.)
            b_dg = chain_rule(b_dg, g_raw, for_k + p_t, m_tk, A_log, dt_bias, lower_bound,
                              dA_log_part, ddt_bias_part, i_part, i_h, o_k, m_k, K, GATE,
                              GATE_HAS_A, GATE_HAS_BIAS)
            tl.store(dg + p_t, b_dg, mask=m_tk)


def reduce_partials(gate: GateArgs, H: int, K: int) -> tuple[torch.Tensor | None,
                                                             torch.Tensor | None]:
    """(dA_log ``[H]``, ddt_bias ``[H * K]``) in fp32 from the backward's partials."""
    dA = gate.dA_log.sum(dim=(0, 2)) if gate.dA_log is not None else None
    dbias = gate.ddt_bias.sum(0).reshape(H * K) if gate.ddt_bias is not None else None
    return dA, dbias


__all__ = ["GATE_BOUNDED", "GATE_NONE", "GATE_SOFTPLUS", "GateArgs", "NO_GATE", "activate",
           "chain_rule", "chain_rule_tiles", "reduce_partials"]
