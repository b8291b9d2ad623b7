"""Tuned-config files: the versioned cache schema, reading, usability, atomic locked writes.

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
  log, once per file and reason) and skipped as a whole by :func:`load`: it is never used and
  never merged.
- Software is compatible when Triton and gdn2_kernels agree on major.minor. The torch and CUDA
  versions are recorded as provenance only: configs are Triton launch parameters, and Triton's
  code generation is what a different version can break.
- The entries of one problem key form one pipeline (the stages must agree on the chunk size BT),
  so writes replace a key's entries as a group.
- Writes are atomic (temporary file in the same folder, fsync, ``os.replace``) and serialised by
  an ``fcntl`` lock on ``<file>.lock``; a writer re-reads the file under the lock
  (:func:`update`) and merges its keys into it, so two concurrent tunes of different keys both
  survive. Every write or removal advances :func:`generation`, which drops resolved configs.

This module only handles files; which file a launch's configs come from is
``gdn2_kernels.dispatch.SOURCES``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from gdn2_kernels import _device, _env, config_schema, provenance
from gdn2_kernels.config_schema import SCHEMA_VERSION, CacheError
from gdn2_kernels.configs import KernelConfig, ProblemKey, get_spec, version_tuple

log = logging.getLogger("gdn2_kernels.config_files")

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
    # such entries below verified ones (``dispatch.pipeline_from``); written only when set.
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
# Usability here
# ------------------------------------------------------------------------------------------------

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


def check_usable(cache: CacheFile, gpu_name: str,
                 software: Mapping[str, Any] | None = None) -> str | None:
    """Why ``cache`` may not be used on ``gpu_name`` with ``software``; None if it may."""
    return gpu_mismatch(cache.gpu, gpu_name) or software_mismatch(
        cache.software, software if software is not None else provenance.current_software())


# ------------------------------------------------------------------------------------------------
# Reading
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


def report(path: str, reason: str) -> None:
    """Warn (and log) once per file and reason that the file, or part of it, is not used."""
    if (path, reason) in _warned:
        return
    _warned.add((path, reason))
    msg = f"gdn2_kernels: ignoring config file {path}: {reason}"
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)


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
        report(path, str(exc))
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
            report(path, str(exc))
            cache = None
        if software is None:
            _loaded[path] = (stamp, cache)
    if cache is None:
        return None
    reason = check_usable(cache, gpu_name, software)
    if reason:
        report(path, reason)
        return None
    return cache


def forget() -> None:
    """Drop the files read so far and the warnings given (they are read and given again)."""
    global _generation
    _loaded.clear()
    _warned.clear()
    _generation += 1


# ------------------------------------------------------------------------------------------------
# Where the files are
# ------------------------------------------------------------------------------------------------

# Shipped profiles: the repository's ``profiles/`` next to the package (source and editable
# installs), else the copy a wheel installs under ``<prefix>/share/gdn2-kernels/profiles``
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


def missing_config_file() -> str | None:
    """Why ``$GDN2_CONFIG_FILE`` cannot be used because nothing is there; None when it is unset or
    names an existing path (whose content :func:`load` judges)."""
    path = _env.config_file()
    if path is None or os.path.exists(path):
        return None
    return (f"${_env.CONFIG_FILE_VAR}={path}: no such file. Point it at a cache-schema JSON file "
            f"(gdn2 export --format portable writes one), or unset {_env.CONFIG_FILE_VAR}")


def config_file_path(gpu_name: str | None = None) -> str | None:
    """``$GDN2_CONFIG_FILE`` (the same file for every GPU); :class:`CacheError` when it names
    nothing: the user named a file that is not there."""
    missing = missing_config_file()
    if missing:
        raise CacheError(missing)
    return _env.config_file()


def cache_files(folder: str | os.PathLike | None = None) -> list[Path]:
    """The cache files in the user cache folder (default ``$GDN2_CACHE_DIR`` or ~/.cache/gdn2)."""
    folder = Path(folder or _env.cache_dir())
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


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
            report(str(path), str(exc))
            continue
        for e in cache.entries:
            if e.kernel == kernel and e.problem_key() == key:
                cfg = e.kernel_config()
                if cfg not in out:
                    out.append(cfg)
    return out


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

_generation = 0


def generation() -> int:
    """Advances on every write or removal through this module: what was resolved from the files
    before may be stale."""
    return _generation


def _changed(path: str | None = None) -> None:
    global _generation
    if path is None:
        _loaded.clear()
    else:
        _loaded.pop(path, None)
    _generation += 1


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


@dataclass
class Update:
    """A file held under its lock (:func:`update`): ``current`` are the entries of the usable file
    there (empty when there is none, or when it was set aside); :meth:`write` replaces the file."""

    path: str
    gpu: dict[str, Any]
    software: dict[str, Any]
    current: list[CacheEntry]
    written: CacheFile | None = None

    def write(self, entries: Sequence[CacheEntry]) -> CacheFile:
        """Validate ``entries`` as one document and write it atomically."""
        doc = parse({"schema_version": SCHEMA_VERSION, "gpu": dict(self.gpu),
                     "software": dict(self.software), "created": provenance.now_iso(),
                     "entries": [e.as_dict() for e in entries]}, self.path)
        atomic_write_json(self.path, doc.as_dict())
        self.written = doc
        return doc


@contextlib.contextmanager
def update(path: str | os.PathLike, gpu: Mapping[str, Any],
           software: Mapping[str, Any] | None = None) -> Iterator[Update]:
    """Hold ``path``'s lock and re-read it: the block decides the new entries from
    ``Update.current`` and writes them with ``Update.write``.

    An existing file that is corrupt or belongs to another GPU or software is never merged: it is
    renamed to ``<path>.rejected-<time>`` with a warning, and ``current`` is empty.
    """
    path = str(path)
    software = dict(software) if software is not None else provenance.current_software()
    with locked(path):
        current: list[CacheEntry] = []
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
                warnings.warn(msg, stacklevel=4)
            else:
                current = old.entries
        try:
            yield Update(path, dict(gpu), software, current)
        finally:
            _changed(path)


def write_entries(path: str | os.PathLike, entries: Sequence[CacheEntry], gpu: Mapping[str, Any],
                  software: Mapping[str, Any] | None = None) -> CacheFile:
    """Merge ``entries`` into the file at ``path`` atomically: their problem keys replace the
    file's entries of those keys, the file's other keys stay (see :func:`update`)."""
    software = dict(software) if software is not None else provenance.current_software()
    # Validated before the lock is taken, so a bad entry changes nothing on disk.
    parse({"schema_version": SCHEMA_VERSION, "gpu": dict(gpu), "software": software,
           "created": provenance.now_iso(), "entries": [e.as_dict() for e in entries]}, str(path))
    with update(path, gpu, software) as file:
        replaced = {e.problem_key() for e in entries}
        return file.write([e for e in file.current if e.problem_key() not in replaced]
                          + list(entries))


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
    _changed()
    return removed


__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheFile",
    "SCHEMA_VERSION",
    "Update",
    "atomic_write_json",
    "cache_files",
    "check_usable",
    "clear",
    "config_file_path",
    "forget",
    "generation",
    "gpu_mismatch",
    "load",
    "locked",
    "missing_config_file",
    "parse",
    "profile_filename",
    "profiles_dir",
    "read",
    "report",
    "shipped_configs",
    "shipped_profile_path",
    "software_mismatch",
    "update",
    "user_cache_path",
    "write_entries",
]
