"""Time fwd+bwd with one kernel's config changed at a time; check gradients against the default.

Usage: python scripts/device_variants.py OUT_DIR
"""
from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench

from gdn2_kernels import chunk_gdn2, dispatch
from gdn2_kernels._testing import make_inputs, rel_rms
from gdn2_kernels.configs import get_spec

out_dir = sys.argv[1]
VARIANTS = [
    ("intra_bwd", {"num_warps": 8}), ("intra_bwd", {"BK": 64}), ("intra_bwd", {"BK": 64, "num_warps": 8}),
    ("intra_bwd", {"BV": 64, "BK": 64, "num_warps": 8}), ("intra_bwd", {"SOLVE_PRECISION": "tf32"}),
    ("intra_fwd", {"num_warps": 8}), ("intra_fwd", {"BK": 64, "num_warps": 8}),
    ("intra_fwd", {"SOLVE_PRECISION": "tf32"}), ("intra_fwd", {"BC": 32, "num_warps": 8}),
    ("state_fwd", {"BV": 64}), ("state_fwd", {"BV": 16}), ("state_fwd", {"num_warps": 8}),
    ("state_bwd", {"BV": 64}), ("state_bwd", {"BV": 16}), ("state_bwd", {"num_warps": 8}),
]
rows = []
for B, T in [(8, 2048), (1, 16384)]:
    x = make_inputs(B, T, 16, 128, 128, torch.bfloat16, "cuda")
    xi = x.to(torch.bfloat16, "cuda", requires_grad=True)
    args = (xi.q, xi.k, xi.v, xi.g, xi.b, xi.w)
    dO = torch.randn_like(xi.v)

    def run():
        o, _ = chunk_gdn2(*args, validate_values=False)
        o.backward(dO)

    def grads():
        for a in args:
            a.grad = None
        run()
        return [a.grad.float().clone() for a in args]

    base = dispatch.default_pipeline(64)
    with dispatch.override(base):
        ref = grads()
        t0 = do_bench(run, warmup=10, rep=60, return_mode="median", grad_to_none=list(args))
    rows.append({"B": B, "T": T, "variant": "default", "ms": t0})
    print(json.dumps(rows[-1]), flush=True)
    for kernel, change in VARIANTS:
        row = {"B": B, "T": T, "variant": f"{kernel}:{change}"}
        try:
            cfg = base[kernel].replace(**change)
            pipe = dispatch.complete_pipeline({**base.as_dict(), kernel: cfg}, "variant")
            with dispatch.override(pipe):
                g = grads()
                row["max_grad_rel_diff"] = max(rel_rms(a, b) for a, b in zip(g, ref))
                row["ms"] = do_bench(run, warmup=10, rep=60, return_mode="median",
                                     grad_to_none=list(args))
                row["speedup"] = t0 / row["ms"]
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        json.dump(rows, open(f"{out_dir}/variants.json", "w"), indent=1)
