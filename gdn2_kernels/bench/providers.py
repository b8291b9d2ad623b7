"""Benchmark providers: ours and the baselines, registered as data.

Each :class:`Provider` says what it is (``baseline``, ``fwd_only``, the modes where it is
meaningful, the model family its FLOPs/bytes come from) and how to load its op; loading raises
:class:`Unavailable` with a one-line reason, so a missing package or feature is listed, never
dropped. ``make_step(op, inputs, mode)`` returns the zero-argument callable that is timed:

- ``fwd``: the forward on inputs that need no gradient;
- ``fwdbwd``: the forward, then ``torch.autograd.grad`` of the output against every input with a
  fixed random ``dO`` (no ``.grad`` accumulation is timed);
- ``decode``: one token per sequence from a carried state (or KV cache).

Mamba-2's Triton SSD is imported without ``mamba_ssm/__init__.py`` (which loads the CUDA
extensions): a bare package module pointing at the source tree stands in for it, so only the
pure-Python Triton modules are executed. The source tree is, in order: an explicit path
(``gdn2 bench --mamba-src``), an installed ``mamba_ssm``, or ``.whl/mamba_ssd`` in the repository
(what ``lab/device/device_run.sh`` carries).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gdn2_kernels.bench.inputs import ProblemInputs

REPO_MAMBA_SRC = Path(__file__).resolve().parents[1] / ".whl" / "mamba_ssd"
_SSD_MODULE = "mamba_ssm.ops.triton.ssd_combined"
_SSU_MODULE = "mamba_ssm.ops.triton.selective_state_update"

Step = Callable[[], Any]


class Unavailable(Exception):
    """A provider cannot run here; the message is the one-line reason."""


@dataclass(frozen=True)
class Provider:
    name: str
    label: str
    family: str                    # gdn2_kernels.bench.model family: its FLOP/byte model
    baseline: bool
    fwd_only: bool
    modes: tuple[str, ...]         # where it is meaningful
    load: Callable[[], Any]        # -> op namespace, or raises Unavailable
    make_step: Callable[[Any, ProblemInputs, str], Step]
    note: str = ""
    long_context: bool = False     # also run at the long shapes (``gdn2 bench --long``)


@dataclass
class ProviderStatus:
    """A provider as the report lists it."""

    name: str
    label: str
    family: str
    baseline: bool
    fwd_only: bool
    modes: list[str]
    available: bool
    reason: str | None = None
    note: str = ""


@dataclass
class Registry:
    providers: dict[str, Provider] = field(default_factory=dict)

    def register(self, p: Provider) -> Provider:
        if p.name in self.providers:
            raise ValueError(f"provider {p.name!r} is already registered")
        self.providers[p.name] = p
        return p

    def get(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            raise KeyError(f"unknown provider {name!r}; available: "
                           f"{', '.join(self.providers)}") from None

    def names(self) -> list[str]:
        return list(self.providers)


def load_provider(p: Provider) -> tuple[Any, str | None]:
    """``(op, None)`` when ``p`` can run here, else ``(None, reason)``."""
    try:
        return p.load(), None
    except Unavailable as exc:
        return None, str(exc)


def status(p: Provider) -> ProviderStatus:
    _, reason = load_provider(p)
    return ProviderStatus(p.name, p.label, p.family, p.baseline, p.fwd_only, list(p.modes),
                          reason is None, reason, p.note)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def _on_cuda(load: Callable[[], Any]) -> Callable[[], Any]:
    """Every registered provider times GPU kernels: no CUDA device, no provider."""
    def checked():
        if not torch.cuda.is_available():
            raise Unavailable("no CUDA device (benchmarks time GPU kernels)")
        return load()
    return checked


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install failing at import
        raise Unavailable(f"{what} not importable ({type(exc).__name__}: {exc})") from None


def _attr(mod, name: str, what: str):
    fn = getattr(mod, name, None)
    if fn is None:
        raise Unavailable(f"{what}: {mod.__name__}.{name} does not exist in this version")
    return fn


def _load_ours():
    from gdn2_kernels import ops

    return ops.chunk_gdn2  # the call users make: default arguments (the g check in-kernel)


def _load_ours_decode():
    from gdn2_kernels import ops

    fn = getattr(ops, "fused_recurrent_gdn2", None)
    if fn is None:
        raise Unavailable("gdn2_kernels has no fused_recurrent_gdn2 yet (decode kernel)")
    return fn  # the default call, as for chunk_gdn2


def _fla(module: str, name: str) -> Callable[[], Any]:
    def load():
        return _attr(_import(module, "fla-core (FLA)"), name, "fla-core")
    return load


def _load_cudnn_kda():
    """cuDNN frontend's KDA (``cudnn.linear_attention``): its Hopper engines need sm90, and
    Blackwell's FROST engine sm100+."""
    la = _import("cudnn.linear_attention", "nvidia-cudnn-frontend (cuDNN KDA)")
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        raise Unavailable(f"cuDNN KDA needs a Hopper or newer GPU (sm90+), this is sm{major}x")
    return _attr(la, "kimi_delta_attention", "nvidia-cudnn-frontend")


def _sdpa(backend_name: str) -> Callable[[], Any]:
    def load():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend_name}")
        if backend_name == "CUDNN_ATTENTION" and not torch.backends.cudnn.is_available():
            raise Unavailable("cuDNN is not available to torch")
        return types.SimpleNamespace(
            attn=torch.nn.functional.scaled_dot_product_attention,
            ctx=lambda: sdpa_kernel(backend))
    return load


def mamba_source_dirs(explicit: str | Path | None = None) -> list[Path]:
    """Candidate roots holding ``mamba_ssm/ops/triton/ssd_combined.py``, in order of use."""
    dirs: list[Path] = []
    if explicit:
        dirs.append(Path(explicit))
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p).parent for p in spec.submodule_search_locations)
    dirs.append(REPO_MAMBA_SRC)
    return dirs


_mamba_src: list[str | None] = [None]


def set_mamba_source(path: str | Path | None) -> None:
    """Use the mamba source tree at ``path`` (a folder holding ``mamba_ssm/``) first."""
    _mamba_src[0] = str(path) if path else None


def load_mamba_ssd(explicit: str | Path | None = None):
    """``mamba_chunk_scan_combined`` and ``selective_state_update`` without mamba's CUDA
    extensions. An already imported ``mamba_ssm`` (whole package or this stand-in) is reused."""
    before = set(sys.modules)
    if "mamba_ssm" not in sys.modules:
        roots = [d for d in mamba_source_dirs(explicit or _mamba_src[0])
                 if (d / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").is_file()]
        if not roots:
            raise Unavailable("mamba_ssm Triton SSD sources not found (install mamba_ssm, pass "
                              "--mamba-src, or carry .whl/mamba_ssd)")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [str(roots[0] / "mamba_ssm")]
        sys.modules["mamba_ssm"] = pkg
    try:
        ssd = importlib.import_module(_SSD_MODULE)
        ssu = importlib.import_module(_SSU_MODULE)
    except Exception as exc:
        for name in set(sys.modules) - before:   # leave no half-imported stand-in behind
            if name.split(".")[0] == "mamba_ssm":
                del sys.modules[name]
        raise Unavailable(f"mamba_ssm Triton SSD not importable ({type(exc).__name__}: {exc})") \
            from None
    return types.SimpleNamespace(chunk_scan=ssd.mamba_chunk_scan_combined,
                                 state_update=ssu.selective_state_update,
                                 source=str(Path(ssd.__file__).parents[3]))


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _step(mode: str, forward: Callable[[dict], Any], tensors: dict[str, torch.Tensor],
          ctx: Callable[[], Any] = nullcontext) -> Step:
    """The timed callable for ``fwd`` / ``fwdbwd`` / ``decode`` around ``forward(tensors)``."""
    if mode != "fwdbwd":
        def run():
            with torch.no_grad(), ctx():
                return forward(tensors)
        return run
    leaves = [t for t in tensors.values() if t.requires_grad]
    with torch.no_grad(), ctx():
        shape_o = _first(forward(tensors))
    gen = torch.Generator(device=shape_o.device).manual_seed(1)
    do = torch.randn(shape_o.shape, generator=gen, device=shape_o.device, dtype=shape_o.dtype)

    def run():
        with ctx():
            o = _first(forward(tensors))
        return torch.autograd.grad(o, leaves, do)
    return run


def _gdn2_step(op, inp: ProblemInputs, mode: str, tied: bool = False) -> Step:
    grad = mode == "fwdbwd"
    x = inp.kda_tied(grad) if tied else inp.gdn2(grad)
    if mode == "decode":
        return _step(mode, lambda t: op(t["q"], t["k"], t["v"], t["g"], t["b"], t["w"],
                                        initial_state=t["h0"], output_final_state=True), x)
    return _step(mode, lambda t: op(t["q"], t["k"], t["v"], t["g"], t["b"], t["w"]), x)


def _ours_kda_step(op, inp, mode):
    return _gdn2_step(op, inp, mode, tied=True)


def _kda_step(op, inp: ProblemInputs, mode: str) -> Step:
    x = inp.kda(mode == "fwdbwd")
    kw = {"initial_state": x["h0"], "output_final_state": True} if mode == "decode" else {}
    return _step(mode, lambda t: op(t["q"], t["k"], t["v"], t["g"], t["beta"], **kw), x)


def _cudnn_kda_step(op, inp: ProblemInputs, mode: str) -> Step:
    """cuDNN's KDA on the THD layout: the batch flattened to ``[B*T, H, D]`` tokens with
    ``cu_seqlens = [0, T, 2T, ...]``; beta ``[B*T, H]`` in float32 (its Hopper backward engine
    writes dBeta in float32 and declines a bf16 beta, whose gradient would be bf16)."""
    x = inp.kda(mode == "fwdbwd")
    B, T = inp.shape.B, inp.shape.T
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=x["q"].device)

    def fwd(t):
        q, k, v, g = (t[n].flatten(0, 1) for n in ("q", "k", "v", "g"))
        return op(q, k, v, g, t["beta"].flatten(0, 1).float(), cu)
    return _step(mode, fwd, x)


def _gdn_step(op, inp: ProblemInputs, mode: str) -> Step:
    x = inp.gdn(mode == "fwdbwd")
    kw = {"initial_state": x["h0"], "output_final_state": True} if mode == "decode" else {}
    return _step(mode, lambda t: op(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"], **kw), x)


def _attention_step(op, inp: ProblemInputs, mode: str) -> Step:
    x = inp.attention(mode == "fwdbwd")
    causal = mode != "decode"   # one new query attends to the whole cache

    def fwd(t):
        q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
        return op.attn(q, k, v, is_causal=causal)
    return _step(mode, fwd, x, op.ctx)


def _mamba_step(op, inp: ProblemInputs, mode: str) -> Step:
    x = inp.mamba(mode == "fwdbwd")
    chunk = 256
    if mode != "decode":
        return _step(mode, lambda t: op.chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"],
                                                   chunk), x)
    m_heads, p, n = x["state"].shape[1:]
    # Per-head dt, A, dt_bias and D broadcast over the head dim with stride 0, as Mamba-2's own
    # decode step passes them: selective_state_update then takes its tied-head-dim path. Its
    # launch reads dt_bias's and D's strides, so both must be given; zeros change nothing.
    zeros = torch.zeros(m_heads, device=x["dt"].device, dtype=torch.float32)[:, None].expand(-1, p)
    dt_bias = D = zeros

    def fwd(t):
        dt = t["dt"][:, 0, :, None].expand(-1, -1, p)
        A = t["A"][:, None, None].expand(-1, p, n)
        return op.state_update(t["state"], t["x"][:, 0], dt, A, t["B"][:, 0], t["C"][:, 0],
                               D=D, dt_bias=dt_bias)
    return _step(mode, fwd, x)


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------

TRAIN = ("fwd", "fwdbwd")
ALL_MODES = ("fwd", "fwdbwd", "decode")


def default_registry() -> Registry:
    r = Registry()
    r.register(Provider("gdn2", "gdn2_kernels chunk_gdn2", "gdn2", False, False, TRAIN,
                        _load_ours, _gdn2_step, long_context=True))
    r.register(Provider("gdn2-kda", "gdn2_kernels chunk_gdn2, tied gates (KDA)", "kda", False,
                        False, TRAIN, _load_ours, _ours_kda_step,
                        note="b = w = beta: the KDA special case, to compare with fla-kda and "
                             "cudnn-kda", long_context=True))
    r.register(Provider("gdn2-decode", "gdn2_kernels fused_recurrent_gdn2", "gdn2", False, True,
                        ("decode",), _load_ours_decode, _gdn2_step))
    r.register(Provider("fla-gdn2", "FLA chunk_gdn2", "gdn2", True, False, TRAIN,
                        _fla("fla.ops.gdn2", "chunk_gdn2"), _gdn2_step))
    r.register(Provider("fla-kda", "FLA chunk_kda", "kda", True, False, TRAIN,
                        _fla("fla.ops.kda", "chunk_kda"), _kda_step))
    r.register(Provider("cudnn-kda", "cuDNN FE kimi_delta_attention (KDA)", "kda", True, False,
                        TRAIN, _load_cudnn_kda, _cudnn_kda_step,
                        note="THD layout, beta scalar per token and head; the Hopper CUDA engine "
                             "on sm90", long_context=True))
    r.register(Provider("fla-gdn", "FLA chunk_gated_delta_rule", "gdn", True, False, TRAIN,
                        _fla("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"), _gdn_step))
    r.register(Provider("fla-gdn2-decode", "FLA fused_recurrent_gdn2", "gdn2", True, True,
                        ("decode",), _fla("fla.ops.gdn2", "fused_recurrent_gdn2"), _gdn2_step))
    r.register(Provider("fla-kda-decode", "FLA fused_recurrent_kda", "kda", True, True,
                        ("decode",), _fla("fla.ops.kda", "fused_recurrent_kda"), _kda_step))
    r.register(Provider("fla-gdn-decode", "FLA fused_recurrent_gated_delta_rule", "gdn", True,
                        True, ("decode",),
                        _fla("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"),
                        _gdn_step))
    r.register(Provider("sdpa-flash", "PyTorch SDPA, flash backend (FA2), causal", "attention",
                        True, False, ALL_MODES, _sdpa("FLASH_ATTENTION"), _attention_step,
                        note="decode: one query over a KV cache of --decode-context tokens"))
    r.register(Provider("sdpa-cudnn", "PyTorch SDPA, cuDNN backend, causal", "attention", True,
                        False, ALL_MODES, _sdpa("CUDNN_ATTENTION"), _attention_step,
                        note="decode: one query over a KV cache of --decode-context tokens"))
    r.register(Provider("mamba2", "Mamba-2 SSD (mamba_ssm Triton)", "mamba2", True, False,
                        ALL_MODES, lambda: load_mamba_ssd(), _mamba_step,
                        note="64 heads x head dim 64 x d_state 64 (GDN-2's state size); "
                             "decode: selective_state_update"))
    for name, p in r.providers.items():
        r.providers[name] = dataclasses.replace(p, load=_on_cuda(p.load))
    return r
