"""Compiling ahead (gdn2_kernels/_launch.py): the meta-tensor walk must launch exactly what the real
call launches (same kernels, grids, ints, flags, configs and tensor dtypes), or its compiles would
be for other specialisations and the real call would still compile one kernel after another."""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels import _launch, dispatch, ops, pipeline
from gdn2_kernels.configs import dtype_name
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.configs import ProblemKey


def _recorder(calls, run_real):
    real = _launch.launch

    def launch(kernel, grid, **kwargs):
        name = getattr(kernel, "fn", kernel).__name__
        calls.append((name, tuple(grid), {k: ("tensor", v.dtype) if isinstance(v, torch.Tensor)
                                           else v for k, v in kwargs.items()}))
        if run_real:
            real(kernel, grid, **kwargs)
    return launch


@pytest.mark.parametrize("l2norm,h0,final,recompute,variants", [
    (True, True, True, False, False),
    (False, False, False, True, False),
    (False, True, True, True, True),    # segmented state scans (forced) and split phase D
])
def test_walk_launches_what_the_real_call_launches(monkeypatch, force_segments, l2norm, h0, final,
                                                   recompute, variants):
    x = make_inputs(1, 40, 2, 32, 48, torch.float32, "cpu", with_h0=h0)
    if variants:
        force_segments(1)
        pipe = dispatch.default_pipeline(16).as_dict()
        pipe["state_fwd"] = pipe["state_fwd"].replace(SCAN="segmented")
        pipe["state_bwd"] = pipe["state_bwd"].replace(SCAN="segmented")
        pipe["intra_bwd"] = pipe["intra_bwd"].replace(PHASE_D="split")
        monkeypatch.setattr(dispatch, "resolve", lambda key: dispatch.complete_pipeline(pipe, "t"))
    leaves = [t.requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w)]
    if h0:
        x.h0.requires_grad_()
    real_calls, walk_calls = [], []
    monkeypatch.setattr(_launch, "launch", _recorder(real_calls, run_real=True))
    o, ht = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                           output_final_state=final, use_qk_l2norm_in_kernel=l2norm,
                           disable_recompute=not recompute)
    loss = o.sum() + (ht.sum() if ht is not None else 0)
    loss.backward()
    assert all(t.grad is not None for t in leaves)

    opts = pipeline.GDN2Options(scale=32 ** -0.5, output_final_state=final,
                           use_qk_l2norm_in_kernel=l2norm, has_initial_state=h0, is_varlen=False,
                           disable_recompute=not recompute)
    pipe = dispatch.resolve(ProblemKey(32, 48, dtype_name(torch.float32)))
    walk = pipeline.compile_ahead_walk(x.q, x.k, x.v, x.g, x.b, x.w, x.h0, opts, pipe,
                                   with_backward=True, need_dh0=h0)
    monkeypatch.setattr(_launch, "launch", _recorder(walk_calls, run_real=False))
    with _launch.walking(torch.device("cpu")):
        walk()
    assert [c[0] for c in walk_calls] == [c[0] for c in real_calls]
    assert walk_calls == real_calls


def test_launch_in_a_walk_only_warms_up_with_dtype_stand_ins():
    seen = {}

    class Kernel:
        def __getitem__(self, grid):
            raise AssertionError("a walk must not launch")

        def warmup(self, grid, **kwargs):
            seen.update(kwargs, grid=grid)

    with _launch.walking(torch.device("cpu")):
        _launch.launch(Kernel(), (3, 1), x=torch.empty(2, device="meta", dtype=torch.bfloat16),
                       T=40, flag=None, BV=16)
    assert seen["grid"] == (3, 1) and seen["T"] == 40 and seen["flag"] is None
    assert type(seen["x"]).__name__ == "MockTensor" and seen["x"].dtype == torch.bfloat16
    assert _launch.walk_device(torch.device("meta")).type == "meta"  # outside a walk


def test_compile_ahead_only_for_gpu_inputs_and_when_enabled(monkeypatch):
    """On CPU (the interpreter compiles nothing) and with GDN2_COMPILE_AHEAD=0 it is a no-op."""
    x = make_inputs(1, 8, 1, 16, 16, torch.float32, "cpu")

    class Ctx:
        needs_input_grad = (True,) * 9

    opts = pipeline.GDN2Options(0.25, False, False, False, False, False)
    pipe = dispatch.resolve(ProblemKey(16, 16, "float32"))
    with pipeline.compile_ahead(Ctx(), x.q, x.k, x.v, x.g, x.b, x.w, None, None, opts, pipe) as did:
        assert did is False
    monkeypatch.setenv("GDN2_COMPILE_AHEAD", "0")
    from gdn2_kernels import _env

    assert not _env.compile_ahead_enabled()


def test_compile_ahead_runs_the_walk_inside_triton_async_mode(monkeypatch):
    """With Triton's AsyncCompileMode (3.4+), the walk runs with it active and launches only
    warm up; inside someone else's AsyncCompileMode it steps aside (they cannot nest)."""
    mode_cls = _launch.async_compile_mode()
    if mode_cls is None:
        pytest.skip("this Triton has no AsyncCompileMode")
    from triton.runtime._async_compile import active_mode

    seen = []

    def walk():
        seen.append((active_mode.get() is not None, _launch.walk_device(torch.device("meta"))))

    with _launch.compile_ahead(torch.device("cpu"), walk) as did:
        assert did is True
    assert seen == [(True, torch.device("cpu"))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, mode_cls(pool):
        with _launch.compile_ahead(torch.device("cpu"), walk) as did:
            assert did is False
    assert len(seen) == 1


def test_a_failing_walk_warns_and_the_call_goes_on():
    if _launch.async_compile_mode() is None:
        pytest.skip("this Triton has no AsyncCompileMode")

    def walk():
        raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning, match="compiling ahead failed"):
        with _launch.compile_ahead(torch.device("cpu"), walk) as did:
            assert did is True


@pytest.mark.gpu
def test_first_call_with_compile_ahead_matches_a_plain_call_bitwise():
    """Compiling ahead changes when kernels compile, never what runs."""
    x = make_inputs(2, 300, 4, 64, 64, torch.bfloat16, "cuda", with_h0=True)
    outs = []
    for _ in range(2):  # the first call of this signature compiles ahead, the second does not
        leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.g, x.b, x.w)]
        o, ht = ops.chunk_gdn2(*leaves, initial_state=x.h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True)
        (o.float().square().sum() + ht.sum()).backward()
        outs.append([o, ht] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_a_failing_parallel_compile_falls_back_to_lazy_compiling(monkeypatch):
    """If the compile-ahead machinery fails (here: on leaving its block), the call runs again
    compiling lazily, gives the same results, warns once, and later calls skip compiling ahead."""
    import contextlib

    entered = []

    @contextlib.contextmanager
    def broken(*args, **kwargs):
        entered.append(1)
        yield True
        raise RuntimeError("async compile broke")

    x = make_inputs(1, 40, 2, 32, 32, torch.float32, "cpu")
    want, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    monkeypatch.setattr(pipeline, "compile_ahead", broken)
    monkeypatch.setattr(pipeline, "_compile_ahead_broken", [])
    with pytest.warns(RuntimeWarning, match="compiling ahead failed.*async compile broke"):
        got, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    assert torch.equal(got, want)
    again, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    assert torch.equal(again, want) and len(entered) == 1


def test_a_real_kernel_error_is_not_swallowed(monkeypatch):
    """Errors of the call itself (compiling ahead off) propagate unchanged."""
    def boom(*args, **kwargs):
        raise ValueError("kernel failed")

    monkeypatch.setattr(pipeline, "run_forward", boom)
    x = make_inputs(1, 20, 1, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="kernel failed"):
        ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
