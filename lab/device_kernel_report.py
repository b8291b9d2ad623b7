"""Compiler resource report (registers, spills, shared memory) of every kernel after one
fwd+bwd at 8x2048 (H=16, D=128, bf16) with the configs dispatch resolves.

Usage: python lab/device_kernel_report.py [OUT_DIR]
"""
from __future__ import annotations

import json
import sys

import torch

from gdn2_kernels import chunk_gdn2
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.kernels import intra_bwd, intra_fwd, l2norm, state_bwd, state_fwd

x = make_inputs(8, 2048, 16, 128, 128, torch.bfloat16, "cuda").to(torch.bfloat16, "cuda",
                                                                   requires_grad=True)
o, _ = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, validate_values=False)
o.sum().backward()
torch.cuda.synchronize()
rows = []
for mod, name in ((intra_fwd, "_intra_fwd_kernel"), (state_fwd, "_state_fwd_kernel"),
                  (intra_bwd, "_intra_bwd_kernel"), (state_bwd, "_state_bwd_kernel"),
                  (l2norm, "_l2norm_fwd_kernel")):
    fn = getattr(mod, name)
    for caches in getattr(fn, "device_caches", {}).values():
        for ck in caches[0].values():
            md = ck.metadata
            rows.append({"kernel": name, "n_regs": ck.n_regs, "n_spills": ck.n_spills,
                         "shared": md.shared, "num_warps": md.num_warps,
                         "num_stages": md.num_stages})
for r in rows:
    print(json.dumps(r))
if len(sys.argv) > 1:
    json.dump(rows, open(f"{sys.argv[1]}/kernel_report.json", "w"), indent=1)
