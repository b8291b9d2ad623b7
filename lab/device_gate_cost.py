"""What the in-kernel g check costs: the default call against ``validate_values=False``.

Usage: python lab/device_gate_cost.py OUT_DIR [8x2048,1x16384]

For each shape, fwd and fwd+bwd medians (``triton.testing.do_bench``) of ``chunk_gdn2`` with its
default arguments and with ``validate_values=False``, the two interleaved twice so drift shows.
Writes OUT_DIR/gate_cost.json.
"""
from __future__ import annotations

import json
import sys

import torch
from triton.testing import do_bench

from gdn2_kernels.bench.provenance import collect
from gdn2_kernels import chunk_gdn2
from gdn2_kernels.inputs import make_inputs

out_dir = sys.argv[1]
shapes = [tuple(int(n) for n in s.split("x"))
          for s in (sys.argv[2] if len(sys.argv) > 2 else "8x2048,1x16384").split(",")]
result = {"provenance": collect(), "rows": []}
for B, T in shapes:
    x = make_inputs(B, T, 16, 128, 128, torch.bfloat16, "cuda", seed=1).to(
        torch.bfloat16, "cuda", requires_grad=True)
    args = (x.q, x.k, x.v, x.g, x.b, x.w)
    dO = torch.randn_like(x.v)
    for mode in ("fwd", "fwdbwd"):
        for rnd in range(2):
            for label, kw in (("default", {}), ("validate_values=False", {"validate_values": False})):
                if mode == "fwd":
                    def step(kw=kw):
                        with torch.no_grad():
                            return chunk_gdn2(*args, **kw)
                else:
                    def step(kw=kw):
                        o, _ = chunk_gdn2(*args, **kw)
                        return torch.autograd.grad(o, args, dO)
                step()
                ms = do_bench(step, warmup=25, rep=200, return_mode="median")
                row = {"B": B, "T": T, "mode": mode, "call": label, "round": rnd, "ms": ms}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
with open(f"{out_dir}/gate_cost.json", "w") as f:
    json.dump(result, f, indent=1)
