"""Importing gdn2_kernels changes neither the environment nor Triton, and CPU calls still run.

Without a CUDA device each launch on CPU tensors runs through Triton's interpreter with the bf16
fixes (``gdn2_kernels._interpreter``), and everything it swaps is put back after the launch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os
import triton.language as tl
from triton.runtime import interpreter as interp
from triton.runtime.jit import JITFunction

builder = interp.InterpreterBuilder
before = (builder.create_dot, builder.cast_impl, tl.cdiv)


def state():
    from gdn2_kernels.kernels import l2norm
    return {"env": "TRITON_INTERPRET" in os.environ,
            "dot": builder.create_dot is before[0], "cast": builder.cast_impl is before[1],
            "cdiv": tl.cdiv is before[2] and isinstance(tl.cdiv, JITFunction),
            "ours_compiled": isinstance(l2norm._l2norm_fwd_kernel, JITFunction)}


import torch
import gdn2_kernels
from gdn2_kernels.accuracy import TOLERANCES, rel_rms
from gdn2_kernels.inputs import make_inputs

imported = state()
x = make_inputs(1, 40, 2, 32, 32, torch.bfloat16, "cpu", with_h0=True, seed=0)
o, ht = gdn2_kernels.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                output_final_state=True)
d = {n: t.double() for n, t in x.tensors().items()}
ref, _ = gdn2_kernels.naive_recurrent_gdn2(d["q"], d["k"], d["v"], d["g"], d["b"], d["w"],
                                           initial_state=d["h0"], output_final_state=True)
print(json.dumps({"imported": imported, "called": state(), "err": rel_rms(o, ref),
                  "tol": TOLERANCES["bfloat16"]["o"]}))
"""


def test_import_leaves_env_and_triton_alone_and_cpu_calls_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, on any machine
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    untouched = {"env": False, "dot": True, "cast": True, "cdiv": True, "ours_compiled": True}
    assert out["imported"] == untouched, out
    assert out["called"] == untouched, out  # the launches put everything back
    assert out["err"] <= out["tol"], out  # bf16, so the interpreter fixes were in effect


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="launches are interpreted one by one only without a CUDA device")
def test_a_launch_swaps_back_even_when_the_kernel_fails():
    import triton.language as tl
    from triton.runtime import interpreter as interp

    from gdn2_kernels import _interpreter
    from gdn2_kernels.kernels import l2norm

    kernel, cdiv, dot = l2norm._l2norm_fwd_kernel, tl.cdiv, interp.InterpreterBuilder.create_dot
    with pytest.raises(Exception):
        _interpreter.launch(kernel, (1,), {"x": torch.zeros(4, 16)})  # arguments missing
    assert l2norm._l2norm_fwd_kernel is kernel and tl.cdiv is cdiv
    assert interp.InterpreterBuilder.create_dot is dot
