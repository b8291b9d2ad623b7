"""Checks of user options, made before any work starts.

The library functions behind ``gdn2 tune``, ``bench`` and ``profile`` call these on their option
dataclasses; a failure raises :class:`OptionError` naming the option (as the CLI spells it) and
what it accepts, which the CLI turns into a usage error (exit code 2).
"""
from __future__ import annotations

import math
from typing import Any, Iterable


class OptionError(ValueError):
    """An option value that cannot work; ``option`` is its CLI name (``--dtype``)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.detail = message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def integer(value: Any, option: str, low: int = 1, high: int | None = None) -> int:
    """An ``int`` (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(option, f"must be an integer, got {_show(value)}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise OptionError(option, f"must be {bound}, got {value}")
    return value


def positive_number(value: Any, option: str) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise OptionError(option, f"must be a finite number > 0, got {_show(value)}")
    return float(value)


def one_of(value: Any, choices: Iterable[Any], option: str) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise OptionError(option, f"must be one of {', '.join(map(str, choices))}; got "
                                  f"{_show(value)}")
    return value


def parse_shapes(text: str, option: str = "--shapes") -> tuple[tuple[int, int], ...]:
    """'8x2048,4x4096' -> ((8, 2048), (4, 4096)); :class:`OptionError` naming ``option``."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            b, t = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise OptionError(option, f"shape {part!r} is not BxT (e.g. 4x4096)") from None
        if b < 1 or t < 1:
            raise OptionError(option, f"shape {part!r}: B and T must be positive")
        out.append((b, t))
    if not out:
        raise OptionError(option, "no shapes given; use e.g. 8x2048,1x16384")
    return tuple(out)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32), all positive; :class:`OptionError` naming the option ``what``."""
    try:
        vals = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise OptionError(what, f"must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise OptionError(what, f"must be positive integers, got {text!r}")
    return vals


__all__ = ["OptionError", "integer", "one_of", "parse_ints", "parse_shapes", "positive_number"]
