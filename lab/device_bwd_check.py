"""Device run for issue 3: gradient errors beside FLA, fwd+bwd time and peak memory beside FLA,
(the training loop is lab/device_train_check.py).

Usage: python lab/device_bwd_check.py OUT_DIR
Writes OUT_DIR/bwd_check.json incrementally.
"""
from __future__ import annotations

import json
import sys
import time

import torch
from triton.testing import do_bench

import gdn2_kernels.ops as ops
from gdn2_kernels.accuracy import rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.reference import naive_recurrent_gdn2
from gdn2_kernels.bench.provenance import collect

out_dir = sys.argv[1]
dev = torch.device("cuda")
result: dict = {"schema": "gdn2.lab/1", "experiment": "bwd_check", "provenance": collect(),
                "gradients": [], "timing": []}


def save():
    with open(f"{out_dir}/bwd_check.json", "w") as f:
        json.dump(result, f, indent=1)


try:  # the version is in the provenance (software.fla_core)
    from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2
except Exception as exc:  # noqa: BLE001
    fla_chunk_gdn2 = None
    result["fla_unavailable"] = f"{exc}"

NAMES = ("q", "k", "v", "g", "b", "w", "h0")


def grads_of(fn, x, do, dht):
    xi = x.to(x.q.dtype, dev, requires_grad=True)
    o, ht = fn(xi.q, xi.k, xi.v, xi.g, xi.b, xi.w, initial_state=xi.h0, output_final_state=True)
    torch.autograd.backward((o, ht), (do.to(o.dtype), dht))
    return o, ht, {n: getattr(xi, n).grad for n in NAMES}


# --- gradient errors ---------------------------------------------------------------------------
x = make_inputs(2, 2048, 16, 128, 128, torch.bfloat16, dev, with_h0=True)
do = torch.randn(2, 2048, 16, 128, device=dev)
dht = torch.randn(2, 16, 128, 128, device=dev)
refs = {}
for dt in (torch.float64, torch.float32):
    xr = x.to(dt, dev, requires_grad=True)
    ro, rh = naive_recurrent_gdn2(xr.q, xr.k, xr.v, xr.g, xr.b, xr.w, initial_state=xr.h0,
                                  output_final_state=True)
    torch.autograd.backward((ro, rh), (do.to(dt), dht.to(dt)))
    refs[dt] = (ro.detach(), rh.detach(), {n: getattr(xr, n).grad for n in NAMES})
    del xr, ro, rh
    torch.cuda.empty_cache()
impls = {"ours": lambda *a, **kw: ops.chunk_gdn2(*a, validate_values=False, **kw)}
if fla_chunk_gdn2 is not None:
    impls["fla"] = fla_chunk_gdn2
for name, fn in impls.items():
    t0 = time.time()
    o, ht, gr = grads_of(fn, x, do, dht)
    torch.cuda.synchronize()
    row = {"impl": name, "shape": "B2-T2048-H16-K128-V128-bf16", "first_call_s": time.time() - t0}
    for ref_name, dt in (("fp64", torch.float64), ("fp32", torch.float32)):
        ro, rh, rg = refs[dt]
        row[f"vs_{ref_name}"] = {"o": rel_rms(o, ro), "ht": rel_rms(ht, rh),
                                 **{f"d{n}": rel_rms(gr[n], rg[n]) for n in NAMES}}
    result["gradients"].append(row)
    print(json.dumps(row), flush=True)
    save()
del refs
torch.cuda.empty_cache()

# --- timing and peak memory --------------------------------------------------------------------
for B, T in [(8, 2048), (4, 4096), (2, 8192), (1, 16384)]:
    x = make_inputs(B, T, 16, 128, 128, torch.bfloat16, dev)
    row = {"B": B, "T": T, "H": 16, "K": 128, "V": 128, "dtype": "bfloat16"}
    for name, fn in impls.items():
        xi = x.to(torch.bfloat16, dev, requires_grad=True)
        args = (xi.q, xi.k, xi.v, xi.g, xi.b, xi.w)
        dO = torch.randn(B, T, 16, 128, device=dev, dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                return fn(*args)

        def fwdbwd():
            o, _ = fn(*args)
            o.backward(dO)

        fwd()
        fwdbwd()
        row[f"{name}_fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
        row[f"{name}_fwdbwd_ms"] = do_bench(fwdbwd, warmup=25, rep=100, return_mode="median",
                                            grad_to_none=list(args))
        modes = [("", {})]
        if name == "ours":  # issue 3: peak memory with the chunk states recomputed and kept
            modes.append(("_keep_h", {"disable_recompute": True}))
        for suffix, kw in modes:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            o, _ = fn(*args, **kw)
            o.backward(dO)
            torch.cuda.synchronize()
            row[f"{name}{suffix}_fwdbwd_peak_extra_MiB"] = (
                (torch.cuda.max_memory_allocated() - base) / 2**20)
            del o
        del xi, args
    if "fla_fwdbwd_ms" in row:
        row["speedup_fwd"] = row["fla_fwd_ms"] / row["ours_fwd_ms"]
        row["speedup_fwdbwd"] = row["fla_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
    result["timing"].append(row)
    print(json.dumps(row), flush=True)
    save()

print("DONE", flush=True)
