"""Device run for issue 4: decode step beside FLA, state-traffic bandwidth, config sweep, compile.

Usage: python lab/decode_device.py OUT_DIR [--seconds=S]

Writes OUT_DIR/decode_device.json (updated as it goes) with:
  * copy_gbps: measured HBM copy bandwidth (1 GiB device-to-device copy, read + write bytes);
  * per batch B in (1, 16, 64, 256), H=16, K=V=128, bf16, T=1: correctness of ours and FLA's
    against the fp64 recurrence; GPU time of one decode step (CUDA graph, no launch overhead) and
    eager wall time, for ours and FLA's fused_recurrent_gdn2; bytes moved, GB/s, % of copy_gbps;
  * sweep: every valid recurrent_fwd config per batch (CUDA-graph time), best first;
  * compile: torch.compile(GatedDeltaNet2, fullgraph=True) prefill + decode vs eager, and a
    compiled training step (records the NotImplementedError while chunk_gdn2 has no backward).
"""
from __future__ import annotations

import json
import sys
import time
import traceback

import torch
from triton.testing import do_bench, do_bench_cudagraph

from gdn2_kernels import GatedDeltaNet2, GDN2Cache, dispatch, fused_recurrent_gdn2
from gdn2_kernels.accuracy import max_rel_err, rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import ProblemKey, get_spec
from gdn2_kernels.kernels.recurrent_fwd import recurrent_fwd
from gdn2_kernels.reference import naive_recurrent_gdn2
from gdn2_kernels.bench.provenance import collect

out_dir = sys.argv[1]
budget = float(next((a.split("=")[1] for a in sys.argv if a.startswith("--seconds=")), 400))
deadline = time.time() + budget
dev = torch.device("cuda")
H, K, V = 16, 128, 128
BATCHES = (1, 16, 64, 256)
result: dict = {
    "schema": "gdn2.lab/1", "experiment": "decode", "provenance": collect(),
    "shape": {"H": H, "K": K, "V": V, "T": 1, "dtype": "bfloat16"},
}


def save() -> None:
    with open(f"{out_dir}/decode_device.json", "w") as f:
        json.dump(result, f, indent=1)


def graph_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=50, return_mode="median")


def wall_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


try:  # the version is in the provenance (software.fla_core)
    from fla.ops.gdn2 import fused_recurrent_gdn2 as fla_fused_recurrent_gdn2
except Exception as exc:  # noqa: BLE001
    fla_fused_recurrent_gdn2 = None
    result["fla_unavailable"] = f"{type(exc).__name__}: {exc}"
print("fla:", result["provenance"]["software"]["fla_core"] or result["fla_unavailable"], flush=True)

src = torch.empty(1 << 28, dtype=torch.float32, device=dev)
dst = torch.empty_like(src)
copy_ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
result["copy_gbps"] = 2 * src.numel() * 4 / copy_ms / 1e6
src = dst = None  # free the 2 GiB before the runs
print("copy GB/s", round(result["copy_gbps"]), flush=True)

spec = get_spec("recurrent_fwd")
key = ProblemKey(K, V, "bfloat16")
default_cfg = dispatch.resolve(key)["recurrent_fwd"]
result["config"] = default_cfg.as_dict()
result["batches"] = []
for B in BATCHES:
    x = make_inputs(B, 1, H, K, V, torch.bfloat16, dev, with_h0=True, seed=B)
    args = (x.q, x.k, x.v, x.g, x.b, x.w)
    nbytes = (2 * B * H * K * V * 4                 # state read + write (fp32)
              + B * H * K * (3 * 2 + 4)             # q, k, b (bf16) and g (fp32)
              + B * H * V * 3 * 2)                  # v, w, o (bf16)
    row: dict = {"B": B, "bytes": nbytes, "state_bytes": 2 * B * H * K * V * 4}
    x64 = x.to(torch.float64)
    ro, rht = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w,
                                   initial_state=x64.h0, output_final_state=True)
    o, ht = fused_recurrent_gdn2(*args, initial_state=x.h0, output_final_state=True)
    row["ours"] = {"o_rel_rms": rel_rms(o, ro), "o_max_rel": max_rel_err(o, ro),
                   "ht_rel_rms": rel_rms(ht, rht)}

    def ours():
        return fused_recurrent_gdn2(*args, initial_state=x.h0, output_final_state=True,
                                    validate_values=False)

    def ours_kernel(cfg=default_cfg):
        return recurrent_fwd(*args, K ** -0.5, x.h0, True, False, None, cfg)

    row["ours"]["graph_ms"] = graph_ms(ours)
    row["ours"]["kernel_graph_ms"] = graph_ms(ours_kernel)
    row["ours"]["wall_ms"] = wall_ms(ours)
    row["ours"]["gbps"] = nbytes / row["ours"]["graph_ms"] / 1e6
    row["ours"]["pct_copy"] = 100 * row["ours"]["gbps"] / result["copy_gbps"]
    if fla_fused_recurrent_gdn2 is not None:
        def fla():
            return fla_fused_recurrent_gdn2(q=x.q, k=x.k, v=x.v, g=x.g, b=x.b, w=x.w,
                                            initial_state=x.h0, output_final_state=True)
        try:
            fo, fht = fla()
            row["fla"] = {"o_rel_rms": rel_rms(fo, ro), "ht_rel_rms": rel_rms(fht, rht),
                          "graph_ms": graph_ms(fla), "wall_ms": wall_ms(fla)}
            row["fla"]["gbps"] = nbytes / row["fla"]["graph_ms"] / 1e6
            row["fla"]["pct_copy"] = 100 * row["fla"]["gbps"] / result["copy_gbps"]
            row["speedup_vs_fla"] = row["fla"]["graph_ms"] / row["ours"]["graph_ms"]
        except Exception as exc:  # noqa: BLE001
            row["fla"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result["batches"].append(row)
    print(json.dumps(row), flush=True)
    save()

# Config sweep of the decode kernel, per batch (kernel alone, CUDA-graph time); the largest
# batch first (the one where FLA is closest). num_stages is left at 1: with T = 1 the token loop
# runs once, so there is nothing to pipeline.
result["sweep"] = {}
valid = [c for c in spec.space(key).valid if c["num_stages"] == 1]
for B in sorted(BATCHES, reverse=True):
    x = make_inputs(B, 1, H, K, V, torch.bfloat16, dev, with_h0=True, seed=B)
    args = (x.q, x.k, x.v, x.g, x.b, x.w)
    rows = []
    for cfg in valid:
        if time.time() > deadline - 120:
            break
        try:
            recurrent_fwd(*args, K ** -0.5, x.h0, True, False, None, cfg)
            ms = graph_ms(lambda: recurrent_fwd(*args, K ** -0.5, x.h0, True, False, None,  # noqa
                                                cfg))
            rows.append({"config": cfg.as_dict(), "ms": ms})
        except Exception as exc:  # noqa: BLE001
            rows.append({"config": cfg.as_dict(), "error": f"{type(exc).__name__}: {exc}"[:200]})
    rows.sort(key=lambda r: r.get("ms", float("inf")))
    result["sweep"][str(B)] = rows
    if rows and "ms" in rows[0]:
        best = rows[0]
        print("BEST B", B, round(best["ms"] * 1e3, 2), "us", best["config"],
              round(2 * B * H * K * V * 4 / best["ms"] / 1e6), "GB/s state", flush=True)
    save()

# torch.compile(fullgraph=True) of the layer: prefill + decode, and a training step.
comp: dict = {}
try:
    torch._dynamo.reset()
    layer = GatedDeltaNet2(hidden_size=2048, num_heads=16, head_dim=128, device=dev,
                           dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    xs = torch.randn(4, 264, 2048, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        full = layer(xs, mode="chunk")
        t0 = time.time()
        comp["chunk_rel_rms"] = rel_rms(compiled(xs, mode="chunk"), full)
        cache = GDN2Cache()
        outs = [compiled(xs[:, :256], cache=cache, mode="chunk")]
        outs += [compiled(xs[:, t:t + 1], cache=cache, mode="recurrent") for t in range(256, 264)]
        comp["first_calls_s"] = time.time() - t0
        comp["prefill_decode_rel_rms"] = rel_rms(torch.cat(outs, 1), full)
        step = xs[:, 263:264]
        ec, cc = GDN2Cache(), GDN2Cache()
        layer(xs[:, :256], cache=ec, mode="chunk")
        compiled(xs[:, :256], cache=cc, mode="chunk")
        comp["eager_decode_step_ms"] = wall_ms(lambda: layer(step, cache=ec, mode="recurrent"))
        comp["compiled_decode_step_ms"] = wall_ms(lambda: compiled(step, cache=cc,
                                                                   mode="recurrent"))
    comp["fullgraph_inference"] = "ok"
except Exception as exc:  # noqa: BLE001
    comp["fullgraph_inference"] = f"{type(exc).__name__}: {exc}"[:500]
    comp["traceback"] = traceback.format_exc()[-3000:]
try:
    xs = torch.randn(2, 512, 2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    compiled(xs, mode="chunk").float().square().mean().backward()
    comp["fullgraph_training"] = "ok"
except NotImplementedError as exc:
    comp["fullgraph_training"] = f"traced; backward not implemented yet: {exc}"[:300]
except Exception as exc:  # noqa: BLE001
    comp["fullgraph_training"] = f"{type(exc).__name__}: {exc}"[:500]
    comp["training_traceback"] = traceback.format_exc()[-3000:]
result["compile"] = comp
print(json.dumps({k: v for k, v in comp.items() if "traceback" not in k}), flush=True)
save()
