"""One fwd+bwd step for Nsight Compute: where each stage kernel spends its time.

Usage (on the GPU machine):

    ncu --clock-control none --kernel-name regex:'_(intra|state)_' --launch-skip 5 \
        --launch-count 5 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section LaunchStats --section Occupancy --section WarpStateStats \
        python lab/device_ncu.py 8x2048

The first step (5 launches: intra_fwd, state_fwd, the backward's state_fwd, state_bwd,
intra_bwd) compiles and warms; the second is the one profiled. Configs are the resolved ones
(the shipped profile of this GPU), as the default call uses them.
"""
from __future__ import annotations

import sys

import torch

from gdn2_kernels import chunk_gdn2
from gdn2_kernels.inputs import make_inputs

B, T = (int(n) for n in (sys.argv[1] if len(sys.argv) > 1 else "8x2048").split("x"))
x = make_inputs(B, T, 16, 128, 128, torch.bfloat16, "cuda", seed=1).to(
    torch.bfloat16, "cuda", requires_grad=True)
args = (x.q, x.k, x.v, x.g, x.b, x.w)
dO = torch.randn_like(x.v)
for _ in range(2):
    o, _ = chunk_gdn2(*args)
    torch.autograd.grad(o, args, dO)
    torch.cuda.synchronize()
print("done", B, T)
