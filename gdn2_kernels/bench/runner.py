"""``run_bench``: every provider on every shape and mode, measured and modelled; one report.

Order of work per (mode, shape): build the shared inputs once, then for each available provider
build its step, call it once and synchronise (compilation and FLA's autotuning happen here, never
inside a timing), time it, and for ``fwdbwd`` record its peak memory. A failure of one row is
recorded on the row (``unavailable`` for NotImplementedError, ``oom``, ``error``) and the run
goes on.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from gdn2_kernels.bench import model
from gdn2_kernels.bench.inputs import ProblemInputs
from gdn2_kernels.bench.model import Ceilings, Shape
from gdn2_kernels.bench.providers import Registry, default_registry, load_provider, set_mamba_source
from gdn2_kernels.bench.providers import Provider, ProviderStatus
from gdn2_kernels.bench.timing import CudaMeasurer, Measurer
from gdn2_kernels.configs import KEY_DTYPES, MAX_HEAD_DIM
from gdn2_kernels.options import OptionError, integer, one_of

SCHEMA_VERSION = 1
DEFAULT_SHAPES = ((8, 2048), (4, 4096), (2, 8192), (1, 16384))
# The same token budget's 4x in one sequence: run only by providers whose time is linear in T
# (``Provider.long_context``), with ``gdn2 bench --long``.
LONG_SHAPES = ((1, 65536),)
DEFAULT_DECODE_BATCHES = (1, 8, 32, 128)

OK, UNAVAILABLE, SKIPPED, OOM, ERROR = "ok", "unavailable", "skipped", "oom", "error"


@dataclass(frozen=True)
class BenchOptions:
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES          # (B, T), one token budget
    long_shapes: tuple[tuple[int, int], ...] = ()                  # long_context providers only
    H: int = 16
    D: int = 128
    dtype: str = "bfloat16"
    decode_batches: tuple[int, ...] = DEFAULT_DECODE_BATCHES
    decode_context: int = 4096
    providers: tuple[str, ...] | None = None                      # None: all registered
    seed: int = 0
    warmup_ms: int = 25
    rep_ms: int = 200
    mamba_src: str | None = None

    def shapes_for(self, mode: str) -> list[Shape]:
        if mode == "decode":
            return [Shape(b, 1, self.H, self.D, self.dtype, self.decode_context)
                    for b in self.decode_batches]
        return [Shape(b, t, self.H, self.D, self.dtype)
                for b, t in (*self.shapes, *self.long_shapes)]

    def is_long(self, shape: Shape) -> bool:
        return (shape.B, shape.T) in self.long_shapes and (shape.B, shape.T) not in self.shapes


@dataclass
class BenchRow:
    provider: str
    mode: str
    B: int
    T: int
    context: int
    status: str
    reason: str | None = None
    ms: float | None = None
    iqr_ms: float | None = None
    peak_mem_mb: float | None = None
    flops: float | None = None
    bytes: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    roofline_ms: float | None = None
    pct_roofline: float | None = None
    bound: str | None = None
    speedup: dict[str, float] = field(default_factory=dict)   # baseline name -> its ms / ours

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.mode, self.B, self.T, self.context)


@dataclass
class BenchReport:
    schema_version: int
    created: str
    options: BenchOptions
    provenance: dict
    ceilings: Ceilings | None
    providers: list[ProviderStatus]
    rows: list[BenchRow]
    notes: list[str] = field(default_factory=list)  # how the providers asked for were mapped

    def rows_for(self, mode: str) -> list[BenchRow]:
        return [r for r in self.rows if r.mode == mode]

    @property
    def timed(self) -> int:
        """Rows that were measured (kept from a resumed report included)."""
        return sum(r.status == OK for r in self.rows)


def check_options(options: BenchOptions, registry: Registry | None = None) -> None:
    """Refuse options that cannot work, before any work starts (:class:`OptionError`), the
    providers asked for included (:func:`select_providers` on ``registry``, default all)."""
    if not options.modes:
        raise OptionError("-m/--mode", f"give at least one of {', '.join(model.MODES)}")
    for mode in options.modes:
        one_of(mode, model.MODES, "-m/--mode")
    integer(options.H, "--heads")
    integer(options.D, "--dim", 1, MAX_HEAD_DIM)
    one_of(options.dtype, KEY_DTYPES, "--dtype")
    if not options.shapes:
        raise OptionError("--shapes", "give at least one BxT shape, e.g. 8x2048")
    for b, t in options.shapes:
        integer(b, "--shapes (B)")
        integer(t, "--shapes (T)")
    if not options.decode_batches:
        raise OptionError("--decode-batches", "give at least one batch size")
    for b in options.decode_batches:
        integer(b, "--decode-batches")
    integer(options.decode_context, "--decode-context")
    integer(options.rep_ms, "--rep-ms")
    integer(options.warmup_ms, "warmup_ms", 0)
    select_providers(options, registry or default_registry())


def select_providers(options: BenchOptions,
                     registry: Registry) -> tuple[list[Provider], list[str]]:
    """The providers to run and notes on how the asked names were mapped.

    Without ``options.providers``, every registered provider. A named provider without one of
    the selected modes is replaced in that mode by ``<name>-<mode>`` when that is registered
    (``-p gdn2 -m decode`` times ``gdn2-decode``), else the note says it has no rows there.
    Raises :class:`OptionError` for an unknown name, or when no selected provider runs in one of
    the selected modes.
    """
    if not options.providers:
        return [registry.get(n) for n in registry.names()], []
    chosen: dict[str, Provider] = {}
    notes = []
    for name in options.providers:
        if name not in registry.names():
            raise OptionError("-p/--provider", f"unknown provider {name!r}; available: "
                                               f"{', '.join(registry.names())}")
        p = registry.get(name)
        for mode in dict.fromkeys(options.modes):
            if mode in p.modes:
                chosen.setdefault(p.name, p)
                continue
            alias = f"{name}-{mode}"
            if alias in registry.names() and mode in registry.get(alias).modes:
                chosen.setdefault(alias, registry.get(alias))
                notes.append(f"{name} has no {mode} mode: its {mode} rows time {alias} "
                             f"({registry.get(alias).label})")
            else:
                notes.append(f"{name} has no {mode} mode (it runs in {', '.join(p.modes)}): no "
                             f"{mode} rows for it")
    for mode in dict.fromkeys(options.modes):
        if not any(mode in p.modes for p in chosen.values()):
            raise OptionError("-p/--provider", f"no provider asked for runs in {mode} mode: "
                                               + "; ".join(notes))
    return list(chosen.values()), notes


def fill_metrics(row: BenchRow, family: str, shape: Shape, ceilings: Ceilings | None) -> None:
    """The model's work and every derived metric of a timed row."""
    w = model.work(family, row.mode, shape)
    row.flops, row.bytes = w.flops, w.bytes
    row.tokens_per_s = model.tokens_per_s(row.ms, shape)
    row.tflops = model.tflops(w, row.ms)
    row.gbps = model.gbps(w, row.ms)
    if ceilings is not None:
        row.roofline_ms = model.roofline_ms(w, ceilings)
        row.pct_roofline = model.pct_roofline(w, row.ms, ceilings)
        row.bound = model.bound(w, ceilings)


def fill_speedups(rows: list[BenchRow], baselines: set[str]) -> None:
    """Per ok row: speed ratio against every ok baseline row of the same mode and shape."""
    by_key: dict[tuple, list[BenchRow]] = {}
    for r in rows:
        if r.status == OK:
            by_key.setdefault(r.key, []).append(r)
    for group in by_key.values():
        for r in group:
            r.speedup = {b.provider: model.speedup(r.ms, b.ms) for b in group
                         if b.provider in baselines and b.provider != r.provider}


def _failure(exc: BaseException) -> tuple[str, str]:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, NotImplementedError):
        return UNAVAILABLE, msg
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return OOM, msg[:200]
    return ERROR, f"{type(exc).__name__}: {msg}"[:300]


def _measure_row(row: BenchRow, step_fn: Callable[[], Callable], measurer: Measurer) -> None:
    step = None
    try:
        step = step_fn()
        step()                      # compile / autotune / warm, never timed
        measurer.sync()
        if row.mode == "fwdbwd":
            row.peak_mem_mb = _mb(measurer.peak_bytes(step))
        row.ms, row.iqr_ms = measurer.time_ms(step)
        row.status = OK
    except Exception as exc:  # one row's failure must not end the run
        row.status, row.reason = _failure(exc)
    finally:
        del step
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2 ** 20


def run_bench(options: BenchOptions = BenchOptions(), measurer: Measurer | None = None,
              registry: Registry | None = None, provenance: dict | None = None,
              progress: Callable[[str], None] | None = None,
              checkpoint: Callable[[BenchReport], None] | None = None,
              resume: Sequence[BenchRow] = ()) -> BenchReport:
    """Benchmark every selected provider; unavailable ones are rows with the reason.

    ``checkpoint``, when given, receives the report of the rows finished so far after each row
    (``gdn2 bench --save`` writes it, so an interrupted run keeps what it measured). Rows in
    ``resume`` (an earlier report's, same H/D/dtype) are kept instead of re-measured; their
    derived metrics are recomputed against this run's ceilings.
    """
    from gdn2_kernels.bench.provenance import collect

    registry = registry or default_registry()
    check_options(options, registry)
    providers, notes = select_providers(options, registry)
    set_mamba_source(options.mamba_src)
    measurer = measurer or CudaMeasurer(options.warmup_ms, options.rep_ms)
    ops = {p.name: load_provider(p) for p in providers}
    statuses = [ProviderStatus(p.name, p.label, p.family, p.baseline, p.fwd_only, list(p.modes),
                               ops[p.name][0] is not None, ops[p.name][1], p.note)
                for p in providers]
    any_ok = any(op is not None for op, _ in ops.values())
    ceilings = measurer.ceilings() if any_ok else None
    say = progress or (lambda _msg: None)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    prov = provenance if provenance is not None else collect()

    def _report(finished: list[BenchRow]) -> BenchReport:
        fill_speedups(finished, {p.name for p in providers if p.baseline})
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return BenchReport(SCHEMA_VERSION, created, options, prov, ceilings, statuses,
                           list(finished), list(notes))

    done = {(r.provider, r.key): r for r in resume}
    rows: list[BenchRow] = []
    for mode in dict.fromkeys(options.modes):
        for shape in dict.fromkeys(options.shapes_for(mode)):
            inputs = ProblemInputs(shape, device, options.seed)
            for p in providers:
                if mode not in p.modes:
                    continue
                row = BenchRow(p.name, mode, shape.B, shape.T, shape.context, SKIPPED)
                op, reason = ops[p.name]
                if (p.name, row.key) in done:
                    row = dataclasses.replace(done[(p.name, row.key)], speedup={})
                    say(f"{mode} {shape.label()} {p.name}: kept from the resumed report")
                elif op is None:
                    row.status, row.reason = UNAVAILABLE, reason
                elif mode != "decode" and options.is_long(shape) and not p.long_context:
                    row.reason = "long shapes run only for providers linear in T (--long)"
                else:
                    say(f"{mode} {shape.label()} {p.name}")
                    _measure_row(row, lambda: p.make_step(op, inputs, mode), measurer)
                if row.status == OK:
                    fill_metrics(row, p.family, shape, ceilings)
                rows.append(row)
                if checkpoint is not None:
                    checkpoint(_report(rows))
            del inputs
    return _report(rows)


SCHEMA = "gdn2.bench/1"  # the JSON report's layout (bench/render_results.py reads it)


def report_dict(report: BenchReport) -> dict:
    """The report as plain JSON data (what ``--json`` prints and ``bench/results/`` holds)."""
    d = {"schema": SCHEMA, **asdict(report)}
    d["rows"] = [{**asdict(r), "label": f"{r.B}x{r.T}"} for r in report.rows]
    return d


def rows_from_json(path: str | os.PathLike, options: BenchOptions) -> list[BenchRow]:
    """The rows of a saved report (``--save``), to resume; its problem must match ``options``."""
    with open(path) as f:
        data = json.load(f)
    saved = data.get("options", {})
    for name in ("H", "D", "dtype", "seed", "decode_context"):
        if name in saved and saved[name] != getattr(options, name):
            raise ValueError(f"cannot resume {path}: it was run with {name}={saved[name]!r}, "
                             f"this run has {name}={getattr(options, name)!r}")
    names = {f.name for f in dataclasses.fields(BenchRow)}
    return [BenchRow(**{k: v for k, v in r.items() if k in names}) for r in data.get("rows", [])]


