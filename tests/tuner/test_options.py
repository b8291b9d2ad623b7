"""``gdn2 tune`` says what it does: options checked before any work (exit 2 naming the option),
the interpreter notice first, progress that ends at its total, advice that works on a CPU, and
a trial log whose odd lines are skipped with a warning."""
from __future__ import annotations

import json

import pytest
from helpers import tiny_problem
from typer.testing import CliRunner

from gdn2_kernels.cli import app
from gdn2_kernels.options import OptionError
from gdn2_kernels.tuner.trial import Problem, read_log
from gdn2_kernels.tuner.tune import TuneOptions, check_options, make_plan, tune

runner = CliRunner()

# (arguments, the option named, words of the message)
BAD_TUNE = [
    (["--dtype", "bogus"], "--dtype", "must be one of bfloat16, float16, float32; got 'bogus'"),
    (["--dtype", "float32", "--dtype", "float64"], "--dtype", "got 'float64'"),
    (["-K", "512"], "-K/--k", "must be between 1 and 256, got 512"),
    (["-V", "0"], "-V/--v", "must be between 1 and 256, got 0"),
    (["-B", "-1"], "-B/--batch", "must be >= 1, got -1"),
    (["-T", "0"], "-T/--seqlen", "must be >= 1, got 0"),
    (["-H", "0"], "-H/--heads", "must be >= 1, got 0"),
    (["--max-minutes", "-1"], "--max-minutes", "must be a finite number > 0, got -1.0"),
    (["--max-minutes", "inf"], "--max-minutes", "must be a finite number > 0, got inf"),
    (["--max-configs", "0"], "--max-configs", "must be >= 1, got 0"),
    (["--timeout", "0"], "--timeout", "must be a finite number > 0, got 0.0"),
    (["-k", "nope_fwd"], "-k/--kernel", "got 'nope_fwd'"),
    (["-c", "48"], "-c/--chunk-size", "must be one of 16, 32, 64, 128; got 48"),
    (["--strategy", "grid"], "--strategy", "must be one of exhaustive, halving, random"),
    (["--strategy", "random", "-o", "eta=2"], "-o/--option", "has no option 'eta'"),
    (["-o", "eta=1"], "-o/--option", "option eta must be >= 2, got 1"),
    (["-o", "n=abc"], "-o/--option", "option n must be int, got 'abc'"),
    (["--strategy", "random", "-o", "n=0"], "-o/--option", "option n must be >= 1, got 0"),
    (["--devices", "gpu0"], "--devices", "must be 'auto', 'all' or indices like 0,1"),
]


@pytest.mark.parametrize("args, option, message", BAD_TUNE, ids=[" ".join(b[0]) for b in BAD_TUNE])
def test_bad_tune_options_exit_2_before_any_work(tmp_path, args, option, message):
    log = tmp_path / "log.jsonl"
    res = runner.invoke(app, ["tune", "--log", str(log), *args])
    assert res.exit_code == 2, res.output
    text = " ".join(res.stderr.replace("│", " ").split())
    assert f"Invalid value for '{option}'" in text and message in text
    assert not log.exists()  # nothing ran


def test_the_library_refuses_the_same_options():
    with pytest.raises(OptionError, match="--dtype") as info:
        tune(TuneOptions(problem=Problem(dtype="bogus")))
    assert info.value.option == "--dtype"
    with pytest.raises(OptionError, match="-K/--k"):
        make_plan(TuneOptions(problem=Problem(K=512)))
    with pytest.raises(OptionError, match="must be an integer, got True"):
        check_options(TuneOptions(max_configs=True))
    with pytest.raises(OptionError, match="reps"):
        check_options(TuneOptions(reps=0))


def test_the_interpreter_notice_comes_first():
    res = runner.invoke(app, ["tune", "--dry-run", "-k", "l2norm_fwd"])
    assert res.exit_code == 0, res.output
    first = res.stdout.lstrip().splitlines()[0]
    assert first.startswith("No CUDA GPU: kernels run through Triton's interpreter")
    res = runner.invoke(app, ["tune", "--dry-run", "-k", "l2norm_fwd", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["interpreter"] is True
    assert res.stderr.lstrip().startswith("No CUDA GPU")


@pytest.mark.parametrize("strategy, options, max_configs", [
    ("halving", {"n": 4, "eta": 2}, 4),  # the CPU default: the config budget ends each search
    ("halving", {"n": 4, "eta": 2}, None),  # three rungs per search
    ("random", {"n": 2}, None),
])
def test_progress_ends_at_its_total(tmp_path, strategy, options, max_configs):
    events = []
    result = tune(TuneOptions(problem=tiny_problem(), kernels=("state_fwd", "l2norm_fwd"),
                              chunk_sizes=(32,), strategy=strategy, strategy_options=options,
                              max_configs=max_configs, max_minutes=30,
                              log_path=str(tmp_path / "t.jsonl"), reps=1, warmup=0,
                              long_check=False, trial_fn="fake_trials:by_chunk_and_length"),
                  events.append)
    last = events[-1]
    assert last.phase == "done" and last.done == last.expected == result.trials_run
    # The estimate shown while it runs is the number that ran (no budget ran out here).
    assert all(ev.expected == result.trials_run for ev in events)


def test_a_trial_log_line_that_is_json_but_not_a_trial_is_skipped(tmp_path):
    path = tmp_path / "log.jsonl"
    good = {"id": "a", "kernel": "state_fwd", "config": {"BV": 32}, "chunk_size": 32,
            "workload": "fwd", "stage": "kernel", "effort": 1, "status": "ok"}
    lines = [json.dumps(good), "[1, 2, 3]", "42", '"text"', "null",
             json.dumps({**good, "status": "great"}), json.dumps({"id": "b"}), "{torn"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        trials = read_log(path)
    assert [t.id for t in trials] == ["a"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 7
    assert any(":2: skipping an unreadable trial line (a JSON list, not an object)" in m
               for m in messages)
    assert any(":6: skipping" in m and "'great'" in m for m in messages)
