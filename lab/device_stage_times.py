"""Per-stage forward timing on the device: each launcher timed alone over a small config grid.

Usage: python lab/device_stage_times.py OUT_DIR [--seconds=S]
"""
from __future__ import annotations

import itertools
import json
import sys
import time

import torch
from triton.testing import do_bench

from gdn2_kernels import _varlen
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import get_spec
from gdn2_kernels.kernels.intra_fwd import intra_fwd
from gdn2_kernels.kernels.state_fwd import state_fwd

out_dir = sys.argv[1]
budget = float(next((a.split("=")[1] for a in sys.argv if a.startswith("--seconds=")), 200))
deadline = time.time() + budget
dev = torch.device("cuda")
rows = []
intra, state = get_spec("intra_fwd"), get_spec("state_fwd")


def ms(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


for B, T in [(1, 16384), (8, 2048)]:
    x = make_inputs(B, T, 16, 128, 128, torch.bfloat16, dev)
    for BT in (64, 32):
        base = intra.config({"BT": BT})
        g_cum, A, A_qk, Y, U, Qg, Kt, gC = intra_fwd(x.q, x.k, x.v, x.g, x.b, x.w, 0.088, None, None, base)
        nc = _varlen.num_chunks(T, B, None, BT)
        grid_i = [intra.config({"BT": BT, "BC": 16, "BK": bk, "BV": bv, "SOLVE_PRECISION": p,
                                "num_warps": nw, "num_stages": ns})
                  for bk, bv, p, nw, ns in itertools.product((32, 64), (32, 64), ("tf32x3", "tf32"),
                                                             (4, 8), (1, 2))]
        grid_s = [state.config({"BT": BT, "BV": bv, "num_warps": nw, "num_stages": ns})
                  for bv, nw, ns in itertools.product((16, 32, 64), (4, 8), (1, 2, 3))]
        for cfg in grid_s + grid_i:
            if time.time() > deadline:
                break
            if cfg.kernel == "state_fwd":
                fn = lambda: state_fwd(Qg, Kt, gC, Y, U, A_qk, None, False, False,  # noqa
                                       None, None, nc, cfg)
            else:
                fn = lambda: intra_fwd(x.q, x.k, x.v, x.g, x.b, x.w, 0.088, None, None, cfg)  # noqa
            row = {"B": B, "T": T, "kernel": cfg.kernel, "config": cfg.as_dict()}
            try:
                fn()
                row["ms"] = ms(fn)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            json.dump(rows, open(f"{out_dir}/stage_times.json", "w"), indent=1)
best = {}
for r in rows:
    if "ms" in r:
        k = (r["B"], r["T"], r["kernel"], r["config"]["BT"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
for k, r in sorted(best.items()):
    print("BEST", k, round(r["ms"], 4), r["config"])
