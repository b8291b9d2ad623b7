"""``GatedDeltaNet2``: the GDN-2 token mixer (MATH.md "Layer") and its decode cache.

    q, k = L2norm(SiLU(conv(Linear(x))))      [B, T, H, K]     (L2 norm inside the op)
    v    = SiLU(conv(Linear(x)))              [B, T, H_v, V]
    g    = -exp(A_log) * softplus(Linear_f(x) + dt_bias)      fp32, [B, T, H, K]
    b    = sigmoid(Linear_b(x))  (x 2 with allow_neg_eigval)  [B, T, H, K]
    w    = sigmoid(Linear_w(x))                               [B, T, H_v, V]
    o    = Linear_out(RMSNorm(GDN2(q, k, v, g, b, w)) * SiLU(Linear_gate(x)))

With grouped value heads (H_v = G * H) value head j reads key head j // G: q, k, g, b are repeated
across the group, v and w live on the value heads. ``conv`` is a short causal depthwise
convolution (``conv_size`` taps).

Two modes run the same math: ``chunk`` (``chunk_gdn2``: training and long prefills) and
``recurrent`` (``fused_recurrent_gdn2``: decoding, forward only). A :class:`GDN2Cache` carries
the recurrent state and the last ``conv_size - 1`` inputs of each convolution between calls, so a
prefill of T tokens followed by N one-token steps gives the outputs of one call over T + N tokens.
While ``torch.compile`` traces the layer, the ops go through their ``torch.library``
registrations (:mod:`gdn2_kernels.custom_ops`), so ``fullgraph=True`` holds.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gdn2_kernels import custom_ops, ops
from gdn2_kernels.configs import MAX_HEAD_DIM

MODES = ("auto", "chunk", "recurrent")
# "auto" decodes with the recurrent kernel up to this many tokens per call (when no grad is needed).
RECURRENT_MAX_T = 64

_layer_tags = itertools.count()


@dataclass(eq=False)
class GDN2Cache:
    """Decode state of one :class:`GatedDeltaNet2` layer (one cache per layer).

    Create it empty (``GDN2Cache()``) or with :meth:`GatedDeltaNet2.init_cache`; the first call
    that receives it fills it and ties it to that layer and batch size.

    Attributes:
        state: recurrent state ``[B, H_v, K, V]`` float32 (None before the first call).
        conv_q, conv_k: last ``conv_size - 1`` inputs of the q/k convolutions ``[B, W-1, H*K]``.
        conv_v: the same for v, ``[B, W-1, H_v*V]``.
        layer_tag: identity of the layer that owns the cache.
    """

    state: torch.Tensor | None = None
    conv_q: torch.Tensor | None = None
    conv_k: torch.Tensor | None = None
    conv_v: torch.Tensor | None = None
    layer_tag: int | None = None

    @property
    def batch_size(self) -> int | None:
        return None if self.state is None else self.state.shape[0]

    def reset(self) -> None:
        """Forget the sequence (keeps the tie to its layer)."""
        self.state = self.conv_q = self.conv_k = self.conv_v = None


def _causal_conv(x: torch.Tensor, conv: nn.Conv1d, tail: torch.Tensor | None,
                 keep_tail: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv of ``x`` ``[B, T, D]`` continuing from ``tail`` ``[B, W-1, D]``.

    Returns the output ``[B, T, D]`` and, if ``keep_tail``, the new tail (last W-1 inputs).
    """
    B, T, D = x.shape
    W = conv.kernel_size[0]
    if tail is None:
        y = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=W - 1, groups=D)[..., :T]
        tail = x.new_zeros(B, W - 1, D) if keep_tail else None
    else:
        xp = torch.cat([tail, x], dim=1)
        y = F.conv1d(xp.transpose(1, 2), conv.weight, conv.bias, groups=D)
    # Contiguous [B, T, D] now: the ops need it anyway, and the head views stay plain.
    y = y.transpose(1, 2).contiguous()
    if not keep_tail:
        return y, None
    new_tail = torch.cat([tail, x[:, max(0, T - (W - 1)):]], dim=1)[:, -(W - 1):] if W > 1 else tail
    return y, new_tail.contiguous()


def _check_arguments(**args) -> None:
    """The constructor's sizes are positive ints (head dims up to the ops' MAX_HEAD_DIM), its
    flags bools and norm_eps a positive finite number; errors name GatedDeltaNet2 and the
    argument."""
    for name in ("hidden_size", "num_heads", "head_dim", "num_v_heads", "head_v_dim",
                 "conv_size"):
        value = args[name]
        high = MAX_HEAD_DIM if name in ("head_dim", "head_v_dim") else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"GatedDeltaNet2: {name} must be an int, got {value!r}")
        if value < 1 or (high is not None and value > high):
            bound = f"between 1 and {high}" if high else ">= 1"
            raise ValueError(f"GatedDeltaNet2: {name} must be {bound}, got {value}")
    for name in ("conv_bias", "allow_neg_eigval"):
        if not isinstance(args[name], bool):
            raise TypeError(f"GatedDeltaNet2: {name} must be True or False, got {args[name]!r}")
    eps = args["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps <= 0:
        raise ValueError(f"GatedDeltaNet2: norm_eps must be a positive finite number, got {eps!r}")


class GatedDeltaNet2(nn.Module):
    """Gated DeltaNet-2 token mixer (MATH.md "Layer"); input and output ``[B, T, hidden_size]``.

    Args:
        hidden_size: model width d_model. Default 2048.
        num_heads: key heads H. Default 16.
        head_dim: key head dim d_k. Default 128.
        num_v_heads: value heads H_v, a multiple of H (grouped value heads). Default H.
        head_v_dim: value head dim d_v. Default d_k.
        conv_size: taps of the short causal convolutions. Default 4.
        conv_bias: bias in the convolutions. Default False.
        allow_neg_eigval: erase gate in [0, 2] instead of [0, 1]. Default False.
        norm_eps: epsilon of the output RMSNorm. Default 1e-5.
        mode: 'auto' (recurrent kernel for calls of <= 64 tokens that need no grad, else chunk),
            'chunk' or 'recurrent' (forward only). Default 'auto'. ``forward`` can override it.
        layer_idx: index in the model, shown in error messages. Default None.
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 16,
        head_dim: int = 128,
        num_v_heads: int | None = None,
        head_v_dim: int | None = None,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        mode: str = "auto",
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        head_v_dim = head_dim if head_v_dim is None else head_v_dim
        _check_arguments(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim,
                         num_v_heads=num_v_heads, head_v_dim=head_v_dim, conv_size=conv_size,
                         conv_bias=conv_bias, allow_neg_eigval=allow_neg_eigval,
                         norm_eps=norm_eps)
        if num_v_heads % num_heads != 0:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_heads "
                             f"({num_heads}): each group of value heads shares one key head")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.hidden_size = hidden_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_v_heads, self.head_v_dim = num_v_heads, head_v_dim
        self.conv_size = conv_size
        self.allow_neg_eigval = allow_neg_eigval
        self.norm_eps = norm_eps
        self.mode = mode
        self.layer_idx = layer_idx
        self._tag = next(_layer_tags)

        kw = {"device": device, "dtype": dtype}
        key_dim, value_dim = num_heads * head_dim, num_v_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False, **kw)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False, **kw)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False, **kw)
        self.f_proj = nn.Linear(hidden_size, key_dim, bias=False, **kw)
        self.b_proj = nn.Linear(hidden_size, key_dim, bias=False, **kw)
        self.w_proj = nn.Linear(hidden_size, value_dim, bias=False, **kw)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False, **kw)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False, **kw)
        self.q_conv1d = nn.Conv1d(key_dim, key_dim, conv_size, groups=key_dim, bias=conv_bias, **kw)
        self.k_conv1d = nn.Conv1d(key_dim, key_dim, conv_size, groups=key_dim, bias=conv_bias, **kw)
        self.v_conv1d = nn.Conv1d(value_dim, value_dim, conv_size, groups=value_dim,
                                  bias=conv_bias, **kw)
        self.A_log = nn.Parameter(torch.empty(num_heads, **kw))
        self.dt_bias = nn.Parameter(torch.empty(key_dim, **kw))
        self.o_norm_weight = nn.Parameter(torch.empty(head_v_dim, **kw))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: Xavier-uniform linears with gain 2^-2.5; Mamba-style decay params."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.f_proj, self.b_proj, self.w_proj,
                    self.g_proj, self.o_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        # A in [1, 16]; dt in [1e-3, 1e-1] log-uniformly, dt_bias = softplus^-1(dt).
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(
            math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.o_norm_weight.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, num_v_heads={self.num_v_heads}, "
                f"head_v_dim={self.head_v_dim}, conv_size={self.conv_size}, "
                f"allow_neg_eigval={self.allow_neg_eigval}, mode={self.mode!r}")

    def _name(self) -> str:
        return "GatedDeltaNet2" + (f" (layer_idx={self.layer_idx})" if self.layer_idx is not None
                                   else "")

    def init_cache(self, batch_size: int, device: torch.device | str | None = None) -> GDN2Cache:
        """An empty-history cache for ``batch_size`` sequences (zero state and conv tails)."""
        w = self.q_proj.weight
        device = w.device if device is None else device
        W = self.conv_size - 1
        kd, vd = self.num_heads * self.head_dim, self.num_v_heads * self.head_v_dim
        return GDN2Cache(
            state=torch.zeros(batch_size, self.num_v_heads, self.head_dim, self.head_v_dim,
                              dtype=torch.float32, device=device),
            conv_q=torch.zeros(batch_size, W, kd, dtype=w.dtype, device=device),
            conv_k=torch.zeros(batch_size, W, kd, dtype=w.dtype, device=device),
            conv_v=torch.zeros(batch_size, W, vd, dtype=w.dtype, device=device),
            layer_tag=self._tag,
        )

    # --------------------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, cache: GDN2Cache | None, mode: str) -> None:
        name = self._name()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: x must be [batch, seq_len, hidden_size={self.hidden_size}],"
                             f" got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: x has seq_len 0; pass at least one token")
        w = self.q_proj.weight
        if x.dtype != w.dtype:
            raise TypeError(f"{name}: x has dtype {x.dtype} but the layer's parameters are "
                            f"{w.dtype}; cast x, or the layer with .to({x.dtype})")
        if x.device != w.device:
            raise ValueError(f"{name}: x is on {x.device} but the layer is on {w.device}")
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
        if cache is None:
            return
        if not isinstance(cache, GDN2Cache):
            raise TypeError(f"{name}: cache must be a GDN2Cache, got {type(cache).__name__}")
        if cache.layer_tag is not None and cache.layer_tag != self._tag:
            raise ValueError(f"{name}: this cache belongs to another GatedDeltaNet2 layer; keep "
                             "one GDN2Cache per layer")
        if cache.state is None:
            return
        B = x.shape[0]
        if cache.state.shape[0] != B:
            raise ValueError(f"{name}: the cache holds {cache.state.shape[0]} sequences but x has "
                             f"batch size {B}; use a new cache (or cache.reset()) for a new batch")
        expect = (B, self.num_v_heads, self.head_dim, self.head_v_dim)
        if tuple(cache.state.shape) != expect or cache.state.dtype != torch.float32:
            raise ValueError(f"{name}: cache.state must be float32 {expect}, got "
                             f"{cache.state.dtype} {tuple(cache.state.shape)}")
        for tail in (cache.conv_q, cache.conv_k, cache.conv_v):
            if tail is None or tail.dtype != x.dtype or tail.device != x.device:
                raise TypeError(f"{name}: the cache's conv tails must be {x.dtype} on {x.device} "
                                "like x; was the cache filled at another dtype? Use a new cache")

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor, cache: GDN2Cache | None = None,
                mode: str | None = None) -> torch.Tensor:
        """Mix ``x`` ``[B, T, hidden_size]``; returns ``[B, T, hidden_size]`` in x's dtype.

        Args:
            x: input hidden states, in the parameters' dtype and device.
            cache: a :class:`GDN2Cache` to continue from and update in place (decoding). Default
                None: the sequence starts from a zero state and nothing is kept.
            mode: 'auto', 'chunk' or 'recurrent'; default the layer's ``mode``.
        """
        mode = self.mode if mode is None else mode
        self._check(x, cache, mode)
        B, T, _ = x.shape
        H, K, HV, V = self.num_heads, self.head_dim, self.num_v_heads, self.head_v_dim
        needs_grad = self._needs_grad(x)
        if mode == "auto":
            mode = "recurrent" if (T <= RECURRENT_MAX_T and not needs_grad) else "chunk"
        if mode == "recurrent" and needs_grad:
            raise ValueError(f"{self._name()}: mode='recurrent' is forward-only (decoding) but "
                             "gradients are required; use mode='chunk' to train, or run under "
                             "torch.no_grad() / torch.inference_mode()")

        keep = cache is not None
        started = keep and cache.state is not None
        tails = (cache.conv_q, cache.conv_k, cache.conv_v) if started else (None, None, None)
        q, tail_q = _causal_conv(self.q_proj(x), self.q_conv1d, tails[0], keep)
        k, tail_k = _causal_conv(self.k_proj(x), self.k_conv1d, tails[1], keep)
        v, tail_v = _causal_conv(self.v_proj(x), self.v_conv1d, tails[2], keep)
        # Views before the pointwise ops: the op inputs are then fresh tensors, not views (Inductor
        # cannot order the symbolic strides of saved views under dynamic shapes).
        q = F.silu(q.view(B, T, H, K))
        k = F.silu(k.view(B, T, H, K))
        v = F.silu(v.view(B, T, HV, V))
        g = -self.A_log.float().exp()[:, None] * F.softplus(
            self.f_proj(x).float().view(B, T, H, K) + self.dt_bias.float().view(H, K))
        b = torch.sigmoid(self.b_proj(x).view(B, T, H, K))
        if self.allow_neg_eigval:
            b = b * 2.0
        w = torch.sigmoid(self.w_proj(x).view(B, T, HV, V))
        if HV != H:
            heads = torch.arange(HV, device=x.device) // (HV // H)   # value head j: key head j // G
            q, k, g, b = (t.index_select(2, heads) for t in (q, k, g, b))

        compiling = torch.compiler.is_compiling()
        if mode == "chunk":
            op = custom_ops.chunk_gdn2 if compiling else ops.chunk_gdn2
        else:
            op = custom_ops.fused_recurrent_gdn2 if compiling else ops.fused_recurrent_gdn2
        o, ht = op(q, k, v, g, b, w, initial_state=cache.state if started else None,
                   output_final_state=keep, use_qk_l2norm_in_kernel=True, validate_values=False)
        if keep:
            cache.state, cache.conv_q, cache.conv_k, cache.conv_v = ht, tail_q, tail_k, tail_v
            cache.layer_tag = self._tag

        o = F.rms_norm(o.float(), (V,), self.o_norm_weight.float(), self.norm_eps).to(x.dtype)
        o = o * F.silu(self.g_proj(x).view(B, T, HV, V))
        return self.o_proj(o.reshape(B, T, HV * V))


__all__ = ["GDN2Cache", "GatedDeltaNet2", "MODES", "RECURRENT_MAX_T"]
