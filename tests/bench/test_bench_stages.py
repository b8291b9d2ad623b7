"""gdn2 stages on the CPU: launches observed through _launch, grouped by KernelSpec."""
from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from gdn2_kernels import _launch
from gdn2_kernels.bench import report as render
from gdn2_kernels.bench.model import Shape
from gdn2_kernels.bench.stages import breakdown, run_ncu, stage_of


def test_kernels_map_to_their_specs():
    assert stage_of("_intra_fwd_kernel") == "intra_fwd"
    assert stage_of("_intra_bwd_pairwise_kernel") == "intra_bwd"  # a part of intra_bwd
    assert stage_of("_state_bwd_kernel") == "state_bwd"
    assert stage_of("_something_new_kernel") == "something_new"


def test_breakdown_of_forward_and_backward_leaves_no_observer():
    rep = breakdown(Shape(1, 70, 1, 16, "float32"), backward=True, reps=1)
    assert not _launch._observers
    stages = {(s.phase, s.stage): s for s in rep.stages}
    assert {("fwd", "intra_fwd"), ("fwd", "state_fwd"), ("bwd", "state_fwd"),
            ("bwd", "state_bwd"), ("bwd", "intra_bwd")} <= set(stages)
    assert sum(s.share for s in rep.stages) == pytest.approx(100.0)
    intra = stages[("fwd", "intra_fwd")]
    assert intra.calls == 1 and intra.bytes > 0 and intra.flops > 0 and intra.tflops is not None
    assert rep.interpreter and rep.fwd_ms is None and rep.backward
    assert rep.launched["intra_fwd"]["BT"] == rep.chunk_size
    assert rep.launch_changes == []  # no SM count on the CPU
    console = Console(record=True, width=160)
    console.print(render.stages_table(rep))
    assert "intra_fwd" in console.export_text()
    assert any("sum of stages" in line for line in render.stages_lines(rep))


def test_profile_is_the_deprecated_name_of_stages():
    from gdn2_kernels.cli import app

    args = ["--shape", "1x20", "--heads", "1", "--dim", "16", "--reps", "1", "--forward-only",
            "--json"]
    new = CliRunner().invoke(app, ["stages", *args])
    old = CliRunner().invoke(app, ["profile", *args])
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert "deprecated" in old.stderr.lower()
    a, b = json.loads(new.stdout), json.loads(old.stdout)
    assert [s["stage"] for s in a["stages"]] == [s["stage"] for s in b["stages"]]


def test_ncu_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("gdn2_kernels.bench.stages.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="ncu"):
        run_ncu("intra_fwd", Shape(1, 64, 1, 16), tmp_path)


def test_cli_bench_json_lists_unavailable_providers(monkeypatch):
    from gdn2_kernels.cli import app

    import gdn2_kernels.bench.runner as runner
    from gdn2_kernels.bench.model import Ceilings

    monkeypatch.setattr("gdn2_kernels.bench.provenance.collect", lambda: {"gpu": {"name": None}})
    monkeypatch.setattr(runner.CudaMeasurer, "ceilings", lambda self: Ceilings(1.0, 1.0))
    res = CliRunner().invoke(app, ["bench", "-p", "fla-gdn2", "-p", "mamba2", "--shapes",
                                   "1x64", "--json"])
    if not torch.cuda.is_available():  # nothing can be timed: the report, then exit 1
        assert res.exit_code == 1 and "no row was timed" in res.stderr
    d = json.loads(res.stdout)
    st = {p["name"]: p for p in d["providers"]}
    assert set(st) == {"fla-gdn2", "mamba2"}
    if not st["fla-gdn2"]["available"]:
        assert st["fla-gdn2"]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="every provider is unavailable only on CPU")
def test_cli_bench_without_provider_option_runs_every_provider_and_resumes(monkeypatch, tmp_path):
    """No -p means the whole registry; --save is resumable and --resume needs --save."""
    from gdn2_kernels.cli import app

    monkeypatch.setattr("gdn2_kernels.bench.provenance.collect", lambda: {"gpu": {"name": None}})
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "--shapes", "1x64", "-m", "fwd", "--save", str(out)])
    assert res.exit_code == 1 and "no row was timed" in res.stderr, res.output
    names = {r["provider"] for r in json.loads(out.read_text())["rows"]}
    assert {"gdn2", "fla-gdn2", "sdpa-flash", "mamba2"} <= names
    res = CliRunner().invoke(app, ["bench", "--shapes", "1x64", "-m", "fwd", "--save", str(out),
                                   "--resume"])
    assert res.exit_code == 1 and "rows kept" in res.output, res.output
    res = CliRunner().invoke(app, ["bench", "--resume"])
    assert res.exit_code != 0 and "--save" in res.output
