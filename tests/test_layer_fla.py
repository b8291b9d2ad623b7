"""GatedDeltaNet2 under flash-linear-attention 0.6.0's layer contract: constructor order, the
FLA-style forward (padding mask, FLA's cache object, packed sequences, ``(o, None, cache)``),
checked against our own contract on the unpadded sequences."""
from __future__ import annotations

import inspect

import pytest
import torch

from gdn2_kernels import GatedDeltaNet2, GDN2Cache
from gdn2_kernels.accuracy import rel_rms

TOL = 2e-4

# flash-linear-attention 0.6.0's fla/layers/gdn2.py, in order.
FLA_INIT = ["hidden_size", "expand_v", "head_dim", "num_heads", "num_v_heads", "mode",
            "use_short_conv", "allow_neg_eigval", "conv_size", "conv_bias", "layer_idx",
            "norm_eps"]
FLA_FORWARD = ["hidden_states", "attention_mask", "past_key_values", "use_cache",
               "output_attentions"]


class ListCache:
    """FLA's cache object as its layers use it (``LegacyFLACache``'s interface)."""

    def __init__(self) -> None:
        self.states: list[dict] = []
        self.seen = 0

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> dict:
        return self.states[i]

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None,
               layer_idx: int = 0, offset: int = 1, cache_kwargs=None) -> dict:
        if len(self.states) <= layer_idx:
            self.states.append(dict(recurrent_state=recurrent_state, attn_state=None,
                                    conv_state=conv_state, ffn_state=None))
        else:
            st = self.states[layer_idx]
            if recurrent_state is not None:
                st["recurrent_state"] = recurrent_state
            if conv_state is not None:
                st["conv_state"] = conv_state
        self.seen += offset
        return self.states[layer_idx]


def _layer(**kw) -> GatedDeltaNet2:
    torch.manual_seed(0)
    args = dict(hidden_size=32, head_dim=16, num_heads=2, num_v_heads=4, layer_idx=0)
    args.update(kw)
    return GatedDeltaNet2(**args)


def test_signatures_follow_fla():
    init = list(inspect.signature(GatedDeltaNet2.__init__).parameters)[1:len(FLA_INIT) + 1]
    assert init == FLA_INIT
    fwd = list(inspect.signature(GatedDeltaNet2.forward).parameters)[1:len(FLA_FORWARD) + 1]
    assert fwd == FLA_FORWARD


def test_positional_construction_as_fla():
    layer = GatedDeltaNet2(64, 0.5, 16, 4, 8, "chunk", True, False, 4, False, 3, 1e-6)
    assert (layer.hidden_size, layer.head_dim, layer.num_heads, layer.num_v_heads) == (64, 16, 4, 8)
    assert layer.head_v_dim == 8 and layer.layer_idx == 3 and layer.norm_eps == 1e-6
    with pytest.raises(ValueError, match="expand_v=0.3 times head_dim=16 is not an integer"):
        GatedDeltaNet2(64, 0.3, 16, 4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'fuse_norm'"):
        GatedDeltaNet2(64, fuse_norm=True)


@torch.no_grad()
def test_fla_call_returns_a_triple_equal_to_our_call():
    layer = _layer()
    x = torch.randn(2, 9, 32)
    ours = layer(x)
    o, attn, cache = layer(hidden_states=x, attention_mask=None, past_key_values=None,
                           use_cache=False, output_attentions=False)
    assert attn is None and cache is None
    assert rel_rms(o, ours) < TOL


@pytest.mark.parametrize("grad", [False, True], ids=["recurrent", "chunk-grad"])
def test_left_padding_equals_the_unpadded_sequences(grad: bool):
    layer = _layer(conv_bias=True)
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0                               # sequence 0: 7 real tokens, left-padded
    with torch.set_grad_enabled(grad):
        o, _, _ = layer(x, attention_mask=mask)
        ref0 = layer(x[:1, 5:], mode="chunk")
        ref1 = layer(x[1:], mode="chunk")
    assert torch.all(o[0, :5] == 0)
    assert rel_rms(o[0, 5:], ref0[0]) < TOL and rel_rms(o[1], ref1[0]) < TOL
    if grad:
        o.sum().backward()
        assert torch.isfinite(layer.q_proj.weight.grad).all()


@torch.no_grad()
@pytest.mark.parametrize("short_conv", [True, False])
def test_fla_cache_prefill_then_decode(short_conv: bool):
    layer = _layer(use_short_conv=short_conv)
    x = torch.randn(2, 10, 32)
    full = layer(x, mode="chunk")
    cache = ListCache()
    mask = torch.ones(2, 6, dtype=torch.long)
    o, _, ret = layer(x[:, :6], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert ret is cache and len(cache) == 1 and cache.seen == 6
    outs = [o]
    for t in range(6, 10):
        mask = torch.ones(2, t + 1, dtype=torch.long)
        o, _, _ = layer(x[:, t:t + 1], attention_mask=mask, past_key_values=cache,
                        use_cache=True)
        outs.append(o)
    assert rel_rms(torch.cat(outs, 1), full) < TOL
    state = cache[0]["recurrent_state"]
    assert state.shape == (2, 4, 16, 16) and state.dtype == torch.float32


@torch.no_grad()
def test_fla_cache_with_left_padded_prompt():
    layer = _layer()
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    cache = ListCache()
    layer(x[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
    o, _, _ = layer(x[:, 6:7], attention_mask=mask[:, :7], past_key_values=cache, use_cache=True)
    ref = layer(x[1:, 3:7], mode="chunk")
    assert rel_rms(o[1, 0], ref[0, -1]) < TOL


@torch.no_grad()
def test_our_cache_through_past_key_values():
    layer = _layer()
    x = torch.randn(1, 7, 32)
    cache = GDN2Cache()
    _, _, ret = layer(x[:, :4], past_key_values=cache, use_cache=True)
    assert ret is cache and cache.state is not None
    o, _, _ = layer(x[:, 4:], past_key_values=cache, use_cache=True)
    assert rel_rms(o, layer(x, mode="chunk")[:, 4:]) < TOL


@torch.no_grad()
def test_packed_sequences_with_cu_seqlens():
    layer = _layer()
    x = torch.randn(1, 13, 32)
    cu = torch.tensor([0, 2, 9, 13])
    cache = ListCache()
    o, _, _ = layer(x, past_key_values=cache, use_cache=True, cu_seqlens=cu)
    for s, e in ((0, 2), (2, 9), (9, 13)):
        assert rel_rms(o[:, s:e], layer(x[:, s:e], mode="chunk")) < TOL
    # one more token per sequence, packed again, continues each sequence
    step = torch.randn(1, 3, 32)
    o2, _, _ = layer(step, past_key_values=cache, use_cache=True,
                     cu_seqlens=torch.tensor([0, 1, 2, 3]))
    for n, (s, e) in enumerate(((0, 2), (2, 9), (9, 13))):
        ref = layer(torch.cat([x[:, s:e], step[:, n:n + 1]], 1), mode="chunk")
        assert rel_rms(o2[:, n], ref[:, -1]) < TOL


def test_fla_contract_errors():
    layer = _layer(layer_idx=None)
    x = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="needs the layer's layer_idx"):
        layer(x, past_key_values=ListCache(), use_cache=True)
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, seq_len >= 3\]"):
        layer(x, attention_mask=torch.ones(1, 2))
    with pytest.raises(TypeError, match="either our cache= or FLA's past_key_values="):
        layer(x, past_key_values=ListCache(), cache=GDN2Cache())
    with pytest.raises(TypeError, match="second positional argument is FLA's attention_mask"):
        layer(x, GDN2Cache())


def test_fla_cache_object_from_flash_linear_attention():
    cache_utils = pytest.importorskip("fla.models.cache_utils")
    layer = _layer()
    x = torch.randn(2, 5, 32)
    cache = cache_utils.FLACache()
    with torch.no_grad():
        layer(x[:, :4], past_key_values=cache, use_cache=True)
        o, _, _ = layer(x[:, 4:], past_key_values=cache, use_cache=True)
        assert rel_rms(o, layer(x, mode="chunk")[:, 4:]) < TOL
