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


__all__ = ["OptionError", "integer", "one_of", "positive_number"]
