"""Resolution: the config of every kernel launch, from one ordered list of sources.

:data:`SOURCES` is the precedence, and the only statement of it (docs/tuning.md and ``gdn2
info`` render it from this list): the first source that has configs for the problem key gives
the whole pipeline, so the chunk size agrees across stages; kernels that source lacks take their
spec default at its chunk size. Within a file, the exact key wins, else the nearest key with the
same dtype whose configs the specs allow for the asked key (:func:`pipeline_from`).

Lookups are cached per (key, GPU, arch), so they cost nothing per call; the cache is dropped when
a config file is written through :mod:`gdn2_kernels.config_files` (its ``generation``), and by
:func:`clear_cache` (after changing ``$GDN2_CONFIG_FILE`` or ``$GDN2_CACHE_DIR`` in-process).

The last step of resolution depends on the call's shape: the serial passes' launchers narrow the
value tile (and cap the warps) when few sequences x heads would leave SMs idle, and run the state
passes as a two-level scan where their ``SCAN`` allows it (the rules of ``_parallel``).
:func:`launch_time` applies those rules to a resolved pipeline, so the configs that launch are the
ones logged (``log_launch``, at INFO) and shown (``gdn2 info --shape``, ``gdn2 profile``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from gdn2_kernels import _device, _env, _parallel, config_files
from gdn2_kernels.config_schema import CacheError
from gdn2_kernels.configs import DEFAULT_CHUNK_SIZE, KernelConfig, ProblemKey, all_specs, get_spec

log = logging.getLogger("gdn2_kernels.dispatch")


@dataclass(frozen=True)
class PipelineConfig:
    """One config per kernel for one problem, all with the same chunk size, and where it came from."""

    chunk_size: int
    configs: tuple[tuple[str, KernelConfig], ...]
    source: str

    def __getitem__(self, kernel: str) -> KernelConfig:
        for name, cfg in self.configs:
            if name == kernel:
                return cfg
        raise KeyError(f"pipeline has no config for kernel {kernel!r}")

    def as_dict(self) -> dict[str, KernelConfig]:
        return dict(self.configs)


def default_pipeline(chunk_size: int = DEFAULT_CHUNK_SIZE, source: str = "default") -> PipelineConfig:
    """Every registered spec's default, with ``BT`` pinned to ``chunk_size``."""
    cfgs = []
    for spec in all_specs():
        fixed = {"BT": chunk_size} if any(p.name == "BT" for p in spec.params) else {}
        cfgs.append((spec.name, spec.default_config(**fixed)))
    return PipelineConfig(chunk_size, tuple(cfgs), source)


def complete_pipeline(partial: Mapping[str, KernelConfig], source: str) -> PipelineConfig:
    """Fill kernels missing from ``partial`` with defaults at its chunk size; check BT agrees."""
    bts = {c["BT"] for c in partial.values() if "BT" in c.as_dict()}
    if len(bts) > 1:
        raise ValueError(f"configs from {source} disagree on the chunk size BT: {sorted(bts)}")
    chunk_size = bts.pop() if bts else DEFAULT_CHUNK_SIZE
    base = default_pipeline(chunk_size, source).as_dict()
    for name, cfg in partial.items():
        get_spec(name)  # raises for unknown kernels
        base[name] = cfg
    return PipelineConfig(chunk_size, tuple(base.items()), source)


def with_chunk_size(pipe: PipelineConfig, chunk_size: int, key: ProblemKey) -> PipelineConfig:
    """``pipe`` with every stage's ``BT`` pinned to ``chunk_size`` (a caller's ``chunk_size``).

    Each stage keeps its resolved config with the new BT where its spec allows that config,
    else takes the spec default at that chunk size (correct everywhere).
    """
    if pipe.chunk_size == chunk_size:
        return pipe
    cfgs = []
    for name, cfg in pipe.configs:
        spec = get_spec(name)
        if any(p.name == "BT" for p in spec.params):
            cfg = cfg.replace(BT=chunk_size)
            if spec.check(cfg, key) is not None:
                cfg = spec.default_config(BT=chunk_size)
        cfgs.append((name, cfg))
    return PipelineConfig(chunk_size, tuple(cfgs), f"{pipe.source}, BT pinned to {chunk_size}")


# ------------------------------------------------------------------------------------------------
# The sources, in precedence order
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One place configs may come from. ``file`` gives the config file for a GPU name (None: the
    source has no file there); sources without ``file`` are not files."""

    name: str
    where: str
    role: str
    file: Callable[[str], "str | Path | None"] | None = None


SOURCES: tuple[Source, ...] = (
    Source("override", "dispatch.override(...), in this thread",
           "the tuner's candidate under test; tests"),
    Source("config_file", f"${_env.CONFIG_FILE_VAR}",
           "a cache-schema file the user points at, the same for every GPU",
           config_files.config_file_path),
    Source("user_cache", f"${_env.CACHE_DIR_VAR}/<GPU>.json (default ~/.cache/gdn2/)",
           "written by `gdn2 tune` and `gdn2 cache import`", config_files.user_cache_path),
    Source("shipped_profile", "profiles/<GPU>.json",
           "tuned on that GPU model and shipped with the package",
           config_files.shipped_profile_path),
    Source("default", "each KernelSpec's default",
           "correct everywhere; one warning per process on a GPU"),
)


def precedence_table() -> str:
    """:data:`SOURCES` as a Markdown list, highest precedence first (docs/tuning.md)."""
    return "\n".join(f"{i}. `{s.name}`: {s.where}; {s.role}" for i, s in enumerate(SOURCES, 1))


def _key_distance(a: ProblemKey, b: ProblemKey) -> float:
    return abs(math.log2(a.K / b.K)) + abs(math.log2(a.V / b.V))


def pipeline_from(cache: config_files.CacheFile, key: ProblemKey,
                  source: str) -> PipelineConfig | None:
    """The pipeline for ``key`` from ``cache``: the exact key, else the nearest usable one.

    Keys whose entries are unverified hints (``CacheEntry.hint``) come after every verified key,
    and using one is reported once: ``gdn2 verify`` checks them on this GPU.
    """
    groups: dict[ProblemKey, list[config_files.CacheEntry]] = {}
    for e in cache.entries:
        groups.setdefault(e.problem_key(), []).append(e)
    hinted = {k for k, es in groups.items() if any(e.is_hint for e in es)}
    candidates = sorted((k for k in groups if k.dtype == key.dtype),
                        key=lambda k: (k in hinted, _key_distance(k, key), k.K, k.V))
    for k in candidates:
        partial = {e.kernel: e.kernel_config() for e in groups[k]}
        refusals = [r for r in (get_spec(n).check(c, key)
                                for n, c in partial.items()) if r is not None]
        if refusals:
            if k == key:
                config_files.report(cache.path or source,
                                    f"{refusals[0].config.kernel} config refused: "
                                    f"{refusals[0].reason}")
            continue
        label = source if k == key else f"{source} (nearest key {k.as_dict()})"
        if k in hinted:
            label += " (unverified hint)"
            config_files.report(cache.path or source, f"using unverified imported configs for "
                                                      f"{k.as_dict()}; run `gdn2 verify` to "
                                                      "check them on this GPU")
        return complete_pipeline(partial, label)
    return None


# ------------------------------------------------------------------------------------------------
# Resolving
# ------------------------------------------------------------------------------------------------

_local = threading.local()
_warned_untuned = False


@contextlib.contextmanager
def override(pipeline: PipelineConfig | Mapping[str, KernelConfig]) -> Iterator[PipelineConfig]:
    """Use ``pipeline`` for every launch in this thread inside the ``with`` block (the first of
    :data:`SOURCES`)."""
    if not isinstance(pipeline, PipelineConfig):
        pipeline = complete_pipeline(pipeline, "override")
    prev = getattr(_local, "override", None)
    _local.override = pipeline
    try:
        yield pipeline
    finally:
        _local.override = prev


def clear_cache() -> None:
    _lookup.cache_clear()


@functools.lru_cache(maxsize=256)
def _lookup(key: ProblemKey, gpu: str, arch: str, generation: int) -> PipelineConfig:
    global _warned_untuned

    for source in SOURCES:
        path = source.file(gpu) if source.file is not None else None
        if path is None:
            continue
        cache = config_files.load(path, gpu)
        if cache is None:
            continue
        found = pipeline_from(cache, key, f"{source.name} {path}")
        if found is not None:
            log.info("configs for %s on %s from %s", key, gpu, found.source)
            return found
    if arch != "cpu" and not _warned_untuned:
        _warned_untuned = True
        warnings.warn(
            f"gdn2_kernels: no tuned configs for {key.as_dict()} on {gpu}; using spec defaults. "
            "Run `gdn2 tune` to tune for this GPU.", stacklevel=4)
    return default_pipeline()


def resolve(key: ProblemKey) -> PipelineConfig:
    """The pipeline config for ``key`` on the current device (see :data:`SOURCES`)."""
    ov = getattr(_local, "override", None)
    if ov is not None:
        return ov
    index = _device.current_index()
    return _lookup(key, _device.gpu_name(index), _device.arch(index), config_files.generation())


# ------------------------------------------------------------------------------------------------
# Launch time: the shape's rules
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launched:
    """A resolved pipeline as its launchers run it at one shape, and what the rules changed."""

    pipeline: PipelineConfig
    changes: tuple[str, ...]


def launch_time(pipe: PipelineConfig, N: int, H: int, T: int, V: int, device,
                varlen: bool = False, op: str = "chunk") -> Launched:
    """``pipe`` at ``N`` sequences (or batch rows) x ``H`` heads of ``T`` tokens and value dim
    ``V`` on ``device``, for the kernels of ``op`` ('chunk' or 'recurrent'): each serial pass
    (``KernelSpec.serial``) with the ``BV`` and ``num_warps`` its launcher uses
    (``_parallel.serial_launch``), the state passes' two-level scan (``_parallel.scan_segments``;
    dense inputs only) named in ``changes``. Without an SM count (the CPU) nothing changes."""
    cfgs, changes = [], []
    for name, cfg in pipe.configs:
        spec = get_spec(name)
        if not spec.serial or spec.op != op:
            cfgs.append((name, cfg))
            continue
        rows, how = N * H, []
        seg = (None if varlen or "SCAN" not in cfg.as_dict()
               else _parallel.scan_segments(cfg, N, H, T, V, None, device))
        if seg is not None:
            S = -(-(-(-T // cfg["BT"])) // seg)
            rows = N * S * H
            how.append(f"two-level scan, {S} segments of {seg} chunks per sequence")
        BV, options = _parallel.serial_launch(cfg, rows, V, device)
        launched = cfg.replace(BV=BV, num_warps=options["num_warps"])
        if launched != cfg:
            how.append(f"BV {cfg['BV']} -> {BV}, num_warps {cfg['num_warps']} -> "
                       f"{options['num_warps']} ({rows} rows x V/BV programs would cover < half "
                       "the SMs)")
        if how:
            changes.append(f"{name}: " + "; ".join(how))
        cfgs.append((name, launched))
    return Launched(PipelineConfig(pipe.chunk_size, tuple(cfgs), pipe.source), tuple(changes))


_logged: set[tuple] = set()


def log_launch(pipe: PipelineConfig, N: int, H: int, T: int, V: int, device,
               varlen: bool = False, op: str = "chunk") -> None:
    """Log (INFO, once per pipeline and shape) the configs that launch at this shape."""
    if not log.isEnabledFor(logging.INFO):
        return
    seen = (pipe, N, H, T, V, str(device), varlen, op)
    if seen in _logged or len(_logged) > 4096:
        return
    _logged.add(seen)
    launched = launch_time(pipe, N, H, T, V, device, varlen, op)
    log.info("%s launch at N=%d H=%d T=%d V=%d: %s", op, N, H, T, V,
             "; ".join(launched.changes) or f"as resolved ({pipe.source})")


# ------------------------------------------------------------------------------------------------
# The sources on this machine (gdn2 info)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceInfo:
    """One place configs may come from, in precedence order, and its state on this machine."""

    name: str
    path: str | None
    exists: bool
    usable: bool
    note: str


def describe_sources(gpu_name: str | None = None) -> list[SourceInfo]:
    """The sources that can hold configs for this GPU, highest precedence first (``gdn2 info``;
    the override exists only inside a ``with override(...)`` block)."""
    gpu_name = gpu_name or _device.gpu_name()
    out = []
    for source in SOURCES:
        if source.name == "override":
            continue
        if source.file is None:
            out.append(SourceInfo(source.name, None, True, True, source.where))
            continue
        try:
            path = source.file(gpu_name)
        except CacheError:  # $GDN2_CONFIG_FILE names nothing
            path = _env.config_file()
        if path is None:
            out.append(SourceInfo(source.name, None, False, False, f"{source.where} not set"))
            continue
        path = str(path)
        if not os.path.exists(path):
            note = "error: no such file" if source.name == "config_file" else "no file"
            out.append(SourceInfo(source.name, path, False, False, note))
            continue
        try:
            cache = config_files.read(path)
        except (CacheError, OSError) as exc:
            out.append(SourceInfo(source.name, path, True, False, f"rejected: {exc}"))
            continue
        reason = config_files.check_usable(cache, gpu_name)
        note = reason or f"{len(cache.entries)} entries for {len(cache.keys())} keys"
        out.append(SourceInfo(source.name, path, True, reason is None, note))
    return out


__all__ = ["Launched", "PipelineConfig", "SOURCES", "Source", "SourceInfo", "clear_cache",
           "complete_pipeline", "default_pipeline", "describe_sources", "launch_time",
           "log_launch", "override", "pipeline_from", "precedence_table", "resolve",
           "with_chunk_size"]
