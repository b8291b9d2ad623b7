"""``gdn2 export`` and ``gdn2 cache import``: tuned configs out to other software and machines.

Formats (docs/formats.md has the schemas and real examples):

- ``portable``: our cache schema (``config_files``, schema_version 1), the verified entries of one
  GPU, written to ``<out>/<GPU>.json``; ``gdn2 cache import`` reads it on another machine.
- ``fla``: flash-linear-attention's config cache, ``<out>/<GPU>/<FLA kernel>.json``
  (``kernel_name``, ``triton_version``, ``autotune_entries`` keyed by the MD5 of FLA's serialised
  autotune key, ``default_config``), for the FLA kernels whose autotuned parameters are ours
  (:data:`FLA_MAPPINGS`); every other kernel is listed as skipped with the reason.
- ``vllm``: one JSON per kernel, problem and device, ``kernel=..,K=..,V=..,dtype=..,device_name=..
  .json``, mapping token-count buckets to the config (read by :func:`gdn2_kernels.load_exported`).

Import rules (issue 7): a file for another GPU model, another major Triton version or a newer
schema is refused; ``force`` keeps its entries as unverified hints (``CacheEntry.hint``), which
dispatch ranks below verified entries. Entries tuned under another Triton or gdn2_kernels minor
version are kept as hints too (the cache only trusts configs of the running major.minor).
``merge`` keeps, per problem key, the better pipeline: verified over hint, then the lower total
median over the kernels both have. Run ``gdn2 verify`` after an import to check the configs
against the fp64 reference on this GPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gdn2_kernels import _device, config_files, config_schema, provenance
from gdn2_kernels.config_files import CacheEntry, CacheError, CacheFile
from gdn2_kernels.configs import ProblemKey, version_tuple
from gdn2_kernels.exported import vllm_filename
from gdn2_kernels.tuner.cache import where_configs_come_from
from gdn2_kernels.tuner.trial import Problem

FORMATS = ("portable", "fla", "vllm")
VERIFY_HINT = "run `gdn2 verify` (add --backward for the gradients) to check them on this GPU"


class ExportError(ValueError):
    """Nothing to export from, or an unknown format."""


class ImportRefused(CacheError):
    """An import refused as a whole: another GPU model, Triton major or a newer schema."""


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------

@dataclass
class ExportItem:
    """One source entry and what became of it (``written`` or ``skipped``)."""

    kernel: str
    key: str
    status: str
    target: str | None
    reason: str


@dataclass
class ExportReport:
    format: str
    source: str
    gpu: str
    out: str
    files: list[str]
    items: list[ExportItem]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.files)


@dataclass
class ImportItem:
    """One problem key of the imported file: ``imported``, ``hint`` or ``kept existing``."""

    key: str
    kernels: list[str]
    status: str
    reason: str


@dataclass
class ImportReport:
    source: str
    target: str
    source_gpu: str
    gpu: str
    merge: bool
    force: bool
    items: list[ImportItem]
    next_step: str = VERIFY_HINT

    @property
    def ok(self) -> bool:
        return True


def _key_label(key: dict[str, Any]) -> str:
    return f"K{key['K']} V{key['V']} {key['dtype']}"


# ------------------------------------------------------------------------------------------------
# Source
# ------------------------------------------------------------------------------------------------

def source_path(source: str | None = None) -> Path:
    """``source`` if given, else this GPU's user cache, else its shipped profile."""
    if source:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no file {path}")
        return path  # read (regular files only, bounded) and validated by config_files.read
    name = _device.gpu_name()
    for path in (config_files.user_cache_path(name), config_files.shipped_profile_path(name)):
        if path.is_file():
            return path
    raise ExportError(f"no tuned configs for {name!r}: neither "
                      f"{config_files.user_cache_path(name)} nor "
                      f"{config_files.shipped_profile_path(name)} exists; "
                      + where_configs_come_from("--from"))


# ------------------------------------------------------------------------------------------------
# FLA
# ------------------------------------------------------------------------------------------------

def fla_sanitize_gpu_name(name: str) -> str:
    """FLA's folder name for a GPU (``fla.ops.utils.cache.sanitize_gpu_name``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "unknown_gpu"


def fla_key_hash(key: list[Any]) -> str:
    """FLA's ``AutotuneKey.key_hash``: MD5 of the compact, key-sorted JSON of the key."""
    return hashlib.md5(json.dumps(key, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


# FLA builds an autotune key from the values of the declared key arguments followed by
# str(dtype) of every tensor argument passed, in call order. The optional state tensors (h0/ht
# in the forward, dht/dh0 in the backward) add entries, so each key is written with none, one
# and both of them. FLA's GDN-2 runs these kernels with BT = 64, HV = H, STATE_V_FIRST = False.
_F32 = "torch.float32"
_STATE_EXTRAS = ([], [_F32], [_F32, _F32])
# l2norm's NB = cdiv(rows, 65536) buckets the row count; our configs do not depend on it.
L2NORM_NB = tuple(range(1, 17))


def _fwd_h_keys(k: ProblemKey, heads: int) -> list[list[Any]]:
    x = f"torch.{k.dtype}"
    return [[heads, heads, k.K, k.V, 64, False, x, x, x, x, _F32, x, *extra] for extra in _STATE_EXTRAS]


def _dhu_keys(k: ProblemKey, heads: int) -> list[list[Any]]:
    x = f"torch.{k.dtype}"
    return [[heads, heads, k.K, k.V, 64, False, False, x, x, x, _F32, *extra, x, x, x, x]
            for extra in _STATE_EXTRAS]


def _l2norm_fwd_keys(k: ProblemKey, heads: int) -> list[list[Any]]:
    x = f"torch.{k.dtype}"
    return [[k.K, nb, x, x, _F32] for nb in L2NORM_NB]


def _l2norm_bwd_keys(k: ProblemKey, heads: int) -> list[list[Any]]:
    x = f"torch.{k.dtype}"
    return [[k.K, nb, x, _F32, x, x] for nb in L2NORM_NB]


@dataclass(frozen=True)
class FlaMapping:
    """Our kernel whose tunables are the autotuned parameters of one FLA kernel.

    ``kwargs`` maps FLA's config kwarg to our parameter; ``candidates`` holds FLA's declared
    values (configs outside them are never exported); ``chunk_size`` is the BT FLA runs with.
    """

    ours: str
    fla_kernel: str
    declared_in: str
    kwargs: tuple[tuple[str, str], ...]
    candidates: tuple[tuple[str, tuple], ...]
    keys: Callable[[ProblemKey, int], list[list[Any]]]
    chunk_size: int | None = None
    note: str = ""


FLA_MAPPINGS: tuple[FlaMapping, ...] = (
    FlaMapping(
        "state_fwd", "chunk_gated_delta_rule_fwd_kernel_h_blockdim64", "fla/ops/common/chunk_delta_h.py",
        (("BV", "BV"),), (("BV", (32, 64)), ("num_warps", (2, 4)), ("num_stages", (2, 3, 4))),
        _fwd_h_keys, 64,
        "same grid (one program per [K, BV] state slice, serial over chunks); ours also forms the "
        "output, so the timing that chose the config is of the fused pass"),
    FlaMapping(
        "state_bwd", "chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64", "fla/ops/common/chunk_delta_h.py",
        (("BV", "BV"),), (("BV", (32, 64)), ("num_warps", (2, 4)), ("num_stages", (2, 3, 4))),
        _dhu_keys, 64,
        "same grid (one program per [K, BV] state-gradient slice, chunks in reverse)"),
    FlaMapping(
        "l2norm_fwd", "l2norm_fwd_kernel", "fla/modules/norm/l2norm.py",
        (("BT", "BR"),), (("BT", (8, 16, 32, 64, 128)), ("num_warps", (1, 2, 4, 8, 16))),
        _l2norm_fwd_keys, None, "rows per program (our BR is FLA's BT); no loop, num_stages unused"),
    FlaMapping(
        "l2norm_bwd", "l2norm_bwd_kernel", "fla/modules/norm/l2norm.py",
        (("BT", "BR"),), (("BT", (8, 16, 32, 64, 128)), ("num_warps", (1, 2, 4, 8, 16))),
        _l2norm_bwd_keys, None, "rows per program (our BR is FLA's BT); no loop, num_stages unused"),
)

FLA_NO_MAPPING: dict[str, str] = {
    "intra_fwd": "no FLA kernel takes these tunables: FLA splits the stage into "
                 "chunk_gdn2_fwd_kernel_intra_token_parallel (BH), "
                 "chunk_gdn2_fwd_kernel_inter_solve_fused (BK) and recompute_w_u_fwd_gdn2_kernel "
                 "(warps/stages only); our one program per chunk tiles BC/BK/BV/SOLVE_PRECISION",
    "intra_bwd": "no FLA kernel takes these tunables: FLA's chunk_gdn2_bwd_kernel_wy_dqkg_fused "
                 "(BK, BV) and chunk_gdn2_bwd_kernel_intra (warps/stages) split the work our fused "
                 "VJP does in one program with BC/BK/BV/SOLVE_PRECISION",
    "recurrent_fwd": "FLA's fused_recurrent_gdn2_fwd_kernel is not autotuned (BV=32, num_warps=4, "
                     "num_stages=2 fixed in fla/ops/gdn2/fused_recurrent.py), so FLA reads no "
                     "config file for it",
}


def fla_mapping(kernel: str) -> FlaMapping | None:
    return next((m for m in FLA_MAPPINGS if m.ours == kernel), None)


def _fla_refusal(m: FlaMapping, config: dict[str, Any]) -> str | None:
    if m.chunk_size is not None and config.get("BT") != m.chunk_size:
        return (f"tuned at BT={config.get('BT')}; FLA's GDN-2 runs {m.fla_kernel} only at "
                f"BT={m.chunk_size}")
    fla_values = {fla: config[ours] for fla, ours in m.kwargs}
    fla_values.update(num_warps=config["num_warps"], num_stages=config["num_stages"])
    for name, allowed in m.candidates:
        if fla_values[name] not in allowed:
            return f"{name}={fla_values[name]} is outside FLA's candidates {allowed} for {m.fla_kernel}"
    return None


def fla_config(m: FlaMapping, config: dict[str, Any]) -> dict[str, Any]:
    """A serialised ``triton.Config`` as FLA's CachedAutotuner reads it."""
    return {"kwargs": {fla: config[ours] for fla, ours in m.kwargs},
            "num_warps": int(config["num_warps"]), "num_stages": int(config["num_stages"]),
            "num_ctas": 1, "maxnreg": None}


def _read_json_object(path: Path) -> dict[str, Any]:
    """An earlier export in the output folder, to add to; {} when there is none or it is not a
    readable JSON object (it is then rewritten)."""
    try:
        data = config_schema.read_json(path)
    except (OSError, CacheError):
        return {}
    return data if isinstance(data, dict) else {}


def _export_fla(cache: CacheFile, entries: list[CacheEntry], out: Path, heads: tuple[int, ...],
                items: list[ExportItem]) -> list[str]:
    folder = out / fla_sanitize_gpu_name(str(cache.gpu["name"]))
    per_kernel: dict[str, dict[str, dict[str, Any]]] = {}
    for e in entries:
        m = fla_mapping(e.kernel)
        label = _key_label(e.key)
        if m is None:
            reason = FLA_NO_MAPPING.get(e.kernel, "no FLA kernel corresponds to this one")
            items.append(ExportItem(e.kernel, label, "skipped", None, reason))
            continue
        refusal = _fla_refusal(m, e.config)
        if refusal:
            items.append(ExportItem(e.kernel, label, "skipped", None, refusal))
            continue
        cfg = fla_config(m, e.config)
        table = per_kernel.setdefault(m.fla_kernel, {})
        keys = [k for h in heads for k in m.keys(e.problem_key(), h)]
        for k in keys:
            table[fla_key_hash(k)] = {"autotune_key": k, "config": cfg}
        items.append(ExportItem(e.kernel, label, "written", str(folder / f"{m.fla_kernel}.json"),
                                f"as {m.fla_kernel} {cfg['kwargs']} num_warps={cfg['num_warps']} "
                                f"num_stages={cfg['num_stages']} under {len(keys)} autotune keys"))
    files = []
    for name, table in per_kernel.items():
        path = folder / f"{name}.json"
        existing = _read_json_object(path).get("autotune_entries")
        merged = {**(existing if isinstance(existing, dict) else {}), **table}
        counts = Counter(json.dumps(v["config"], sort_keys=True) for v in table.values())
        default = json.loads(counts.most_common(1)[0][0])
        config_files.atomic_write_json(path, {
            "kernel_name": name, "triton_version": cache.software.get("triton"),
            "autotune_entries": merged, "default_config": default})
        files.append(str(path))
    return files


# ------------------------------------------------------------------------------------------------
# vLLM-style and portable
# ------------------------------------------------------------------------------------------------

def default_tokens(kernel: str) -> int:
    """Token bucket of an entry: B*T of the tuner's default GPU problem (its decode batch for the
    recurrent kernel, which is timed on T = 1 steps). The cache does not record the problem."""
    p = Problem()
    return p.decode_batch if kernel == "recurrent_fwd" else p.B * p.T


def _export_vllm(cache: CacheFile, entries: list[CacheEntry], out: Path, tokens: int | None,
                 items: list[ExportItem]) -> list[str]:
    files = []
    for e in entries:
        path = out / vllm_filename(e.kernel, e.key["K"], e.key["V"], e.key["dtype"],
                                   str(cache.gpu["name"]))
        bucket = tokens if tokens is not None else default_tokens(e.kernel)
        data = {k: v for k, v in _read_json_object(path).items() if str(k).isdigit()}
        data[str(bucket)] = dict(e.config)
        config_files.atomic_write_json(
            path, {str(b): data[str(b)] for b in sorted(int(k) for k in data)})
        files.append(str(path))
        items.append(ExportItem(e.kernel, _key_label(e.key), "written", str(path),
                                f"bucket {bucket} tokens ({len(data)} bucket(s) in the file)"))
    return files


def _export_portable(cache: CacheFile, entries: list[CacheEntry], out: Path,
                     items: list[ExportItem]) -> list[str]:
    path = out / config_files.profile_filename(str(cache.gpu["name"]))
    doc = {**cache.as_dict(), "entries": [e.as_dict() for e in entries]}
    config_files.parse(doc)  # what we write must read back
    config_files.atomic_write_json(path, doc)
    for e in entries:
        items.append(ExportItem(e.kernel, _key_label(e.key), "written", str(path),
                                f"median {e.median_ms} ms" if e.median_ms is not None else "no timing"))
    return [str(path)]


def export(fmt: str, out: str, source: str | None = None, heads: tuple[int, ...] | None = None,
           tokens: int | None = None) -> ExportReport:
    """Write the verified entries of ``source`` (default: this GPU's cache or profile) as ``fmt``.

    Args:
        fmt: 'portable', 'fla' or 'vllm'.
        out: output folder (created).
        source: a cache-schema file; default this GPU's user cache, else its shipped profile.
        heads: FLA only: head counts H to write exact autotune keys for (FLA's state kernels key
            on H; FUZZY/FULL modes match any H). Default the tuner's problem H (16).
        tokens: vLLM only: the token bucket of these configs; default the tuner's problem B*T
            (decode batch for recurrent_fwd).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    path = source_path(source)
    cache = config_files.read(path)
    out_dir = Path(out)
    items: list[ExportItem] = []
    verified = []
    for e in cache.entries:
        if e.is_hint:
            items.append(ExportItem(e.kernel, _key_label(e.key), "skipped", None,
                                    f"unverified hint ({e.hint.get('reason', 'imported')}); "
                                    "tune or verify on this GPU first"))
        else:
            verified.append(e)
    heads = tuple(heads) if heads else (Problem().H,)
    notes = []
    if not verified:
        files = []
    elif fmt == "portable":
        files = _export_portable(cache, verified, out_dir, items)
    elif fmt == "fla":
        files = _export_fla(cache, verified, out_dir, heads, items)
        folder = out_dir / fla_sanitize_gpu_name(str(cache.gpu["name"]))
        notes.append(f"FLA reads them with FLA_CONFIG_DIR={folder} and FLA_CACHE_MODE=full (or "
                     f"strict: exact keys, written for H in {list(heads)}), set before importing fla")
    else:
        files = _export_vllm(cache, verified, out_dir, tokens, items)
        notes.append("read with gdn2_kernels.load_exported(folder, kernel, K, V, dtype, num_tokens)")
    return ExportReport(fmt, str(path), str(cache.gpu["name"]), str(out_dir), files, items, notes)


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------

def _total_median(entries: list[CacheEntry], kernels: set[str]) -> float:
    meds = [e.median_ms for e in entries if e.kernel in kernels]
    return math.inf if not meds or any(m is None for m in meds) else sum(meds)


def _rank(entries: list[CacheEntry], kernels: set[str]) -> tuple[bool, float]:
    return (any(e.is_hint for e in entries), _total_median(entries, kernels))


def merge_entries(old: list[CacheEntry], new: list[CacheEntry],
                  decisions: list[ImportItem] | None = None) -> list[CacheEntry]:
    """Per problem key keep one pipeline: verified beats hint, then the lower total median over the
    kernels both sides have; a tie keeps the existing one. Keys on one side only are kept."""
    def groups(entries):
        out: dict[ProblemKey, list[CacheEntry]] = {}
        for e in entries:
            out.setdefault(e.problem_key(), []).append(e)
        return out

    g_old, g_new = groups(old), groups(new)
    result: list[CacheEntry] = []
    for key in list(g_old) + [k for k in g_new if k not in g_old]:
        a, b = g_old.get(key), g_new.get(key)
        if a is None or b is None:
            result.extend(a or b)
            if decisions is not None and b is not None:
                decisions.append(ImportItem(_key_label(key.as_dict()), [e.kernel for e in b],
                                            "hint" if any(e.is_hint for e in b) else "imported",
                                            "new key"))
            continue
        common = {e.kernel for e in a} & {e.kernel for e in b}
        take_new = _rank(b, common) < _rank(a, common)
        result.extend(b if take_new else a)
        if decisions is not None:
            ra, rb = _rank(a, common), _rank(b, common)
            why = (f"imported {'hint' if rb[0] else 'verified'}, total median {rb[1]:.4g} ms; "
                   f"existing {'hint' if ra[0] else 'verified'}, {ra[1]:.4g} ms")
            status = ("hint" if rb[0] else "imported") if take_new else "kept existing"
            decisions.append(ImportItem(_key_label(key.as_dict()), [e.kernel for e in b], status, why))
    return result


def _refusals(data: dict[str, Any], cache: CacheFile, gpu_name: str,
              software: dict[str, Any]) -> list[str]:
    out = []
    version = data.get("schema_version")
    if type(version) is int and version > config_files.SCHEMA_VERSION:
        out.append(f"schema_version {version} is newer than this gdn2_kernels reads "
                   f"({config_files.SCHEMA_VERSION}); upgrade gdn2-kernels")
    mismatch = config_files.gpu_mismatch(cache.gpu, gpu_name)
    if mismatch:
        out.append(f"{mismatch}; configs are tuned per GPU model")
    theirs, ours = str(cache.software.get("triton")), str(software.get("triton"))
    if version_tuple(theirs)[0] != version_tuple(ours)[0]:
        out.append(f"tuned with Triton {theirs}, running Triton {ours} (another major version)")
    return out


def import_file(path: str, merge: bool = False, force: bool = False,
                gpu_name: str | None = None, software: dict[str, Any] | None = None) -> ImportReport:
    """Import a portable export into this GPU's user cache.

    Args:
        path: a cache-schema file (``gdn2 export --format portable``, a profile, a cache file).
        merge: keep the better pipeline per problem key (see :func:`merge_entries`); default the
            file's keys replace the cache's.
        force: keep entries that would be refused (another GPU model, Triton major, newer schema)
            as unverified hints.
        gpu_name, software: the machine imported into (default this one; for tests).

    Raises:
        ImportRefused: the file is for another GPU / Triton major / newer schema and not ``force``.
        CacheError: the file is not a valid cache file.
    """
    gpu_name = gpu_name or _device.gpu_name()
    software = dict(software) if software is not None else provenance.current_software()
    try:
        data = config_schema.read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no file {path}") from None
    except CacheError as exc:
        raise CacheError(f"{path}: refused: {exc}") from None
    if not isinstance(data, dict):
        raise CacheError(f"{path}: top level is not a JSON object")
    newer = type(data.get("schema_version")) is int and \
        data["schema_version"] > config_files.SCHEMA_VERSION
    if newer and not force:
        raise ImportRefused(f"{path}: schema_version {data['schema_version']} is newer than this "
                            f"gdn2_kernels reads ({config_files.SCHEMA_VERSION}); upgrade "
                            "gdn2-kernels, or pass --force to keep its entries as unverified hints")
    try:
        cache = config_files.parse({**data, "schema_version": config_files.SCHEMA_VERSION}
                                   if newer else data, str(path))
    except CacheError as exc:
        raise CacheError(f"{path}: refused: {exc}") from None
    refusals = _refusals(data, cache, gpu_name, software)
    if refusals and not force:
        raise ImportRefused(f"{path}: refused: " + "; ".join(refusals)
                            + ". Pass --force to keep its entries as unverified hints")
    hint_reason = "; ".join(refusals) or config_files.software_mismatch(cache.software, software)
    entries = cache.entries
    if hint_reason:
        hint = {"reason": hint_reason, "gpu": str(cache.gpu.get("name")),
                "software": dict(cache.software), "imported": provenance.now_iso()}
        entries = [e if e.is_hint else CacheEntry(e.kernel, e.key, e.config, e.median_ms,
                                                  e.iqr_ms, e.verified, dict(hint))
                   for e in entries]
    target = config_files.user_cache_path(gpu_name)
    same_gpu = config_files.gpu_mismatch(cache.gpu, gpu_name) is None
    gpu_doc = dict(cache.gpu) if same_gpu else {"name": gpu_name}
    decisions: list[ImportItem] = []
    if merge:
        with config_files.update(target, gpu_doc, software) as file:
            file.write(merge_entries(file.current, entries, decisions))
    else:
        config_files.write_entries(target, entries, gpu_doc, software)
        for key in cache.keys():
            group = [e for e in entries if e.problem_key() == key]
            hinted = any(e.is_hint for e in group)
            decisions.append(ImportItem(_key_label(key.as_dict()), [e.kernel for e in group],
                                        "hint" if hinted else "imported",
                                        (f"unverified: {group[0].hint.get('reason')}" if hinted
                                         else "replaces the cache's entries for this key")))
    return ImportReport(str(path), str(target), str(cache.gpu.get("name")), gpu_name, merge, force,
                        decisions)


__all__ = ["ExportError", "ExportItem", "ExportReport", "FLA_MAPPINGS", "FLA_NO_MAPPING", "FORMATS",
           "FlaMapping", "ImportItem", "ImportRefused", "ImportReport", "export", "fla_config",
           "fla_key_hash", "fla_mapping", "fla_sanitize_gpu_name", "import_file", "merge_entries",
           "source_path"]
