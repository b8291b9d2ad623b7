"""Where a benchmark ran: GPU (NVML via ``gdn2_kernels.gpu``), clocks, software versions, commit,
date.

Everything is best effort: a field that cannot be read is None, with the reason where useful,
so a missing NVML or git never stops a benchmark.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch
import triton

_REPO = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    """HEAD, with '-dirty' when tracked files differ from it (a copied working tree, such as the
    device machine's, may carry changes its HEAD does not have)."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head}-dirty" if dirty else head


def _gpu() -> dict:
    if not torch.cuda.is_available():
        return {"name": None, "note": "no CUDA device"}
    try:
        from gdn2_kernels import gpu
    except ImportError as exc:
        return {"name": torch.cuda.get_device_name(0), "note": f"gdn2_kernels.gpu: {exc}"}
    index = torch.cuda.current_device()
    return {**dataclasses.asdict(gpu.identify(index)),
            "sample": dataclasses.asdict(gpu.sample(index)),
            "nvml": gpu.nvml_status() or "ok"}


def collect() -> dict:
    """Provenance of this process, as plain JSON data."""
    from gdn2_kernels.bench.providers import load_mamba_ssd, Unavailable

    try:
        mamba = load_mamba_ssd().source if torch.cuda.is_available() else None
    except Unavailable as exc:
        mamba = f"unavailable: {exc}"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": _gpu(),
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
            else None,
            "triton": triton.__version__,
            "gdn2_kernels": _version("gdn2-kernels"),
            "fla_core": _version("fla-core"),
            "mamba_ssm_source": mamba,
        },
        "git_commit": _git_commit(),
        "host": platform.node(),
    }
