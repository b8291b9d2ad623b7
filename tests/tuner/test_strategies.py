"""Strategies against a replay evaluator (no kernels), and the space/pruning plan."""
from __future__ import annotations

import pytest

from helpers import logged, state_fwd_candidates

from gdn2_kernels.tuner.evaluate import ReplayEvaluator
from gdn2_kernels.tuner.strategies import get_strategy, options_help, parse_options
from gdn2_kernels.tuner.strategies.exhaustive import exhaustive
from gdn2_kernels.tuner.strategies.halving import halving
from gdn2_kernels.tuner.strategies.random import random
from gdn2_kernels.tuner.trial import Budget, best
from gdn2_kernels.tuner.tune import TuneOptions, make_plan

CANDS = state_fwd_candidates(bvs=(16, 32), warps=(2, 4), stages=(1, 2, 3))  # 12


def _log(medians, efforts=(1, 3, 9)):
    return [t for e in efforts for t in logged(CANDS, medians, e)]


def test_exhaustive_visits_all_and_respects_max_configs():
    ev = ReplayEvaluator(_log({}))
    assert len(exhaustive(CANDS, ev, Budget())) == 12
    ev = ReplayEvaluator(_log({}))
    assert len(exhaustive(CANDS, ev, Budget(max_configs=5))) == 5


def test_random_is_seeded_and_keeps_the_default_first():
    a = [t.label() for t in random(CANDS, ReplayEvaluator(_log({})), Budget(), n=4, seed=1)]
    b = [t.label() for t in random(CANDS, ReplayEvaluator(_log({})), Budget(), n=4, seed=1)]
    assert a == b and len(a) == 4 and a[0] == CANDS[0].label()


def test_samples_always_keep_pinned_candidates():
    """The configs in use now (pinned) are in every sampled rung, whatever the seed."""
    import dataclasses

    from gdn2_kernels.tuner.strategies.random import sample

    cands = list(CANDS)
    cands[9] = dataclasses.replace(cands[9], pinned=True)
    for seed in range(5):
        got = sample(cands, 4, seed)
        assert len(got) == 4 and got[0] == cands[0] and cands[9] in got


def test_tune_pins_the_config_this_gpu_resolves_to():
    from gdn2_kernels import dispatch
    from gdn2_kernels.configs import ProblemKey
    from gdn2_kernels.tuner.tune import _candidates

    key = ProblemKey(64, 64, "float32")  # every BV of the spec fits, so the default is valid
    plan = next(kp for kp in make_plan(TuneOptions(kernels=["state_fwd"], chunk_sizes=[32]))
                .searches if kp.kernel == "state_fwd")
    in_use = dispatch.default_pipeline(32).as_dict()
    in_use["state_fwd"] = in_use["state_fwd"].replace(BV=16, num_warps=2, num_stages=1)
    with dispatch.override(in_use):
        cands = _candidates(plan, key)
    pinned = [c.config for c in cands if c.pinned]
    assert in_use["state_fwd"] in pinned and cands[0].pinned and len(pinned) == 2
    # SCAN is not tuned: every candidate keeps its default
    assert {c.config["SCAN"] for c in cands} == {"serial"}


def test_halving_finds_the_fastest_and_never_advances_failures():
    fast, broken = CANDS[7].label(), CANDS[3].label()
    medians = {fast: 0.5, broken: None, CANDS[5].label(): 0.9}
    ev = ReplayEvaluator(_log(medians))
    trials = halving(CANDS, ev, Budget(), eta=3)
    win = best(trials)
    assert win.label() == fast and win.effort > 1
    efforts = {e for label, e in ev.calls if label == broken}
    assert efforts == {1}
    assert len([c for c in ev.calls if c[1] == 3]) == 3  # 11 ok // 3 re-timed


def test_wrong_results_never_win():
    medians = {c.label(): None for c in CANDS[:6]}
    medians[CANDS[0].label()] = None
    trials = exhaustive(CANDS, ReplayEvaluator(_log(medians)), Budget())
    assert best(trials).label() not in medians


def test_options_table_parses_and_documents():
    assert parse_options("halving", ["eta=2", "n=4"]) == {"eta": 2, "n": 4}
    assert "halving n, eta, seed" in options_help() and get_strategy("random").options
    try:
        parse_options("random", ["eta=2"])
    except ValueError as exc:
        assert "no option 'eta'" in str(exc)
    else:
        raise AssertionError("unknown option accepted")


def test_plan_reports_pruning_per_chunk_size_and_skips_missing_backward():
    plan = make_plan(TuneOptions(kernels=("intra_fwd", "state_fwd", "l2norm_bwd"),
                                 chunk_sizes=(32, 64)))
    labels = [s.label() for s in plan.searches if s.direction == "fwd"]
    assert labels == ["intra_fwd@BT=32", "intra_fwd@BT=64", "state_fwd@BT=32", "state_fwd@BT=64"]
    intra = plan.searches[0]
    assert intra.total == intra.valid + sum(intra.pruned_by_rule.values())
    assert "BK_le_K" in intra.pruned_reasons and len(intra.pruned) == intra.total - intra.valid
    if not plan.backward_available:
        assert [k for k, _ in plan.skipped] == ["l2norm_bwd"]
    else:
        assert any(s.kernel == "l2norm_bwd" and s.workload == "fwd+bwd" for s in plan.searches)


def test_tune_pins_the_configs_of_every_shipped_profile(tmp_path, monkeypatch):
    """A shipped profile of another GPU seeds the samples (verified and timed like the rest)."""
    from gdn2_kernels import config_files
    from gdn2_kernels.configs import ProblemKey
    from gdn2_kernels.tuner.tune import _candidates

    key = ProblemKey(64, 64, "float32")
    plan = next(kp for kp in make_plan(TuneOptions(kernels=["state_fwd"], chunk_sizes=[32]))
                .searches if kp.kernel == "state_fwd")
    sibling = get_spec_default("state_fwd").replace(BV=16, num_warps=8, num_stages=3)
    entry = config_files.CacheEntry("state_fwd", key.as_dict(), sibling.as_dict())
    config_files.write_entries(tmp_path / "Sibling_GPU.json", [entry], {"name": "Sibling GPU"})
    (tmp_path / "broken.json").write_text("{not json")  # skipped with a warning, not fatal
    monkeypatch.setattr(config_files, "profiles_dir", lambda: tmp_path)
    with pytest.warns(UserWarning, match="broken.json: not valid JSON"):
        assert config_files.shipped_configs("state_fwd", key) == [sibling]
    assert config_files.shipped_configs("state_fwd", ProblemKey(128, 128, "float32")) == []
    cands = _candidates(plan, key)
    assert sibling in [c.config for c in cands if c.pinned]


def get_spec_default(name):
    from gdn2_kernels.configs import get_spec

    return get_spec(name).default_config(BT=32)


def test_tune_pins_the_other_algorithm_of_every_pinned_config():
    """intra_fwd's DIAG_INVERSE is an algorithm choice: the default's doubling twin is pinned."""
    from gdn2_kernels.configs import ProblemKey, get_spec
    from gdn2_kernels.tuner.tune import _candidates

    key = ProblemKey(64, 64, "float32")
    plan = next(kp for kp in make_plan(TuneOptions(kernels=["intra_fwd"], chunk_sizes=[32]))
                .searches if kp.kernel == "intra_fwd")
    cands = _candidates(plan, key)
    pinned = {c.config for c in cands if c.pinned}
    default = get_spec("intra_fwd").default_config(BT=32)
    assert default in pinned and default.replace(DIAG_INVERSE="doubling") in pinned
    assert get_spec("intra_bwd").param("PHASE_D").algorithm
