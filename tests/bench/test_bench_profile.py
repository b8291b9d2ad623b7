"""gdn2 profile on the CPU: stages discovered from the launchers, through the interpreter."""
from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from gdn2_kernels.bench import report as render
from gdn2_kernels.bench.model import Shape
from gdn2_kernels.bench.profile import discover_launchers, profile, run_ncu


def test_launchers_are_discovered_from_the_orchestrators():
    found = {(m.__name__.rsplit(".", 1)[-1], n) for m, n, _ in discover_launchers()}
    assert ("chunk_fwd", "intra_fwd") in found and ("chunk_fwd", "state_fwd") in found
    assert all(not n.endswith("_grid") and not n.startswith("_") for _, n in found)


def test_profile_forward_stages_and_restores_launchers():
    import gdn2_kernels.kernels.chunk_fwd as orchestrator

    before = orchestrator.intra_fwd
    rep = profile(Shape(1, 70, 1, 16, "float32"), backward=True, reps=1)
    assert orchestrator.intra_fwd is before
    stages = {(s.phase, s.stage): s for s in rep.stages}
    assert {("fwd", "intra_fwd"), ("fwd", "state_fwd")} <= set(stages)
    assert sum(s.share for s in rep.stages) == pytest.approx(100.0)
    intra = stages[("fwd", "intra_fwd")]
    assert intra.calls == 1 and intra.bytes > 0 and intra.flops > 0 and intra.tflops is not None
    assert rep.interpreter and rep.fwd_ms is None
    console = Console(record=True, width=160)
    console.print(render.profile_table(rep))
    assert "intra_fwd" in console.export_text()
    assert any("sum of stages" in line for line in render.profile_lines(rep))


def test_ncu_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("gdn2_kernels.bench.profile.shutil.which", lambda name: None)
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
