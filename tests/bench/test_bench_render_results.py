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
