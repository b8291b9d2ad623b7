"""GatedDeltaNet2: modes agree, prefill + decode == one forward, gradients, compile, errors."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import gdn2_kernels
from gdn2_kernels import GatedDeltaNet2, GDN2Cache, custom_ops, ops, reference
from gdn2_kernels.accuracy import rel_rms
from gdn2_kernels.inputs import make_inputs

# Layer outputs pass through projections and an RMSNorm; fp32 math on both sides.
TOL = 1e-4


@dataclass(frozen=True)
class LayerCase:
    hidden: int = 32
    H: int = 2
    K: int = 16
    HV: int | None = None
    V: int | None = None
    neg: bool = False
    conv: int = 4

    def label(self) -> str:
        return (f"D{self.hidden}-H{self.H}-K{self.K}-HV{self.HV or self.H}-V{self.V or self.K}"
                + ("-neg" if self.neg else "") + f"-W{self.conv}")

    def build(self, seed: int = 0, **kw) -> GatedDeltaNet2:
        torch.manual_seed(seed)
        return GatedDeltaNet2(hidden_size=self.hidden, num_heads=self.H, head_dim=self.K,
                              num_v_heads=self.HV, head_v_dim=self.V, conv_size=self.conv,
                              allow_neg_eigval=self.neg, **kw)


CASES = [
    LayerCase(),
    LayerCase(HV=4, V=24, neg=True),             # grouped value heads + negative eigenvalues
    LayerCase(hidden=24, H=1, K=20, HV=3, V=12, conv=2),
]


def _x(B: int, T: int, hidden: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, hidden, generator=torch.Generator().manual_seed(seed))


def _reference_chunk(q, k, v, g, b, w, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, **_):
    """Stand-in for ops.chunk_gdn2 with autograd (the fp32 token recurrence)."""
    o, ht = reference.naive_recurrent_gdn2(q, k, v, g, b, w, scale, initial_state,
                                           output_final_state, use_qk_l2norm_in_kernel,
                                           cu_seqlens)
    return o.to(q.dtype), ht


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_chunk_and_recurrent_modes_agree(case: LayerCase):
    layer = case.build()
    x = _x(2, 11, case.hidden)
    o_chunk = layer(x, mode="chunk")
    o_rec = layer(x, mode="recurrent")
    assert o_chunk.shape == x.shape and o_chunk.dtype == x.dtype
    assert rel_rms(o_rec, o_chunk) < TOL


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(case: LayerCase):
    layer = case.build()
    x = _x(3, 12, case.hidden)
    full = layer(x, mode="chunk")
    cache = GDN2Cache()
    outs = [layer(x[:, :5], cache=cache, mode="chunk")]
    outs += [layer(x[:, t:t + 1], cache=cache) for t in range(5, 9)]   # auto -> recurrent
    outs.append(layer(x[:, 9:12], cache=cache, mode="chunk"))           # a multi-token step
    assert rel_rms(torch.cat(outs, 1), full) < TOL
    assert cache.batch_size == 3
    assert cache.state.shape == (3, layer.num_v_heads, layer.head_dim, layer.head_v_dim)


@torch.no_grad()
def test_decode_from_first_token_with_init_cache():
    """Prefill shorter than the conv window, from an explicit zero cache."""
    case = CASES[1]
    layer = case.build()
    x = _x(2, 6, case.hidden)
    full = layer(x)
    cache = layer.init_cache(2)
    outs = [layer(x[:, t:t + 1], cache=cache, mode="recurrent") for t in range(6)]
    assert rel_rms(torch.cat(outs, 1), full) < TOL
    cache.reset()
    assert cache.state is None and cache.layer_tag is not None


def test_layer_matches_hand_written_forward():
    """The layer's math against docs/math.md "Layer", written out with the fp64 recurrence."""
    import torch.nn.functional as F

    case = CASES[1]
    layer = case.build().double()
    x = _x(2, 7, case.hidden).double()
    B, T, _ = x.shape
    H, K, HV, V, W = layer.num_heads, layer.head_dim, layer.num_v_heads, layer.head_v_dim, 4

    def conv(y, m):
        y = F.pad(y.transpose(1, 2), (W - 1, 0))
        return F.conv1d(y, m.weight, groups=y.shape[1]).transpose(1, 2)

    q = reference.l2norm(F.silu(conv(layer.q_proj(x), layer.q_conv1d)).view(B, T, H, K))
    k = reference.l2norm(F.silu(conv(layer.k_proj(x), layer.k_conv1d)).view(B, T, H, K))
    v = F.silu(conv(layer.v_proj(x), layer.v_conv1d)).view(B, T, HV, V)
    g = -layer.A_log.exp()[:, None] * F.softplus(layer.f_proj(x).view(B, T, H, K)
                                                  + layer.dt_bias.view(H, K))
    b = 2 * torch.sigmoid(layer.b_proj(x)).view(B, T, H, K)
    w = torch.sigmoid(layer.w_proj(x)).view(B, T, HV, V)
    rep = HV // H
    q, k, g, b = (t.repeat_interleave(rep, dim=2) for t in (q, k, g, b))
    o, _ = reference.naive_recurrent_gdn2(q, k, v, g, b, w)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.o_norm_weight
    o = o * F.silu(layer.g_proj(x).view(B, T, HV, V))
    ref = layer.o_proj(o.reshape(B, T, HV * V))

    layer32 = layer.float()
    with torch.no_grad():
        out = layer32(x.float(), mode="chunk")
    assert rel_rms(out, ref) < TOL


def test_paper_init():
    layer = GatedDeltaNet2(hidden_size=64, num_heads=2, head_dim=32)
    fan_in, fan_out = 64, 64
    bound = 2 ** -2.5 * (6 / (fan_in + fan_out)) ** 0.5
    assert layer.q_proj.weight.abs().max() <= bound
    assert layer.q_proj.weight.abs().max() > 0.8 * bound
    A = layer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert ((dt >= 1e-4 * 0.99) & (dt <= 0.1 * 1.01)).all()
    assert (layer.o_norm_weight == 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_layer(dtype):
    case = CASES[1]
    layer = case.build()
    x = _x(2, 9, case.hidden)
    ref = layer(x, mode="recurrent")
    layer = layer.to(dtype)
    out = layer(x.to(dtype), mode="recurrent")
    assert out.dtype == dtype
    assert rel_rms(out, ref) < 3e-2   # bf16/fp16 weights and activations end to end
    cache = GDN2Cache()
    layer(x[:, :4].to(dtype), cache=cache)
    assert cache.state.dtype == torch.float32 and cache.conv_v.dtype == dtype


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES[:2])
def test_gradients_flow_to_every_parameter(case: LayerCase, monkeypatch):
    """Layer plumbing with the op's backward stood in by the differentiable reference."""
    monkeypatch.setattr(ops, "chunk_gdn2", _reference_chunk)
    layer = case.build()
    x = _x(2, 8, case.hidden).requires_grad_()
    out = layer(x)                                # auto + grad -> chunk
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_layer_backward_with_chunk_kernels():
    case = CASES[1]
    layer = case.build()
    x = _x(2, 8, case.hidden).requires_grad_()
    out = layer(x, mode="chunk")
    out.square().mean().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    # Same loss through the reference op: the kernels' gradients must match it.
    ref_layer = case.build()
    x_ref = x.detach().clone().requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "chunk_gdn2", _reference_chunk)
        ref_layer(x_ref, mode="chunk").square().mean().backward()
    assert rel_rms(x.grad, x_ref.grad) < 1e-3
    for n, p in ref_layer.named_parameters():
        assert rel_rms(grads[n], p.grad) < 1e-3, n


# ---------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["chunk_gdn2", "fused_recurrent_gdn2"])
def test_custom_ops_opcheck(op):
    x = make_inputs(2, 5, 2, 16, 16, with_h0=True, seed=0)
    for final in (True, False):
        torch.library.opcheck(getattr(torch.ops.gdn2, op),
                              (x.q, x.k, x.v, x.g, x.b, x.w, x.h0, None, 0.25, final, True, False))


def test_custom_op_backward_delegates_to_ops(monkeypatch):
    monkeypatch.setattr(ops, "chunk_gdn2", _reference_chunk)
    x = make_inputs(2, 6, 2, 16, 16, with_h0=True, seed=2)
    xa, xb = x.to(requires_grad=True), x.to(requires_grad=True)
    o, ht = custom_ops.chunk_gdn2(xa.q, xa.k, xa.v, xa.g, xa.b, xa.w, initial_state=xa.h0,
                                  output_final_state=True)
    (o.sum() + ht.square().sum()).backward()
    o, ht = _reference_chunk(xb.q, xb.k, xb.v, xb.g, xb.b, xb.w, initial_state=xb.h0,
                             output_final_state=True)
    (o.sum() + ht.square().sum()).backward()
    for name in ("q", "k", "v", "g", "b", "w", "h0"):
        assert rel_rms(getattr(xa, name).grad, getattr(xb, name).grad) < 1e-5, name


@torch.no_grad()
def test_compile_fullgraph_prefill_and_decode():
    """No graph breaks (fullgraph) through both ops and the cache; aot_eager runs the fakes."""
    torch._dynamo.reset()
    case = CASES[1]
    layer = case.build()
    x = _x(2, 7, case.hidden)
    full = layer(x, mode="chunk")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert rel_rms(compiled(x, mode="chunk"), full) < TOL
    cache = GDN2Cache()
    outs = [compiled(x[:, :4], cache=cache, mode="chunk")]
    outs += [compiled(x[:, t:t + 1], cache=cache, mode="recurrent") for t in range(4, 7)]
    assert rel_rms(torch.cat(outs, 1), full) < TOL


def test_compile_fullgraph_training_step(monkeypatch):
    monkeypatch.setattr(ops, "chunk_gdn2", _reference_chunk)
    torch._dynamo.reset()
    case = CASES[0]
    layer = case.build()
    x = _x(2, 6, case.hidden)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x, mode="chunk").square().mean().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x, mode="chunk").square().mean().backward()
    for n, p in layer.named_parameters():
        assert rel_rms(grads[n], p.grad) < 1e-5, n


@pytest.mark.gpu
def test_compile_inductor_fullgraph_gpu():
    torch._dynamo.reset()
    layer = GatedDeltaNet2(hidden_size=512, num_heads=4, head_dim=64, num_v_heads=8,
                           device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 100, 512, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        full = layer(x, mode="chunk")
        assert rel_rms(compiled(x, mode="chunk"), full) < 1e-2
        cache = GDN2Cache()
        outs = [compiled(x[:, :90], cache=cache, mode="chunk")]
        outs += [compiled(x[:, t:t + 1], cache=cache, mode="recurrent") for t in range(90, 100)]
        assert rel_rms(torch.cat(outs, 1), full) < 1e-2
    x.requires_grad_()
    compiled(x, mode="chunk").float().square().mean().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_errors_bad_input():
    layer = CASES[0].build()
    with pytest.raises(ValueError, match="hidden_size=32"):
        layer(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"\[batch, seq_len, hidden_size"):
        layer(torch.randn(3, 32))
    with pytest.raises(ValueError, match="seq_len 0"):
        layer(torch.randn(2, 0, 32))
    with pytest.raises(TypeError, match="dtype torch.float16.*float32"):
        layer(torch.randn(2, 3, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="mode must be one of"):
        layer(torch.randn(2, 3, 32), mode="fused")
    with pytest.raises(ValueError, match="mode='recurrent' is forward-only"):
        layer(torch.randn(2, 3, 32), mode="recurrent")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        GatedDeltaNet2(hidden_size=32, num_heads=2, head_dim=16, num_v_heads=3)


BAD_LAYER_ARGS = [
    (dict(num_heads=0), ValueError, "GatedDeltaNet2: num_heads must be >= 1, got 0"),
    (dict(num_heads=-2), ValueError, "GatedDeltaNet2: num_heads must be >= 1, got -2"),
    (dict(num_heads=2.0), TypeError, "GatedDeltaNet2: num_heads must be an int, got 2.0"),
    (dict(num_heads=True), TypeError, "GatedDeltaNet2: num_heads must be an int, got True"),
    (dict(hidden_size=0), ValueError, "GatedDeltaNet2: hidden_size must be >= 1, got 0"),
    (dict(head_dim=0), ValueError, "GatedDeltaNet2: head_dim must be between 1 and 256, got 0"),
    (dict(head_dim=512), ValueError, "GatedDeltaNet2: head_dim must be between 1 and 256"),
    (dict(num_v_heads=0), ValueError, "GatedDeltaNet2: num_v_heads must be >= 1, got 0"),
    (dict(head_v_dim=300), ValueError, "GatedDeltaNet2: head_v_dim must be between 1 and 256"),
    (dict(head_v_dim="64"), TypeError, "GatedDeltaNet2: head_v_dim must be an int, got '64'"),
    (dict(conv_size=0), ValueError, "GatedDeltaNet2: conv_size must be >= 1, got 0"),
    (dict(norm_eps=0.0), ValueError, "GatedDeltaNet2: norm_eps must be a positive finite"),
    (dict(norm_eps=float("nan")), ValueError, "GatedDeltaNet2: norm_eps must be a positive"),
    (dict(allow_neg_eigval="False"), TypeError,
     "GatedDeltaNet2: allow_neg_eigval must be True or False, got 'False'"),
    (dict(conv_bias=1), TypeError, "GatedDeltaNet2: conv_bias must be True or False, got 1"),
]


@pytest.mark.parametrize("changes, exc, message", BAD_LAYER_ARGS,
                         ids=[",".join(f"{k}={v!r}" for k, v in c[0].items())
                              for c in BAD_LAYER_ARGS])
def test_constructor_arguments_are_checked(changes, exc, message):
    args = dict(hidden_size=32, num_heads=2, head_dim=16)
    args.update(changes)
    with pytest.raises(exc) as info:
        GatedDeltaNet2(**args)
    assert str(info.value).startswith(message)


@torch.no_grad()
def test_errors_bad_cache():
    layer, other = CASES[0].build(), CASES[0].build()
    cache = GDN2Cache()
    layer(torch.randn(2, 3, 32), cache=cache)
    with pytest.raises(ValueError, match="belongs to another GatedDeltaNet2 layer"):
        other(torch.randn(2, 1, 32), cache=cache)
    with pytest.raises(ValueError, match="holds 2 sequences but x has batch size 4"):
        layer(torch.randn(4, 1, 32), cache=cache)
    with pytest.raises(TypeError, match="must be a GDN2Cache"):
        layer(torch.randn(2, 1, 32), cache={"state": None})
    half = CASES[0].build().half()
    cache16 = GDN2Cache()
    half(torch.randn(2, 3, 32).half(), cache=cache16)
    half.float()
    with pytest.raises(TypeError, match="conv tails must be torch.float32"):
        half(torch.randn(2, 1, 32), cache=cache16)


def test_exports():
    assert gdn2_kernels.GatedDeltaNet2 is GatedDeltaNet2
    assert gdn2_kernels.fused_recurrent_gdn2 is ops.fused_recurrent_gdn2
