"""Rendering of a :class:`gdn2_kernels.bench.runner.BenchReport`: rich tables, the JSON file, the
PNG plot.

The CLI only calls these; tests call them directly with fake timings.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.table import Table

from gdn2_kernels.bench.runner import OK, BenchReport, BenchRow, report_dict

MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward + backward", "decode": "decode (1 token)"}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _shape(r: BenchRow) -> str:
    return f"{r.B}x{r.context}" if r.mode == "decode" else f"{r.B}x{r.T}"


def metrics_table(report: BenchReport, mode: str) -> Table:
    """One row per (shape, provider): latency, throughput, model rates, roofline, memory."""
    gpu = report.provenance.get("gpu", {}).get("name") or "no GPU"
    shape_col = "B x context" if mode == "decode" else "B x T"
    t = Table(title=f"{MODE_TITLES[mode]} on {gpu}")
    for col in ("provider", shape_col, "ms", "tokens/s", "TFLOP/s", "GB/s", "% roofline",
                "peak MiB", "status"):
        t.add_column(col, justify="left" if col in ("provider", "status") else "right")
    down = {p.name for p in report.providers if not p.available}
    for r in report.rows_for(mode):
        if r.provider in down:
            continue             # listed once, with the reason, by unavailable_lines()
        if r.status == OK:
            t.add_row(r.provider, _shape(r), _fmt(r.ms, ".3f"), _fmt(r.tokens_per_s, ".3g"),
                      _fmt(r.tflops, ".1f"), _fmt(r.gbps, ".0f"),
                      _fmt(r.pct_roofline, ".1f") + (f" ({r.bound[0]})" if r.bound else ""),
                      _fmt(r.peak_mem_mb, ".0f"), "[green]ok[/green]")
        else:
            t.add_row(r.provider, _shape(r), "-", "-", "-", "-", "-", "-",
                      f"[yellow]{r.status}[/yellow]")
    return t


def speedup_table(report: BenchReport, mode: str) -> Table | None:
    """Speed ratio (baseline ms / ours ms) of each non-baseline provider against each baseline."""
    baselines = [p.name for p in report.providers if p.baseline]
    ours = [p.name for p in report.providers if not p.baseline]
    rows = [r for r in report.rows_for(mode) if r.provider in ours and r.status == OK]
    cols = [b for b in baselines if any(b in r.speedup for r in rows)]
    if not rows or not cols:
        return None
    t = Table(title=f"{MODE_TITLES[mode]}: speed ratio (x faster than the baseline)")
    t.add_column("provider")
    t.add_column("B x context" if mode == "decode" else "B x T", justify="right")
    for b in cols:
        t.add_column(b, justify="right")
    for r in rows:
        t.add_row(r.provider, _shape(r), *(_fmt(r.speedup.get(b), ".2f") for b in cols))
    return t


def unavailable_lines(report: BenchReport) -> list[str]:
    """'name: reason' for every provider that could not run at all."""
    return [f"{p.name}: {p.reason}" for p in report.providers if not p.available]


def failure_lines(report: BenchReport) -> list[str]:
    """'provider mode (shapes): status: reason' for rows of runnable providers that failed."""
    down = {p.name for p in report.providers if not p.available}
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for r in report.rows:
        if r.status != OK and r.provider not in down:
            groups.setdefault((r.provider, r.mode, r.status, r.reason or ""), []).append(_shape(r))
    return [f"{prov} {mode} ({', '.join(shapes)}): {st}: {reason}"
            for (prov, mode, st, reason), shapes in groups.items()]


def tables(report: BenchReport) -> list[Table]:
    out: list[Table] = []
    for mode in report.options.modes:
        out.append(metrics_table(report, mode))
        sp = speedup_table(report, mode)
        if sp is not None:
            out.append(sp)
    return out


def ceilings_line(report: BenchReport) -> str:
    c = report.ceilings
    if c is None:
        return "ceilings: not measured (no provider could run)"
    return (f"ceilings measured in this run: bf16 matmul {c.matmul_tflops:.0f} TFLOP/s, "
            f"device copy {c.copy_gbps:.0f} GB/s (read + write)")


def to_json(report: BenchReport) -> str:
    return json.dumps(report_dict(report), indent=2, default=str)


def save_json(report: BenchReport, path: str | os.PathLike) -> Path:
    """Write the report atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(to_json(report) + "\n")
    os.replace(tmp, path)
    return path


def plot(data: BenchReport | dict, path: str | os.PathLike) -> Path:
    """Tokens/s against sequence length per provider, one panel per mode (decode: vs batch).

    Takes a report or its JSON dict (``bench/render_results.py`` plots committed files). Needs
    matplotlib (the ``plot`` extra); raises RuntimeError naming it when missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"--plot needs matplotlib (pip install 'gdn2-kernels[plot]'): {exc}") \
            from None
    d = report_dict(data) if isinstance(data, BenchReport) else data
    modes = list(d["options"]["modes"])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in d["rows"] if r["mode"] == mode and r["status"] == OK]
        xkey = "B" if mode == "decode" else "T"
        for name in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r[xkey], r["tokens_per_s"]) for r in rows if r["provider"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (one token each)" if mode == "decode" else
                      "sequence length T (fixed token budget)")
        ax.set_ylabel("tokens/s")
        ax.set_title(MODE_TITLES[mode])
        ax.grid(True, which="both", alpha=0.3)
        if rows:
            ax.legend(fontsize=8)
    gpu = (d.get("provenance", {}).get("gpu") or {}).get("name") or "no GPU"
    fig.suptitle(f"GDN-2 and baselines on {gpu}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def stages_table(report) -> Table:
    """Per-stage table of a :class:`gdn2_kernels.bench.stages.StagesReport`."""
    s = report.shape
    t = Table(title=f"chunk_gdn2 stages, B={s.B} T={s.T} H={s.H} K=V={s.D} {s.dtype}, "
                    f"chunk {report.chunk_size} ({report.config_source} configs) on {report.device}")
    for col in ("phase", "stage", "calls", "ms", "share %", "GB/s", "TFLOP/s"):
        t.add_column(col, justify="left" if col in ("phase", "stage") else "right")
    for st in report.stages:
        t.add_row(st.phase, st.stage, str(st.calls), f"{st.ms:.4f}", f"{st.share:.1f}",
                  f"{st.gbps:.0f}", _fmt(st.tflops, ".1f"))
    return t


def stages_lines(report) -> list[str]:
    """End-to-end times next to the stage sum (the gap is launch overhead and torch glue), and
    what launch time changed in the resolved configs."""
    lines = [f"sum of stages: {report.stage_ms:.4f} ms per pass (median of {report.reps})"]
    if report.fwd_ms is not None:
        lines.append(f"forward end to end: {report.fwd_ms:.4f} ms")
    if report.fwdbwd_ms is not None:
        lines.append(f"forward + backward end to end: {report.fwdbwd_ms:.4f} ms")
    for change in report.launch_changes:
        lines.append(f"launched: {change}")
    if report.interpreter:
        lines.append("interpreter: wall-clock times of Triton's CPU interpreter, not GPU times")
    if report.ncu is not None:
        lines.append(f"ncu ({report.ncu.stage}): exit {report.ncu.returncode}, report "
                     f"{report.ncu.report_path}")
    return lines
