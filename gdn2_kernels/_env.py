"""Environment variables the library reads, in one place.

Kernel modules never read the environment; everything that does goes through here.
"""
from __future__ import annotations

import os

CACHE_DIR_VAR = "GDN2_CACHE_DIR"
CONFIG_FILE_VAR = "GDN2_CONFIG_FILE"
INTERPRET_VAR = "TRITON_INTERPRET"
COMPILE_AHEAD_VAR = "GDN2_COMPILE_AHEAD"
FLA_VAR = "GDN2_FLA"


def interpreter_choice() -> bool | None:
    """The user's ``TRITON_INTERPRET``: True (the interpreter for every Triton kernel of the
    process, read by Triton when a kernel is decorated), False (never), None when unset."""
    value = os.environ.get(INTERPRET_VAR)
    if value is None:
        return None
    return value.lower() in ("1", "true", "yes", "on")


def config_file() -> str | None:
    return os.environ.get(CONFIG_FILE_VAR) or None


def cache_dir() -> str:
    return os.environ.get(CACHE_DIR_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "gdn2")


def compile_ahead_enabled() -> bool:
    """Whether a first call compiles all its kernels ahead in parallel (``GDN2_COMPILE_AHEAD``,
    default on; ``0`` compiles each kernel at its first launch, one after another)."""
    return os.environ.get(COMPILE_AHEAD_VAR, "1").lower() not in ("0", "false", "no", "off")


def fla_integration_requested() -> bool:
    """Whether importing gdn2_kernels routes flash-linear-attention's GDN-2 ops to ours
    (``GDN2_FLA=1``; default off: importing the package changes no other library)."""
    return os.environ.get(FLA_VAR, "0").lower() in ("1", "true", "yes", "on")
