"""Evaluating candidates: verify on fresh inputs, then time, in restartable worker processes.

:func:`run_trial` is what a worker does for one candidate: run the workload under
``dispatch.override(candidate pipeline)`` on fresh random inputs and compare every output (and
gradient, for fwd+bwd) with the fp64 recurrence (:func:`gdn2_kernels.tuner.verify.run_case`);
only a verified candidate is timed (:func:`gdn2_kernels.timing.measure`), with NVML samples
around the timing and up to ``retime_throttled`` re-timings when the GPU throttled.

:class:`WorkerPool` keeps one spawned worker per device (``-1`` = the CPU interpreter). A worker
that dies (segfault, ``os.abort``, illegal memory access) yields a ``crash`` trial, one that
exceeds the timeout is killed and yields ``timeout``; either way a fresh worker is started and
the sweep goes on. A candidate's timeout counts from when its worker is ready (imports done,
:data:`READY`), so restarting a worker costs the next candidate none of its time. :class:`PoolEvaluator` adds the trial log (resume: trials already in the log
are returned without running) and the budget; :class:`ReplayEvaluator` answers from a log so
strategies are tested without kernels.
"""
from __future__ import annotations

import collections
import importlib
import multiprocessing as mp
import multiprocessing.connection
import os
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from gdn2_kernels.tuner.trial import Budget, Candidate, Problem, Trial, TrialLog, trial_id

WORKLOADS = ("fwd", "fwd+bwd", "decode")


@dataclass(frozen=True)
class EvalSettings:
    """How every trial of one tune is verified and timed."""

    problem: Problem
    verify_T: int = 300  # tokens of the verification problem (not a multiple of any BT)
    warmup: int = 5
    reps: int = 20  # timed repetitions per unit of effort
    retime_throttled: int = 2
    timeout_s: float = 180.0
    trial_fn: str = "gdn2_kernels.tuner.evaluate:run_trial"  # "module:function"; tests inject fakes


@dataclass(frozen=True)
class Task:
    id: str
    candidate: Candidate
    effort: int
    settings: EvalSettings


def classify(error: str) -> str:
    """Typed status of a failed run from its ``'ExceptionType: message'`` text."""
    low = error.lower()
    if "outofresources" in low or "out of resource" in low or "outofmemory" in low \
            or "out of memory" in low:
        return "out_of_resources"
    head = error.split(":", 1)[0]
    if "Compil" in head or "Assertion" in head and "tl." in error or "ptxas" in low \
            or "mlir" in low:
        return "compile_error"
    return "crash"


# ------------------------------------------------------------------------------------------------
# What a worker runs
# ------------------------------------------------------------------------------------------------

def verify_case(candidate: Candidate, settings: EvalSettings):
    """The verification case of a candidate's workload (fresh inputs each call)."""
    from gdn2_kernels.tuner.verify import VerifyCase

    p = settings.problem
    if candidate.workload == "decode":
        return VerifyCase(2, 3, p.H, p.K, p.V, p.dtype, qk_l2norm=True, op="recurrent")
    return VerifyCase(1, settings.verify_T, p.H, p.K, p.V, p.dtype, qk_l2norm=True,
                      backward=candidate.workload == "fwd+bwd")


_INPUTS: dict[tuple, Any] = {}


def _timed_call(candidate: Candidate, problem: Problem, device):
    """A closure running the candidate's workload once on the timing problem, and its leaves."""
    import torch

    from gdn2_kernels import ops
    from gdn2_kernels.inputs import make_inputs

    dtype = getattr(torch, problem.dtype)
    decode = candidate.workload == "decode"
    grad = candidate.workload == "fwd+bwd"
    key = (problem, candidate.workload, str(device))
    if key not in _INPUTS:
        _INPUTS.clear()
        B, T = (problem.decode_batch, 1) if decode else (problem.B, problem.T)
        x = make_inputs(B, T, problem.H, problem.K, problem.V, dtype, device, with_h0=decode,
                        normalize_qk=False, seed=0).to(dtype, device, requires_grad=grad)
        do = torch.randn(B, T, problem.H, problem.V, dtype=dtype, device=device) if grad else None
        _INPUTS[key] = (x, do)
    x, do = _INPUTS[key]
    if decode:
        def call():
            with torch.no_grad():
                ops.fused_recurrent_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, initial_state=x.h0,
                                         output_final_state=True, use_qk_l2norm_in_kernel=True,
                                         validate_values=False)
        return call, ()

    def call():
        with torch.set_grad_enabled(grad):
            o, _ = ops.chunk_gdn2(x.q, x.k, x.v, x.g, x.b, x.w, use_qk_l2norm_in_kernel=True,
                                  validate_values=False)
            if grad:
                o.backward(do)
    leaves = tuple(x.tensors().values()) if grad else ()
    return call, leaves


def run_trial(task: Task, device_index: int) -> Trial:
    """Verify then time one candidate on this worker's device (see module docstring)."""
    import torch

    from gdn2_kernels import _device, dispatch, gpu
    from gdn2_kernels import timing
    from gdn2_kernels.tuner.verify import run_case

    cand, s = task.candidate, task.settings
    device = torch.device("cuda", device_index) if device_index >= 0 else torch.device("cpu")
    trial = Trial(task.id, cand.kernel, cand.config.as_dict(), cand.chunk_size, cand.workload,
                  cand.stage, task.effort, "ok", device=_device.gpu_name(max(device_index, 0)))
    if cand.stage != "kernel":
        trial.pipeline = {n: c.as_dict() for n, c in cand.pipeline}
    t0 = time.perf_counter()
    pipeline = dispatch.PipelineConfig(cand.chunk_size, cand.pipeline, "tuner candidate")
    res = run_case(verify_case(cand, s), device, pipeline)
    trial.errors = {e.name: {"max_rel_err": e.max_rel_err, "rel_rms": e.rel_rms,
                             "tolerance": e.tolerance} for e in res.errors}
    if res.error is not None:
        trial.status, trial.message = classify(res.error), res.error
    elif not res.ok:
        bad = [e for e in res.errors if not e.ok]
        trial.status = "wrong_result"
        trial.message = "; ".join(f"{e.name}: rel_rms {e.rel_rms:.2e} > {e.tolerance:.0e}"
                                  for e in bad)
    if trial.status == "ok":
        try:
            with dispatch.override(pipeline):
                call, leaves = _timed_call(cand, s.problem, device)
                reps = s.reps * task.effort
                for attempt in range(s.retime_throttled + 1):
                    before = gpu.sample(device_index) if device_index >= 0 else gpu.GpuSample()
                    t = timing.measure(call, reps, s.warmup, device, leaves)
                    after = gpu.sample(device_index) if device_index >= 0 else gpu.GpuSample()
                    trial.throttled = before.throttled or after.throttled
                    if not trial.throttled:
                        break
                    trial.retimed = attempt + 1
            trial.median_ms, trial.iqr_ms, trial.reps, trial.clock = (t.median_ms, t.iqr_ms,
                                                                      t.reps, t.clock)
        except Exception as exc:  # a config may compile and verify yet fail at the timing shape
            trial.status = classify(f"{type(exc).__name__}: {exc}")
            trial.message = f"timing: {type(exc).__name__}: {exc}"
    trial.seconds = time.perf_counter() - t0
    return trial


def _load_fn(path: str) -> Callable[[Task, int], Trial]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# What a worker sends once it has imported everything and can take a task; a candidate's timeout
# clock starts then, so a fresh worker's start-up (seconds of imports on a loaded machine) is
# never charged to the candidate it was started for.
READY = "ready"
# A worker that has not said READY by then is stuck starting (its candidate is a timeout).
STARTUP_TIMEOUT_S = 600.0


def _worker_main(conn, device_index: int, trial_fn: str) -> None:
    import torch

    import gdn2_kernels  # noqa: F401  (imported before READY: a slow import is not a trial's time)

    if device_index >= 0:
        torch.cuda.set_device(device_index)
    fn = _load_fn(trial_fn)
    conn.send(READY)
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            trial = fn(task, device_index)
        except Exception as exc:
            c = task.candidate
            trial = Trial(task.id, c.kernel, c.config.as_dict(), c.chunk_size, c.workload, c.stage,
                          task.effort, classify(f"{type(exc).__name__}: {exc}"),
                          message=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        conn.send(trial)
        if trial.status == "crash":
            return  # the CUDA context may be broken: the pool starts a fresh worker


# ------------------------------------------------------------------------------------------------
# Worker pool
# ------------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, device: int, trial_fn: str):
        self.device, self.trial_fn = device, trial_fn
        self.proc = self.conn = None
        self.task: Task | None = None
        self.spawned = 0.0  # when the process was started
        self.started: float | None = None  # when the task's clock started (worker ready)
        self.ready = False
        self.restarts = -1

    def ensure(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            return
        self.close(kill=True)
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, self.device, self.trial_fn),
                           daemon=True, name=f"gdn2-tune-worker-{self.device}")
        try:
            proc.start()
        finally:
            child.close()
        self.proc, self.conn = proc, conn
        self.spawned, self.ready = time.monotonic(), False
        self.restarts += 1

    def submit(self, task: Task) -> None:
        """Send ``task``; its clock starts now if the worker is ready, else when it says so."""
        self.ensure()
        self.task, self.started = task, time.monotonic() if self.ready else None
        self.conn.send(task)

    def overdue(self, timeout_s: float) -> str | None:
        """Why the task in flight is over its time, or None."""
        now = time.monotonic()
        if self.started is None:
            if now - self.spawned > STARTUP_TIMEOUT_S:
                return (f"the worker did not start within {STARTUP_TIMEOUT_S:.0f} s; worker "
                        "killed and restarted")
            return None
        if now - self.started > timeout_s:
            return f"no result after {timeout_s:.0f} s; worker killed and restarted"
        return None

    def close(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill and self.proc.is_alive():
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.proc = self.conn = None


class WorkerPool:
    """One worker process per device; runs tasks, turning deaths and hangs into typed trials."""

    def __init__(self, devices: Sequence[int], trial_fn: str = EvalSettings.trial_fn):
        if not devices:
            raise ValueError("WorkerPool needs at least one device (-1 for the CPU interpreter)")
        self.workers = [_Worker(d, trial_fn) for d in devices]

    @property
    def restarts(self) -> int:
        return sum(max(0, w.restarts) for w in self.workers)

    def run(self, tasks: Sequence[Task], on_done: Callable[[Trial], None],
            stop: Callable[[], bool] = lambda: False) -> None:
        """Run ``tasks`` (in order, sharded over the workers); ``stop`` halts new submissions."""
        pending = collections.deque(tasks)
        while True:
            for w in self.workers:
                if w.task is None and pending and not stop():
                    w.submit(pending.popleft())
            busy = [w for w in self.workers if w.task is not None]
            if not busy:
                return
            waits = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            multiprocessing.connection.wait(waits, timeout=0.5)
            for w in busy:
                trial = self._poll(w)
                if trial is not None:
                    w.task = None
                    on_done(trial)

    def _poll(self, w: _Worker) -> Trial | None:
        task = w.task
        if w.conn.poll():
            try:
                trial = w.conn.recv()
            except (EOFError, OSError):
                trial = None
            if trial == READY:
                w.ready, w.started = True, time.monotonic()
                return None
            if trial is not None:
                if trial.status == "crash":  # the worker exits after a crash; start a fresh one
                    w.close(kill=True)
                return trial
        elif w.proc.is_alive():
            why = w.overdue(task.settings.timeout_s)
            if why is None:
                return None
            w.close(kill=True)
            return _failed(task, "timeout", why)
        code = w.proc.exitcode if w.proc is not None else None
        w.close(kill=True)
        return _failed(task, "crash", f"worker died (exit code {code}); restarted")

    def close(self) -> None:
        for w in self.workers:
            w.close()


def _failed(task: Task, status: str, message: str) -> Trial:
    c = task.candidate
    return Trial(task.id, c.kernel, c.config.as_dict(), c.chunk_size, c.workload, c.stage,
                 task.effort, status, message=message, finished=time.time())


# ------------------------------------------------------------------------------------------------
# Evaluators (what strategies call)
# ------------------------------------------------------------------------------------------------

def _config_key(c: Candidate) -> tuple:
    return (c.kernel, c.chunk_size, c.workload, c.stage, c.label())


def _admit(candidates: Sequence[Candidate], budget: Budget, seen: set[tuple]) -> list[Candidate]:
    """The leading candidates the budget allows; each config not seen before is charged once."""
    out = []
    for c in candidates:
        ck = _config_key(c)
        if ck not in seen:
            if budget.exhausted():
                break
            budget.charge()
            seen.add(ck)
        out.append(c)
    return out


class PoolEvaluator:
    """Runs candidates in a :class:`WorkerPool`, appends each trial to the log as it finishes,
    and answers trials already in the log (a resumed sweep) without running them."""

    def __init__(self, pool: WorkerPool, log: TrialLog, settings: EvalSettings,
                 on_trial: Callable[[Trial, bool], None] | None = None):
        self.pool, self.log, self.settings = pool, log, settings
        self.on_trial = on_trial  # (trial, replayed_from_log)
        self._seen: set[tuple] = set()
        self.ran = 0
        self.resumed = 0

    def __call__(self, candidates: Sequence[Candidate], effort: int, budget: Budget) -> list[Trial]:
        out: dict[str, Trial] = {}
        order, tasks = [], []
        for c in _admit(candidates, budget, self._seen):
            tid = trial_id(self.settings.problem, c, effort)
            order.append(tid)
            done = self.log.get(tid)
            if done is not None:
                out[tid] = done
                self.resumed += 1
                if self.on_trial:
                    self.on_trial(done, True)
            else:
                tasks.append(Task(tid, c, effort, self.settings))

        def finished(trial: Trial) -> None:
            trial = replace(trial, finished=time.time())
            self.log.append(trial)
            out[trial.id] = trial
            self.ran += 1
            if self.on_trial:
                self.on_trial(trial, False)

        deadline = budget.deadline
        self.pool.run(tasks, finished,
                      stop=lambda: deadline is not None and time.monotonic() >= deadline)
        return [out[t] for t in order if t in out]


class ReplayEvaluator:
    """Answers from a trial log (or list): for testing strategies without kernels or workers.

    A candidate is matched on (kernel, chunk size, workload, stage, config) at the largest logged
    effort not above the one asked; one that is not in the log yields a ``crash`` trial.
    """

    def __init__(self, trials: Sequence[Trial] | str | os.PathLike, problem: Problem = Problem()):
        if isinstance(trials, (str, os.PathLike)):
            from gdn2_kernels.tuner.trial import read_log

            trials = read_log(trials)
        self.problem = problem
        self.index: dict[tuple, dict[int, Trial]] = collections.defaultdict(dict)
        for t in trials:
            self.index[(t.kernel, t.chunk_size, t.workload, t.stage, t.label())][t.effort] = t
        self.calls: list[tuple[str, int]] = []
        self._seen: set[tuple] = set()

    def __call__(self, candidates: Sequence[Candidate], effort: int, budget: Budget) -> list[Trial]:
        out = []
        for c in _admit(candidates, budget, self._seen):
            self.calls.append((c.label(), effort))
            logged = {e: t for e, t in self.index.get(_config_key(c), {}).items() if e <= effort}
            if logged:
                out.append(replace(logged[max(logged)], effort=effort))
            else:
                out.append(_failed(Task(trial_id(self.problem, c, effort), c, effort,
                                        EvalSettings(self.problem)), "crash", "not in replay log"))
        return out


__all__ = ["EvalSettings", "PoolEvaluator", "READY", "ReplayEvaluator", "STARTUP_TIMEOUT_S", "Task",
           "WORKLOADS", "WorkerPool", "classify", "run_trial", "verify_case"]
