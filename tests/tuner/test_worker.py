"""The evaluator: verification rejects wrong outputs, crashing and hanging candidates become
typed trials while the worker is restarted, and two workers shard one batch."""
from __future__ import annotations

import dataclasses

import torch
from helpers import state_fwd_candidates, tiny_problem

from gdn2_kernels import pipeline
from gdn2_kernels.tuner.evaluate import (EvalSettings, PoolEvaluator, Task, WorkerPool, classify,
                                         run_trial)
from gdn2_kernels.tuner.trial import Budget, TrialLog, read_log

FAKE = "fake_trials:by_config"


def _settings(**kw) -> EvalSettings:
    return EvalSettings(tiny_problem(), verify_T=40, warmup=0, reps=1, trial_fn=FAKE, **kw)


def test_run_trial_verifies_then_times_a_good_config():
    cand = state_fwd_candidates(bvs=(16,), warps=(4,), stages=(2,))[0]
    t = run_trial(Task("a", cand, 1, _settings()), -1)
    assert t.status == "ok", t.message
    assert t.median_ms > 0 and t.clock.startswith("wall-clock")
    assert set(t.errors) == {"o", "ht"} and t.errors["o"]["max_rel_err"] < 1e-4


def test_run_trial_rejects_a_wrong_output(monkeypatch):
    real = pipeline.chunk_gdn2_fwd

    def off_by_one_percent(*args, **kwargs):
        res = real(*args, **kwargs)
        return dataclasses.replace(res, o=res.o * 1.01)

    monkeypatch.setattr(pipeline, "chunk_gdn2_fwd", off_by_one_percent)
    cand = state_fwd_candidates(bvs=(16,), warps=(4,), stages=(2,))[0]
    t = run_trial(Task("b", cand, 1, _settings()), -1)
    assert t.status == "wrong_result" and "o: rel_rms" in t.message
    assert t.median_ms is None and t.errors["o"]["rel_rms"] > 5e-3


def test_classify():
    assert classify("OutOfResources: out of resource: shared memory") == "out_of_resources"
    assert classify("CompilationError: at 12:4") == "compile_error"
    assert classify("RuntimeError: CUDA error: an illegal memory access") == "crash"


def test_crash_abort_and_hang_are_typed_and_the_sweep_goes_on(tmp_path):
    # BV=16 aborts, BV=64 raises, num_warps=8 hangs; the others are fine.
    cands = state_fwd_candidates(bvs=(16, 32, 64), warps=(2,), stages=(1,))
    cands += state_fwd_candidates(bvs=(32,), warps=(8,), stages=(1,))
    cands += state_fwd_candidates(bvs=(32,), warps=(4,), stages=(3,))
    pool = WorkerPool([-1], FAKE)
    log = TrialLog(tmp_path / "log.jsonl")
    try:
        trials = PoolEvaluator(pool, log, _settings(timeout_s=4))(cands, 1, Budget())
    finally:
        pool.close()
    status = [t.status for t in trials]
    assert status == ["crash", "ok", "crash", "timeout", "ok"]
    assert "exit code" in trials[0].message and "illegal memory" in trials[2].message
    assert pool.restarts >= 3
    assert [t.id for t in read_log(log.path)] == [t.id for t in trials]


def test_two_workers_shard_one_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("GDN2_TEST_TRIAL_SECONDS", "0.3")
    cands = state_fwd_candidates(bvs=(32,), warps=(2, 4), stages=(1, 2, 3))
    pool = WorkerPool([-1, -1], FAKE)
    try:
        trials = PoolEvaluator(pool, TrialLog(tmp_path / "l.jsonl"), _settings())(cands, 1, Budget())
    finally:
        pool.close()
    assert [t.label() for t in trials] == [c.label() for c in cands]  # merged in request order
    assert all(t.ok for t in trials) and len({t.device for t in trials}) == 2
    assert torch.get_default_dtype() == torch.float32


def test_a_workers_start_up_is_not_charged_to_its_candidate(tmp_path, monkeypatch):
    """Every fresh worker here takes 3 s to import, more than the 2.5 s timeout: the clock starts
    when the worker is ready, so neither the first candidate nor the one after the crash (whose
    worker is restarted) times out."""
    monkeypatch.setenv("GDN2_TEST_IMPORT_SECONDS", "3")
    cands = state_fwd_candidates(bvs=(16, 32), warps=(2,), stages=(1,))  # BV=16 aborts
    cands += state_fwd_candidates(bvs=(32,), warps=(4,), stages=(1,))
    fn = "slow_import_trials:by_config"
    pool = WorkerPool([-1], fn)
    settings = EvalSettings(tiny_problem(), verify_T=40, warmup=0, reps=1, timeout_s=2.5,
                            trial_fn=fn)
    try:
        trials = PoolEvaluator(pool, TrialLog(tmp_path / "l.jsonl"), settings)(
            [cands[1], cands[0], cands[2]], 1, Budget())
    finally:
        pool.close()
    assert [t.status for t in trials] == ["ok", "crash", "ok"], [t.message for t in trials]
    assert pool.restarts == 1


def test_a_worker_that_never_starts_is_a_timeout(monkeypatch):
    """A worker stuck in its imports past STARTUP_TIMEOUT_S is killed; the candidate is a
    timeout that says so."""
    import gdn2_kernels.tuner.evaluate as evaluate

    monkeypatch.setenv("GDN2_TEST_IMPORT_SECONDS", "60")
    monkeypatch.setattr(evaluate, "STARTUP_TIMEOUT_S", 1.0)
    cand = state_fwd_candidates(bvs=(32,), warps=(2,), stages=(1,))[0]
    pool = WorkerPool([-1], "slow_import_trials:by_config")
    got = []
    try:
        pool.run([Task("s", cand, 1, _settings(timeout_s=1000))], got.append)
    finally:
        pool.close()
    assert [t.status for t in got] == ["timeout"] and "did not start" in got[0].message
