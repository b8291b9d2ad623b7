"""Device run for issue 19 (one GPU): the span summary's cost beside a forward of the same span,
and context parallelism's accuracy at 8 and 16 emulated ranks.

Usage: python lab/device_cp_summary.py OUT_DIR [--seconds=S] [--parts=timing,accuracy]
                                     [--cases=I,J]   (indices into ACCURACY)

Writes OUT_DIR/cp_summary_device.json (rewritten as it goes):
  * timing, per T in (8192, 32768, 131072), one sequence, H=16, K=V=128, bf16 (median ms,
    triton.testing.do_bench): the op's forward (``chunk_gdn2``, no grad) and forward + backward;
    ``chunk_gdn2_summary`` with and without the transition M (intra-chunk forward included; both
    as dense [1, T] calls); and the summary passes
    alone on the intra-chunk forward's factors, which is what a rank adds to its forward in
    ``chunk_gdn2_cp`` (H for a slot where the sequence starts; H and M for a middle slot), and
    the backward summary pass G beside the op's backward;
  * accuracy: ``emulate_cp`` (every rank's steps on this GPU, all-gathers replaced by stacking)
    at 8 and 16 ranks, contiguous and zigzag, bf16 and fp32, against the single-device op and the
    float64 recurrence: relative RMS error per tensor (o, final state, every gradient).
"""
from __future__ import annotations

import json
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

import gdn2_kernels
from gdn2_kernels import _varlen, chunk_gdn2, dispatch
from gdn2_kernels.bench.provenance import collect
from gdn2_kernels.accuracy import TOLERANCES, rel_rms
from gdn2_kernels.configs import dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.cp import chunk_gdn2_summary
from gdn2_kernels.cp.emulate import emulate_cp
from gdn2_kernels.kernels.intra_fwd import intra_fwd
from gdn2_kernels.kernels.summary import span_summary_bwd, span_summary_fwd
from gdn2_kernels.reference import naive_recurrent_gdn2

out_dir = sys.argv[1]
budget = float(next((a.split("=")[1] for a in sys.argv if a.startswith("--seconds=")), 480))
deadline = time.time() + budget
parts = next((a.split("=")[1] for a in sys.argv if a.startswith("--parts=")),
             "timing,accuracy").split(",")
H, D = 16, 128
result: dict = {"schema": "gdn2.lab/1", "experiment": "cp_summary", "provenance": collect(),
                "timing": [], "accuracy": []}


def save() -> None:
    with open(f"{out_dir}/cp_summary_device.json", "w") as f:
        json.dump(result, f, indent=1)


def ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=200))


def timing(T: int) -> dict:
    x = make_inputs(1, T, H, D, D, torch.bfloat16, "cuda", seed=0)
    pipe = dispatch.resolve(ProblemKey(D, D, "bfloat16"))
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    idx = _varlen.chunk_indices(cu, pipe.chunk_size)
    offs = _varlen.chunk_offsets(cu, pipe.chunk_size)
    scale = D ** -0.5
    row = {"T": T, "H": H, "K": D, "V": D, "dtype": "bfloat16", "chunk": pipe.chunk_size,
           "config_source": pipe.source, "state_fwd": pipe["state_fwd"].label(),
           "state_bwd": pipe["state_bwd"].label()}
    with torch.no_grad():
        # dense [1, T] calls: the varlen path would add host syncs (chunk indices) to the time
        row["forward_ms"] = ms(lambda: chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w,
                                                  validate_values=False))
        row["summary_H_M_ms"] = ms(lambda: chunk_gdn2_summary(x.k, x.v, x.g, x.b, x.w,
                                                              validate_values=False))
        row["summary_H_ms"] = ms(lambda: chunk_gdn2_summary(
            x.k, x.v, x.g, x.b, x.w, output_transition=False, validate_values=False))
        g_cum, _, A_qk, Y, U, Qg, Kt, gC = intra_fwd(x.q, x.k, x.v, x.g, x.b, x.w, scale, cu, idx,
                                                     pipe["intra_fwd"])
        row["cp_pass_H_ms"] = ms(lambda: span_summary_fwd(Qg, Kt, gC, Y, U, A_qk, None, cu, offs,
                                                          pipe["state_fwd"], transition=False))
        row["cp_pass_H_M_ms"] = ms(lambda: span_summary_fwd(Qg, Kt, gC, Y, U, A_qk, None, cu,
                                                            offs, pipe["state_fwd"]))
        do = torch.randn_like(x.v)
        row["cp_pass_G_ms"] = ms(lambda: span_summary_bwd(x.q, x.k, g_cum, Qg, Kt, gC, Y, A_qk,
                                                          do, None, scale, cu, offs,
                                                          pipe["state_bwd"]))
    leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w)]

    def fwd_bwd():
        o, _ = chunk_gdn2(*leaves, validate_values=False)
        o.backward(do)
    row["forward_backward_ms"] = ms(fwd_bwd)
    return row


def accuracy(world: int, layout: str, dtype: torch.dtype, T: int, Hh: int,
             cu: list[int], decay: str = "normal") -> dict:
    x = make_inputs(1, T, Hh, D, D, dtype, "cuda", decay=decay, with_h0=True, cu_seqlens=cu,
                    seed=world)
    do = torch.randn(1, T, Hh, D, device="cuda").to(dtype)
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    run = emulate_cp(x.q, x.k, x.v, x.g, x.b, x.w, cu, world, layout, do=do, initial_state=x.h0)
    names = ("dq", "dk", "dv", "dg", "db", "dw", "dh0")
    leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w, x.h0)]
    o, ht = chunk_gdn2(*leaves[:6], initial_state=leaves[6], output_final_state=True,
                       cu_seqlens=cu_t)
    (o.float() * do.float()).sum().backward()
    single = {"o": o, "ht": ht, **{n: t.grad for n, t in zip(names, leaves)}}
    x64 = x.to(torch.float64)
    l64 = [t.detach().clone().requires_grad_()
           for t in (x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, x64.h0)]
    o64, ht64 = naive_recurrent_gdn2(*l64[:6], initial_state=l64[6], output_final_state=True,
                                     cu_seqlens=cu_t)
    (o64 * do.double()).sum().backward()
    exact = {"o": o64, "ht": ht64, **{n: t.grad for n, t in zip(names, l64)}}
    got = {"o": run.o, "ht": run.final_state, **run.grads}
    tol = TOLERANCES[dtype_name(dtype)]
    return {"world": world, "layout": layout, "dtype": dtype_name(dtype), "T": T, "H": Hh,
            "decay": decay,
            "cu_seqlens": cu,
            "vs_single": {n: rel_rms(got[n], single[n]) for n in got},
            "vs_fp64": {n: rel_rms(got[n], exact[n]) for n in got},
            "single_vs_fp64": {n: rel_rms(single[n], exact[n]) for n in got},
            "within_tolerance": all(rel_rms(got[n], ref[n]) <= tol[n] for n in got
                                    for ref in (single, exact))}


for T in (8192, 32768, 131072) if "timing" in parts else ():
    if time.time() > deadline:
        break
    try:
        result["timing"].append(timing(T))
        print(result["timing"][-1], flush=True)
    except Exception:  # noqa: BLE001 - recorded, the run goes on
        result["timing"].append({"T": T, "error": traceback.format_exc()[-2000:]})
    save()

ACCURACY = [(8, "contiguous", torch.bfloat16, 16384, 4, [0, 16384]),
            (8, "zigzag", torch.bfloat16, 16384, 4, [0, 1000, 9000, 9001, 16384]),
            (16, "contiguous", torch.bfloat16, 16384, 4, [0, 16384]),
            (8, "contiguous", torch.float32, 8192, 2, [0, 3000, 8192]),
            # spans of 256 tokens with weak decay: the entering state reaches the span's end
            # (at 2048 tokens a span's transition M is below fp32's range and the chain is exact)
            (8, "contiguous", torch.bfloat16, 2048, 4, [0, 2048], "weak"),
            (8, "zigzag", torch.float32, 2048, 4, [0, 700, 2048], "weak")]
picked = next((a.split("=")[1] for a in sys.argv if a.startswith("--cases=")), None)
if picked is not None:
    ACCURACY = [ACCURACY[int(i)] for i in picked.split(",")]
for case in ACCURACY if "accuracy" in parts else ():
    if time.time() > deadline:
        break
    try:
        result["accuracy"].append(accuracy(*case))
        print(result["accuracy"][-1], flush=True)
    except Exception:  # noqa: BLE001 - recorded, the run goes on
        result["accuracy"].append({"case": str(case[:4]), "error": traceback.format_exc()[-2000:]})
    save()
save()
