"""run_bench with fake providers and timings; tables, JSON and plot from the report."""
from __future__ import annotations

import json

import pytest
from rich.console import Console

from gdn2_kernels.bench import report as render
from gdn2_kernels.bench.runner import OK, UNAVAILABLE, BenchOptions, report_dict, run_bench
from gdn2_kernels.options import parse_ints, parse_shapes

OPTS = BenchOptions(modes=("fwd", "fwdbwd"), shapes=((4, 1024), (1, 8192)))


@pytest.fixture
def report(fake_measurer, fake_registry, fake_provenance):
    return run_bench(OPTS, measurer=fake_measurer, registry=fake_registry,
                     provenance=fake_provenance)


def _row(rep, provider, mode, T):
    return next(r for r in rep.rows if (r.provider, r.mode, r.T) == (provider, mode, T))


def test_unavailable_provider_is_listed_with_reason(report):
    st = {p.name: p for p in report.providers}
    assert not st["missing"].available and "fakepkg" in st["missing"].reason
    rows = [r for r in report.rows if r.provider == "missing"]
    assert len(rows) == 4 and all(r.status == UNAVAILABLE and "fakepkg" in r.reason for r in rows)
    assert any("missing: fakepkg" in line for line in render.unavailable_lines(report))


def test_not_implemented_row_is_unavailable_and_the_run_goes_on(report):
    r = _row(report, "ours", "fwdbwd", 8192)
    assert r.status == UNAVAILABLE and "backward not written" in r.reason
    assert _row(report, "flaish", "fwdbwd", 8192).status == OK
    assert any("ours fwdbwd (1x8192)" in line for line in render.failure_lines(report))


def test_metrics_and_speedups(report):
    r = _row(report, "ours", "fwd", 1024)
    assert r.ms == 0.5 and r.tokens_per_s == pytest.approx(4096 / 0.5e-3)
    assert r.speedup == {"flaish": pytest.approx(2.0), "attn": pytest.approx(0.8)}
    assert r.tflops > 0 and r.gbps > 0 and 0 < r.pct_roofline and r.bound in ("compute", "memory")
    assert _row(report, "ours", "fwdbwd", 1024).peak_mem_mb == 64
    assert _row(report, "ours", "fwd", 1024).peak_mem_mb is None       # memory: fwd+bwd only
    assert "flaish" not in _row(report, "flaish", "fwd", 1024).speedup


def test_tables_render(report):
    console = Console(record=True, width=200)
    for t in render.tables(report):
        console.print(t)
    text = console.export_text()
    assert "forward + backward on Fake GPU 80GB" in text
    assert "speed ratio" in text and "2.00" in text
    assert "missing" not in text          # unavailable providers: listed once, not per shape
    assert render.ceilings_line(report).startswith("ceilings measured in this run: bf16 matmul 700")


def test_json_has_provenance_options_and_rows(report, tmp_path):
    d = json.loads(render.to_json(report))
    assert d["schema_version"] == 1 and d["provenance"]["gpu"]["name"] == "Fake GPU 80GB"
    assert d["ceilings"] == {"matmul_tflops": 700.0, "copy_gbps": 3000.0}
    assert d["options"]["shapes"] == [[4, 1024], [1, 8192]]
    row = next(r for r in d["rows"] if r["provider"] == "ours" and r["mode"] == "fwd")
    assert row["label"] == "4x1024" and row["speedup"]["flaish"] == pytest.approx(2.0)
    path = render.save_json(report, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text()) == d


def test_plot_writes_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    out = render.plot(report, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = render.plot(report_dict(report), tmp_path / "q.png")       # from committed JSON
    assert out2.stat().st_size > 0


def test_decode_mode_rows(fake_measurer, fake_registry, fake_provenance):
    opts = BenchOptions(modes=("decode",), decode_batches=(1, 4), providers=("missing", "ours"))
    rep = run_bench(opts, measurer=fake_measurer, registry=fake_registry,
                    provenance=fake_provenance)
    assert [(r.provider, r.B, r.context) for r in rep.rows] == [("missing", 1, 4096),
                                                                ("missing", 4, 4096)]
    assert rep.ceilings is None  # no provider asked for can run in decode: nothing to compare
    assert rep.notes == ["ours has no decode mode (it runs in fwd, fwdbwd): no decode rows for it"]
    assert rep.timed == 0


def test_bad_mode_and_parsers(fake_measurer, fake_registry):
    with pytest.raises(ValueError, match="mode"):
        run_bench(BenchOptions(modes=("train",)), measurer=fake_measurer,
                  registry=fake_registry, provenance={})
    assert parse_shapes("8x2048, 1X16384") == ((8, 2048), (1, 16384))
    with pytest.raises(ValueError, match="BxT"):
        parse_shapes("8by2048")
    assert parse_ints("1,8,32", "b") == (1, 8, 32)
    with pytest.raises(ValueError, match="positive"):
        parse_ints("0,1", "b")


def test_checkpoint_gets_every_finished_row(fake_measurer, fake_registry, fake_provenance,
                                            tmp_path):
    """An interrupted bench keeps its rows: --save is rewritten after each one."""
    seen = []
    path = tmp_path / "partial.json"

    def checkpoint(part):
        seen.append(len(part.rows))
        render.save_json(part, path)

    rep = run_bench(OPTS, measurer=fake_measurer, registry=fake_registry,
                    provenance=fake_provenance, checkpoint=checkpoint)
    assert seen == list(range(1, len(rep.rows) + 1))
    assert json.loads(path.read_text())["rows"] == json.loads(render.to_json(rep))["rows"]


def test_resume_keeps_saved_rows_and_measures_the_rest(fake_measurer, fake_registry,
                                                       fake_provenance, tmp_path):
    from gdn2_kernels.bench.runner import rows_from_json

    first = run_bench(BenchOptions(modes=("fwd",), shapes=((4, 1024),)), measurer=fake_measurer,
                      registry=fake_registry, provenance=fake_provenance)
    path = render.save_json(first, tmp_path / "r.json")
    kept = rows_from_json(path, OPTS)
    for r in kept:  # mark the saved rows so reuse is visible
        if r.ms is not None:
            r.ms *= 10
    rep = run_bench(BenchOptions(modes=("fwd", "fwd"), shapes=((4, 1024), (1, 8192))),
                    measurer=fake_measurer, registry=fake_registry,
                    provenance=fake_provenance, resume=kept)
    keys = [(r.provider, r.mode, r.B, r.T) for r in rep.rows]
    assert len(keys) == len(set(keys))  # a repeated mode is measured once
    for r in rep.rows:
        old = next((k for k in kept if (k.provider, k.key) == (r.provider, r.key)), None)
        if old is not None and old.ms is not None:
            assert r.ms == old.ms and r.tokens_per_s is not None
    assert {r.T for r in rep.rows} == {1024, 8192}
    with pytest.raises(ValueError, match="H=16"):
        rows_from_json(path, BenchOptions(H=8))


def test_long_shapes_run_only_for_long_context_providers(fake_measurer, fake_registry,
                                                         fake_provenance):
    import dataclasses

    fake_registry.providers["ours"] = dataclasses.replace(fake_registry.get("ours"),
                                                          long_context=True)
    opts = BenchOptions(modes=("fwd",), shapes=((4, 1024),), long_shapes=((1, 4096),))
    rep = run_bench(opts, measurer=fake_measurer, registry=fake_registry,
                    provenance=fake_provenance)
    assert _row(rep, "ours", "fwd", 4096).status == OK
    skipped = _row(rep, "flaish", "fwd", 4096)
    assert skipped.status == "skipped" and "linear in T" in skipped.reason
    assert _row(rep, "flaish", "fwd", 1024).status == OK
