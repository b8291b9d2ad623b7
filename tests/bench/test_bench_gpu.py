"""pytest-benchmark regression tracking on the device (``gpu`` marker; skipped on CPU).

    pytest -m gpu tests/bench/test_bench_gpu.py --benchmark-json=bench.json
    pytest-benchmark compare  # across commits

Each case times one registry provider's step with pytest-benchmark (wall clock around the step
and a device synchronisation); ``extra_info`` carries the model's FLOPs and bytes, so achieved
rates can be derived from the JSON. ``gdn2 bench`` remains the reference measurement (CUDA
events, L2 flushed).
"""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels.bench import model
from gdn2_kernels.bench.inputs import ProblemInputs
from gdn2_kernels.bench.model import Shape
from gdn2_kernels.bench.providers import default_registry, load_provider

pytestmark = pytest.mark.gpu

PROVIDERS = ("gdn2", "gdn2-kda", "fla-gdn2", "fla-kda", "sdpa-flash", "mamba2")
SHAPES = ((4, 4096), (1, 16384))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("bt", SHAPES, ids=lambda bt: f"B{bt[0]}-T{bt[1]}")
@pytest.mark.parametrize("name", PROVIDERS)
def test_provider_step(benchmark, name, bt, mode):
    p = default_registry().get(name)
    op, reason = load_provider(p)
    if op is None:
        pytest.skip(reason)
    shape = Shape(*bt)
    step = p.make_step(op, ProblemInputs(shape, "cuda"), mode)
    try:
        step()
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    torch.cuda.synchronize()

    def run():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
    w = model.work(p.family, mode, shape)
    benchmark.extra_info.update(flops=w.flops, bytes=w.bytes, tokens=shape.tokens,
                                family=p.family)
