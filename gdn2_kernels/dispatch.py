"""Picks the config of every kernel launch.

Precedence (first that has an entry for the problem key wins, the whole pipeline from one source
so the chunk size agrees across stages):

    1. ``override(...)``               (the tuner evaluating a candidate; tests)
    2. ``$GDN2_CONFIG_FILE``           (a cache-schema JSON the user points at)
    3. the user cache                  (``$GDN2_CACHE_DIR`` or ``~/.cache/gdn2``, written by ``gdn2 tune``)
    4. the shipped profile             (``profiles/<GPU name>.json``)
    5. each spec's default             (correct everywhere; one warning per process on a GPU)

Sources 2-4 are registered by ``gdn2_kernels.config_store`` through :func:`add_source`. Lookups
are cached per (key, arch) so they cost nothing per call; :func:`clear_cache` resets.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from gdn2_kernels import _device
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
    chunk = bts.pop() if bts else DEFAULT_CHUNK_SIZE
    base = default_pipeline(chunk, source).as_dict()
    for name, cfg in partial.items():
        get_spec(name)  # raises for unknown kernels
        base[name] = cfg
    return PipelineConfig(chunk, tuple(base.items()), source)


# A source maps (key, gpu name, arch) to a partial pipeline or None.
Source = Callable[[ProblemKey, str, str], "PipelineConfig | None"]
_SOURCES: list[tuple[str, Source]] = []
_local = threading.local()
_warned_untuned = False


def add_source(name: str, source: Source) -> None:
    """Register a lookup source, in precedence order (earlier registered = higher priority)."""
    if any(n == name for n, _ in _SOURCES):
        raise ValueError(f"dispatch source {name!r} already registered")
    _SOURCES.append((name, source))
    clear_cache()


@contextlib.contextmanager
def override(pipeline: PipelineConfig | Mapping[str, KernelConfig]) -> Iterator[PipelineConfig]:
    """Use ``pipeline`` for every launch in this thread inside the ``with`` block."""
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
def _lookup(key: ProblemKey, gpu: str, arch: str) -> PipelineConfig:
    global _warned_untuned
    for name, source in _SOURCES:
        found = source(key, gpu, arch)
        if found is not None:
            log.info("configs for %s on %s from %s", key, gpu, found.source)
            return found
    if arch != "cpu" and not _warned_untuned:
        _warned_untuned = True
        warnings.warn(
            f"gdn2_kernels: no tuned configs for {key.as_dict()} on {gpu}; using spec defaults. "
            "Run `gdn2 tune` to tune for this GPU.", stacklevel=4)
    return default_pipeline()


_builtin_sources_loaded = False


def _load_builtin_sources() -> None:
    """Import ``config_store`` (which imports this module) to register the file sources.

    Done on first use rather than at import so the import order stays configs -> dispatch ->
    config_store. Sources added with add_source before the first resolve rank above these.
    """
    global _builtin_sources_loaded
    if not _builtin_sources_loaded:
        _builtin_sources_loaded = True
        from gdn2_kernels import config_store

        config_store.register_sources()


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


def resolve(key: ProblemKey) -> PipelineConfig:
    """The pipeline config for ``key`` on the current device."""
    ov = getattr(_local, "override", None)
    if ov is not None:
        return ov
    _load_builtin_sources()
    index = _device.current_index()
    return _lookup(key, _device.gpu_name(index), _device.arch(index))
