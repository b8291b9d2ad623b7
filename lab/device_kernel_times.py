"""Per-kernel CUDA time of one fwd+bwd under torch.profiler, for pipeline variants.

Usage: python lab/device_kernel_times.py OUT_DIR [--shape=8x2048] [VARIANT ...]

A VARIANT is ``kernel:{"PARAM": value, ...}`` against the resolved pipeline of this GPU (as in
``lab/device_variants.py``). With intra_bwd's phases split (``PHASE_B``, ``PHASE_D``) each phase
is its own kernel, so the table says where intra_bwd's time goes: ``_intra_bwd_state_kernel``
(phase B), ``_intra_bwd_kernel`` (phases A and C, plus B and D where fused) and
``_intra_bwd_pairwise_kernel`` (phase D). Writes OUT_DIR/kernel_times.json (``gdn2.lab/1``,
experiment ``kernel_times``): per variant, each kernel's mean CUDA ms per fwd+bwd over 10 steps,
and the registers / spills of the intra_bwd kernels it compiled.
"""
from __future__ import annotations

import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gdn2_kernels import chunk_gdn2, dispatch
from gdn2_kernels.bench.provenance import collect
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.kernels import intra_bwd

out_dir = sys.argv[1]
opts = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--"))
variants = ["base"] + [a for a in sys.argv[2:] if not a.startswith("--")]
B, T = (int(n) for n in opts.get("shape", "8x2048").split("x"))
H, D, STEPS = 16, 128, 10
base = dispatch.resolve(ProblemKey(D, D, "bfloat16"))
result = {"schema": "gdn2.lab/1", "experiment": "kernel_times", "provenance": collect(),
          "shape": {"B": B, "T": T, "H": H, "K": D, "V": D, "dtype": "bfloat16"},
          "base_source": base.source, "steps": STEPS, "rows": []}


def pipeline_of(spec: str) -> dispatch.PipelineConfig:
    if spec == "base":
        return base
    parts = base.as_dict()
    for change in spec.split("+"):
        kernel, _, body = change.partition(":")
        parts[kernel] = parts[kernel].replace(**json.loads(body))
    return dispatch.complete_pipeline(parts, spec)


x = make_inputs(B, T, H, D, D, torch.bfloat16, "cuda", seed=1)
leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w)]
dO = torch.randn_like(x.v)


def compiled() -> dict:
    """Every compiled intra_bwd kernel so far: id -> resource report."""
    out = {}
    for name in ("_intra_bwd_kernel", "_intra_bwd_state_kernel", "_intra_bwd_pairwise_kernel"):
        for caches in getattr(getattr(intra_bwd, name), "device_caches", {}).values():
            for ck in caches[0].values():
                out[id(ck)] = {"kernel": name, "n_regs": ck.n_regs, "n_spills": ck.n_spills,
                               "shared": ck.metadata.shared, "num_warps": ck.metadata.num_warps}
    return out


def step():
    o, _ = chunk_gdn2(*leaves, validate_values=False)
    o.backward(dO)


for spec in variants:
    row: dict = {"variant": spec}
    seen = compiled()
    try:
        with dispatch.override(pipeline_of(spec)):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(STEPS):
                    step()
                torch.cuda.synchronize()
        times: dict[str, float] = {}
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if us and not ev.key.startswith(("cuda", "Memcpy", "Memset")):
                times[ev.key] = times.get(ev.key, 0.0) + us / 1000 / STEPS
        row["kernels_ms"] = dict(sorted(times.items(), key=lambda kv: -kv[1]))
        row["total_ms"] = sum(times.values())
        row["compiled"] = [r for i, r in compiled().items() if i not in seen]
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    with open(f"{out_dir}/kernel_times.json", "w") as f:
        json.dump(result, f, indent=1)
