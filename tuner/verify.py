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
from gdn2_kernels._testing import ErrorReport, compare, make_inputs
from gdn2_kernels.ops import chunk_gdn2
from gdn2_kernels.reference import naive_recurrent_gdn2


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

    def label(self) -> str:
        s = f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-{self.dtype}-{self.decay}"
        if self.cu_seqlens is not None:
            s += "-varlen"
        if self.qk_l2norm:
            s += "-l2norm"
        if self.op != "chunk":
            s += f"-{self.op}"
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
        ]
    return [
        VerifyCase(1, 100, 2, 32, 48, backward=backward),
        VerifyCase(1, 90, 1, 32, 32, decay="strong", cu_seqlens=(0, 10, 75, 90), backward=backward),
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
    t0 = time.perf_counter()
    try:
        xin = x.to(dtype, device, requires_grad=case.backward)
        ctx = dispatch.override(pipeline) if pipeline is not None else contextlib.nullcontext()
        with ctx, torch.set_grad_enabled(case.backward):
            o, ht = _OPS[case.op]()(xin.q, xin.k, xin.v, xin.g, xin.b, xin.w, initial_state=xin.h0,
                                   output_final_state=True, cu_seqlens=xin.cu_seqlens,
                                   use_qk_l2norm_in_kernel=case.qk_l2norm)
            outs = {"o": o, "ht": ht}
            if case.backward:
                do, dht = torch.randn_like(o), torch.randn_like(ht)
                torch.autograd.backward((o, ht), (do, dht))
                outs.update(_grads(xin))
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # a broken config must be reported, not crash the caller
        return VerifyResult(case, [], time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - t0
    x64 = x.to(torch.float64, device, requires_grad=case.backward)
    ro, rht = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, initial_state=x64.h0,
                                   output_final_state=True, cu_seqlens=x64.cu_seqlens,
                                   use_qk_l2norm_in_kernel=case.qk_l2norm)
    refs = {"o": ro, "ht": rht}
    if case.backward:
        torch.autograd.backward((ro, rht), (do.double(), dht.double()))
        refs.update(_grads(x64))
    return VerifyResult(case, compare(outs, refs, case.dtype), seconds)


def _fused_recurrent():
    from gdn2_kernels import ops  # fused_recurrent_gdn2 arrives with the decoding kernel

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
