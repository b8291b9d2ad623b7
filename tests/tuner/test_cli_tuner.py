"""``gdn2 info``, ``gdn2 tune`` and ``gdn2 cache`` through typer's CliRunner."""
from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from gdn2_kernels import _device, config_files
from gdn2_kernels.configs import get_spec
from gdn2_kernels.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def _cache_file(path, name=None):
    entry = config_files.CacheEntry("state_fwd", {"K": 32, "V": 32, "dtype": "float32"},
                                    get_spec("state_fwd").config({"BT": 32}).as_dict(), 1.0, 0.1)
    config_files.write_entries(path, [entry], {"name": name or _device.gpu_name()})


def test_info_json():
    res = _run("info", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["gpu"]["cuda_available"] is False and "no GPU" in data["gpu"]["note"]
    assert {k["name"] for k in data["kernels"]} >= {"intra_fwd", "state_fwd"}
    assert [s["name"] for s in data["sources"]] == ["config_file", "user_cache",
                                                    "shipped_profile", "default"]
    assert _run("info").exit_code == 0


def test_info_at_a_shape_shows_the_launched_configs(monkeypatch):
    """``--shape``: resolution's launch-time step (here with a GPU's SM count stood in)."""
    from gdn2_kernels import dispatch

    res = _run("info", "--shape", "1x16384", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["shape"] == {"B": 1, "T": 16384, "H": 16} and data["launch_changes"] == []
    assert all(k["launched"] == k["resolved"] for k in data["kernels"])  # no SMs on a CPU
    monkeypatch.setattr(_device, "sm_count", lambda device: 132)
    wide = dispatch.default_pipeline().as_dict()
    wide["state_fwd"] = wide["state_fwd"].replace(BV=64, num_warps=8)
    with dispatch.override(wide):
        res = _run("info", "--shape", "1x16384", "--heads", "2")
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert "launch time at 1x16384 H2: state_fwd: BV 64 -> 16, num_warps 8 -> 4" in text
    assert _run("info", "--shape", "2x8,1x8").exit_code == 2


def test_tune_dry_run_lists_space_and_pruning():
    res = _run("tune", "--dry-run", "--json", "-k", "intra_fwd", "-c", "32")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    (search,) = plan["searches"]
    assert search["chunk_size"] == 32 and search["pruned_by_rule"]
    assert search["valid"] + len(search["pruned"]) == search["total"]
    res = _run("tune", "--dry-run")
    assert res.exit_code == 0 and "pruned" in res.stdout


def test_tune_bad_input_is_a_usage_error():
    res = _run("tune", "--dry-run", "-k", "nope_fwd")
    assert res.exit_code == 2 and "'nope_fwd'" in res.stderr
    res = _run("tune", "--dry-run", "--strategy", "random", "-o", "eta=2")
    assert res.exit_code == 2 and "no option 'eta'" in res.stderr
    res = _run("tune", "--dry-run", "--devices", "3")  # well-formed, but no such GPU here
    assert res.exit_code == 1 and "no CUDA GPU here" in res.stderr


def test_tune_runs_on_the_interpreter_and_says_so(tmp_path):
    res = _run("tune", "-k", "l2norm_fwd", "-H", "1", "-K", "16", "-V", "16", "-T", "32",
               "--strategy", "random", "-o", "n=1", "--max-configs", "1",
               "--log", str(tmp_path / "log.jsonl"), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["ok"] and data["written"] == [] and "interpreter" in data["note"]
    assert res.stderr.lstrip().startswith("No CUDA GPU")  # said before the tune, on stderr
    res = _run("tune", "-k", "l2norm_fwd", "-H", "1", "-K", "16", "-V", "16", "-T", "32",
               "--strategy", "random", "-o", "n=1", "--max-configs", "1",
               "--log", str(tmp_path / "log.jsonl"))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("No CUDA GPU")
    # The progress ended at its total, and the result tables start on lines of their own.
    assert any(re.match(r"done .* (\d+)/\1 ", line) for line in lines), res.stdout
    assert any(line.strip().startswith("tune of B1-T32-H1-K16-V16-float32") for line in lines)


def test_advice_without_a_cache_names_a_shipped_profile(isolated_cache):
    """On a CPU `gdn2 tune` writes no cache, so the advice is a shipped profile, by path, and
    following it works."""
    def squeezed(text: str) -> str:  # rich wraps long lines; compare without white space
        return "".join(text.split())

    shipped = isolated_cache / "profiles" / "NVIDIA_H200.json"
    _cache_file(shipped, "NVIDIA H200")
    res = _run("cache", "show")
    assert res.exit_code == 1
    assert squeezed("no CUDA GPU here, so `gdn2 tune` writes no cache") in squeezed(res.stderr)
    assert squeezed(f"gdn2 cache show {shipped}") in squeezed(res.stderr)
    assert _run("cache", "show", str(shipped)).exit_code == 0
    out = str(isolated_cache / "out")
    res = _run("export", "-f", "vllm", "-o", out)
    assert res.exit_code == 1 and squeezed(f"--from {shipped}") in squeezed(res.stderr)
    res = _run("export", "-f", "vllm", "-o", out, "--from", str(shipped))
    assert res.exit_code == 0 and "1 file(s) written" in res.stdout


def test_cache_commands(isolated_cache):
    res = _run("cache", "path", "--json")
    assert res.exit_code == 0
    paths = json.loads(res.stdout)
    assert paths["this_gpu_file"].endswith("cpu-interpreter.json")

    _cache_file(paths["this_gpu_file"])
    _cache_file(isolated_cache / "cache" / "NVIDIA_H100_80GB_HBM3.json", "NVIDIA H100 80GB HBM3")
    (isolated_cache / "cache" / "broken.json").write_text("{")
    res = _run("cache", "ls", "--json")
    rows = {r["path"].rsplit("/", 1)[1]: r for r in json.loads(res.stdout)}
    assert rows["cpu-interpreter.json"]["usable_here"] is True
    assert rows["NVIDIA_H100_80GB_HBM3.json"]["usable_here"] is False
    assert "not valid JSON" in rows["broken.json"]["problem"]
    assert _run("cache", "ls").exit_code == 0

    res = _run("cache", "show", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["entries"][0]["kernel"] == "state_fwd"
    assert _run("cache", "show").exit_code == 0
    res = _run("cache", "show", str(isolated_cache / "cache" / "broken.json"))
    assert res.exit_code == 1 and "not valid JSON" in res.output

    res = _run("cache", "clear", "--json")
    assert json.loads(res.stdout)["removed"] == [paths["this_gpu_file"]]
    res = _run("cache", "show")
    assert res.exit_code == 1 and "no cache file" in res.output
    res = _run("cache", "clear", "--gpu", "all")
    assert res.exit_code == 0 and "NVIDIA_H100" in res.stdout


def test_tune_table_shows_both_problems_and_the_scores(monkeypatch):
    """With the long-sequence check the pipeline table shows each BT's second median and the
    geometric mean the choice used, the defaults' included."""
    import io

    from rich.console import Console

    from gdn2_kernels import cli
    from gdn2_kernels.tuner.trial import Problem, Trial
    from gdn2_kernels.tuner.tune import TuneOptions, TuneResult, make_plan

    plan = make_plan(TuneOptions(problem=Problem(B=2, T=32, H=1, K=16, V=16, dtype="float32"),
                                 kernels=("state_fwd",), chunk_sizes=(32,)))

    def trial(bt, ms, stage="pipeline"):
        return Trial("x", "pipeline", {"BT": bt}, bt, "fwd", stage, 1, "ok", median_ms=ms,
                     iqr_ms=0.0)

    result = TuneResult(plan, [], [trial(32, 1.1)], trial(64, 2.0, "default"), 32, 1.5, [], [],
                        "", 1.0, 1, 0, 0, [trial(32, 1.2)], trial(64, 2.5, "default"),
                        {32: (1.1 * 1.2) ** 0.5})
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=200))
    cli._render_tune(result)
    text = out.getvalue()
    assert "median ms, B=1 T=64" in text
    assert "1.149" in text and "2.236" in text  # sqrt(1.1 * 1.2), sqrt(2.0 * 2.5)
