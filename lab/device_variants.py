"""Pipeline variants side by side: end-to-end fwd and fwd+bwd, per-stage times, output drift.

Usage: python lab/device_variants.py OUT_DIR [--base=resolved|default] [--shapes=8x2048,1x16384]
                                         [VARIANT ...]

A VARIANT is ``kernel:{"PARAM": value, ...}`` (one kernel's config changed from the base) or
``pipeline:BT`` (every kernel at its spec default with chunk size BT). Several changes join with
``+``: ``intra_fwd:{"BC": 16}+intra_bwd:{"BC": 32}``. The base is the resolved pipeline of this
GPU (the shipped profile) or the spec defaults at chunk 64. For each shape and variant the script
records fwd and fwd+bwd medians (CUDA events, L2 flushed), the per-stage times of
``gdn2_kernels.bench.stages.breakdown``, and the largest relative RMS difference of o and of every gradient from
the base's (a config must not change results beyond rounding). Writes OUT_DIR/variants.json as it
goes.
"""
from __future__ import annotations

import json
import sys

import torch

from gdn2_kernels.bench.model import Shape
from gdn2_kernels.bench.stages import breakdown
from gdn2_kernels import chunk_gdn2, dispatch
from gdn2_kernels.accuracy import rel_rms
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import ProblemKey
from gdn2_kernels.bench.provenance import collect

out_dir = sys.argv[1]
opts = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--"))
specs = [a for a in sys.argv[2:] if not a.startswith("--")]
shapes = [tuple(int(n) for n in s.split("x")) for s in opts.get("shapes", "8x2048,1x16384").split(",")]
H, D = 16, 128
key = ProblemKey(D, D, "bfloat16")
base = (dispatch.resolve(key) if opts.get("base", "resolved") == "resolved"
        else dispatch.default_pipeline(64))
result = {
    "schema": "gdn2.lab/1", "experiment": "variants", "provenance": collect(),
    "base_source": base.source, "base": {k: c.as_dict() for k, c in base.configs}, "rows": [],
}


def pipeline_of(spec: str) -> dispatch.PipelineConfig:
    if spec == "base":
        return base
    parts = base.as_dict()
    for change in spec.split("+"):
        kernel, _, body = change.partition(":")
        if kernel == "pipeline":
            parts = dispatch.default_pipeline(int(body)).as_dict()
            continue
        parts[kernel] = parts[kernel].replace(**json.loads(body))
    return dispatch.complete_pipeline(parts, spec)


def outputs(args, dO):
    for a in args:
        a.grad = None
    o, _ = chunk_gdn2(*args, validate_values=False)
    o.backward(dO)
    return [o.detach().float().clone()] + [a.grad.float().clone() for a in args]


for B, T in shapes:
    x = make_inputs(B, T, H, D, D, torch.bfloat16, "cuda", seed=1)
    xi = x.to(torch.bfloat16, "cuda", requires_grad=True)
    args = (xi.q, xi.k, xi.v, xi.g, xi.b, xi.w)
    dO = torch.randn_like(xi.v)
    with dispatch.override(base):
        ref = outputs(args, dO)
    for spec in ["base"] + specs:
        row: dict = {"B": B, "T": T, "variant": spec}
        try:
            pipe = pipeline_of(spec)
            with dispatch.override(pipe):
                got = outputs(args, dO)
                row["max_rel_rms_vs_base"] = max(rel_rms(a, b) for a, b in zip(got, ref))
                rep = breakdown(Shape(B, T, H, D, "bfloat16"), reps=10)
            row.update(fwd_ms=rep.fwd_ms, fwdbwd_ms=rep.fwdbwd_ms,
                       stages={f"{s.phase}:{s.stage}": round(s.ms, 4) for s in rep.stages})
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        json.dump(result, open(f"{out_dir}/variants.json", "w"), indent=1)
