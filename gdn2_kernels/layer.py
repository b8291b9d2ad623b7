"""``GatedDeltaNet2``: the GDN-2 token mixer (docs/math.md "Layer") and its decode cache.

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

The layer also keeps flash-linear-attention 0.6.0's contract for ``fla.layers.GatedDeltaNet2``:
its constructor arguments in its order, and, when a call passes any of FLA's forward arguments
(``attention_mask``, ``past_key_values``, ``use_cache``, ``output_attentions``, ``cu_seqlens``),
FLA's forward: a 0/1 padding mask (left padding: padded tokens are kept out of the state, the
convolutions and the output, which is zero there), FLA's cache object (``past_key_values[layer_idx]``
read, ``past_key_values.update(...)`` written), and ``(o, None, past_key_values)`` returned. A
call with only ``x`` (and our ``cache=`` / ``mode=``) returns the output tensor as before.
Parameters are the paper's layer (docs/math.md), not FLA's: checkpoints do not transfer (to run
an FLA model on these kernels, see ``gdn2_kernels.integrations.fla``).
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

MODES = ("auto", "chunk", "recurrent", "fused_recurrent")  # fused_recurrent: FLA's name


class _FlaDefault:
    """The default of one of FLA's forward arguments; its presence means the caller did not pass
    the argument (so a call without any of them keeps our contract)."""

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


_NO_MASK, _NO_CACHE, _NO_USE_CACHE, _NO_OUTPUT_ATTENTIONS = (
    _FlaDefault(None), _FlaDefault(None), _FlaDefault(False), _FlaDefault(False))
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


def _causal_conv_varlen(x: torch.Tensor, conv: nn.Conv1d, cu_seqlens: torch.Tensor,
                       tails: torch.Tensor | None, keep_tail: bool):
    """:func:`_causal_conv` for sequences packed along T (``x`` ``[1, T, D]``, boundaries
    ``cu_seqlens``), each continuing from its row of ``tails`` ``[N, W-1, D]`` (or zeros).

    Returns the output ``[1, T, D]`` and, if ``keep_tail``, each sequence's new tail.
    """
    T, D = x.shape[1], x.shape[2]
    W = conv.kernel_size[0]
    N = cu_seqlens.shape[0] - 1
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(N, device=x.device), lens, output_size=T)
    pos = torch.arange(T, device=x.device) - cu_seqlens[:-1].long()[seq]        # offset in its seq
    hist = tails if tails is not None else x.new_zeros(N, max(W - 1, 1), D)
    xs = x[0]
    weight = conv.weight[:, 0, :]                                                # [D, W]

    def at(lag: torch.Tensor | int, p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Input ``lag`` tokens before offset ``p`` of sequence ``s``: from x or the history."""
        src = p - lag
        from_x = (src >= 0)[:, None]
        xi = xs[(cu_seqlens[:-1].long()[s] + src.clamp(min=0)).clamp(max=max(T - 1, 0))]
        hi = hist[s, (W - 1 + src).clamp(min=0, max=max(W - 2, 0))]
        return torch.where(from_x, xi, hi if W > 1 else torch.zeros_like(xi))

    y = sum(at(j, pos, seq) * weight[:, W - 1 - j] for j in range(W))
    if conv.bias is not None:
        y = y + conv.bias
    if not keep_tail:
        return y[None], None
    ends = lens.long()                                                           # offset past end
    idx = torch.arange(N, device=x.device)
    new_tail = torch.stack([at(W - 1 - i, ends, idx) for i in range(W - 1)], 1) if W > 1 else hist
    return y[None], new_tail.contiguous()


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
    """Gated DeltaNet-2 token mixer (docs/math.md "Layer"); input and output
    ``[B, T, hidden_size]``.

    Args (flash-linear-attention 0.6.0's, in its order, then ours keyword-only):
        hidden_size: model width d_model. Default 2048.
        expand_v: d_v / d_k (``head_v_dim = head_dim * expand_v``, an integer). Default 1.0.
        head_dim: key head dim d_k. Default 128.
        num_heads: key heads H. Default 16.
        num_v_heads: value heads H_v, a multiple of H (grouped value heads). Default H.
        mode: 'auto' (recurrent kernel for calls of <= 64 tokens that need no grad, else chunk),
            'chunk' or 'recurrent' (forward only; FLA's name 'fused_recurrent' is accepted).
            Default 'auto'. ``forward`` can override it; FLA-style calls choose as FLA does.
        use_short_conv: the short causal convolutions on q, k, v (else SiLU only). Default True.
        allow_neg_eigval: erase gate in [0, 2] instead of [0, 1]. Default False.
        conv_size: taps of the short causal convolutions. Default 4.
        conv_bias: bias in the convolutions. Default False.
        layer_idx: index in the model: the slot of FLA's cache object, and in error messages.
        norm_eps: epsilon of the output RMSNorm. Default 1e-5.
        head_v_dim: value head dim d_v, instead of ``expand_v``. Default ``head_dim * expand_v``.
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        expand_v: float = 1.0,
        head_dim: int = 128,
        num_heads: int = 16,
        num_v_heads: int | None = None,
        mode: str = "auto",
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        norm_eps: float = 1e-5,
        *,
        head_v_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        _check_arguments(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim,
                         num_v_heads=num_v_heads,
                         head_v_dim=head_dim if head_v_dim is None else head_v_dim,
                         conv_size=conv_size, conv_bias=conv_bias,
                         allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps)
        if head_v_dim is None:
            head_v_dim = int(head_dim * expand_v)
            if not math.isclose(head_dim * expand_v, head_v_dim, rel_tol=1e-5):
                raise ValueError(f"GatedDeltaNet2: expand_v={expand_v} times head_dim={head_dim} "
                                 "is not an integer value head dim; choose expand_v so it is, or "
                                 "pass head_v_dim")
        elif expand_v != 1.0 and head_v_dim != int(head_dim * expand_v):
            raise ValueError(f"GatedDeltaNet2: head_v_dim={head_v_dim} contradicts "
                             f"expand_v={expand_v} (head_dim={head_dim}); pass one of them")
        if num_v_heads % num_heads != 0:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_heads "
                             f"({num_heads}): each group of value heads shares one key head")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.hidden_size = hidden_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_v_heads, self.head_v_dim = num_v_heads, head_v_dim
        self.conv_size = conv_size
        self.use_short_conv = bool(use_short_conv)
        self.expand_v = head_v_dim / head_dim
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
        if self.use_short_conv:
            self.q_conv1d = nn.Conv1d(key_dim, key_dim, conv_size, groups=key_dim,
                                      bias=conv_bias, **kw)
            self.k_conv1d = nn.Conv1d(key_dim, key_dim, conv_size, groups=key_dim,
                                      bias=conv_bias, **kw)
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
        for conv in self._convs():
            conv.reset_parameters()
        # A in [1, 16]; dt in [1e-3, 1e-1] log-uniformly, dt_bias = softplus^-1(dt).
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(
            math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.o_norm_weight.fill_(1.0)

    def _convs(self) -> tuple[nn.Conv1d, ...]:
        return (self.q_conv1d, self.k_conv1d, self.v_conv1d) if self.use_short_conv else ()

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, num_v_heads={self.num_v_heads}, "
                f"head_v_dim={self.head_v_dim}, use_short_conv={self.use_short_conv}, "
                f"conv_size={self.conv_size}, "
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
            conv_q=self._zero_tail(batch_size, W, kd, w.dtype, device),
            conv_k=self._zero_tail(batch_size, W, kd, w.dtype, device),
            conv_v=self._zero_tail(batch_size, W, vd, w.dtype, device),
            layer_tag=self._tag,
        )

    def _zero_tail(self, B: int, W: int, D: int, dtype, device) -> torch.Tensor | None:
        return torch.zeros(B, W, D, dtype=dtype, device=device) if self.use_short_conv else None

    # --------------------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, cache: GDN2Cache | None, mode: str,
               num_seqs: int | None = None) -> None:
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
        B = x.shape[0] if num_seqs is None else num_seqs
        if cache.state.shape[0] != B:
            raise ValueError(f"{name}: the cache holds {cache.state.shape[0]} sequences but x has "
                             f"batch size {B}; use a new cache (or cache.reset()) for a new batch")
        expect = (B, self.num_v_heads, self.head_dim, self.head_v_dim)
        if tuple(cache.state.shape) != expect or cache.state.dtype != torch.float32:
            raise ValueError(f"{name}: cache.state must be float32 {expect}, got "
                             f"{cache.state.dtype} {tuple(cache.state.shape)}")
        for tail in ((cache.conv_q, cache.conv_k, cache.conv_v) if self.use_short_conv else ()):
            if tail is None or tail.dtype != x.dtype or tail.device != x.device:
                raise TypeError(f"{name}: the cache's conv tails must be {x.dtype} on {x.device} "
                                "like x; was the cache filled at another dtype? Use a new cache")

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, hidden_states: torch.Tensor, attention_mask=_NO_MASK,
                past_key_values=_NO_CACHE, use_cache=_NO_USE_CACHE,
                output_attentions=_NO_OUTPUT_ATTENTIONS, *, cache: GDN2Cache | None = None,
                mode: str | None = None, **kwargs):
        """Mix ``hidden_states`` ``[B, T, hidden_size]``.

        Our contract (only ``hidden_states``, and ``cache`` / ``mode``): returns the output
        ``[B, T, hidden_size]`` in the input's dtype.

        FLA's contract (any of the arguments below passed): returns ``(o, None, past_key_values)``.

        Args:
            hidden_states: input, in the parameters' dtype and device.
            attention_mask: FLA's ``[B, T_total]`` 0/1 padding mask (its last T columns cover this
                call); padded tokens leave the state and the convolutions untouched and give zero
                output. Default None.
            past_key_values: FLA's cache object (``len``, ``[layer_idx]`` giving a dict with
                ``recurrent_state`` and ``conv_state``, ``update(..., layer_idx=, offset=)``), or
                a :class:`GDN2Cache`. Needs ``layer_idx``. Default None.
            use_cache: write the new state into ``past_key_values``. Default False.
            output_attentions: accepted (FLA returns no attention weights either).
            cache: our :class:`GDN2Cache`, continued from and updated in place. Default None.
            mode: 'auto', 'chunk' or 'recurrent' ('fused_recurrent'); default the layer's.
            **kwargs: FLA's pass-through keywords; ``cu_seqlens`` (``[N + 1]``, B == 1: packed
                sequences) is honoured, others are ignored as FLA does.
        """
        fla = (kwargs or any(not isinstance(a, _FlaDefault) for a in
                             (attention_mask, past_key_values, use_cache, output_attentions)))
        if not fla:
            return self._mix(hidden_states, cache, mode)
        if cache is not None:
            raise TypeError(f"{self._name()}: pass either our cache= or FLA's past_key_values=, "
                            "not both")
        return self._forward_fla(
            hidden_states,
            None if isinstance(attention_mask, _FlaDefault) else attention_mask,
            None if isinstance(past_key_values, _FlaDefault) else past_key_values,
            bool(use_cache.value if isinstance(use_cache, _FlaDefault) else use_cache),
            mode, kwargs.get("cu_seqlens"))

    # --------------------------------------------------------------------------------------------
    # FLA's contract
    # --------------------------------------------------------------------------------------------

    def _forward_fla(self, x, attention_mask, past_key_values, use_cache: bool, mode,
                     cu_seqlens) -> tuple[torch.Tensor, None, object]:
        name = self._name()
        if isinstance(attention_mask, GDN2Cache):
            raise TypeError(f"{name}: the second positional argument is FLA's attention_mask; "
                            "pass our cache as cache=...")
        T = x.shape[1] if isinstance(x, torch.Tensor) and x.ndim == 3 else 0
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 \
                    or attention_mask.shape[0] != x.shape[0] or attention_mask.shape[1] < T:
                raise ValueError(f"{name}: attention_mask must be a [batch, seq_len >= {T}] 0/1 "
                                 "padding mask, got "
                                 f"{getattr(attention_mask, 'shape', type(attention_mask))}")
            if cu_seqlens is not None:
                raise ValueError(f"{name}: pass attention_mask or cu_seqlens, not both")
            mask = attention_mask[:, -T:] != 0
        fla_cache = past_key_values is not None and not isinstance(past_key_values, GDN2Cache)
        cache = past_key_values if isinstance(past_key_values, GDN2Cache) else None
        if fla_cache:
            if self.layer_idx is None:
                raise ValueError(f"{name}: FLA's cache needs the layer's layer_idx (its slot); "
                                 "construct the layer with layer_idx=...")
            last = (past_key_values[self.layer_idx] if len(past_key_values) > self.layer_idx
                    else None)
            cache = self._cache_from_fla(last)
        if cache is not None and not use_cache:
            cache = GDN2Cache(cache.state, cache.conv_q, cache.conv_k, cache.conv_v,
                              cache.layer_tag) if cache.state is not None else None
        if mode is None:
            # FLA's choice: chunk with gradients; the recurrent kernel for short inference calls.
            if torch.is_grad_enabled():
                mode = "chunk"
            elif T <= RECURRENT_MAX_T and not self.training:
                mode = "recurrent"
            else:
                mode = "chunk" if self.mode == "auto" else self.mode
        o = self._mix(x, cache, mode, mask=mask, cu_seqlens=cu_seqlens)
        if fla_cache and use_cache:
            conv = ((cache.conv_q, cache.conv_k, cache.conv_v) if self.use_short_conv else None)
            past_key_values.update(recurrent_state=cache.state, conv_state=conv,
                                   layer_idx=self.layer_idx, offset=T)
        return o, None, past_key_values

    def _cache_from_fla(self, last) -> GDN2Cache:
        """Our cache view of this layer's entry in FLA's cache (an empty one before the first)."""
        if last is None or last.get("recurrent_state") is None:
            return GDN2Cache(layer_tag=self._tag)
        conv = last.get("conv_state") or (None, None, None)
        return GDN2Cache(last["recurrent_state"], *conv, layer_tag=self._tag)

    # --------------------------------------------------------------------------------------------

    def _mix(self, x: torch.Tensor, cache: GDN2Cache | None, mode: str | None, *,
             mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's math (our contract's forward); ``mask`` ``[B, T]`` (True = real token)
        and ``cu_seqlens`` (packed sequences, B == 1) come from FLA-style calls."""
        mode = self.mode if mode is None else mode
        N = None
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 \
                    or cu_seqlens.numel() < 2:
                raise ValueError(f"{self._name()}: cu_seqlens must be a 1-D [N + 1] tensor")
            N = cu_seqlens.numel() - 1
        self._check(x, cache, mode, N)
        if mode == "fused_recurrent":
            mode = "recurrent"
        B, T, _ = x.shape
        H, K, HV, V = self.num_heads, self.head_dim, self.num_v_heads, self.head_v_dim
        needs_grad = self._needs_grad(x)
        if mode == "auto":
            mode = "recurrent" if (T <= RECURRENT_MAX_T and not needs_grad) else "chunk"
        if mode == "recurrent" and needs_grad:
            raise ValueError(f"{self._name()}: mode='recurrent' is forward-only (decoding) but "
                             "gradients are required; use mode='chunk' to train, or run under "
                             "torch.no_grad() / torch.inference_mode()")

        x_in = x
        if mask is not None:
            # Padded tokens: zero inputs (so zero convolution history) and, below, k = 0 and
            # g = 0, which leave the state untouched: S <- Diag(1) S + 0.
            x_in = x * mask[..., None].to(x.dtype)
        keep = cache is not None
        started = keep and cache.state is not None
        tails = (cache.conv_q, cache.conv_k, cache.conv_v) if started else (None, None, None)
        q, tail_q = self._short_conv(self.q_proj(x_in), "q_conv1d", tails[0], keep, cu_seqlens)
        k, tail_k = self._short_conv(self.k_proj(x_in), "k_conv1d", tails[1], keep, cu_seqlens)
        v, tail_v = self._short_conv(self.v_proj(x_in), "v_conv1d", tails[2], keep, cu_seqlens)
        # Views before the pointwise ops: the op inputs are then fresh tensors, not views (Inductor
        # cannot order the symbolic strides of saved views under dynamic shapes).
        q = F.silu(q.view(B, T, H, K))
        k = F.silu(k.view(B, T, H, K))
        v = F.silu(v.view(B, T, HV, V))
        g = -self.A_log.float().exp()[:, None] * F.softplus(
            self.f_proj(x_in).float().view(B, T, H, K) + self.dt_bias.float().view(H, K))
        if mask is not None:
            m = mask[:, :, None, None]
            k = k * m.to(k.dtype)
            g = g * m.to(g.dtype)
        b = torch.sigmoid(self.b_proj(x_in).view(B, T, H, K))
        if self.allow_neg_eigval:
            b = b * 2.0
        w = torch.sigmoid(self.w_proj(x_in).view(B, T, HV, V))
        if HV != H:
            heads = torch.arange(HV, device=x.device) // (HV // H)   # value head j: key head j // G
            q, k, g, b = (t.index_select(2, heads) for t in (q, k, g, b))

        compiling = torch.compiler.is_compiling()
        if mode == "chunk":
            op = custom_ops.chunk_gdn2 if compiling else ops.chunk_gdn2
        else:
            op = custom_ops.fused_recurrent_gdn2 if compiling else ops.fused_recurrent_gdn2
        extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        o, ht = op(q, k, v, g, b, w, initial_state=cache.state if started else None,
                   output_final_state=keep, use_qk_l2norm_in_kernel=True, **extra)
        if keep:
            cache.state, cache.conv_q, cache.conv_k, cache.conv_v = ht, tail_q, tail_k, tail_v
            cache.layer_tag = self._tag

        o = F.rms_norm(o.float(), (V,), self.o_norm_weight.float(), self.norm_eps).to(x.dtype)
        o = o * F.silu(self.g_proj(x).view(B, T, HV, V))
        out = self.o_proj(o.reshape(B, T, HV * V))
        if mask is not None:
            out = out * mask[..., None].to(out.dtype)
        return out

    def _short_conv(self, x: torch.Tensor, name: str, tail: torch.Tensor | None, keep: bool,
                    cu_seqlens: torch.Tensor | None):
        if not self.use_short_conv:
            return x, None
        conv = getattr(self, name)
        if cu_seqlens is not None:
            return _causal_conv_varlen(x, conv, cu_seqlens, tail, keep)
        return _causal_conv(x, conv, tail, keep)


__all__ = ["GDN2Cache", "GatedDeltaNet2", "MODES", "RECURRENT_MAX_T"]
