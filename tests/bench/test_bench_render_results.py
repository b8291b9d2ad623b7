"""docs/results.md is generated from committed JSON: numbers come from the files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from gdn2_kernels.bench.report import save_json
from gdn2_kernels.bench.runner import BenchOptions, run_bench

# The repository's page builder (a script beside bench/results/, not part of the package).
_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "render_results.py"
_spec = importlib.util.spec_from_file_location("render_results", _SCRIPT)
render_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_results)


def test_results_page_from_json(tmp_path, fake_measurer, fake_registry, fake_provenance):
    rep = run_bench(BenchOptions(shapes=((4, 1024),)), measurer=fake_measurer,
                    registry=fake_registry, provenance=fake_provenance)
    results = tmp_path / "results"
    save_json(rep, results / "2026-01-01_Fake_GPU.json")
    (results / "2026-01-01_Fake_GPU.png").write_bytes(b"\x89PNG")
    (results / "2026-01-01_Fake_GPU_profile.json").write_text(json.dumps({
        "shape": {"B": 2, "T": 8192, "H": 16, "D": 128, "dtype": "bfloat16", "context": 0},
        "chunk_size": 64, "config_source": "default", "device": "cuda:0", "fwd_ms": 0.5,
        "backward_reason": None, "stages": [{"phase": "fwd", "stage": "intra_fwd", "calls": 1,
                                             "ms": 0.25, "share": 50.0, "gbps": 1234.0,
                                             "tflops": 55.5}]}))
    text = render_results.render(results, tmp_path / "docs" / "results.md")
    assert "## Fake GPU 80GB" in text
    assert "bf16 matmul 700 TFLOP/s" in text
    assert "| ours | 4x1024 | 0.500 |" in text
    assert "| ours | 4x1024 | 2.00 | 0.80 |" in text            # speed ratio vs flaish, attn
    assert "`missing` (fakepkg" in text
    assert "2026-01-01_Fake_GPU.png)" in text
    assert "| fwd | intra_fwd | 1 | 0.2500 | 50.0 | 1234 | 55.5 |" in text
    assert (tmp_path / "docs" / "results.md").read_text() == text


def test_files_render_by_their_schema_product_first_and_experiments_apart(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    stages = {"schema": "gdn2.stages/1",
              "shape": {"B": 1, "T": 64, "H": 1, "D": 32, "dtype": "float32", "context": 0},
              "chunk_size": 64, "config_source": "default", "device": "cuda:0", "fwd_ms": None,
              "stages": [{"phase": "fwd", "stage": "intra_fwd", "calls": 1, "ms": 0.1,
                          "share": 100.0, "gbps": 1.0, "tflops": None}],
              "launch_changes": ["state_fwd: BV 64 -> 16, num_warps 8 -> 4 (...)"]}
    lab = {"schema": "gdn2.lab/1", "experiment": "fwd_check",
           "provenance": {"date": "2026-02-02T00:00:00", "gpu": {"name": "Lab GPU"},
                          "software": {"torch": "2.13", "triton": "3.9"}},
           "correctness": [], "timing": []}
    (results / "2026-02-01_X_stages.json").write_text(json.dumps(stages))
    (results / "2026-02-02_X_fwd_check.json").write_text(json.dumps(lab))
    (results / "2026-02-03_X_unknown.json").write_text(json.dumps({"what": 1}))
    text = render_results.render(results, tmp_path / "results.md")
    experiments = (tmp_path / "experiments.md").read_text()
    assert "### Stages: B=1 T=64" in text and "Launched: state_fwd: BV 64 -> 16" in text
    assert "Forward check" not in text and "[experiments.md](experiments.md)" in text
    assert "### Forward check: Lab GPU, 2026-02-02" in experiments
    assert "`2026-02-03_X_unknown.json`" in experiments  # listed, not guessed
    assert render_results.schema_of({"options": {}, "rows": [], "providers": []}) == "gdn2.bench/0"
