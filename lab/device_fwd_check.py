"""Device run for issue 2: forward correctness beside FLA, forward timing beside FLA, a small sweep.

Usage (on a GPU machine): python lab/device_fwd_check.py OUT_DIR [--quick]
Writes OUT_DIR/fwd_check.json incrementally (a partial file survives a timeout).
"""
from __future__ import annotations

import itertools
import json
import sys
import time

import torch
from triton.testing import do_bench

from gdn2_kernels import dispatch
from gdn2_kernels.accuracy import max_rel_err, rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import get_spec
from gdn2_kernels.ops import chunk_gdn2
from gdn2_kernels.reference import naive_recurrent_gdn2
from gdn2_kernels.bench.provenance import collect

out_dir = sys.argv[1]
quick = "--quick" in sys.argv
dev = torch.device("cuda")
result: dict = {"schema": "gdn2.lab/1", "experiment": "fwd_check", "provenance": collect(),
                "correctness": [], "timing": [], "sweep": []}


def save():
    with open(f"{out_dir}/fwd_check.json", "w") as f:
        json.dump(result, f, indent=1)


try:  # the version is in the provenance (software.fla_core)
    from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2
except Exception as exc:  # noqa: BLE001
    fla_chunk_gdn2 = None
    result["fla_unavailable"] = f"{exc}"
print("fla:", result["provenance"]["software"]["fla_core"] or result["fla_unavailable"], flush=True)

# --- correctness -------------------------------------------------------------------------------
for with_h0 in (False, True):
    x = make_inputs(4, 4096, 16, 128, 128, torch.bfloat16, dev, with_h0=with_h0)
    x64 = x.to(torch.float64, dev)
    ro, rh = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, initial_state=x64.h0,
                                  output_final_state=True)
    x32 = x.to(torch.float32, dev)
    fo, fh = naive_recurrent_gdn2(x32.q, x32.k, x32.v, x32.g, x32.b, x32.w, initial_state=x32.h0,
                                  output_final_state=True)
    row = {"shape": "B4-T4096-H16-K128-V128-bf16", "h0": with_h0,
           "fp32_reference": {"o_rel_rms": rel_rms(fo, ro), "ht_rel_rms": rel_rms(fh, rh)}}
    o, ht = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0, output_final_state=True)
    row["ours"] = {"o_rel_rms": rel_rms(o, ro), "o_max_rel": max_rel_err(o, ro),
                   "ht_rel_rms": rel_rms(ht, rh), "o_rel_rms_vs_fp32": rel_rms(o, fo)}
    if fla_chunk_gdn2 is not None:
        o2, ht2 = fla_chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                 output_final_state=True)
        row["fla"] = {"o_rel_rms": rel_rms(o2, ro), "o_max_rel": max_rel_err(o2, ro),
                      "ht_rel_rms": rel_rms(ht2, rh), "o_rel_rms_vs_fp32": rel_rms(o2, fo)}
    result["correctness"].append(row)
    print(json.dumps(row), flush=True)
    save()
    del x64, ro, rh


def bench_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


# --- timing ------------------------------------------------------------------------------------
shapes = [(8, 2048), (4, 4096), (2, 8192), (1, 16384)]
for B, T in shapes:
    x = make_inputs(B, T, 16, 128, 128, torch.bfloat16, dev)
    args = (x.q, x.k, x.v, x.g, x.b, x.w)
    row = {"B": B, "T": T, "H": 16, "K": 128, "V": 128, "dtype": "bfloat16"}
    ours = lambda: chunk_gdn2(*args, validate_values=False)  # noqa: E731
    ours()
    row["ours_fwd_ms"] = bench_ms(ours)
    if fla_chunk_gdn2 is not None:
        t0 = time.time()
        fla_chunk_gdn2(*args)
        torch.cuda.synchronize()
        row["fla_first_call_s"] = time.time() - t0
        row["fla_fwd_ms"] = bench_ms(lambda: fla_chunk_gdn2(*args))
        row["speedup_vs_fla"] = row["fla_fwd_ms"] / row["ours_fwd_ms"]
    result["timing"].append(row)
    print(json.dumps(row), flush=True)
    save()

# --- small sweep, one stage at a time (the other stage at its default) ---------------------------
intra, state = get_spec("intra_fwd"), get_spec("state_fwd")
deadline = time.time() + float(next((a.split("=")[1] for a in sys.argv if a.startswith("--sweep-s=")), 240))
candidates = []
for BT, BC, BK, prec, nw in itertools.product((32, 64), (16, 32), (32, 64), ("ieee", "tf32x3", "tf32"),
                                              (4, 8)):
    candidates.append(("intra", {"BT": BT}, {"BT": BT, "BC": BC, "BK": BK, "SOLVE_PRECISION": prec,
                                              "num_warps": nw}))
for BT, BV, nw, ns in itertools.product((32, 64), (16, 32, 64), (4, 8), (1, 2, 3)):
    candidates.append(("state", {"BT": BT, "BV": BV, "num_warps": nw, "num_stages": ns}, {"BT": BT}))
for B, T in [(1, 16384), (8, 2048)]:
    x = make_inputs(B, T, 16, 128, 128, torch.bfloat16, dev)
    args = (x.q, x.k, x.v, x.g, x.b, x.w)
    ref = chunk_gdn2(*args, validate_values=False)[0].float()
    for stage, state_cfg, intra_cfg in candidates:
        if time.time() > deadline:
            break
        pipe = dispatch.complete_pipeline({"intra_fwd": intra.config(intra_cfg),
                                           "state_fwd": state.config(state_cfg)}, "sweep")
        row = {"B": B, "T": T, "stage": stage, "intra": intra_cfg, "state": state_cfg}
        try:
            with dispatch.override(pipe):
                fn = lambda: chunk_gdn2(*args, validate_values=False)  # noqa: E731
                o = fn()[0]
                row["diff_vs_default"] = rel_rms(o, ref)
                row["ms"] = bench_ms(fn)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        result["sweep"].append(row)
        print(json.dumps(row), flush=True)
        save()
print("DONE", flush=True)
