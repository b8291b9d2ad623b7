"""Search strategies: each is one function ``(space, evaluator, budget, **options) -> trials``.

Strategies only order and select candidates; they never touch the GPU (the evaluator does), so
they are tested on the CPU with :class:`gdn2_kernels.tuner.evaluate.ReplayEvaluator`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from gdn2_kernels.tuner.strategies import exhaustive, halving
from gdn2_kernels.tuner.strategies import random as random_search
from gdn2_kernels.tuner.trial import Strategy, StrategyOption


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    run: Strategy
    options: tuple[StrategyOption, ...]
    doc: str


STRATEGIES: dict[str, StrategyInfo] = {
    info.name: info for info in (
        StrategyInfo("exhaustive", exhaustive.exhaustive, exhaustive.OPTIONS,
                     exhaustive.__doc__.splitlines()[0]),
        StrategyInfo("random", random_search.random, random_search.OPTIONS,
                     random_search.__doc__.splitlines()[0]),
        StrategyInfo("halving", halving.halving, halving.OPTIONS, halving.__doc__.splitlines()[0]),
    )
}


def get_strategy(name: str) -> StrategyInfo:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"no strategy {name!r}; available: {sorted(STRATEGIES)}") from None


def parse_options(name: str, pairs: Mapping[str, str] | list[str]) -> dict[str, Any]:
    """Typed options of strategy ``name`` from ``name=value`` strings (CLI ``--option``)."""
    info = get_strategy(name)
    if isinstance(pairs, list):
        items = {}
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"strategy option {pair!r} is not name=value")
            k, v = pair.split("=", 1)
            items[k.strip()] = v.strip()
        pairs = items
    table = {o.name: o for o in info.options}
    out = {}
    for k, v in pairs.items():
        if k not in table:
            raise ValueError(f"strategy {name!r} has no option {k!r}; it has {sorted(table)}")
        opt = table[k]
        try:
            value = v if isinstance(v, opt.type) and not isinstance(v, bool) else opt.type(v)
        except (TypeError, ValueError):
            raise ValueError(f"strategy {name!r} option {k} must be {opt.type.__name__}, got "
                             f"{v!r}") from None
        if opt.minimum is not None and value < opt.minimum:
            raise ValueError(f"strategy {name!r} option {k} must be >= {opt.minimum}, got {value}")
        out[k] = value
    return out


def options_help() -> str:
    """The strategies' options, for ``gdn2 tune --option``'s help: 'random n, seed; ...'."""
    return "; ".join(f"{info.name} " + ", ".join(o.name for o in info.options)
                     for info in STRATEGIES.values() if info.options)


__all__ = ["STRATEGIES", "StrategyInfo", "get_strategy", "options_help", "parse_options"]
