"""Read the vLLM-style config files that ``gdn2 export --format vllm`` writes.

One JSON file per kernel, problem and device, named like vLLM's fused-MoE configs::

    kernel=state_fwd,K=128,V=128,dtype=bfloat16,device_name=NVIDIA_H100_80GB_HBM3.json

mapping token-count buckets (B*T of the timed problem, as strings) to one config of that kernel::

    {"16384": {"BT": 64, "BV": 32, "num_warps": 4, "num_stages": 2}}

:func:`load_exported` is the few lines a downstream library needs: find the file, take the bucket
nearest to its token count. Our own dispatch does not read these files (it reads the cache schema,
``config_files``); this module is the reference reader for others. Format: docs/formats.md.
"""
from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any

from gdn2_kernels import _device, config_schema
from gdn2_kernels.configs import get_spec


def vllm_filename(kernel: str, K: int, V: int, dtype: str, device_name: str) -> str:
    """``kernel=<kernel>,K=<K>,V=<V>,dtype=<dtype>,device_name=<sanitised GPU name>.json``.

    Every part is checked (a registered kernel, dims in range, a known dtype) or sanitised (the
    GPU name), so the name never leaves the folder it is joined to; raises ``ValueError``.
    """
    get_spec(str(kernel))  # KeyError naming the registered kernels
    key = config_schema.check_key({"K": _index(K), "V": _index(V),
                                   "dtype": str(dtype).removeprefix("torch.")}, "vllm_filename")
    return (f"kernel={kernel},K={key['K']},V={key['V']},dtype={key['dtype']},"
            f"device_name={_device.sanitize_gpu_name(str(device_name))}.json")


def _index(x: Any) -> Any:
    """An integer-like value (numpy or torch integer) as an int; anything else unchanged, for
    :func:`config_schema.check_key` to refuse (a bool stays a bool)."""
    if isinstance(x, bool):
        return x
    try:
        return operator.index(x)
    except TypeError:
        return x


def nearest_bucket(buckets: Any, num_tokens: int) -> int:
    """The bucket closest to ``num_tokens`` (ties go to the smaller bucket)."""
    sizes = sorted(int(b) for b in buckets)
    if not sizes:
        raise ValueError("no token-count buckets to choose from")
    return min(sizes, key=lambda b: (abs(b - int(num_tokens)), b))


def load_exported(path_or_dir: str | os.PathLike, kernel: str, K: int, V: int, dtype: str,
                  num_tokens: int, device_name: str | None = None) -> dict[str, Any] | None:
    """The exported config of ``kernel`` for a problem, from a vLLM-style file or its folder.

    Args:
        path_or_dir: a file written by ``gdn2 export --format vllm``, or the folder holding them.
        kernel: our kernel name (``state_fwd``, ``intra_fwd``, ...; see ``gdn2 info``).
        K, V: key and value head dims.
        dtype: ``'bfloat16'``, ``'float16'`` or ``'float32'`` (a ``torch.`` prefix is dropped).
        num_tokens: tokens of the call (B*T); the nearest bucket of the file is used.
        device_name: GPU name as torch reports it (sanitised here); default the current GPU.

    Returns:
        The config (parameter name -> value), or None when there is no file for this kernel,
        problem and device. A file that is not a bucket -> config object (or not a regular file,
        or too large) raises ``ValueError``.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / vllm_filename(kernel, K, V, dtype, device_name or _device.gpu_name())
    if not path.exists():
        return None
    try:
        data = config_schema.read_json(path)  # bounded, regular files only
    except config_schema.CacheError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not all(
            str(b).isdigit() and isinstance(c, dict) for b, c in data.items()):
        raise ValueError(f"{path}: expected an object mapping token counts to configs")
    return dict(data[str(nearest_bucket(data, num_tokens))])


__all__ = ["load_exported", "nearest_bucket", "vllm_filename"]
