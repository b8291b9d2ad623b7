"""What produced a result: the software versions and the time, in the forms the files record.

The ``software`` block of every config file (:func:`current_software`) and the time stamps of
config files and reports (:func:`now_iso`). GPU identity is :mod:`gdn2_kernels.gpu`.
"""
from __future__ import annotations

import datetime as _dt
import sys
from importlib import metadata


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
    """The current UTC time, to the second, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


__all__ = ["current_software", "now_iso", "package_version"]
