"""Long-context accuracy (bf16, H=16, K=V=128) of our op with the configs dispatch resolves
(the shipped profile on a tuned GPU), with the spec defaults, and of FLA, against the fp64
recurrence: forward at T=16384, forward and all gradients at T=4096.

Usage: python lab/device_accuracy_long.py OUT_DIR
"""
from __future__ import annotations

import json
import sys

import torch

from gdn2_kernels import chunk_gdn2, dispatch
from gdn2_kernels.accuracy import rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.reference import naive_recurrent_gdn2

out = {"device": torch.cuda.get_device_name(0), "rows": []}
key = ProblemKey(128, 128, "bfloat16")
resolved = dispatch.resolve(key)
out["resolved_source"] = resolved.source
impls = {
    "ours_resolved": (lambda *a, **kw: chunk_gdn2(*a, validate_values=False, **kw), resolved),
    "ours_defaults": (lambda *a, **kw: chunk_gdn2(*a, validate_values=False, **kw),
                      dispatch.default_pipeline()),
}
try:
    from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2
    impls["fla"] = (fla_chunk_gdn2, None)
except ImportError as exc:
    out["fla"] = f"unavailable: {exc}"
NAMES = ("q", "k", "v", "g", "b", "w", "h0")
for T, grads in ((16384, False), (4096, True)):
    x = make_inputs(1, T, 16, 128, 128, torch.bfloat16, "cuda", with_h0=True)
    x64 = x.to(torch.float64, "cuda", requires_grad=grads)
    ro, rh = naive_recurrent_gdn2(x64.q, x64.k, x64.v, x64.g, x64.b, x64.w, initial_state=x64.h0,
                                  output_final_state=True)
    do, dht = torch.randn_like(ro), torch.randn_like(rh)
    if grads:
        torch.autograd.backward((ro, rh), (do, dht))
    for name, (fn, pipe) in impls.items():
        xi = x.to(torch.bfloat16, "cuda", requires_grad=grads)
        ctx = dispatch.override(pipe) if pipe is not None else torch.enable_grad()
        with ctx:
            o, ht = fn(xi.q, xi.k, xi.v, xi.g, xi.b, xi.w, initial_state=xi.h0,
                       output_final_state=True)
            if grads:
                torch.autograd.backward((o, ht), (do.to(o.dtype), dht.float()))
        row = {"T": T, "impl": name, "o": rel_rms(o, ro), "ht": rel_rms(ht, rh)}
        if grads:
            row.update({f"d{n}": rel_rms(getattr(xi, n).grad, getattr(x64, n).grad) for n in NAMES})
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        json.dump(out, open(f"{sys.argv[1]}/accuracy_long.json", "w"), indent=1)
    del x64, ro, rh
    torch.cuda.empty_cache()
json.dump(out, open(f"{sys.argv[1]}/accuracy_long.json", "w"), indent=1)
