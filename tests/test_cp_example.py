"""The torchrun example of docs/context_parallel.md runs: 2 gloo ranks on the CPU (kernels
through the interpreter), each checking its slice against chunk_gdn2 on the whole batch."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- example: cp_example.py"


def example_source() -> str:
    text = (REPO / "docs" / "context_parallel.md").read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_docs_example_runs_under_torchrun(tmp_path):
    script = tmp_path / "cp_example.py"
    script.write_text(example_source())
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["CUDA_VISIBLE_DEVICES"] = ""          # the CPU path (gloo, interpreter) on any machine
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "rank 0 of 2: ok" in out and "rank 1 of 2: ok" in out, out[-4000:]
