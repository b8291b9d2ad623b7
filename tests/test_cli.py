"""``gdn2 verify`` through typer's CliRunner: exit codes, the rendered table, ``--json``.

Other commands (tune, bench, cache, ...) are tested beside their libraries in tests/tuner/ and
tests/bench/.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import gdn2_kernels.tuner.verify
from gdn2_kernels.accuracy import ErrorReport
from gdn2_kernels.cli import app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help_lists_verify(runner: CliRunner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "verify" in result.stdout


def test_verify_prints_a_table_and_passes(runner: CliRunner):
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 0, result.output
    assert "chunk_gdn2 vs fp64 recurrence" in result.stdout
    assert "rel RMS" in result.stdout and "tolerance" in result.stdout
    assert "all checks passed" in result.stdout
    assert "interpreter" in result.stdout  # says that it ran on the CPU


def test_verify_json_parses(runner: CliRunner):
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["interpreter"] is True
    assert report["results"]
    for res in report["results"]:
        assert res["ok"] is True and res["error"] is None
        assert {e["name"] for e in res["errors"]} >= {"o", "ht"}
        assert all(e["rel_rms"] <= e["tolerance"] for e in res["errors"])


def test_verify_failure_exits_nonzero(runner: CliRunner, monkeypatch: pytest.MonkeyPatch):
    """A report with an error over tolerance renders FAIL and exits 1 (no kernels run here)."""
    case = gdn2_kernels.tuner.verify.VerifyCase(1, 8, 1, 16, 16)

    def failing_verify(**_):
        bad = gdn2_kernels.tuner.verify.VerifyResult(case, [ErrorReport("o", 1.0, 1.0, 1e-3)], 0.0)
        return gdn2_kernels.tuner.verify.VerifyReport("cpu-interpreter", True, [bad])

    monkeypatch.setattr(gdn2_kernels.tuner.verify, "verify", failing_verify)
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "some checks failed" in result.stdout
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ok"] is False
