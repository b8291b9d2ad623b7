"""Provider registry: data, availability with reasons, the mamba loader."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from gdn2_kernels.bench import providers
from gdn2_kernels.bench.providers import (Provider, Registry, Unavailable, default_registry,
                                          load_provider)


def test_default_registry_as_data():
    r = default_registry()
    names = r.names()
    for n in ("gdn2", "gdn2-kda", "fla-gdn2", "fla-kda", "fla-gdn", "sdpa-flash", "sdpa-cudnn",
              "mamba2", "cudnn-kda"):
        assert n in names
    assert {n for n in names if r.get(n).long_context} == {"gdn2", "gdn2-kda", "cudnn-kda"}
    assert r.get("cudnn-kda").baseline and r.get("cudnn-kda").family == "kda"
    ours = [r.get(n) for n in names if not r.get(n).baseline]
    assert {p.name for p in ours} == {"gdn2", "gdn2-kda", "gdn2-decode"}
    assert r.get("fla-gdn2-decode").fwd_only and not r.get("fla-gdn2").fwd_only
    assert "decode" in r.get("sdpa-flash").modes and "decode" not in r.get("fla-kda").modes


def test_registry_rejects_duplicates_and_names_the_choices():
    r = Registry()
    p = Provider("x", "x", "gdn2", True, False, ("fwd",), lambda: None, lambda *a: None)
    r.register(p)
    with pytest.raises(ValueError, match="already"):
        r.register(p)
    with pytest.raises(KeyError, match="available: x"):
        r.get("y")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reason")
def test_every_provider_unavailable_without_cuda_with_reason():
    for p in default_registry().providers.values():
        st = providers.status(p)
        assert not st.available
        assert "no CUDA device" in st.reason


def test_unavailable_reason_is_returned_not_raised():
    def load():
        raise Unavailable("nope: reason")
    p = Provider("x", "x", "gdn2", True, False, ("fwd",), load, lambda *a: None)
    assert load_provider(p) == (None, "nope: reason")


def test_mamba_loader_reports_missing_sources(tmp_path, monkeypatch):
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "mamba_ssm"}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.setattr(providers, "REPO_MAMBA_SRC", tmp_path / "nothing")
    monkeypatch.setattr(providers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(Unavailable, match="sources not found"):
        providers.load_mamba_ssd()
    assert "mamba_ssm" not in sys.modules


def test_mamba_loader_bypasses_package_init(tmp_path, monkeypatch):
    """A package __init__ that would fail (like mamba's CUDA extensions) is never run."""
    root = tmp_path / "src"
    pkg = root / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('selective_scan_cuda')\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text(
        "def mamba_chunk_scan_combined(*a, **k):\n    return 'ssd'\n")
    (pkg / "ops" / "triton" / "selective_state_update.py").write_text(
        "def selective_state_update(*a, **k):\n    return 'ssu'\n")
    for k in [k for k in sys.modules if k.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, k)
    try:
        ns = providers.load_mamba_ssd(root)
        assert ns.chunk_scan() == "ssd" and ns.state_update() == "ssu"
        assert ns.source == str(root)
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "mamba_ssm"]:
            del sys.modules[k]


def test_mamba_decode_step_passes_what_selective_state_update_needs():
    """Mamba's state update reads dt_bias's strides on the tied-head-dim path (dt and A broadcast
    with stride 0, as our step passes them) and unpacks D's strides at launch, so the step must
    pass both, of shape (h, p) (a missing D failed on the H100: "Value after * must be an
    iterable")."""
    import types

    from gdn2_kernels.bench.inputs import ProblemInputs
    from gdn2_kernels.bench.model import Shape

    calls = []

    def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        _, nheads, dim, dstate = state.shape
        assert x.shape == dt.shape == (state.shape[0], nheads, dim)
        assert A.shape == (nheads, dim, dstate) and B.shape == C.shape
        tied = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0
        assert tied and dt_bias.shape == (nheads, dim) and dt_bias.stride(-1) == 0
        assert not dt_bias.any()  # zeros: dt reaches the kernel unchanged
        assert D is not None and D.shape == (nheads, dim) and not D.any()
        calls.append(1)
        return x

    inputs = ProblemInputs(Shape(2, 1, 16, 128, "float32", 64), "cpu", 0)
    op = types.SimpleNamespace(state_update=state_update)
    providers._mamba_step(op, inputs, "decode")()
    assert calls == [1]


def test_mamba_decode_step_runs_the_real_state_update(monkeypatch):
    """Where Mamba's sources are at hand (``.whl/mamba_ssd``, carried for the device), the step
    runs its real selective_state_update through the interpreter and matches the recurrence."""
    try:
        ns = providers.load_mamba_ssd()
    except providers.Unavailable as exc:
        pytest.skip(f"Mamba's sources are not here: {exc}")
    from gdn2_kernels.bench.inputs import ProblemInputs
    from gdn2_kernels.bench.model import Shape

    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    inputs = ProblemInputs(Shape(2, 1, 16, 128, "float32", 64), "cpu", 0)
    t = inputs.mamba()
    state0 = t["state"].clone()
    y = providers._mamba_step(ns, inputs, "decode")()
    # h <- exp(dt A) h + dt x B^T ; y = h C  (per batch, head; dt per head)
    dt = t["dt"][:, 0].double()
    decay = torch.exp(dt * t["A"].double())[..., None, None]
    xs, Bm, Cm = (t[n][:, 0].double() for n in ("x", "B", "C"))
    group = torch.arange(xs.shape[1]) * Bm.shape[1] // xs.shape[1]
    h = decay * state0.double() + dt[..., None, None] * xs[..., None] * Bm[:, group, None, :]
    want = (h * Cm[:, group, None, :]).sum(-1)
    assert torch.allclose(y.double(), want, rtol=1e-4, atol=1e-4)


def test_our_ops_are_timed_as_users_call_them():
    """The bench times the default call (with its in-kernel g check), not a faster variant."""
    from gdn2_kernels import ops

    assert providers._load_ours() is ops.chunk_gdn2
    assert providers._load_ours_decode() is ops.fused_recurrent_gdn2


def test_cudnn_kda_declines_cleanly_without_the_package(monkeypatch):
    """Without nvidia-cudnn-frontend the provider is listed with the reason, never dropped."""
    def no_module(name, *a, **kw):
        raise ModuleNotFoundError(f"No module named {name!r}")
    monkeypatch.setattr(providers.importlib, "import_module", no_module)
    with pytest.raises(Unavailable, match=r"nvidia-cudnn-frontend \(cuDNN KDA\) not importable"):
        providers._load_cudnn_kda()


def test_cudnn_kda_step_passes_the_thd_layout():
    """The step flattens the batch to tokens and passes cu_seqlens = [0, T, 2T, ...]."""
    from gdn2_kernels.bench.inputs import ProblemInputs
    from gdn2_kernels.bench.model import Shape

    seen = {}

    def fake_op(q, k, v, g, beta, cu):
        seen.update(q=q.shape, g=g.shape, beta=beta.shape, cu=cu.tolist())
        return v * 1.0, None
    inp = ProblemInputs(Shape(2, 8, 2, 16, "float32"), "cpu")
    step = providers._cudnn_kda_step(fake_op, inp, "fwd")
    step()
    assert seen == {"q": (16, 2, 16), "g": (16, 2, 16), "beta": (16, 2), "cu": [0, 8, 16]}
