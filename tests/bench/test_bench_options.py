"""``gdn2 bench`` and ``gdn2 stages`` options: checked before any work (exit 2 naming the
option), providers mapped to the mode asked for (``-p gdn2 -m decode`` times ``gdn2-decode``),
a non-zero exit when no row was timed, and a breakdown a CPU can finish by default."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gdn2_kernels.bench.stages import CPU_SHAPE, GPU_SHAPE, default_problem
from gdn2_kernels.bench.providers import default_registry
from gdn2_kernels.bench.runner import BenchOptions, check_options, select_providers
from gdn2_kernels.cli import app
from gdn2_kernels.options import OptionError

runner = CliRunner()


def _text(res) -> str:
    return " ".join(res.stderr.replace("│", " ").split())


BAD_BENCH = [
    (["-m", "train"], "-m/--mode", "must be one of fwd, fwdbwd, decode; got 'train'"),
    (["--heads", "0"], "--heads", "must be >= 1, got 0"),
    (["--dim", "512"], "--dim", "must be between 1 and 256, got 512"),
    (["--dtype", "int8"], "--dtype", "must be one of bfloat16, float16, float32; got 'int8'"),
    (["--shapes", "0x64"], "--shapes", "B and T must be positive"),
    (["--shapes", "8by2048"], "--shapes", "is not BxT"),
    (["--decode-batches", "0"], "--decode-batches", "must be positive integers"),
    (["--decode-context", "0"], "--decode-context", "must be >= 1, got 0"),
    (["--rep-ms", "0"], "--rep-ms", "must be >= 1, got 0"),
    (["-p", "nope"], "-p/--provider", "unknown provider 'nope'; available: gdn2,"),
    (["-m", "decode", "-p", "gdn2-kda"], "-p/--provider",
     "no provider asked for runs in decode mode: gdn2-kda has no decode mode"),
]


@pytest.mark.parametrize("args, option, message", BAD_BENCH,
                         ids=[" ".join(b[0]) for b in BAD_BENCH])
def test_bad_bench_options_exit_2(tmp_path, args, option, message):
    save = tmp_path / "r.json"
    res = runner.invoke(app, ["bench", "--save", str(save), *args])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in _text(res) and message in _text(res)
    assert not save.exists()


def test_gdn2_in_decode_mode_is_the_decode_provider():
    reg = default_registry()
    chosen, notes = select_providers(BenchOptions(modes=("decode",), providers=("gdn2",)), reg)
    assert [p.name for p in chosen] == ["gdn2-decode"]
    assert notes == ["gdn2 has no decode mode: its decode rows time gdn2-decode "
                     "(gdn2_kernels fused_recurrent_gdn2)"]
    chosen, _ = select_providers(BenchOptions(modes=("fwd", "decode"),
                                              providers=("gdn2", "fla-gdn2")), reg)
    assert [p.name for p in chosen] == ["gdn2", "gdn2-decode", "fla-gdn2", "fla-gdn2-decode"]
    chosen, notes = select_providers(BenchOptions(modes=("fwd", "decode"),
                                                  providers=("gdn2-kda", "gdn2")), reg)
    assert [p.name for p in chosen] == ["gdn2-kda", "gdn2", "gdn2-decode"]
    assert notes[0] == "gdn2-kda has no decode mode (it runs in fwd, fwdbwd): no decode rows for it"
    with pytest.raises(OptionError, match="no provider asked for runs in decode mode"):
        select_providers(BenchOptions(modes=("fwd", "decode"), providers=("gdn2-kda",)), reg)
    assert len(select_providers(BenchOptions(), reg)[0]) == len(reg.names())


def test_the_library_checks_bench_options():
    with pytest.raises(OptionError, match="--dim"):
        check_options(BenchOptions(D=0))
    with pytest.raises(OptionError, match="--heads: must be an integer, got True"):
        check_options(BenchOptions(H=True))
    with pytest.raises(OptionError, match="-m/--mode: give at least one"):
        check_options(BenchOptions(modes=()))


def test_bench_exits_nonzero_when_no_row_was_timed_and_says_how_gdn2_was_mapped(monkeypatch):
    monkeypatch.setattr("gdn2_kernels.bench.provenance.collect", lambda: {"gpu": {"name": None}})
    res = runner.invoke(app, ["bench", "-m", "decode", "-p", "gdn2", "--decode-batches", "1"])
    assert res.exit_code == 1
    out = " ".join(res.stdout.split())
    assert "gdn2 has no decode mode: its decode rows time gdn2-decode" in out
    assert "gdn2-decode: no CUDA device" in out
    assert "no row was timed" in res.stderr
    res = runner.invoke(app, ["bench", "-m", "decode", "-p", "gdn2", "--decode-batches", "1",
                              "--json"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert [r["provider"] for r in report["rows"]] == ["gdn2-decode"]
    assert report["notes"][0].startswith("gdn2 has no decode mode")


def test_stages_on_a_cpu_shrinks_its_default_problem():
    assert default_problem(True) == (CPU_SHAPE, 2) and default_problem(False)[0] == GPU_SHAPE
    res = runner.invoke(app, ["stages", "--forward-only", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["shape"] == {"B": 1, "T": 64, "H": 1, "D": 32, "dtype": "float32",
                               "context": 0}
    assert report["reps"] == 2 and report["stages"]
    assert "Timing the stages of 1x64 H1 D32 float32, 2 passes" in " ".join(res.stderr.split())
    res = runner.invoke(app, ["stages", "--forward-only", "--json", "--shape", "1x40",
                              "--dim", "16", "--reps", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["shape"]["T"] == 40


BAD_STAGES = [
    (["--shape", "0x64"], "--shape", "B and T must be positive"),
    (["--shape", "2x64,1x128"], "--shape", "give one BxT (e.g. 2x8192), got "),
    (["--heads", "0"], "--heads", "must be >= 1, got 0"),
    (["--dim", "300"], "--dim", "must be between 1 and 256, got 300"),
    (["--dtype", "float64"], "--dtype", "got 'float64'"),
    (["--reps", "0"], "--reps", "must be >= 1, got 0"),
]


@pytest.mark.parametrize("args, option, message", BAD_STAGES,
                         ids=[" ".join(b[0]) for b in BAD_STAGES])
def test_bad_stages_options_exit_2(args, option, message):
    res = runner.invoke(app, ["stages", *args])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in _text(res) and message in _text(res)
