"""gdn2_kernels.bench.cp_scaling's pure parts: options, the plan of runs, the environment check,
the summary and scaling efficiency, and the clear refusal without torchrun or GPUs."""
from __future__ import annotations

import pytest

from gdn2_kernels.bench import cp_scaling as cs


def test_options_and_their_errors():
    o = cs.parse_args([])
    assert o == cs.ScalingOptions()
    o = cs.parse_args(["--kinds", "strong", "--modes", "fwd", "--layout", "zigzag",
                       "--total-tokens", "4096", "--out", "x.json"])
    assert (o.kinds, o.modes, o.layout, o.total_tokens, o.out) == (("strong",), ("fwd",),
                                                                   "zigzag", 4096, "x.json")
    for bad in (["--kinds", "weak,fast"], ["--modes", ""], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            cs.parse_args(bad)


def test_world_sizes():
    assert cs.world_sizes(1) == [1]
    assert cs.world_sizes(8) == [1, 2, 4, 8]
    assert cs.world_sizes(6) == [1, 2, 4, 6]


def test_plan_weak_and_strong():
    runs = cs.plan(cs.ScalingOptions(tokens_per_gpu=1024, total_tokens=8192), 4)
    assert [(r.kind, r.ranks, r.T_total, r.T_local) for r in runs] == [
        ("weak", 1, 1024, 1024), ("weak", 2, 2048, 1024), ("weak", 4, 4096, 1024),
        ("strong", 1, 8192, 8192), ("strong", 2, 8192, 4096), ("strong", 4, 8192, 2048)]
    with pytest.raises(ValueError, match="do not split into 12 equal zigzag slots"):
        cs.plan(cs.ScalingOptions(total_tokens=1000, layout="zigzag", kinds=("strong",)), 6)


def test_environment_check():
    assert "runs under torchrun" in cs.environment_problem({}, 8)
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}
    assert cs.environment_problem(env, 4) is None
    assert "4 ranks but 2 CUDA device(s)" in cs.environment_problem(env, 2)
    assert "spans hosts" in cs.environment_problem({**env, "LOCAL_WORLD_SIZE": "2"}, 8)


def test_summary_takes_the_slowest_rank_and_efficiency_follows_the_kind():
    rows = [cs.summarize(cs.Run("weak", 1, 1000), "fwd", [{"ms": 2.0, "exchange_ms": None}]),
            cs.summarize(cs.Run("weak", 2, 2000), "fwd",
                         [{"ms": 2.2, "exchange_ms": 0.1, "allgather_ms": 0.05},
                          {"ms": 2.5, "exchange_ms": 0.3, "allgather_ms": 0.04}]),
            cs.summarize(cs.Run("strong", 1, 4000), "fwd", [{"ms": 8.0}]),
            cs.summarize(cs.Run("strong", 4, 4000), "fwd", [{"ms": 2.5}] * 4),
            cs.summarize(cs.Run("strong", 2, 4000), "fwdbwd", [{"ms": 9.0}] * 2)]
    cs.fill_efficiency(rows)
    weak2 = rows[1]
    assert (weak2.ms, weak2.exchange_ms, weak2.allgather_ms) == (2.5, 0.3, 0.05)
    assert weak2.tokens_per_s == pytest.approx(2000 / 2.5e-3)
    assert weak2.efficiency == pytest.approx(2.0 / 2.5)
    assert rows[3].efficiency == pytest.approx(8.0 / (4 * 2.5))
    assert rows[4].efficiency is None                         # no one-GPU fwdbwd row
    text = cs.render(rows)
    assert "weak      2     2000 fwd" in text and text.count("\n") == len(rows) + 1


def test_main_refuses_clearly_without_torchrun_or_gpus(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert cs.main([]) == 2
    assert "runs under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cs.main([]) == 2                                   # the CPU test machine has no GPU
    assert "needs one GPU per rank" in capsys.readouterr().err
