"""Check the op, with the configs dispatch resolves on this device, against the fp64 recurrence.

Used by ``gdn2 verify`` and by the tuner's per-candidate verification.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gdn2_kernels import _device, dispatch
from gdn2_kernels.accuracy import ErrorReport, compare
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.ops import chunk_gdn2
from gdn2_kernels.reference import naive_gate, naive_recurrent_gdn2


@dataclass(frozen=True)
class VerifyCase:
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str = "float32"
    decay: str = "normal"
    with_h0: bool = True
    cu_seqlens: tuple[int, ...] | None = None
    backward: bool = False
    qk_l2norm: bool = False  # unnormalised q, k and use_qk_l2norm_in_kernel=True
    op: str = "chunk"  # 'chunk' (chunk_gdn2) or 'recurrent' (fused_recurrent_gdn2, forward only)
    # 'none', or the in-kernel gate (use_gate_in_kernel) on a raw g: 'softplus' (with A_log and
    # dt_bias, whose gradients are checked too) or 'bounded' (lower_bound -5, with A_log).
    gate: str = "none"

    def label(self) -> str:
        s = f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-{self.dtype}-{self.decay}"
        if self.cu_seqlens is not None:
            s += "-varlen"
        if self.qk_l2norm:
            s += "-l2norm"
        if self.op != "chunk":
            s += f"-{self.op}"
        if self.gate != "none":
            s += f"-gate_{self.gate}"
        return s + ("-fwdbwd" if self.backward else "-fwd")


@dataclass
class VerifyResult:
    case: VerifyCase
    errors: list[ErrorReport]
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(e.ok for e in self.errors)


@dataclass
class VerifyReport:
    device: str
    interpreter: bool
    results: list[VerifyResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def default_cases(on_gpu: bool, backward: bool = False) -> list[VerifyCase]:
    """Small awkward shapes under the interpreter; realistic ones on a GPU."""
    if on_gpu:
        return [
            VerifyCase(2, 1000, 4, 128, 128, "bfloat16", backward=backward),
            VerifyCase(1, 2048, 4, 128, 128, "bfloat16", "strong", backward=backward),
            VerifyCase(1, 1500, 4, 128, 128, "bfloat16", cu_seqlens=(0, 7, 700, 1500),
                       backward=backward),
            VerifyCase(2, 1000, 4, 64, 96, "float32", backward=backward),
            # One long sequence of one head: the state passes leave the GPU under-filled (BV
            # narrowed at launch; the two-level scan when a profile sets SCAN="segmented").
            VerifyCase(1, 4096, 1, 128, 128, "bfloat16", backward=backward),
            # The in-kernel gate (intra_fwd and intra_bwd with GATE set), both activations.
            VerifyCase(2, 1000, 4, 128, 128, "bfloat16", backward=backward, gate="softplus"),
            VerifyCase(1, 1500, 4, 128, 128, "bfloat16", cu_seqlens=(0, 7, 700, 1500),
                       backward=backward, gate="bounded"),
        ]
    return [
        VerifyCase(1, 100, 2, 32, 48, backward=backward),
        VerifyCase(1, 90, 1, 32, 32, decay="strong", cu_seqlens=(0, 10, 75, 90), backward=backward),
        VerifyCase(1, 70, 2, 32, 32, backward=backward, gate="softplus"),
    ]


def run_case(case: VerifyCase, device: torch.device,
             pipeline: dispatch.PipelineConfig | None = None) -> VerifyResult:
    """Run one case on fresh random inputs and compare every output with the fp64 recurrence."""
    if case.op not in _OPS:
        raise ValueError(f"VerifyCase.op must be one of {sorted(_OPS)}, got {case.op!r}")
    if case.backward and case.op != "chunk":
        raise ValueError(f"op {case.op!r} is forward-only; set backward=False")
    dtype = getattr(torch, case.dtype)
    x = make_inputs(case.B, case.T, case.H, case.K, case.V, dtype, device, decay=case.decay,
                    with_h0=case.with_h0, cu_seqlens=list(case.cu_seqlens) if case.cu_seqlens else None,
                    normalize_qk=not case.qk_l2norm)
    gate = _GateInputs.draw(case, x) if case.gate != "none" else None
    t0 = time.perf_counter()
    try:
        xin = x.to(dtype, device, requires_grad=case.backward)
        gin = gate.to(device, case.backward) if gate is not None else None
        ctx = dispatch.override(pipeline) if pipeline is not None else contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(case.backward):
            o, ht = _OPS[case.op]()(xin.q, xin.k, xin.v, xin.g, xin.b, xin.w, initial_state=xin.h0,
                                   output_final_state=True, cu_seqlens=xin.cu_seqlens,
                                   use_qk_l2norm_in_kernel=case.qk_l2norm,
                                   **(gin.op_kwargs() if gin is not None else {}))
            outs = {"o": o, "ht": ht}
            if case.backward:
                do, dht = torch.randn_like(o), torch.randn_like(ht)
                torch.autograd.backward((o, ht), (do, dht))
                outs.update(_grads(xin))
                if gin is not None:
                    outs.update(gin.grads())
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # a broken config must be reported, not crash the caller
        return VerifyResult(case, [], time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - t0
    x64 = x.to(torch.float64, device, requires_grad=case.backward)
    g64 = gate.to(device, case.backward, torch.float64) if gate is not None else None
    g_act = g64.activate(x64.g) if g64 is not None else x64.g
    ro, rht = naive_recurrent_gdn2(x64.q, x64.k, x64.v, g_act, x64.b, x64.w, initial_state=x64.h0,
                                   output_final_state=True, cu_seqlens=x64.cu_seqlens,
                                   use_qk_l2norm_in_kernel=case.qk_l2norm)
    refs = {"o": ro, "ht": rht}
    if case.backward:
        torch.autograd.backward((ro, rht), (do.double(), dht.double()))
        refs.update(_grads(x64))
        if g64 is not None:
            refs.update(g64.grads())
    return VerifyResult(case, compare(outs, refs, case.dtype), seconds)


@dataclass
class _GateInputs:
    """The in-kernel gate's parameters of one case; ``x.g`` then holds the raw gate input."""

    kind: str
    A_log: torch.Tensor
    dt_bias: torch.Tensor | None

    @classmethod
    def draw(cls, case: VerifyCase, x) -> "_GateInputs":
        # The raw input in place of the log-decay: about N(0, 1), any sign.
        with torch.no_grad():
            x.g.copy_(torch.randn(x.g.shape, dtype=x.g.dtype))
        H, K = case.H, case.K
        A_log = torch.rand(H, dtype=torch.float32) * 1.5 - 1.0
        dt_bias = torch.randn(H * K, dtype=torch.float32) * 0.5 if case.gate == "softplus" else None
        return cls(case.gate, A_log, dt_bias)

    def to(self, device, requires_grad: bool, dtype=torch.float32) -> "_GateInputs":
        def conv(t):
            return (None if t is None
                    else t.detach().to(device, dtype).clone().requires_grad_(requires_grad))
        return _GateInputs(self.kind, conv(self.A_log), conv(self.dt_bias))

    @property
    def lower_bound(self) -> float | None:
        return -5.0 if self.kind == "bounded" else None

    def op_kwargs(self) -> dict:
        return dict(use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
                    lower_bound=self.lower_bound)

    def activate(self, g: torch.Tensor) -> torch.Tensor:
        return naive_gate(g, self.A_log, self.dt_bias, self.lower_bound)

    def grads(self) -> dict[str, torch.Tensor]:
        out = {"dA_log": self.A_log.grad}
        if self.dt_bias is not None:
            out["ddt_bias"] = self.dt_bias.grad
        return out


def _fused_recurrent():
    from gdn2_kernels import ops

    return ops.fused_recurrent_gdn2


_OPS: dict[str, Callable[[], Callable]] = {"chunk": lambda: chunk_gdn2,
                                           "recurrent": _fused_recurrent}


def _grads(x) -> dict[str, torch.Tensor]:
    names = {"q": "dq", "k": "dk", "v": "dv", "g": "dg", "b": "db", "w": "dw", "h0": "dh0"}
    return {names[n]: t.grad for n, t in x.tensors().items()}


def verify(cases: list[VerifyCase] | None = None, backward: bool = False,
           pipeline: dispatch.PipelineConfig | None = None,
           progress: Callable[[VerifyResult], None] | None = None) -> VerifyReport:
    """Verify the op on ``cases`` (default: :func:`default_cases` for this device)."""
    device = _device.default_device()
    on_gpu = device.type == "cuda"
    report = VerifyReport(_device.gpu_name(), _device.interpreter_active())
    for case in cases or default_cases(on_gpu, backward):
        res = run_case(case, device, pipeline)
        report.results.append(res)
        if progress is not None:
            progress(res)
    return report


__all__ = ["VerifyCase", "VerifyReport", "VerifyResult", "default_cases", "run_case", "verify"]
