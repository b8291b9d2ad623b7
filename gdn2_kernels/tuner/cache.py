"""``gdn2 cache``: list, show, clear the user cache and say where it is."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gdn2_kernels import _device, _env, config_files


@dataclass
class CacheSummary:
    path: str
    gpu: str | None
    entries: int
    keys: list[dict]
    created: str | None
    usable_here: bool
    problem: str | None  # why the file is unusable (corrupt, other GPU/software), else None
    rejected: bool = False  # the file itself is invalid (``problem`` says why), not just foreign


@dataclass
class CachePaths:
    cache_dir: str
    this_gpu_file: str
    shipped_profile: str
    config_file: str | None


def paths() -> CachePaths:
    name = _device.gpu_name()
    return CachePaths(_env.cache_dir(), str(config_files.user_cache_path(name)),
                      str(config_files.shipped_profile_path(name)), _env.config_file())


def summarize(path: str | Path) -> CacheSummary:
    try:
        c = config_files.read(path)
    except (config_files.CacheError, OSError) as exc:
        return CacheSummary(str(path), None, 0, [], None, False, f"rejected: {exc}", True)
    problem = config_files.check_usable(c, _device.gpu_name())
    return CacheSummary(str(path), c.gpu.get("name"), len(c.entries),
                        [k.as_dict() for k in c.keys()], c.created, problem is None, problem)


def shipped_profiles() -> list[Path]:
    """The shipped profiles (one per GPU model), for advice that works without a GPU."""
    return sorted(config_files.profiles_dir().glob("*.json"))


def where_configs_come_from(option: str) -> str:
    """Advice for a machine without tuned configs: on a GPU, ``gdn2 tune``; without one (the
    interpreter writes no cache), ``option`` naming a shipped profile."""
    shipped = " or ".join(f"{option} {p}" for p in shipped_profiles()) or f"{option} FILE"
    if _device.interpreter_active():
        return (f"no CUDA GPU here, so `gdn2 tune` writes no cache; use a shipped profile: "
                f"{shipped}")
    return f"run `gdn2 tune` on this GPU, or use a shipped profile: {shipped}"


def list_caches() -> list[CacheSummary]:
    """Every file in the user cache folder, valid or not."""
    return [summarize(p) for p in config_files.cache_files()]


def show(target: str | None = None) -> config_files.CacheFile:
    """A cache file: ``target`` is a path or a GPU name; default this GPU's user cache file."""
    if target and (Path(target).exists() or target.endswith(".json")):
        path = Path(target)
    else:
        path = config_files.user_cache_path(target or _device.gpu_name())
    if not path.exists():
        raise FileNotFoundError(f"no cache file {path}; "
                                + where_configs_come_from("gdn2 cache show"))
    return config_files.read(path)


def clear(gpu_name: str | None = None) -> list[str]:
    """Delete this GPU's cache file (or every one when ``gpu_name`` is 'all'); returns paths."""
    if gpu_name == "all":
        return [str(p) for p in config_files.clear()]
    return [str(p) for p in config_files.clear(gpu_name=gpu_name or _device.gpu_name())]


__all__ = ["CachePaths", "CacheSummary", "clear", "list_caches", "paths", "shipped_profiles",
           "show", "summarize", "where_configs_come_from"]
