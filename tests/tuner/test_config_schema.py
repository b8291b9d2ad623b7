"""Hostile config files: every bad value is refused with the field named, the lookup goes on with
the next source, ``cache ls`` / ``info`` call the file rejected, ``import`` refuses it, nothing
from a file reaches a path, and FIFOs, devices and deep or huge files are never read."""
from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
from typer.testing import CliRunner

from gdn2_kernels import _device, config_files, config_schema, dispatch, provenance
from gdn2_kernels.configs import ProblemKey, get_spec
from gdn2_kernels.exported import load_exported, vllm_filename
from gdn2_kernels.tuner import export as ex
from gdn2_kernels.cli import app

KEY = ProblemKey(32, 32, "float32")


def _doc(bt: int = 32, bv: int = 16) -> dict:
    """A valid file for this machine: state_fwd and intra_fwd of KEY."""
    entries = [
        config_files.CacheEntry("state_fwd", KEY.as_dict(),
                                get_spec("state_fwd").config({"BT": bt, "BV": bv}).as_dict(), 1.0,
                                0.1, {"o": {"max_rel_err": 1e-6, "rel_rms": 1e-7}}),
        config_files.CacheEntry("intra_fwd", KEY.as_dict(),
                                get_spec("intra_fwd").config({"BT": bt}).as_dict(), 1.0, 0.1),
    ]
    return {"schema_version": 1, "gpu": {"name": _device.gpu_name()},
            "software": provenance.current_software(), "created": provenance.now_iso(),
            "entries": [e.as_dict() for e in entries]}


def _set(path: list, value):
    def mutate(d):
        node = d
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
    return mutate


def _nest(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


# Each hostile value, and the words its refusal must contain.
BAD = [
    ("BT-float", _set(["entries", 0, "config", "BT"], 32.0), "state_fwd.BT=32.0 is not one of"),
    ("BV-bool", _set(["entries", 0, "config", "num_warps"], True), "num_warps=True is not one of"),
    ("BV-string", _set(["entries", 0, "config", "BV"], "16"), "BV='16' is not one of"),
    ("K-string", _set(["entries", 0, "key", "K"], "abc"), "entries[0].key.K must be an integer"),
    ("K-zero", _set(["entries", 0, "key", "K"], 0), "entries[0].key.K = 0 is out of range"),
    ("K-negative", _set(["entries", 0, "key", "V"], -32), "entries[0].key.V = -32 is out of range"),
    ("K-null", _set(["entries", 0, "key", "K"], None), "entries[0].key.K must be an integer"),
    ("K-float", _set(["entries", 0, "key", "K"], 32.0), "entries[0].key.K must be an integer"),
    ("K-huge", _set(["entries", 0, "key", "K"], 10 ** 9), "must be between 1 and 256"),
    ("K-bool", _set(["entries", 0, "key", "K"], True), "entries[0].key.K must be an integer"),
    ("dtype-path", _set(["entries", 0, "key", "dtype"], "../../x"),
     "entries[0].key.dtype = '../../x' is not one of ['bfloat16', 'float16', 'float32']"),
    ("dtype-int", _set(["entries", 0, "key", "dtype"], 16), "key.dtype = 16 is not one of"),
    ("verified-bool", _set(["entries", 0, "verified"], True),
     "entries[0].verified must be an object"),
    ("verified-string", _set(["entries", 0, "verified"], "yes"),
     "entries[0].verified must be an object"),
    ("verified-metric-text", _set(["entries", 0, "verified", "o", "rel_rms"], "abc"),
     "entries[0].verified.o.rel_rms must be a finite number"),
    ("verified-metric-bool", _set(["entries", 0, "verified", "o", "rel_rms"], False),
     "verified.o.rel_rms must be a finite number"),
    ("median-negative", _set(["entries", 0, "median_ms"], -1.0), "median_ms must be >= 0"),
    ("median-text", _set(["entries", 0, "median_ms"], "fast"), "median_ms must be a finite number"),
    ("hint-list", _set(["entries", 0, "hint"], [1]), "entries[0].hint must be an object"),
    ("entry-unknown-field", _set(["entries", 0, "path"], "/tmp/x"), "unknown fields ['path']"),
    ("entry-not-object", _set(["entries", 0], 7), "entries[0] must be an object"),
    ("kernel-unknown", _set(["entries", 0, "kernel"], "../evil"), "no kernel spec '../evil'"),
    ("deep-gpu", _set(["gpu", "extra"], _nest(40)), "nested more than 8 levels"),
    ("gpu-name-control", _set(["gpu", "name"], "cpu\x1b[2J"), "gpu.name contains control"),
    ("gpu-name-number", _set(["gpu", "name"], 5), "gpu.name must be a string"),
    ("schema-bool", _set(["schema_version"], True), "schema_version is True"),
    ("software-number", _set(["software", "triton"], 3.6), "software.triton must be a string"),
    ("top-unknown", _set(["extra"], 1), "unknown fields ['extra']"),
]


def _write_bad(tmp_path, mutate, name="bad.json") -> str:
    doc = _doc()
    mutate(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("case, mutate, message", BAD, ids=[b[0] for b in BAD])
def test_every_bad_value_is_refused_naming_the_field(tmp_path, case, mutate, message):
    path = _write_bad(tmp_path, mutate)
    with pytest.raises(config_files.CacheError) as info:
        config_files.read(path)
    assert message in str(info.value)


@pytest.mark.parametrize("case, mutate, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_config_file_is_skipped_with_one_warning_and_the_next_source_used(
        isolated_cache, tmp_path, monkeypatch, case, mutate, message):
    """As $GDN2_CONFIG_FILE: one warning naming the file and the reason, then the user cache."""
    good = _doc(bt=16, bv=32)
    config_files.write_entries(config_files.user_cache_path(_device.gpu_name()),
                               config_files.parse(good).entries, good["gpu"])
    path = _write_bad(tmp_path, mutate)
    monkeypatch.setenv("GDN2_CONFIG_FILE", path)
    dispatch.clear_cache()
    with pytest.warns(UserWarning) as caught:
        pipe = dispatch.resolve(KEY)
    assert pipe.source.startswith("user_cache") and pipe["state_fwd"]["BV"] == 32
    mine = [str(w.message) for w in caught if path in str(w.message)]
    assert len(mine) == 1 and message in mine[0]


def test_a_json_nan_or_infinity_is_refused(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(_doc()).replace('"median_ms": 1.0', '"median_ms": NaN', 1))
    with pytest.raises(config_files.CacheError, match="NaN is not a JSON number"):
        config_files.read(path)


def test_json_nested_past_the_interpreters_recursion_limit_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(config_files.CacheError, match="nested more than"):
        config_files.read(path)


def test_a_file_over_the_size_bound_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_doc()))
    monkeypatch.setattr(config_schema, "MAX_FILE_BYTES", 100)
    with pytest.raises(config_files.CacheError, match="at most 100"):
        config_files.read(path)


@pytest.fixture
def no_hang():
    """Fail instead of hanging the suite if a read blocks (the property under test)."""
    def alarm(*_):
        raise TimeoutError("reading the file blocked")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_fifos_devices_and_folders_are_never_read(isolated_cache, tmp_path, monkeypatch, no_hang,
                                                   kind):
    if kind == "fifo":
        path = str(tmp_path / "cfg.json")
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = "/dev/zero"
    else:
        path = str(tmp_path)
    with pytest.raises(config_files.CacheError, match="not a regular file"):
        config_files.read(path)
    monkeypatch.setenv("GDN2_CONFIG_FILE", path)
    dispatch.clear_cache()
    with pytest.warns(UserWarning, match="not a regular file"):
        assert dispatch.resolve(KEY).source == "default"
    sources = {s.name: s for s in dispatch.describe_sources()}
    assert sources["config_file"].note.startswith("rejected: not a regular file")


def test_a_missing_config_file_is_a_clear_error(isolated_cache, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.json"
    monkeypatch.setenv("GDN2_CONFIG_FILE", str(missing))
    dispatch.clear_cache()
    with pytest.raises(config_files.CacheError, match="GDN2_CONFIG_FILE=.*nowhere.json: no such "
                                                      "file"):
        dispatch.resolve(KEY)
    res = CliRunner().invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["resolved_source"].startswith("error: $GDN2_CONFIG_FILE=")
    assert data["sources"][0]["note"] == "error: no such file"


def test_cache_ls_and_info_show_a_bad_file_as_rejected_with_the_reason(isolated_cache, tmp_path,
                                                                        monkeypatch):
    folder = isolated_cache / "cache"
    folder.mkdir()
    _write_bad(folder, _set(["entries", 0, "config", "BT"], 32.0),
               config_files.profile_filename(_device.gpu_name()))
    res = CliRunner().invoke(app, ["cache", "ls", "--json"])
    (row,) = json.loads(res.stdout)
    assert row["rejected"] and not row["usable_here"]
    assert row["problem"] == ("rejected: entries[0]: state_fwd.BT=32.0 is not one of "
                              "(16, 32, 64, 128)")
    res = CliRunner().invoke(app, ["cache", "ls"])
    assert res.exit_code == 0 and "rejected" in res.stdout
    with pytest.warns(UserWarning, match="BT=32.0"):
        res = CliRunner().invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    sources = {s["name"]: s for s in json.loads(res.stdout)["sources"]}
    assert not sources["user_cache"]["usable"]
    assert sources["user_cache"]["note"].startswith("rejected: entries[0]: state_fwd.BT=32.0")


def test_import_refuses_a_bad_file_and_leaves_the_cache_alone(isolated_cache, tmp_path):
    path = _write_bad(tmp_path, _set(["entries", 0, "config", "BT"], 32.0))
    with pytest.raises(config_files.CacheError, match="refused: entries.0.: state_fwd.BT=32.0"):
        ex.import_file(path)
    assert not config_files.user_cache_path(_device.gpu_name()).exists()
    res = CliRunner().invoke(app, ["cache", "import", path])
    assert res.exit_code == 1 and "BT=32.0" in res.output


def test_import_never_reads_a_fifo(isolated_cache, tmp_path, no_hang):
    path = str(tmp_path / "pipe.json")
    os.mkfifo(path)
    with pytest.raises(config_files.CacheError, match="not a regular file"):
        ex.import_file(path)


def test_no_value_from_a_file_reaches_an_export_path(isolated_cache, tmp_path):
    """A dtype of ../../x is refused before any file name is built; names of written files are
    made of validated fields only."""
    bad = _write_bad(tmp_path, _set(["entries", 0, "key", "dtype"], "../../x"))
    out = tmp_path / "deep" / "out"
    for fmt in ex.FORMATS:
        with pytest.raises(config_files.CacheError, match="dtype"):
            ex.export(fmt, str(out), source=bad)
    assert not (tmp_path / "x").exists() and not out.exists()
    doc = _doc(bt=64, bv=32)  # a state_fwd config FLA's kernel can take, so fla writes a file
    doc["gpu"]["name"] = "../../NVIDIA H100"
    good = tmp_path / "g.json"
    good.write_text(json.dumps(doc))
    for fmt in ex.FORMATS:
        report = ex.export(fmt, str(out), source=str(good))
        assert report.files
        for f in report.files:
            assert os.path.realpath(f).startswith(os.path.realpath(out) + os.sep)
    with pytest.raises(ValueError, match="dtype"):
        vllm_filename("state_fwd", 32, 32, "../../x", "gpu")
    with pytest.raises(KeyError, match="no kernel spec"):
        vllm_filename("../state_fwd", 32, 32, "float32", "gpu")
    with pytest.raises(ValueError, match="K = 0"):
        vllm_filename("state_fwd", 0, 32, "float32", "gpu")


def test_export_from_a_fifo_or_device_is_refused(isolated_cache, tmp_path, no_hang):
    path = str(tmp_path / "pipe.json")
    os.mkfifo(path)
    for source in (path, "/dev/zero"):
        with pytest.raises(config_files.CacheError, match="not a regular file"):
            ex.export("portable", str(tmp_path / "out"), source=source)


def test_load_exported_reads_only_regular_files(tmp_path, no_hang):
    folder = tmp_path / "vllm"
    folder.mkdir()
    os.mkfifo(folder / vllm_filename("state_fwd", 32, 32, "float32", "gpu"))
    with pytest.raises(ValueError, match="not a regular file"):
        load_exported(folder, "state_fwd", 32, 32, "float32", 64, device_name="gpu")


def test_a_valid_file_still_loads_without_warnings(isolated_cache, tmp_path, monkeypatch):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_doc(bt=16, bv=32)))
    monkeypatch.setenv("GDN2_CONFIG_FILE", str(path))
    dispatch.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = dispatch.resolve(KEY)
    assert pipe.source.startswith("config_file") and pipe["state_fwd"]["BV"] == 32
