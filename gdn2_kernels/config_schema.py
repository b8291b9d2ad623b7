"""The one gate every config file passes: a bounded read and a strict check of the cache schema.

Config files are untrusted input: the user cache, the shipped profiles, ``$GDN2_CONFIG_FILE``,
``gdn2 cache import`` and ``gdn2 export --from`` all come through here before any value is used
(schema: :mod:`gdn2_kernels.config_files`, docs/formats.md).

Reading (:func:`read_json`): only regular files (a FIFO, a device such as ``/dev/zero`` or a
folder is refused after ``stat``, before it is opened for reading, and again on the open file), at
most :data:`MAX_FILE_BYTES` bytes (read with that bound, so a file that grows meanwhile cannot
grow memory), UTF-8 JSON nested at most :data:`MAX_DEPTH` levels.

Checking (:func:`check_document`): every field's type and range. Integers are ``int`` (``32.0``
and ``true`` are refused), head dims are in ``1..MAX_HEAD_DIM``, the dtype is one of
:data:`~gdn2_kernels.configs.KEY_DTYPES`, the kernel is registered and every config value is one
of its parameter's values (same type too), timings and errors are finite and >= 0, text is short
and has no control characters. The result is a normalised copy of the document; any problem
raises :class:`CacheError` naming the field, so a file with one bad entry is refused as a whole
(its key's entries form one pipeline: using the rest would silently mix tuned and default
configs).
"""
from __future__ import annotations

import json
import math
import os
import stat
from typing import Any, Mapping

from gdn2_kernels.configs import KEY_DTYPES, MAX_HEAD_DIM, Param, get_spec

SCHEMA_VERSION = 1
MAX_FILE_BYTES = 16 * 2 ** 20  # a tuned cache is a few KB per problem key
MAX_DEPTH = 8  # the schema itself nests 5 levels (document, entries, entry, verified, tensor)
MAX_ENTRIES = 20_000
MAX_NAME = 256  # GPU names, versions, kernel and tensor names, timestamps
MAX_TEXT = 2_000  # the reason of an imported hint

KEY_FIELDS = ("K", "V", "dtype")
SOFTWARE_FIELDS = ("torch", "triton", "cuda", "gdn2_kernels")
_DOCUMENT_FIELDS = ("schema_version", "gpu", "software", "created", "entries")
_ENTRY_FIELDS = ("kernel", "key", "config", "median_ms", "iqr_ms", "verified", "hint")


class CacheError(ValueError):
    """A config file that cannot be used: unreadable, wrong schema, or for another GPU/software."""


def _show(value: Any, limit: int = 60) -> str:
    """A short repr of a value read from a file, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _depth(data: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        children = (node.values() if isinstance(node, dict)
                    else node if isinstance(node, list) else None)
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children)
    return deepest


def _refuse_constant(name: str) -> Any:
    raise CacheError(f"{name} is not a JSON number (write a finite number or null)")


def read_json(path: str | os.PathLike) -> Any:
    """The decoded JSON of the regular file ``path``, read with the bounds above.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CacheError: anything else (not a regular file, too large, not UTF-8 JSON, too deep).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CacheError(f"cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CacheError("not a regular file (a FIFO, device or folder is never read)")
    if st.st_size > MAX_FILE_BYTES:
        raise CacheError(f"{st.st_size} bytes; a config file may hold at most {MAX_FILE_BYTES}")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, opening it does not
        # wait for a writer; fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CacheError(f"cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CacheError("not a regular file (a FIFO, device or folder is never read)")
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise CacheError(f"more than {MAX_FILE_BYTES} bytes; a config file may hold no more")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise CacheError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CacheError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise CacheError(f"JSON nested more than {MAX_DEPTH} levels deep") from None
    if _depth(data) > MAX_DEPTH:
        raise CacheError(f"JSON nested more than {MAX_DEPTH} levels deep")
    return data


# ------------------------------------------------------------------------------------------------
# Field checks
# ------------------------------------------------------------------------------------------------

def _text(value: Any, where: str, limit: int = MAX_NAME, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise CacheError(f"{where} must be a string, got {_show(value)}")
    if not value and not empty:
        raise CacheError(f"{where} must not be empty")
    if len(value) > limit:
        raise CacheError(f"{where} is {len(value)} characters long; at most {limit} are allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise CacheError(f"{where} contains control characters: {_show(value)}")
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CacheError(f"{where} must be an object, got {_show(value)}")
    return value


def _fields(obj: Mapping[str, Any], where: str, allowed: tuple[str, ...],
            required: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise CacheError(f"{where} has unknown fields {unknown} (allowed: {list(allowed)})")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CacheError(f"{where} lacks {missing}")


def _int(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise CacheError(f"{where} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise CacheError(f"{where} = {value} is out of range: it must be between {low} and {high}")
    return value


def _number(value: Any, where: str, nullable: bool = True) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CacheError(f"{where} must be a finite number{' or null' if nullable else ''}, "
                         f"got {_show(value)}")
    if value < 0:
        raise CacheError(f"{where} must be >= 0, got {value!r}")
    return float(value)


def _scalar(value: Any, where: str, limit: int = MAX_NAME) -> Any:
    """A provenance value: text, a finite number, a bool or null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _text(value, where, limit, empty=True)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    raise CacheError(f"{where} must be text, a finite number, a bool or null, got {_show(value)}")


def _param_value(p: Param, value: Any, where: str) -> Any:
    # ``32.0 in (16, 32)`` and ``True in (1, 2)`` hold in Python: compare the type as well.
    for allowed in p.values:
        if type(value) is type(allowed) and value == allowed:
            return allowed
    raise CacheError(f"{where}={_show(value)} is not one of {p.values}")


def check_key(raw: Any, where: str) -> dict[str, Any]:
    """A problem key ``{K, V, dtype}``: positive dims up to MAX_HEAD_DIM, a known dtype."""
    key = _object(raw, where)
    _fields(key, where, KEY_FIELDS, KEY_FIELDS)
    dtype = key["dtype"]
    if not isinstance(dtype, str) or dtype not in KEY_DTYPES:
        raise CacheError(f"{where}.dtype = {_show(dtype)} is not one of {list(KEY_DTYPES)}")
    return {"K": _int(key["K"], f"{where}.K", 1, MAX_HEAD_DIM),
            "V": _int(key["V"], f"{where}.V", 1, MAX_HEAD_DIM), "dtype": dtype}


def _check_verified(raw: Any, where: str) -> dict[str, dict[str, float]]:
    out = {}
    for tensor, errs in _object(raw, where).items():
        name = _text(tensor, f"{where} tensor name")
        out[name] = {_text(m, f"{where}.{name} metric name"): _number(x, f"{where}.{name}.{m}",
                                                                      nullable=False)
                     for m, x in _object(errs, f"{where}.{name}").items()}
    return out


def _check_hint(raw: Any, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in _object(raw, where).items():
        name = _text(name, f"{where} field name")
        if isinstance(value, Mapping):
            out[name] = {_text(k, f"{where}.{name} field name"): _scalar(v, f"{where}.{name}.{k}")
                         for k, v in value.items()}
        else:
            out[name] = _scalar(value, f"{where}.{name}", MAX_TEXT)
    return out


def check_entry(raw: Any, where: str) -> dict[str, Any]:
    """One entry, normalised: parameters missing from ``config`` take the spec default (the
    behaviour the file was tuned with, from before the parameter existed)."""
    entry = _object(raw, where)
    _fields(entry, where, _ENTRY_FIELDS, ("kernel", "key", "config"))
    kernel = _text(entry["kernel"], f"{where}.kernel")
    try:
        spec = get_spec(kernel)
    except KeyError as exc:
        raise CacheError(f"{where}: {exc.args[0]}") from None
    config = _object(entry["config"], f"{where}.config")
    names = [p.name for p in spec.params]
    unknown = sorted(str(n) for n in config if n not in names)
    if unknown:
        raise CacheError(f"{where}: {spec.name} has no parameters {unknown} (it has {names})")
    values = {p.name: (_param_value(p, config[p.name], f"{where}: {spec.name}.{p.name}")
                       if p.name in config else p.default) for p in spec.params}
    verified = entry.get("verified")
    hint = entry.get("hint")
    return {"kernel": spec.name, "key": check_key(entry["key"], f"{where}.key"), "config": values,
            "median_ms": _number(entry.get("median_ms"), f"{where}.median_ms"),
            "iqr_ms": _number(entry.get("iqr_ms"), f"{where}.iqr_ms"),
            "verified": {} if verified is None else _check_verified(verified, f"{where}.verified"),
            "hint": None if hint is None else _check_hint(hint, f"{where}.hint")}


def check_document(data: Any) -> dict[str, Any]:
    """A whole cache-schema document, normalised; raises :class:`CacheError` on any problem."""
    doc = _object(data, "the top level")
    version = doc.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise CacheError(f"schema_version is {_show(version)}; this gdn2_kernels reads "
                         f"{SCHEMA_VERSION}")
    _fields(doc, "the top level", _DOCUMENT_FIELDS, _DOCUMENT_FIELDS)
    gpu = {_text(k, "gpu field name"): _scalar(v, f"gpu.{k}")
           for k, v in _object(doc["gpu"], "gpu").items()}
    if "name" not in gpu:
        raise CacheError("gpu must be an object with a name")
    _text(gpu["name"], "gpu.name")
    software = _object(doc["software"], "software")
    _fields(software, "software", tuple(software), SOFTWARE_FIELDS)
    software = {_text(k, "software field name"): (None if v is None else _text(v, f"software.{k}"))
                for k, v in software.items()}
    entries = doc["entries"]
    if not isinstance(entries, list):
        raise CacheError(f"entries must be a list, got {_show(entries)}")
    if len(entries) > MAX_ENTRIES:
        raise CacheError(f"{len(entries)} entries; a config file may hold at most {MAX_ENTRIES}")
    checked = [check_entry(e, f"entries[{i}]") for i, e in enumerate(entries)]
    bts: dict[tuple, set[int]] = {}
    for e in checked:
        if "BT" in e["config"]:
            bts.setdefault(tuple(e["key"].values()), set()).add(e["config"]["BT"])
    for key, sizes in bts.items():
        if len(sizes) > 1:
            raise CacheError(f"entries for {dict(zip(KEY_FIELDS, key))} disagree on the chunk size "
                             f"BT: {sorted(sizes)}")
    return {"schema_version": version, "gpu": gpu, "software": software,
            "created": _text(doc["created"], "created"), "entries": checked}


__all__ = ["CacheError", "KEY_FIELDS", "MAX_DEPTH", "MAX_ENTRIES", "MAX_FILE_BYTES",
           "SCHEMA_VERSION", "SOFTWARE_FIELDS", "check_document", "check_entry", "check_key",
           "read_json"]
