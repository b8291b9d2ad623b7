"""A whole tune on a tiny problem through the interpreter: real kernels, workers, log, resume."""
from __future__ import annotations

import os

from helpers import tiny_problem

from tuner.trial import read_log
from tuner.tune import TuneOptions, tune


def test_tiny_tune_verifies_picks_a_pipeline_writes_nothing_and_resumes(tmp_path):
    log = tmp_path / "trials.jsonl"
    opts = TuneOptions(problem=tiny_problem(), kernels=("state_fwd", "l2norm_fwd"),
                       chunk_sizes=(32,), strategy="random", strategy_options={"n": 2},
                       max_configs=4, max_minutes=3, log_path=str(log), verify_T=40, reps=1,
                       warmup=0)
    events = []
    first = tune(opts, events.append)
    assert first.ok and first.chosen_chunk_size == 32
    assert [s.plan.label() for s in first.searches] == ["state_fwd@BT=32", "l2norm_fwd"]
    assert all(s.best is not None and s.best.ok for s in first.searches)
    assert {e["kernel"] for e in first.entries} == {"state_fwd", "l2norm_fwd"}
    assert all(e["key"] == {"K": 16, "V": 16, "dtype": "float32"} for e in first.entries)
    assert first.pipelines[0].pipeline["state_fwd"]["BT"] == 32
    assert first.written == [] and "interpreter" in first.note
    assert not os.path.exists(tmp_path / "cache")  # no cache file for the CPU
    assert events[-1].phase == "done" and events[0].trial is not None

    n = len(read_log(log))
    again = tune(opts)
    assert again.trials_run == 0 and again.trials_resumed == n
    assert len(read_log(log)) == n
    assert again.entries == first.entries
