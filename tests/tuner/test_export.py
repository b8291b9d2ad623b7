"""Export (portable, FLA, vLLM-style) and ``gdn2 cache import``: round trip, merge rules, refusals,
FLA's own loader on our files, vLLM naming and nearest-bucket lookup. CPU only, no kernels run."""
from __future__ import annotations

import json
import os
import warnings

import pytest

from gdn2_kernels import _device, config_files, dispatch, load_exported, provenance
from gdn2_kernels.configs import ProblemKey, get_spec
from gdn2_kernels.exported import nearest_bucket, vllm_filename
from gdn2_kernels.tuner import export as ex

HERE = _device.gpu_name()  # 'cpu-interpreter': the GPU dispatch sees on this machine
H100 = "NVIDIA H100 80GB HBM3"
KEY = ProblemKey(64, 64, "bfloat16")


FLA_STATE_BWD = {"BV": 64, "num_warps": 2, "num_stages": 2}  # in FLA's candidates


def _pipeline(key=KEY, bt=64, bv=32, warps=4, stages=3, br=16, median=1.0, state_bwd=None):
    """A tuned pipeline for one key: the state kernels, l2norm and intra_fwd (no FLA mapping).

    The default state_bwd config is one our register budget allows at K <= 64 (8 warps, BV=16),
    which lies outside FLA's candidates; ``state_bwd`` replaces it.
    """
    errs = {"o": {"max_rel_err": 1e-3, "rel_rms": 1e-4}}
    cfg = {
        "state_fwd": {"BT": bt, "BV": bv, "num_warps": warps, "num_stages": stages},
        "state_bwd": {"BT": bt, **(state_bwd or {"BV": 16, "num_warps": 8, "num_stages": 1})},
        "l2norm_fwd": {"BR": br, "num_warps": 2},
        "l2norm_bwd": {"BR": 32, "num_warps": 4},
        "intra_fwd": {"BT": bt, "BC": 16, "BK": 16, "BV": 16},
    }
    return [config_files.CacheEntry(k, key.as_dict(), get_spec(k).config(c).as_dict(), median,
                                    0.01, errs) for k, c in cfg.items()]


def _write_file(path, entries, gpu=HERE, software=None):
    return config_files.write_entries(path, entries, {"name": gpu}, software)


def _decisions(keys):
    return {k: {n: c.as_dict() for n, c in dispatch.resolve(k).configs} for k in keys}


@pytest.fixture
def tuned(isolated_cache):
    """This GPU's user cache with two keys, as `gdn2 tune` leaves it."""
    path = config_files.user_cache_path(HERE)
    _write_file(path, _pipeline() + _pipeline(ProblemKey(32, 32, "float32"), bt=32, bv=16))
    return path


# ------------------------------------------------------------------------------------------------
# portable + import
# ------------------------------------------------------------------------------------------------

def test_roundtrip_gives_identical_dispatch_decisions(tuned, tmp_path):
    keys = [KEY, ProblemKey(32, 32, "float32"), ProblemKey(128, 128, "bfloat16")]
    before = _decisions(keys)
    assert before[KEY]["state_fwd"]["num_stages"] == 3  # from the cache, not the spec default
    report = ex.export("portable", str(tmp_path / "out"))
    assert report.files == [str(tmp_path / "out" / config_files.profile_filename(HERE))]
    assert all(i.status == "written" for i in report.items) and len(report.items) == 10
    config_files.clear(gpu_name=HERE)
    assert _decisions(keys) != before
    imported = ex.import_file(report.files[0])
    assert {i.status for i in imported.items} == {"imported"}
    assert _decisions(keys) == before
    assert "gdn2 verify" in imported.next_step


def test_merge_keeps_verified_best_median_per_key(tuned, tmp_path):
    other = tmp_path / "other.json"
    faster = _pipeline(stages=1, median=0.5)
    slower = _pipeline(ProblemKey(32, 32, "float32"), bt=32, stages=1, median=9.0)
    new_key = _pipeline(ProblemKey(128, 128, "bfloat16"), median=2.0)
    _write_file(other, faster + slower + new_key)
    report = ex.import_file(str(other), merge=True)
    status = {i.key: i.status for i in report.items}
    assert status == {"K64 V64 bfloat16": "imported", "K32 V32 float32": "kept existing",
                      "K128 V128 bfloat16": "imported"}
    assert dispatch.resolve(KEY)["state_fwd"]["num_stages"] == 1
    assert dispatch.resolve(ProblemKey(32, 32, "float32"))["state_fwd"]["num_stages"] == 3
    assert len(config_files.read(tuned).keys()) == 3


def test_merge_prefers_verified_over_a_faster_hint(tuned, tmp_path):
    other = tmp_path / "h100.json"
    _write_file(other, _pipeline(stages=1, median=0.01), gpu=H100)
    report = ex.import_file(str(other), merge=True, force=True)
    assert [i.status for i in report.items] == ["kept existing"]
    assert dispatch.resolve(KEY)["state_fwd"]["num_stages"] == 3


def test_replace_without_merge(tuned, tmp_path):
    other = tmp_path / "other.json"
    _write_file(other, _pipeline(stages=1, median=50.0))
    ex.import_file(str(other))
    assert dispatch.resolve(KEY)["state_fwd"]["num_stages"] == 1  # replaced although slower
    assert dispatch.resolve(ProblemKey(32, 32, "float32"))["state_fwd"]["num_stages"] == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["gpu"].update(name=H100), "tuned on 'NVIDIA H100"),
    (lambda d: d["software"].update(triton="2.3.1"), "another major version"),
    (lambda d: d.update(schema_version=config_files.SCHEMA_VERSION + 1), "newer than"),
], ids=["other-gpu", "other-triton-major", "newer-schema"])
def test_refused_then_forced_as_hints(isolated_cache, tmp_path, mutate, message):
    path = tmp_path / "in.json"
    _write_file(path, _pipeline(stages=1))
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ex.ImportRefused, match=message) as info:
        ex.import_file(str(path))
    assert "--force" in str(info.value)
    assert not config_files.user_cache_path(HERE).exists()

    report = ex.import_file(str(path), force=True)
    assert [i.status for i in report.items] == ["hint"]
    stored = config_files.read(config_files.user_cache_path(HERE))
    assert all(e.is_hint and message in e.hint["reason"] for e in stored.entries)
    assert stored.software == provenance.current_software()  # usable by this machine's cache
    with pytest.warns(UserWarning, match="unverified imported configs"):
        pipe = dispatch.resolve(KEY)
    assert pipe["state_fwd"]["num_stages"] == 1 and "unverified hint" in pipe.source


def test_triton_minor_difference_imports_as_hint(isolated_cache, tmp_path):
    path = tmp_path / "in.json"
    major = provenance.current_software()["triton"].split(".")[0]
    _write_file(path, _pipeline(), software=dict(provenance.current_software(),
                                                 triton=f"{major}.99.0"))
    report = ex.import_file(str(path))
    assert [i.status for i in report.items] == ["hint"] and "triton" in report.items[0].reason


def test_hints_rank_below_verified_keys_and_are_not_exported(tuned, tmp_path):
    other = tmp_path / "h100.json"
    small = ProblemKey(16, 16, "float32")
    _write_file(other, _pipeline(small, bt=32, bv=16, stages=1), gpu=H100)
    ex.import_file(str(other), force=True)
    # the exact key K16 is only a hint: the verified nearest key (K32) wins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = dispatch.resolve(small)
    assert pipe["state_fwd"]["num_stages"] == 3 and "nearest key" in pipe.source
    report = ex.export("portable", str(tmp_path / "out"))
    skipped = [i for i in report.items if i.status == "skipped"]
    assert len(skipped) == 5 and all("unverified hint" in i.reason for i in skipped)


def test_invalid_or_missing_files(isolated_cache, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(config_files.CacheError, match="JSON"):
        ex.import_file(str(bad))
    with pytest.raises(FileNotFoundError):
        ex.import_file(str(tmp_path / "missing.json"))
    with pytest.raises(ex.ExportError, match="gdn2 tune"):
        ex.export("portable", str(tmp_path / "out"))
    with pytest.raises(ex.ExportError, match="unknown format"):
        ex.export("onnx", str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------
# vLLM-style
# ------------------------------------------------------------------------------------------------

def test_vllm_names_buckets_and_loader(tuned, tmp_path):
    out = tmp_path / "vllm"
    report = ex.export("vllm", str(out), source=str(tuned), tokens=4096)
    name = "kernel=state_fwd,K=64,V=64,dtype=bfloat16,device_name=cpu-interpreter.json"
    assert name in {os.path.basename(f) for f in report.files}
    assert json.loads((out / name).read_text()) == {"4096": {"BT": 64, "BV": 32, "SCAN": "serial",
                                                              "num_warps": 4, "num_stages": 3}}
    assert vllm_filename("state_fwd", 128, 128, "torch.bfloat16", H100) == (
        "kernel=state_fwd,K=128,V=128,dtype=bfloat16,device_name=NVIDIA_H100_80GB_HBM3.json")
    # a second export at another token count adds a bucket to the same file
    other = tmp_path / "t64.json"
    _write_file(other, _pipeline(bv=16))
    ex.export("vllm", str(out), source=str(other), tokens=64)
    assert list(json.loads((out / name).read_text())) == ["64", "4096"]
    pick = lambda n: load_exported(out, "state_fwd", 64, 64, "bfloat16", n)["BV"]  # noqa: E731
    assert (pick(1), pick(2000), pick(3000), pick(10 ** 6)) == (16, 16, 32, 32)
    assert load_exported(out / name, "state_fwd", 64, 64, "bfloat16", 5000)["BV"] == 32
    assert load_exported(out, "state_fwd", 64, 64, "bfloat16", 1, device_name=H100) is None
    assert nearest_bucket(["1", "16", "64"], 40) == 16  # tie goes to the smaller bucket
    (out / "bad.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="token counts"):
        load_exported(out / "bad.json", "state_fwd", 64, 64, "bfloat16", 1)


# ------------------------------------------------------------------------------------------------
# FLA
# ------------------------------------------------------------------------------------------------

def test_fla_layout_mapping_and_skips(tuned, tmp_path):
    src = tmp_path / "src.json"
    _write_file(src, _pipeline(state_bwd=FLA_STATE_BWD) + _pipeline(ProblemKey(32, 32, "float32"), bt=32)
                + _pipeline(ProblemKey(128, 128, "bfloat16"), bv=16))
    report = ex.export("fla", str(tmp_path / "fla"), source=str(src), heads=(2, 16))
    folder = tmp_path / "fla" / "cpu_interpreter"
    assert sorted(os.listdir(folder)) == sorted(f"{m.fla_kernel}.json" for m in ex.FLA_MAPPINGS)
    doc = json.loads((folder / "chunk_gated_delta_rule_fwd_kernel_h_blockdim64.json").read_text())
    assert doc["kernel_name"] == "chunk_gated_delta_rule_fwd_kernel_h_blockdim64"
    assert doc["triton_version"] == provenance.current_software()["triton"]
    assert doc["default_config"] == {"kwargs": {"BV": 32}, "num_warps": 4, "num_stages": 3,
                                     "num_ctas": 1, "maxnreg": None}
    assert len(doc["autotune_entries"]) == 2 * 3  # heads x (no state, one, both state tensors)
    for h, entry in doc["autotune_entries"].items():
        assert h == ex.fla_key_hash(entry["autotune_key"])
    reasons = {(i.kernel, i.key): i.reason for i in report.items if i.status == "skipped"}
    assert "no FLA kernel" in reasons[("intra_fwd", "K64 V64 bfloat16")]
    assert "BT=32" in reasons[("state_fwd", "K32 V32 float32")]
    assert "BV=16 is outside FLA's candidates" in reasons[("state_fwd", "K128 V128 bfloat16")]
    assert ex.fla_sanitize_gpu_name("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100_SXM4_80GB"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fla_loader_accepts_our_files(isolated_cache, tmp_path, monkeypatch, dtype):
    """FLA's own chunk_gdn2 (fwd + bwd) on CPU, every Triton launch stubbed out: the autotuners of
    the mapped kernels must take our exported configs under FLA_CACHE_MODE=strict, i.e. our
    autotune keys are exactly the ones FLA builds, and FLA's reader accepts the files."""
    fla_cache = pytest.importorskip(
        "fla.ops.utils.cache", reason="fla-core not installed (pip install --no-deps fla-core)")
    import torch
    from triton.runtime import jit as triton_jit
    from triton.runtime.autotuner import Autotuner

    key = ProblemKey(64, 64, dtype)
    src = tmp_path / "src.json"
    _write_file(src, _pipeline(key, state_bwd=FLA_STATE_BWD))
    report = ex.export("fla", str(tmp_path / "fla"), source=str(src), heads=(2,))
    loaded: dict[str, object] = {}

    def autotuner_run(self, *args, **kwargs):  # what FLA's CachedAutotuner put in its cache
        k = fla_cache.AutotuneKey.build(self.arg_names, self.keys, args, kwargs).autotune_key
        loaded[self.kernel_name] = self.cache.get(k)

    monkeypatch.setattr(Autotuner, "run", autotuner_run)
    monkeypatch.setattr(triton_jit.JITFunction, "run", lambda self, *a, **k: None)
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.STRICT)
    monkeypatch.setenv("FLA_CONFIG_DIR", str(tmp_path / "fla" / "cpu_interpreter"))
    fla_cache.load_config_file.cache_clear()
    from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2

    for autotuner in _fla_autotuners():
        autotuner.cache.clear()
    dt = getattr(torch, dtype)
    B, T, H = 1, 64, 2
    x = lambda d: torch.randn(B, T, H, d, dtype=dt, requires_grad=True)  # noqa: E731
    o, _ = fla_chunk_gdn2(x(64), x(64), x(64), x(64), x(64), x(64), output_final_state=False,
                          use_qk_l2norm_in_kernel=True)
    o.float().sum().backward()

    written = {i.kernel for i in report.items if i.status == "written"}
    assert written == {"state_fwd", "state_bwd", "l2norm_fwd", "l2norm_bwd"}
    for m in ex.FLA_MAPPINGS:
        cfg = loaded[m.fla_kernel]
        ours = next(e.config for e in _pipeline(key, state_bwd=FLA_STATE_BWD) if e.kernel == m.ours)
        want = ex.fla_config(m, ours)
        assert cfg is not None, f"FLA did not take our config for {m.fla_kernel}"
        assert (cfg.kwargs, cfg.num_warps, cfg.num_stages) == (
            want["kwargs"], want["num_warps"], want["num_stages"]), m.fla_kernel


def _fla_autotuners():
    """The CachedAutotuner of every mapped FLA kernel, found where the mapping says it is declared."""
    import importlib

    from fla.ops.utils.cache import CachedAutotuner

    out = []
    for m in ex.FLA_MAPPINGS:
        obj = getattr(importlib.import_module(m.declared_in.removesuffix(".py").replace("/", ".")),
                      m.fla_kernel)
        while not isinstance(obj, CachedAutotuner):
            obj = obj.fn
        out.append(obj)
    return out


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def test_cli_export_and_import(tuned, tmp_path):
    from typer.testing import CliRunner

    from gdn2_kernels.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["export", "--format", "fla", "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["files"] and {i["status"] for i in data["items"]} == {"written", "skipped"}
    res = runner.invoke(app, ["export", "--format", "portable", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0 and "written" in res.output
    path = tmp_path / "p" / config_files.profile_filename(HERE)
    data = json.loads(path.read_text())
    data["gpu"]["name"] = H100
    path.write_text(json.dumps(data))
    res = runner.invoke(app, ["cache", "import", str(path)])
    assert res.exit_code == 1 and "--force" in res.output
    res = runner.invoke(app, ["cache", "import", str(path), "--force", "--merge"])
    assert res.exit_code == 0 and "gdn2 verify" in res.output
