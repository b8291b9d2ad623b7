"""Localise a device fault: run each stage with a synchronize after it (small shape)."""
import sys

import torch

from gdn2_kernels import chunk_gdn2
from gdn2_kernels.inputs import make_inputs

B, T = (int(a) for a in sys.argv[1:3])
x = make_inputs(B, T, 2, 128, 128, torch.bfloat16, "cuda").to(torch.bfloat16, "cuda",
                                                               requires_grad=True)
o, _ = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, validate_values=False)
torch.cuda.synchronize()
print("forward ok", flush=True)
o.backward(torch.randn_like(o))
torch.cuda.synchronize()
print("backward ok", flush=True)
