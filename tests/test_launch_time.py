"""Resolution's last step: ``dispatch.launch_time`` says the configs the launchers really run.

The serial passes narrow BV and cap the warps when few sequences x heads would leave SMs idle,
and the state passes may run as a two-level scan (``_parallel``). On the CPU there is no SM
count, so a GPU's is stood in for; every launch is observed through ``_launch.observed``.
"""
from __future__ import annotations

import pytest
import torch

from gdn2_kernels import _device, _launch, dispatch
from gdn2_kernels.inputs import make_inputs
from gdn2_kernels.ops import chunk_gdn2, fused_recurrent_gdn2

SMS = 132


class _Launches:
    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    def before(self, kernel, grid, kwargs):
        self.seen.append((_launch.kernel_name(kernel), dict(kwargs)))

    def after(self, kernel, grid, kwargs):
        pass

    def of(self, stage: str) -> list[dict]:
        return [kw for name, kw in self.seen if name == f"_{stage}_kernel"]


def _wide(scan: str = "serial") -> dispatch.PipelineConfig:
    pipe = dispatch.default_pipeline(16).as_dict()
    for name in ("state_fwd", "state_bwd"):
        pipe[name] = pipe[name].replace(BV=64, num_warps=8, SCAN=scan)
    pipe["recurrent_fwd"] = pipe["recurrent_fwd"].replace(BV=64, num_warps=8)
    return dispatch.complete_pipeline(pipe, "test")


@pytest.mark.parametrize("scan,T", [("serial", 40), ("segmented", 530)])
def test_chunk_launches_match_launch_time(monkeypatch, scan, T):
    monkeypatch.setattr(_device, "sm_count", lambda device: SMS)
    pipe = _wide(scan)
    x = make_inputs(1, T, 1, 16, 64, torch.float32, "cpu", seed=0).to(requires_grad=True)
    with dispatch.override(pipe), _launch.observed(_Launches()) as launches:
        o, _ = chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
        o.sum().backward()
    launched = dispatch.launch_time(pipe, 1, 1, T, 64, torch.device("cpu"))
    for stage in ("state_fwd", "state_bwd"):
        want = launched.pipeline[stage]
        runs = [kw for kw in launches.of(stage) if kw["V"] == 64]
        assert runs, stage
        assert all(kw["BV"] == want["BV"] and kw["num_warps"] == want["num_warps"]
                   for kw in runs), (stage, want, [(kw["BV"], kw["num_warps"]) for kw in runs])
        assert (want["BV"], want["num_warps"]) != (64, 8)  # the rule did act
    text = "; ".join(launched.changes)
    assert "state_fwd: " in text and "num_warps 8 -> 4" in text
    assert ("two-level scan" in text) == (scan == "segmented")


def test_recurrent_launch_matches_launch_time(monkeypatch):
    monkeypatch.setattr(_device, "sm_count", lambda device: SMS)
    pipe = _wide()
    x = make_inputs(2, 1, 2, 16, 64, torch.float32, "cpu", seed=0)
    with torch.no_grad(), dispatch.override(pipe), _launch.observed(_Launches()) as launches:
        fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w)
    want = dispatch.launch_time(pipe, 2, 2, 1, 64, torch.device("cpu"),
                                op="recurrent").pipeline["recurrent_fwd"]
    (kw,) = launches.of("recurrent_fwd")
    assert (kw["BV"], kw["num_warps"]) == (want["BV"], want["num_warps"]) != (64, 8)


def test_no_sm_count_no_change():
    pipe = _wide()
    launched = dispatch.launch_time(pipe, 1, 1, 4096, 64, torch.device("cpu"))
    assert launched.pipeline == pipe and launched.changes == ()
