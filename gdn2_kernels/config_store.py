"""Tuned-config files: the versioned cache schema, validation, atomic writes, dispatch sources.

One schema serves the user cache (written by ``gdn2 tune``), the shipped profiles
(``profiles/<GPU>.json`` at the top of the repository) and a file named by ``$GDN2_CONFIG_FILE``::

    {"schema_version": 1,
     "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", ...},
     "software": {"torch": "2.5.1", "triton": "3.2.0", "cuda": "12.4", "gdn2_kernels": "0.1.0"},
     "created": "2026-06-01T12:00:00+00:00",
     "entries": [{"kernel": "intra_fwd", "key": {"K": 128, "V": 128, "dtype": "bfloat16"},
                  "config": {"BT": 64, "BC": 16, ...}, "median_ms": 1.23, "iqr_ms": 0.01,
                  "verified": {"o": {"max_rel_err": 1e-3, "rel_rms": 4e-4}, ...}}]}

Rules (STYLE 19):

- A file is read and validated by :mod:`gdn2_kernels.config_schema` (regular files only, bounded
  size and depth, every field's type and range). A corrupt file, another schema version, unknown
  kernels, parameter names that differ from the registered spec, values outside the spec, a GPU
  other than the one running, or software that is not compatible is reported (``warnings`` +
  log, once per file and reason) and skipped as a whole: it is never used and never merged, and
  the lookup goes on with the next source. A ``$GDN2_CONFIG_FILE`` that does not exist is an
  error (:class:`CacheError` from every lookup): the user named a file that is not there.
- Software is compatible when Triton and gdn2_kernels agree on major.minor. The torch and CUDA
  versions are recorded as provenance only: configs are Triton launch parameters, and Triton's
  code generation is what a different version can break.
- The entries of one problem key form one pipeline (the stages must agree on the chunk size BT),
  so writes replace a key's entries as a group and lookups take a key's entries as a group.
- Writes are atomic (temporary file in the same folder, fsync, ``os.replace``) and serialised by
  an ``fcntl`` lock on ``<file>.lock``; a writer re-reads the file under the lock and merges its
  keys into it, so two concurrent tunes of different keys both survive.

Lookup order (registered with :func:`gdn2_kernels.dispatch.add_source`, see :mod:`dispatch`):
``$GDN2_CONFIG_FILE`` > user cache (``$GDN2_CACHE_DIR`` or ``~/.cache/gdn2``, file
``<sanitized GPU name>.json``) > shipped profile > spec default. Within a file: the exact key, else
the nearest key with the same dtype whose configs satisfy the spec's constraints for the asked key.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from gdn2_kernels import _device, _env, config_schema, dispatch
from gdn2_kernels.config_schema import SCHEMA_VERSION, CacheError
from gdn2_kernels.configs import KernelConfig, ProblemKey, version_tuple, get_spec

log = logging.getLogger("gdn2_kernels.config_store")

_COMPATIBLE_SOFTWARE = ("triton", "gdn2_kernels")  # must agree on major.minor


@dataclass(frozen=True)
class CacheEntry:
    """The tuned config of one kernel for one problem key, with its timing and verification."""

    kernel: str
    key: dict[str, Any]
    config: dict[str, Any]
    median_ms: float | None = None
    iqr_ms: float | None = None
    verified: dict[str, dict[str, float]] = field(default_factory=dict)
    # Set on entries kept by ``gdn2 cache import --force`` (or tuned under another Triton /
    # gdn2_kernels minor): where they were tuned and why they are unverified here. Lookups rank
    # such entries below verified ones (see pipeline_for); written only when set.
    hint: dict[str, Any] | None = None

    @property
    def is_hint(self) -> bool:
        return self.hint is not None

    def problem_key(self) -> ProblemKey:
        return ProblemKey.from_dict(self.key)

    def kernel_config(self) -> KernelConfig:
        return get_spec(self.kernel).config(self.config)

    def as_dict(self) -> dict[str, Any]:
        out = {"kernel": self.kernel, "key": dict(self.key), "config": dict(self.config),
               "median_ms": self.median_ms, "iqr_ms": self.iqr_ms,
               "verified": {k: dict(v) for k, v in self.verified.items()}}
        if self.hint is not None:
            out["hint"] = dict(self.hint)
        return out


@dataclass
class CacheFile:
    """A parsed, validated config file."""

    gpu: dict[str, Any]
    software: dict[str, Any]
    created: str
    entries: list[CacheEntry]
    schema_version: int = SCHEMA_VERSION
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "gpu": dict(self.gpu),
                "software": dict(self.software), "created": self.created,
                "entries": [e.as_dict() for e in self.entries]}

    def keys(self) -> list[ProblemKey]:
        seen: dict[ProblemKey, None] = {}
        for e in self.entries:
            seen.setdefault(e.problem_key(), None)
        return list(seen)


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------

def package_version() -> str:
    """``gdn2_kernels.__version__`` (right even when run from a checkout that is not installed)."""
    version = getattr(sys.modules.get("gdn2_kernels"), "__version__", None)
    if version:
        return str(version)
    try:
        return metadata.version("gdn2-kernels")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def current_software() -> dict[str, str | None]:
    """Versions of the software a config depends on, in the schema's ``software`` form."""
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "gdn2_kernels": package_version()}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def software_mismatch(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why configs recorded under ``recorded`` may not be used with ``current``; None if they may."""
    for name in _COMPATIBLE_SOFTWARE:
        a, b = recorded.get(name), current.get(name)
        if a is None or b is None or version_tuple(str(a))[:2] != version_tuple(str(b))[:2]:
            return f"recorded with {name} {a}, running {name} {b} (major.minor must agree)"
    return None


def gpu_mismatch(recorded: Mapping[str, Any], gpu_name: str) -> str | None:
    name = str(recorded.get("name", ""))
    if _device.sanitize_gpu_name(name) != _device.sanitize_gpu_name(gpu_name):
        return f"tuned on {name!r}, running on {gpu_name!r}"
    return None


# ------------------------------------------------------------------------------------------------
# Parsing and validation
# ------------------------------------------------------------------------------------------------

def _entry(checked: Mapping[str, Any]) -> CacheEntry:
    return CacheEntry(checked["kernel"], dict(checked["key"]), dict(checked["config"]),
                      checked["median_ms"], checked["iqr_ms"], dict(checked["verified"]),
                      checked["hint"])


def parse(data: Any, path: str | None = None) -> CacheFile:
    """Validate a decoded JSON document against the schema (:func:`config_schema.check_document`);
    raises :class:`CacheError` naming the field."""
    doc = config_schema.check_document(data)
    return CacheFile(doc["gpu"], doc["software"], doc["created"],
                     [_entry(e) for e in doc["entries"]], doc["schema_version"], path)


def read(path: str | os.PathLike) -> CacheFile:
    """Read (bounded, regular files only) and validate one file; raises :class:`CacheError`
    (``FileNotFoundError`` when there is no file)."""
    return parse(config_schema.read_json(path), str(path))


_warned: set[tuple[str, str]] = set()


def _report(path: str, reason: str) -> None:
    if (path, reason) in _warned:
        return
    _warned.add((path, reason))
    msg = f"gdn2_kernels: ignoring config file {path}: {reason}"
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)


def check_usable(cache: CacheFile, gpu_name: str,
                 software: Mapping[str, Any] | None = None) -> str | None:
    """Why ``cache`` may not be used on ``gpu_name`` with ``software``; None if it may."""
    return gpu_mismatch(cache.gpu, gpu_name) or software_mismatch(
        cache.software, software if software is not None else current_software())


_loaded: dict[str, tuple[tuple[int, int], CacheFile | None]] = {}


def load(path: str | os.PathLike, gpu_name: str,
         software: Mapping[str, Any] | None = None) -> CacheFile | None:
    """The validated file at ``path`` if it exists and may be used here, else None (reported)."""
    path = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _report(path, str(exc))
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _loaded.get(path)
    if hit is not None and hit[0] == stamp and software is None:
        cache = hit[1]
    else:
        try:
            cache = read(path)
        except FileNotFoundError:  # removed since the stat
            return None
        except CacheError as exc:
            _report(path, str(exc))
            cache = None
        if software is None:
            _loaded[path] = (stamp, cache)
    if cache is None:
        return None
    reason = check_usable(cache, gpu_name, software)
    if reason:
        _report(path, reason)
        return None
    return cache


# ------------------------------------------------------------------------------------------------
# Lookup
# ------------------------------------------------------------------------------------------------

def _key_distance(a: ProblemKey, b: ProblemKey) -> float:
    return abs(math.log2(a.K / b.K)) + abs(math.log2(a.V / b.V))


def pipeline_for(cache: CacheFile, key: ProblemKey, arch: str, triton_version: str,
                 source: str) -> dispatch.PipelineConfig | None:
    """The pipeline for ``key`` from ``cache``: the exact key, else the nearest usable one.

    Keys whose entries are unverified hints (``CacheEntry.hint``) come after every verified key,
    and using one is reported once: ``gdn2 verify`` checks them on this GPU.
    """
    groups: dict[ProblemKey, list[CacheEntry]] = {}
    for e in cache.entries:
        groups.setdefault(e.problem_key(), []).append(e)
    hinted = {k for k, es in groups.items() if any(e.is_hint for e in es)}
    candidates = sorted((k for k in groups if k.dtype == key.dtype),
                        key=lambda k: (k in hinted, _key_distance(k, key), k.K, k.V))
    for k in candidates:
        partial = {e.kernel: e.kernel_config() for e in groups[k]}
        refusals = [r for r in (get_spec(n).check(c, key, arch, triton_version)
                                for n, c in partial.items()) if r is not None]
        if refusals:
            if k == key:
                _report(cache.path or source, f"{refusals[0].config.kernel} config refused for "
                                              f"{arch}: {refusals[0].reason}")
            continue
        label = source if k == key else f"{source} (nearest key {k.as_dict()})"
        if k in hinted:
            label += " (unverified hint)"
            _report(cache.path or source, f"using unverified imported configs for {k.as_dict()}; "
                                          "run `gdn2 verify` to check them on this GPU")
        return dispatch.complete_pipeline(partial, label)
    return None


# Where shipped profiles live: the repository's ``profiles/`` next to the package (source and
# editable installs), else the copy a wheel installs under ``<prefix>/share/gdn2-kernels/profiles``
# (``[tool.setuptools.data-files]`` in pyproject.toml).
_REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
_INSTALLED_PROFILES = Path(sys.prefix) / "share" / "gdn2-kernels" / "profiles"


def profiles_dir() -> Path:
    """The folder of shipped profiles (see the two locations above; the repository's first)."""
    for folder in (_REPO_PROFILES, _INSTALLED_PROFILES):
        if folder.is_dir():
            return folder
    return _REPO_PROFILES


def profile_filename(gpu_name: str) -> str:
    return f"{_device.sanitize_gpu_name(gpu_name)}.json"


def user_cache_path(gpu_name: str) -> Path:
    return Path(_env.cache_dir()) / profile_filename(gpu_name)


def shipped_profile_path(gpu_name: str) -> Path:
    return profiles_dir() / profile_filename(gpu_name)


def shipped_configs(kernel: str, key: ProblemKey) -> list[KernelConfig]:
    """The configs every shipped profile (any GPU) holds for ``kernel`` at exactly ``key``.

    The tuner seeds its samples with them: a config that won on a sibling GPU is a strong
    candidate here, and it is still verified and timed on this GPU before it can win. Unreadable
    profiles are skipped with a warning (``gdn2 info`` reports them too).
    """
    out: list[KernelConfig] = []
    for path in sorted(profiles_dir().glob("*.json")):
        try:
            cache = read(path)
        except CacheError as exc:
            _report(str(path), str(exc))
            continue
        for e in cache.entries:
            if e.kernel == kernel and e.problem_key() == key:
                cfg = e.kernel_config()
                if cfg not in out:
                    out.append(cfg)
    return out


@dataclass(frozen=True)
class SourceInfo:
    """One place configs may come from, in precedence order, and its state on this machine."""

    name: str
    path: str | None
    exists: bool
    usable: bool
    note: str


def describe_sources(gpu_name: str | None = None) -> list[SourceInfo]:
    """Where configs for this GPU come from, highest precedence first (for ``gdn2 info``)."""
    gpu_name = gpu_name or _device.gpu_name()
    out = []
    cfg = _env.config_file()
    paths = [("config_file", cfg), ("user_cache", str(user_cache_path(gpu_name))),
             ("shipped_profile", str(shipped_profile_path(gpu_name)))]
    for name, path in paths:
        if path is None:
            out.append(SourceInfo(name, None, False, False, f"${_env.CONFIG_FILE_VAR} not set"))
            continue
        if not os.path.exists(path):
            note = "error: no such file" if name == "config_file" else "no file"
            out.append(SourceInfo(name, path, False, False, note))
            continue
        try:
            cache = read(path)
        except (CacheError, OSError) as exc:
            out.append(SourceInfo(name, path, True, False, f"rejected: {exc}"))
            continue
        reason = check_usable(cache, gpu_name)
        note = reason or f"{len(cache.entries)} entries for {len(cache.keys())} keys"
        out.append(SourceInfo(name, path, True, reason is None, note))
    out.append(SourceInfo("default", None, True, True, "each KernelSpec's default"))
    return out


def missing_config_file() -> str | None:
    """Why ``$GDN2_CONFIG_FILE`` cannot be used because nothing is there; None when it is unset or
    names an existing path (whose content :func:`load` judges)."""
    path = _env.config_file()
    if path is None or os.path.exists(path):
        return None
    return (f"${_env.CONFIG_FILE_VAR}={path}: no such file. Point it at a cache-schema JSON file "
            f"(gdn2 export --format portable writes one), or unset {_env.CONFIG_FILE_VAR}")


def _config_file_path(gpu_name: str) -> str | None:
    missing = missing_config_file()
    if missing:
        raise CacheError(missing)
    return _env.config_file()


def _file_source(name: str, path_of):
    def source(key: ProblemKey, gpu_name: str, arch: str) -> dispatch.PipelineConfig | None:
        path = path_of(gpu_name)
        if path is None:
            return None
        cache = load(path, gpu_name)
        if cache is None:
            return None
        import triton

        return pipeline_for(cache, key, arch, triton.__version__, f"{name} {path}")

    return source


_SOURCES = (
    ("config_file", _file_source("config_file", _config_file_path)),
    ("user_cache", _file_source("user_cache", user_cache_path)),
    ("shipped_profile", _file_source("shipped_profile", shipped_profile_path)),
)


def register_sources() -> None:
    """Register the three file sources with dispatch, once, in precedence order."""
    registered = {n for n, _ in dispatch._SOURCES}
    for name, fn in _SOURCES:
        if name not in registered:
            dispatch.add_source(name, fn)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``<path>.lock`` (serialises writers across processes)."""
    lock_path = f"{path}.lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf.fileno(), fcntl.LOCK_UN)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync it, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_entries(path: str | os.PathLike, entries: Sequence[CacheEntry], gpu: Mapping[str, Any],
                  software: Mapping[str, Any] | None = None,
                  merge: Callable[[list[CacheEntry], list[CacheEntry]], list[CacheEntry]] | None = None,
                  ) -> CacheFile:
    """Merge ``entries`` into the file at ``path`` (their keys replace the file's) atomically.

    ``merge(old, new)``, when given, is called under the lock with the usable file's entries and
    ``entries`` and returns the entries to write instead (``gdn2 cache import --merge``).

    An existing file that is corrupt or belongs to another GPU or software is never merged: it is
    renamed to ``<path>.rejected-<time>`` with a warning, and a fresh file is written.
    """
    path = str(path)
    software = dict(software) if software is not None else current_software()
    new_file = parse({"schema_version": SCHEMA_VERSION, "gpu": dict(gpu), "software": software,
                      "created": now_iso(), "entries": [e.as_dict() for e in entries]}, path)
    with locked(path):
        kept: list[CacheEntry] = []
        if os.path.exists(path):
            try:
                old = read(path)
                reason = check_usable(old, str(gpu["name"]), software)
            except CacheError as exc:
                old, reason = None, str(exc)
            if reason:
                aside = f"{path}.rejected-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
                os.replace(path, aside)
                msg = f"gdn2_kernels: not merging into {path} ({reason}); moved it to {aside}"
                log.warning(msg)
                warnings.warn(msg, stacklevel=2)
            elif merge is None:
                replaced = {e.problem_key() for e in new_file.entries}
                kept = [e for e in old.entries if e.problem_key() not in replaced]
            else:
                kept = old.entries
        new_file.entries = (kept + new_file.entries if merge is None
                            else parse({**new_file.as_dict(), "entries": [
                                e.as_dict() for e in merge(kept, new_file.entries)]}, path).entries)
        atomic_write_json(path, new_file.as_dict())
    _loaded.pop(path, None)
    dispatch.clear_cache()
    return new_file


def cache_files(folder: str | os.PathLike | None = None) -> list[Path]:
    """The cache files in the user cache folder (default ``$GDN2_CACHE_DIR`` or ~/.cache/gdn2)."""
    folder = Path(folder or _env.cache_dir())
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def clear(folder: str | os.PathLike | None = None, gpu_name: str | None = None) -> list[Path]:
    """Delete cache files (all, or the one of ``gpu_name``) under their locks; returns them."""
    targets = ([user_cache_path(gpu_name)] if gpu_name and folder is None
               else [p for p in cache_files(folder)
                     if gpu_name is None or p.name == profile_filename(gpu_name)])
    removed = []
    for p in targets:
        with locked(p):
            if p.exists():
                p.unlink()
                removed.append(p)
    _loaded.clear()
    dispatch.clear_cache()
    return removed


__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheFile",
    "SCHEMA_VERSION",
    "SourceInfo",
    "atomic_write_json",
    "cache_files",
    "check_usable",
    "clear",
    "current_software",
    "describe_sources",
    "gpu_mismatch",
    "load",
    "locked",
    "missing_config_file",
    "parse",
    "pipeline_for",
    "profile_filename",
    "profiles_dir",
    "read",
    "register_sources",
    "shipped_profile_path",
    "software_mismatch",
    "user_cache_path",
    "write_entries",
]
