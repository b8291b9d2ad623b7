"""Resume after kill: a sweep killed mid-way and restarted loses and repeats no finished trial."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from gdn2_kernels.tuner.trial import read_log

HERE = os.path.dirname(__file__)


def _start(log, executions):
    env = dict(os.environ, GDN2_TEST_EXECUTIONS=str(executions), GDN2_TEST_TRIAL_SECONDS="0.4",
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "sweep_script.py"), str(log),
                             "fake_trials:by_config"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_mid_sweep_then_resume(tmp_path):
    log, executions = tmp_path / "trials.jsonl", tmp_path / "executions.txt"
    proc = _start(log, executions)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, mid-trial
    proc.wait()
    first = [t.label() for t in read_log(log)]
    assert 3 <= len(first) < 8

    proc = _start(log, executions)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"resumed {len(first)}" in out

    trials = read_log(log)
    labels = [t.label() for t in trials]
    assert len(labels) == len(set(labels)) == 8  # nothing lost, nothing logged twice
    assert labels[:len(first)] == first
    runs = executions.read_text().splitlines()
    assert all(runs.count(label) == 1 for label in first)  # finished trials never re-run
    assert len(runs) - len(set(runs)) <= 1  # only the trial in flight at the kill ran twice
