"""fp32 accuracy of chunk_gdn2 against fp64 at the `gdn2 verify` case (B2 T1000 H4 K64 V96).

Usage: python lab/device_fp32_check.py   (run once plain and once with TRITON_F32_DEFAULT=ieee)
Prints o / ht relative RMS for the spec defaults and for SOLVE_PRECISION=ieee in both intra kernels.
"""
import os

import torch

from gdn2_kernels import chunk_gdn2, dispatch
from gdn2_kernels.accuracy import rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.reference import naive_recurrent_gdn2

x = make_inputs(2, 1000, 4, 64, 96, torch.float32, "cuda", with_h0=True)
x64 = x.to(torch.float64)
ro, rh = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, initial_state=x64.h0,
                              output_final_state=True)
for bt in (64, 32):
    for prec in ("tf32x3", "ieee"):
        base = dispatch.default_pipeline(bt).as_dict()
        for kern in ("intra_fwd", "intra_bwd"):
            base[kern] = base[kern].replace(SOLVE_PRECISION=prec)
        with dispatch.override(base):
            o, h = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                              output_final_state=True)
        print(os.environ.get("TRITON_F32_DEFAULT", "-"), "BT", bt, prec,
              "o %.3e ht %.3e" % (rel_rms(o, ro), rel_rms(h, rh)), flush=True)
