"""The cache schema: validation, corrupt/mismatched files, atomic and concurrent writes, and the
dispatch order config file > user cache > shipped profile > spec default."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings

import pytest

from gdn2_kernels import _device, config_files, dispatch, provenance
from gdn2_kernels.configs import ProblemKey, get_spec

GPU = {"name": _device.gpu_name()}  # 'cpu-interpreter' here: what dispatch sees on this machine
KEY = ProblemKey(32, 32, "float32")


def _entries(key: ProblemKey = KEY, bt: int = 32, bv: int = 16, median: float = 1.0):
    return [
        config_files.CacheEntry("state_fwd", key.as_dict(),
                                get_spec("state_fwd").config({"BT": bt, "BV": bv}).as_dict(),
                                median, 0.1, {"o": {"max_rel_err": 1e-6, "rel_rms": 1e-7}}),
        config_files.CacheEntry("intra_fwd", key.as_dict(),
                                get_spec("intra_fwd").config({"BT": bt}).as_dict(), median, 0.1),
    ]


def _write(path, **kw):
    return config_files.write_entries(path, _entries(**kw), GPU)


def test_roundtrip_and_schema(tmp_path):
    path = tmp_path / "c.json"
    _write(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == config_files.SCHEMA_VERSION
    assert set(data["software"]) == {"torch", "triton", "cuda", "gdn2_kernels"}
    assert data["created"] and data["gpu"]["name"] == GPU["name"]
    entry = data["entries"][0]
    assert {"kernel", "key", "config", "median_ms", "iqr_ms", "verified"} <= set(entry)
    back = config_files.read(path)
    assert back.entries == config_files.parse(data).entries
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d.pop("software"), "software"),
    (lambda d: d["entries"][0]["config"].update(BQ=16), "no parameters"),
    (lambda d: d["entries"][0]["config"].update(BV=48), "BV=48"),
    (lambda d: d["entries"][0].update(kernel="nope_fwd"), "nope_fwd"),
    (lambda d: d["entries"][0]["key"].update(T=4096), "key"),
    (lambda d: d["entries"][1]["config"].update(BT=64), "chunk size"),
], ids=["schema", "software", "unknown-param", "bad-value", "unknown-kernel", "key-with-T", "BT"])
def test_invalid_files_are_refused(tmp_path, mutate, message):
    path = tmp_path / "c.json"
    _write(path)
    data = json.loads(path.read_text())
    mutate(data)
    with pytest.raises(config_files.CacheError, match=message):
        config_files.parse(data)


def test_a_parameter_newer_than_the_file_takes_its_default(tmp_path):
    # A file written before a parameter existed was tuned with the kernel that parameter's
    # default keeps; it must still load (the shipped profiles once lost their state_fwd entries).
    path = tmp_path / "c.json"
    _write(path)
    data = json.loads(path.read_text())
    spec = get_spec("state_fwd")
    for e in data["entries"]:
        if e["kernel"] == "state_fwd":
            e["config"].pop("SCAN")
    entry = config_files.parse(data).entries[0]
    assert entry.config["SCAN"] == spec.param("SCAN").default
    assert entry.config["BV"] == 16


@pytest.mark.parametrize("path", sorted(config_files.profiles_dir().glob("*.json")),
                         ids=lambda p: p.stem)
def test_every_shipped_profile_loads_and_resolves_its_keys(path, monkeypatch):
    # Against this version's specs: a profile the loader refuses would silently fall back to the
    # spec defaults on its GPU (and drop out of the tuner's seeds).
    cache = config_files.read(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in cache.keys():
            pipe = dispatch.pipeline_from(cache, key, "test")
            stored = {e.kernel: e.kernel_config() for e in cache.entries
                      if e.problem_key() == key}
            assert {"intra_fwd", "state_fwd", "intra_bwd", "state_bwd"} <= set(stored)
            assert pipe is not None and pipe.source == "test"
            assert {k: c for k, c in pipe.configs if k in stored} == stored


def test_corrupt_file_is_reported_and_skipped(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"schema_version": 1, "entr')
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert config_files.load(path, GPU["name"]) is None


def test_other_gpu_or_software_is_refused(tmp_path):
    path = tmp_path / "c.json"
    config_files.write_entries(path, _entries(), {"name": "NVIDIA H100 80GB HBM3"})
    with pytest.warns(UserWarning, match="tuned on 'NVIDIA H100"):
        assert config_files.load(path, GPU["name"]) is None
    old = dict(provenance.current_software(), triton="2.0.0")
    config_files.write_entries(tmp_path / "d.json", _entries(), GPU, software=old)
    with pytest.warns(UserWarning, match="triton"):
        assert config_files.load(tmp_path / "d.json", GPU["name"]) is None


def test_write_replaces_a_keys_group_and_keeps_others(tmp_path):
    path = tmp_path / "c.json"
    _write(path, bt=32)
    other = ProblemKey(64, 64, "bfloat16")
    _write(path, key=other, bt=64)
    _write(path, bt=16, bv=32)  # re-tune of KEY: its whole group is replaced
    cache = config_files.read(path)
    assert sorted(k.as_dict()["K"] for k in cache.keys()) == [32, 64]
    mine = [e for e in cache.entries if e.problem_key() == KEY]
    assert {e.config["BT"] for e in mine} == {16} and len(mine) == 2


def test_corrupt_file_is_moved_aside_not_merged(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("garbage")
    with pytest.warns(UserWarning, match="not merging"):
        _write(path)
    assert config_files.read(path).entries
    assert [p for p in os.listdir(tmp_path) if ".rejected-" in p]


def _writer(path: str, k: int, n: int) -> None:
    for i in range(n):
        key = ProblemKey(16 * (k * n + i + 1), 32, "float32")
        config_files.write_entries(path, _entries(key=key), GPU)


def test_concurrent_writers_leave_a_valid_file_with_every_key(tmp_path):
    path = str(tmp_path / "c.json")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, k, 4)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = config_files.read(path)
    assert len(cache.keys()) == 8 and len(cache.entries) == 16
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_dispatch_order(isolated_cache, monkeypatch):
    gpu = GPU["name"]
    assert dispatch.resolve(KEY).source == "default"
    profile = config_files.shipped_profile_path(gpu)
    _write(profile, bt=16)
    dispatch.clear_cache()
    pipe = dispatch.resolve(KEY)
    assert pipe.source.startswith("shipped_profile") and pipe.chunk_size == 16
    assert pipe["l2norm_fwd"] == get_spec("l2norm_fwd").default_config()  # completed by defaults
    _write(config_files.user_cache_path(gpu), bt=32)
    dispatch.clear_cache()
    assert dispatch.resolve(KEY).source.startswith("user_cache")
    assert dispatch.resolve(KEY)["state_fwd"]["BT"] == 32
    explicit = isolated_cache / "mine.json"
    _write(explicit, bt=16, bv=32)
    monkeypatch.setenv("GDN2_CONFIG_FILE", str(explicit))
    dispatch.clear_cache()
    assert dispatch.resolve(KEY).source.startswith("config_file")
    assert dispatch.resolve(KEY)["state_fwd"]["BV"] == 32
    with dispatch.override(dispatch.default_pipeline(128)):
        assert dispatch.resolve(KEY).chunk_size == 128


def test_nearest_key_and_corrupt_user_cache_falls_through(isolated_cache):
    gpu = GPU["name"]
    _write(config_files.shipped_profile_path(gpu), key=ProblemKey(64, 64, "float32"), bt=16)
    config_files.user_cache_path(gpu).parent.mkdir(parents=True)
    config_files.user_cache_path(gpu).write_text("{broken")
    dispatch.clear_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = dispatch.resolve(KEY)
    assert any("not valid JSON" in str(w.message) for w in caught)
    assert pipe.source.startswith("shipped_profile") and "nearest key" in pipe.source
    assert dispatch.resolve(ProblemKey(32, 32, "bfloat16")).source == "default"  # dtype differs
