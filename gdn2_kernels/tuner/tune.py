"""``gdn2 tune``: plan the search, run a strategy per kernel and chunk size, pick the pipeline.

The plan (:func:`make_plan`, also ``--dry-run``): every selected KernelSpec's space for the
problem key, pruned by its constraints (each pruned config with the rule and reason). Specs with a
``BT`` parameter get one space per chunk size, because BT is pipeline-wide. A ``bwd`` spec is
timed through forward+backward; with ``--forward-only`` bwd specs are skipped and the plan says
so.

The tune (:func:`tune`): for each (kernel, BT) the strategy searches that kernel's configs with
every other kernel at its default (at that BT), so one trial varies one kernel. Then, per BT, the
pipeline of the per-kernel winners is verified and timed as a whole (forward+backward unless
``--forward-only``), as are the spec defaults, on the tune problem and (``long_check``, when
B > 1) on one sequence of the same token count (B = 1, T = B*T). The BT whose pipeline has the smallest
geometric mean of the two medians wins, and its configs are written to the user cache (and
``output``) as one group. The second problem guards the choice: configs are keyed on (K, V, dtype),
not on B or T, and a small chunk that wins when B*H fills the GPU can lose on one long sequence,
where the state scans walk twice as many chunks (on the H100, 2026-11-27: BT=16 won the tune
problem by 2% and took 31% longer than BT=32 at 1 x 16384). Under the interpreter nothing is
written: interpreter wall-clock timings say nothing about a GPU.

Budgets: ``max_configs`` is split evenly over the (kernel, BT) searches; ``max_minutes`` is shared
out as the tune goes (each search gets the time left over the searches left), with a reserve for
the final pipeline trials.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from gdn2_kernels import _device, _env, config_files, dispatch, gpu
from gdn2_kernels.configs import (CHUNK_SIZES, DEFAULT_CHUNK_SIZE, KEY_DTYPES, MAX_HEAD_DIM,
                                  KernelConfig, KernelSpec, ProblemKey, all_specs, get_spec)
from gdn2_kernels.options import OptionError, integer, one_of, positive_number
from gdn2_kernels.tuner.evaluate import EvalSettings, PoolEvaluator, WorkerPool
from gdn2_kernels.tuner.strategies import STRATEGIES, get_strategy, parse_options
from gdn2_kernels.tuner.trial import Budget, Candidate, Problem, Trial, TrialLog, best


CPU_PROBLEM = Problem(B=1, T=64, H=1, K=32, V=32, dtype="float32", decode_batch=2)
GPU_PROBLEM = Problem()


class TuneError(RuntimeError):
    """A tune that cannot run as asked (bad kernel names, no device, ...)."""


@dataclass(frozen=True)
class TuneOptions:
    """What to tune and how. ``None`` fields take device-dependent defaults (:func:`defaults`)."""

    problem: Problem | None = None
    kernels: tuple[str, ...] | None = None  # default: every registered spec
    chunk_sizes: tuple[int, ...] | None = None  # default: the BT values of the specs
    backward: bool = True  # also tune the bwd specs (timed through fwd+bwd)
    strategy: str = "halving"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    max_minutes: float | None = None
    max_configs: int | None = None
    devices: str = "auto"  # 'auto' (one), 'all', or a comma list of CUDA indices
    log_path: str | None = None
    output: str | None = None  # also write the profile JSON here (GPU only)
    write_cache: bool = True
    resume: bool = True
    verify_T: int | None = None
    reps: int | None = None
    warmup: int | None = None
    timeout_s: float = 180.0
    trial_fn: str = EvalSettings.trial_fn
    long_check: bool = True  # also time the final pipelines on one sequence of B*T tokens


@dataclass
class KernelPlan:
    """One search: a kernel at one chunk size (None: the kernel has no BT), and its space."""

    kernel: str
    direction: str
    workload: str
    chunk_size: int | None
    total: int
    valid: int
    pruned_by_rule: dict[str, int]
    pruned_reasons: dict[str, str]
    pruned: list[tuple[str, str]]  # (config label, rule)

    def label(self) -> str:
        return self.kernel + (f"@BT={self.chunk_size}" if self.chunk_size else "")


@dataclass
class TunePlan:
    problem: Problem
    key: dict[str, Any]
    device: str
    arch: str
    triton: str
    interpreter: bool
    devices: list[int]
    strategy: str
    strategy_options: dict[str, Any]
    max_minutes: float | None
    max_configs: int | None
    chunk_sizes: list[int]
    searches: list[KernelPlan]
    skipped: list[tuple[str, str]]  # (kernel, reason)
    backward_available: bool
    log_path: str
    long_problem: Problem | None = None  # the final pipelines' second problem (None: not checked)


@dataclass
class SearchResult:
    plan: KernelPlan
    trials: int
    by_status: dict[str, int]
    best: Trial | None


@dataclass
class TuneResult:
    plan: TunePlan
    searches: list[SearchResult]
    pipelines: list[Trial]  # one per chunk size: the per-kernel winners together
    default: Trial | None  # the spec defaults, same workload
    chosen_chunk_size: int | None
    speedup: float | None  # default / chosen pipeline score (1.0: the defaults were kept)
    entries: list[dict[str, Any]]
    written: list[str]
    note: str
    seconds: float
    trials_run: int
    trials_resumed: int
    worker_restarts: int
    long_pipelines: list[Trial] = field(default_factory=list)  # the same on plan.long_problem
    long_default: Trial | None = None
    scores: dict[int, float] = field(default_factory=dict)  # BT -> the score the choice used

    @property
    def ok(self) -> bool:
        return self.chosen_chunk_size is not None


@dataclass(frozen=True)
class ProgressEvent:
    """What the progress callback receives after every trial (and at phase changes)."""

    phase: str  # 'search', 'pipeline', 'done'
    search: str
    done: int
    expected: int
    trial: Trial | None
    replayed: bool
    bests: dict[str, Trial]


Progress = Callable[[ProgressEvent], None]


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------

def defaults(options: TuneOptions) -> TuneOptions:
    """Fill device-dependent defaults: the problem, budgets, timing repetitions."""
    on_gpu = gpu.gpu_available()
    changes: dict[str, Any] = {}
    if options.problem is None:
        changes["problem"] = GPU_PROBLEM if on_gpu else CPU_PROBLEM
    if options.max_minutes is None:
        changes["max_minutes"] = 9.0 if on_gpu else 1.5
    if options.max_configs is None and not on_gpu:
        changes["max_configs"] = 24
    if options.chunk_sizes is None and not on_gpu:
        changes["chunk_sizes"] = (32, 64)
    if options.verify_T is None:
        changes["verify_T"] = 300 if on_gpu else 40
    if options.reps is None:
        changes["reps"] = 20 if on_gpu else 2
    if options.warmup is None:
        changes["warmup"] = 5 if on_gpu else 1
    if options.strategy == "halving" and not options.strategy_options and not on_gpu:
        changes["strategy_options"] = {"n": 4, "eta": 2}
    if options.strategy == "halving" and not options.strategy_options and on_gpu:
        changes["strategy_options"] = {"n": 12, "eta": 3}
    return dataclasses.replace(options, **changes)


_PROBLEM_OPTIONS = (("B", "-B/--batch", None), ("T", "-T/--seqlen", None),
                    ("H", "-H/--heads", None), ("K", "-K/--k", MAX_HEAD_DIM),
                    ("V", "-V/--v", MAX_HEAD_DIM), ("decode_batch", "decode_batch", None))


def check_options(options: TuneOptions) -> None:
    """Refuse options that cannot work, before any work starts: :class:`OptionError` naming the
    option as the CLI spells it. (Whether the named devices exist is checked by
    :func:`resolve_devices`.)"""
    p = options.problem
    if p is not None:
        for field_name, option, high in _PROBLEM_OPTIONS:
            integer(getattr(p, field_name), option, 1, high)
        one_of(p.dtype, KEY_DTYPES, "--dtype")
    for name in options.kernels or ():
        one_of(name, [s.name for s in all_specs()], "-k/--kernel")
    for bt in options.chunk_sizes or ():
        one_of(bt, CHUNK_SIZES, "-c/--chunk-size")
    one_of(options.strategy, sorted(STRATEGIES), "--strategy")
    try:
        parse_options(options.strategy, dict(options.strategy_options))
    except ValueError as exc:
        raise OptionError("-o/--option", str(exc)) from None
    if options.max_minutes is not None:
        positive_number(options.max_minutes, "--max-minutes")
    if options.max_configs is not None:
        integer(options.max_configs, "--max-configs")
    positive_number(options.timeout_s, "--timeout")
    devices = options.devices
    if devices not in ("auto", "all") and not (
            isinstance(devices, str) and devices.replace(",", "").replace(" ", "").isdigit()):
        raise OptionError("--devices", f"must be 'auto', 'all' or indices like 0,1; got "
                                       f"{devices!r}")
    for name in ("verify_T", "reps"):
        if getattr(options, name) is not None:
            integer(getattr(options, name), name)
    if options.warmup is not None:
        integer(options.warmup, "warmup", 0)


def resolve_devices(spec: str) -> list[int]:
    """``'auto'`` -> the current device, ``'all'`` -> every visible GPU, else a comma list."""
    if not gpu.gpu_available():
        if spec not in ("auto", "all"):
            raise TuneError(f"--devices {spec}: no CUDA GPU here (kernels run in the interpreter)")
        return [-1]
    visible = gpu.visible_devices()
    if spec == "auto":
        import torch

        return [torch.cuda.current_device()]
    if spec == "all":
        return visible
    try:
        out = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise TuneError(f"--devices must be 'auto', 'all' or indices like 0,1; got {spec!r}") from None
    bad = [d for d in out if d not in visible]
    if bad or not out:
        raise TuneError(f"--devices {spec}: visible CUDA devices are {visible}")
    return out


def workload_of(spec: KernelSpec) -> str:
    """The workload that times a kernel: decode for the recurrent op, else its direction."""
    if spec.op == "recurrent":
        return "decode"
    return "fwd+bwd" if spec.direction == "bwd" else "fwd"


def _has_bt(spec: KernelSpec) -> bool:
    return any(p.name == "BT" for p in spec.params)


def _select_specs(options: TuneOptions) -> list[KernelSpec]:
    if options.kernels:
        try:
            specs = [get_spec(n) for n in options.kernels]
        except KeyError as exc:
            raise TuneError(exc.args[0]) from None
    else:
        specs = all_specs()
    return specs


def default_log_path(problem: Problem, gpu_name: str) -> str:
    name = f"{_device.sanitize_gpu_name(gpu_name)}-{problem.label()}.jsonl"
    return os.path.join(_env.cache_dir(), "logs", name)


def make_plan(options: TuneOptions) -> TunePlan:
    """The searches of a tune and what each space keeps and prunes (``gdn2 tune --dry-run``)."""
    import triton

    check_options(options)
    options = defaults(options)
    p = options.problem
    key = ProblemKey(p.K, p.V, p.dtype)
    arch, name = _device.arch(), _device.gpu_name()
    devices = resolve_devices(options.devices)
    specs = _select_specs(options)
    bwd_reason = None if options.backward else "backward tuning off (--forward-only)"
    chunk_sizes = list(options.chunk_sizes or get_spec(next(
        (s.name for s in all_specs() if _has_bt(s)))).param("BT").values)
    searches, skipped = [], []
    for spec in specs:
        if spec.direction == "bwd" and bwd_reason:
            skipped.append((spec.name, bwd_reason))
            continue
        for bt in (chunk_sizes if _has_bt(spec) else [None]):
            fixed = {"BT": bt} if bt else {}
            rep = spec.space(key, **fixed)
            by_rule: dict[str, int] = {}
            reasons: dict[str, str] = {}
            for pr in rep.pruned:
                by_rule[pr.rule] = by_rule.get(pr.rule, 0) + 1
                reasons[pr.rule] = pr.reason
            searches.append(KernelPlan(spec.name, spec.direction, workload_of(spec), bt,
                                       rep.total, len(rep.valid), by_rule, reasons,
                                       [(pr.config.label(), pr.rule) for pr in rep.pruned]))
    return TunePlan(p, key.as_dict(), name, arch, triton.__version__, _device.interpreter_active(),
                    devices, options.strategy, dict(options.strategy_options), options.max_minutes,
                    options.max_configs, chunk_sizes, searches, skipped, bwd_reason is None,
                    options.log_path or default_log_path(p, name), long_problem(options))


def long_problem(options: TuneOptions) -> Problem | None:
    """One sequence of the tune problem's token count, or None (no check, or B is already 1)."""
    p = options.problem
    if not options.long_check or p is None or p.B == 1:
        return None
    return dataclasses.replace(p, B=1, T=p.B * p.T)


def pipeline_score(main: Trial | None, long: Trial | None, checked: bool) -> float | None:
    """What the chunk size is chosen by: the median, or with the long check the geometric mean of
    both medians; None when a needed trial failed."""
    if main is None or not main.ok or main.median_ms is None:
        return None
    if not checked:
        return main.median_ms
    if long is None or not long.ok or long.median_ms is None:
        return None
    return (main.median_ms * long.median_ms) ** 0.5


# ------------------------------------------------------------------------------------------------
# Tuning
# ------------------------------------------------------------------------------------------------

def _candidates(kp: KernelPlan, key: ProblemKey) -> list[Candidate]:
    spec = get_spec(kp.kernel)
    bt = kp.chunk_size or DEFAULT_CHUNK_SIZE
    base = dispatch.default_pipeline(bt).as_dict()
    fixed = {"BT": kp.chunk_size} if kp.chunk_size else {}
    valid = list(spec.space(key, **fixed).valid)
    default = spec.default_config(**fixed)
    if default in valid:  # the default first: random and halving samples always include it
        valid.remove(default)
        valid.insert(0, default)
    # The config this GPU resolves to now (user cache or shipped profile), when it has this chunk
    # size, is pinned too: a sampled tune never loses to the configs it would replace.
    # So are the configs the shipped profiles of every GPU hold for this key (winners on a sibling
    # GPU are strong seeds); all of them are verified and timed here like any other candidate.
    in_use = dispatch.resolve(key)
    pins = [default] + config_files.shipped_configs(kp.kernel, key)
    if in_use.source != "default" and (kp.chunk_size is None or in_use.chunk_size == bt):
        pins.append(in_use[kp.kernel])
    # ... and each of them with every other value of the algorithm-choice parameters.
    for p in spec.params:
        if p.algorithm:
            pins += [cfg.replace(**{p.name: value}) for cfg in list(pins) for value in p.values]
    out = []
    for cfg in valid:
        pipe = dict(base)
        pipe[kp.kernel] = cfg
        out.append(Candidate(kp.kernel, cfg, tuple(pipe.items()), bt, kp.workload,
                             pinned=cfg in pins))
    return out


def _expected_trials(plan: TunePlan, sizes: list[int], options: TuneOptions) -> int:
    opts = plan.strategy_options
    n = 0
    cap = (max(1, plan.max_configs // max(1, len(sizes))) if plan.max_configs else None)
    for size in sizes:
        k = size
        if plan.strategy in ("random", "halving") and opts.get("n"):
            k = min(k, int(opts["n"]))
        if cap:
            k = min(k, cap)
        # Halving re-times in later rungs only while the config budget lasts: a first rung of
        # ``cap`` configs uses it up, and the strategy stops there.
        if plan.strategy == "halving" and not (cap and k >= cap):
            eta, m = int(opts.get("eta", 3)), k
            while m > 1:
                m = max(1, m // eta)
                k += m
        n += k
    return n + (len(plan.chunk_sizes) + 1) * (2 if plan.long_problem else 1)


def tune(options: TuneOptions, progress: Progress | None = None) -> TuneResult:
    """Run the tune described in the module docstring; returns what was found and written."""
    t_start = time.monotonic()
    check_options(options)
    options = defaults(options)
    plan = make_plan(options)
    if not plan.searches:
        raise TuneError("nothing to tune: " + "; ".join(f"{k}: {r}" for k, r in plan.skipped))
    key = ProblemKey(**plan.key)
    log_path = plan.log_path
    if not options.resume and os.path.exists(log_path):
        os.replace(log_path, f"{log_path}.{time.strftime('%Y%m%d-%H%M%S')}.old")
    log = TrialLog(log_path)
    settings = EvalSettings(plan.problem, options.verify_T, options.warmup, options.reps,
                            timeout_s=options.timeout_s, trial_fn=options.trial_fn)
    strategy = get_strategy(options.strategy)
    spaces = [_candidates(kp, key) for kp in plan.searches]
    expected = _expected_trials(plan, [len(s) for s in spaces], options)
    bests: dict[str, Trial] = {}
    state = {"done": 0, "search": "", "phase": "search"}

    def on_trial(trial: Trial, replayed: bool) -> None:
        state["done"] += 1
        if progress:
            progress(ProgressEvent(state["phase"], state["search"], state["done"], expected,
                                   trial, replayed, dict(bests)))

    pool = WorkerPool(plan.devices, options.trial_fn)
    evaluator = PoolEvaluator(pool, log, settings, on_trial)
    deadline = t_start + options.max_minutes * 60 if options.max_minutes else None
    results: list[SearchResult] = []
    try:
        for i, (kp, space) in enumerate(zip(plan.searches, spaces)):
            left = len(plan.searches) - i
            task_deadline = None
            if deadline is not None:
                now = time.monotonic()
                reserve = 0.15 * (deadline - t_start)  # final pipelines (~n_final slow trials)
                task_deadline = now + max(0.0, deadline - reserve - now) / left
            cap = max(1, options.max_configs // len(plan.searches)) if options.max_configs else None
            state["search"] = kp.label()
            trials = strategy.run(space, evaluator, Budget(cap, task_deadline),
                                  **options.strategy_options)
            win = best(trials)
            by_status: dict[str, int] = {}
            for t in trials:
                by_status[t.status] = by_status.get(t.status, 0) + 1
            if win is not None:
                bests[kp.label()] = win
            results.append(SearchResult(kp, len(trials), by_status, win))

        state["phase"], state["search"] = "pipeline", "pipelines"
        finals = _final_candidates(plan, results)
        final_effort = max([t.effort for t in bests.values()] + [1])
        trials = evaluator(finals, final_effort, Budget())
        long_trials: list[Trial] = []
        long_eval = None
        if plan.long_problem is not None:
            state["search"] = f"pipelines on {plan.long_problem.label()}"
            long_eval = PoolEvaluator(pool, log, dataclasses.replace(
                settings, problem=plan.long_problem), on_trial)
            long_trials = long_eval(finals, final_effort, Budget())
    finally:
        pool.close()
    checked = plan.long_problem is not None
    by_bt = {t.chunk_size: t for t in trials if t.stage == "pipeline"}
    long_by_bt = {t.chunk_size: t for t in long_trials if t.stage == "pipeline"}
    default = next((t for t in trials if t.stage == "default"), None)
    long_default = next((t for t in long_trials if t.stage == "default"), None)
    scores = {bt: sc for bt, t in by_bt.items()
              if (sc := pipeline_score(t, long_by_bt.get(bt), checked)) is not None}
    chosen = by_bt[min(scores, key=scores.get)] if scores else None
    default_score = pipeline_score(default, long_default, checked)
    speedup = (default_score / scores[chosen.chunk_size]
               if chosen is not None and default_score is not None else None)
    if speedup is not None and speedup < 1:  # never ship a pipeline slower than the defaults
        chosen, speedup = default, 1.0
    entries = _entries(plan, results, chosen, key) if chosen else []
    written, note = _write(plan, entries, options)
    if progress:  # the estimate is an upper bound (budgets, failures): end at what ran
        progress(ProgressEvent("done", "", state["done"], state["done"], None, False,
                               dict(bests)))
    return TuneResult(plan, results, sorted(by_bt.values(), key=lambda t: t.chunk_size), default,
                      chosen.chunk_size if chosen else None, speedup,
                      [e.as_dict() for e in entries], written, note,
                      time.monotonic() - t_start,
                      evaluator.ran + (long_eval.ran if long_eval else 0),
                      evaluator.resumed + (long_eval.resumed if long_eval else 0), pool.restarts,
                      sorted(long_by_bt.values(), key=lambda t: t.chunk_size), long_default,
                      scores)


def _pipeline_workload(plan: TunePlan) -> str:
    return "fwd+bwd" if plan.backward_available else "fwd"


def _final_candidates(plan: TunePlan, results: list[SearchResult]) -> list[Candidate]:
    """Per chunk size the winners together, plus the spec defaults, as whole-pipeline trials."""
    workload = _pipeline_workload(plan)
    out = []
    no_bt = {r.plan.kernel: r.best for r in results if r.plan.chunk_size is None and r.best}
    for bt in plan.chunk_sizes:
        pipe = dispatch.default_pipeline(bt).as_dict()
        for r in results:
            if r.plan.chunk_size == bt and r.best is not None:
                pipe[r.plan.kernel] = get_spec(r.plan.kernel).config(r.best.config)
        for name, t in no_bt.items():
            pipe[name] = get_spec(name).config(t.config)
        out.append(Candidate("pipeline", _chunk_label(bt), tuple(pipe.items()), bt, workload,
                             "pipeline"))
    d = dispatch.default_pipeline(DEFAULT_CHUNK_SIZE).as_dict()
    out.append(Candidate("pipeline", _chunk_label(DEFAULT_CHUNK_SIZE), tuple(d.items()),
                         DEFAULT_CHUNK_SIZE, workload, "default"))
    return out


def _chunk_label(bt: int) -> KernelConfig:
    """The 'config' of a whole-pipeline trial: its chunk size (the trial records every config)."""
    return KernelConfig("pipeline", (("BT", bt),))


def _entries(plan: TunePlan, results: list[SearchResult], chosen: Trial,
             key: ProblemKey) -> list[config_files.CacheEntry]:
    out = []
    if chosen.stage == "default":
        for r in results:
            if r.plan.chunk_size in (None, chosen.chunk_size):
                cfg = chosen.pipeline[r.plan.kernel]
                out.append(config_files.CacheEntry(r.plan.kernel, key.as_dict(), dict(cfg),
                                                   chosen.median_ms, chosen.iqr_ms,
                                                   _verified(chosen)))
        return out
    for r in results:
        if r.best is None or r.plan.chunk_size not in (None, chosen.chunk_size):
            continue
        out.append(config_files.CacheEntry(r.plan.kernel, key.as_dict(), dict(r.best.config),
                                           r.best.median_ms, r.best.iqr_ms, _verified(r.best)))
    return out


def _verified(trial: Trial) -> dict[str, dict[str, float]]:
    return {n: {"max_rel_err": e["max_rel_err"], "rel_rms": e["rel_rms"]}
            for n, e in trial.errors.items()}


def _write(plan: TunePlan, entries: list[config_files.CacheEntry],
           options: TuneOptions) -> tuple[list[str], str]:
    if plan.interpreter:
        return [], ("interpreter run: timings are CPU wall-clock times of Triton's interpreter, "
                    "not GPU timings; nothing was written to the cache or a GPU profile")
    if not entries:
        return [], "no verified configs; nothing written"
    ident = gpu.identify(plan.devices[0])
    gpu_doc = {k: v for k, v in dataclasses.asdict(ident).items() if k != "index"}
    written = []
    if options.write_cache:
        path = config_files.user_cache_path(ident.name)
        config_files.write_entries(path, entries, gpu_doc)
        written.append(str(path))
    if options.output:
        config_files.write_entries(options.output, entries, gpu_doc)
        written.append(options.output)
    return written, "written" if written else "not written (--no-cache and no --output)"


__all__ = ["CPU_PROBLEM", "GPU_PROBLEM", "KernelPlan", "ProgressEvent", "SearchResult",
           "TuneError", "TuneOptions", "TunePlan", "TuneResult", "check_options",
           "defaults", "make_plan", "resolve_devices", "tune", "workload_of"]
