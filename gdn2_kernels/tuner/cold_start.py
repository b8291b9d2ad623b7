"""Cold start: the first ``chunk_gdn2`` forward+backward of a fresh process, compile included.

Run it as its own process (``python -m gdn2_kernels.tuner.cold_start``), with
``TRITON_CACHE_DIR`` pointing at an empty folder for a true cold start: it times the package
import, the first call (config lookup + Triton compile + run) and a second call, and reports
where dispatch took the configs from.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402


@dataclass
class ColdStart:
    device: str
    config_source: str
    workload: str
    shape: str
    import_s: float
    first_call_s: float
    second_call_s: float
    total_s: float
    compile_ahead: bool = True  # GDN2_COMPILE_AHEAD (kernels compiled in parallel on the first call)


def run(B: int = 4, T: int = 4096, H: int = 16, D: int = 128, dtype: str = "bfloat16") -> ColdStart:
    import torch

    import gdn2_kernels
    from gdn2_kernels import _device, dispatch
    from gdn2_kernels.inputs import make_inputs
    from gdn2_kernels.configs import ProblemKey

    t_import = time.perf_counter() - _T0
    dev = _device.default_device()
    dt = getattr(torch, dtype)
    x = make_inputs(B, T, H, D, D, dt, dev, seed=0).to(dt, dev, requires_grad=True)

    def call() -> None:
        o, _ = gdn2_kernels.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, use_qk_l2norm_in_kernel=True)
        o.backward(torch.ones_like(o))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    t = time.perf_counter()
    call()
    second = time.perf_counter() - t
    source = dispatch.resolve(ProblemKey(D, D, dtype)).source
    from gdn2_kernels import _env

    return ColdStart(_device.gpu_name(), source, "fwd+bwd", f"B{B}-T{T}-H{H}-D{D}-{dtype}",
                     t_import, first, second, time.perf_counter() - _T0,
                     _env.compile_ahead_enabled())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 4), ("T", 4096), ("H", 16), ("D", 128)):
        ap.add_argument(f"-{name}", type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = run(a.B, a.T, a.H, a.D, a.dtype)
    if a.json:
        print(json.dumps(asdict(res), indent=2))
    else:
        print(f"{res.device}: configs from {res.config_source}; {res.workload} {res.shape}: import "
              f"{res.import_s:.1f} s, first call {res.first_call_s:.1f} s, second "
              f"{res.second_call_s * 1e3:.1f} ms, total {res.total_s:.1f} s.")


if __name__ == "__main__":
    main()
