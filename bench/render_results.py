"""Build ``docs/results.md`` from the committed ``bench/results/*.json`` (numbers never typed).

    python bench/render_results.py [--results bench/results] [--out docs/results.md]

A bench report (``gdn2 bench --save``) becomes its provenance, the measured ceilings, one table
per mode and the speed ratios of ours against each baseline; a PNG with the same stem is shown
above it. A profile report (``gdn2 profile --json``, file ending ``_profile.json``) becomes its
stage table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODE_TITLES = {"fwd": "Forward", "fwdbwd": "Forward + backward", "decode": "Decode (one token)"}


def _f(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _shape(r: dict) -> str:
    return f"{r['B']}x{r['context']}" if r["mode"] == "decode" else f"{r['B']}x{r['T']}"


def render_bench(d: dict, png: str | None) -> list[str]:
    prov = d.get("provenance", {})
    gpu = prov.get("gpu") or {}
    sw = prov.get("software") or {}
    lines = [f"## {gpu.get('name') or 'unknown GPU'}, {d.get('created', '')[:10]}", ""]
    lines.append(f"torch {sw.get('torch')}, triton {sw.get('triton')}, CUDA {sw.get('cuda')}, "
                 f"cuDNN {sw.get('cudnn')}, fla-core {sw.get('fla_core')}; driver "
                 f"{gpu.get('driver')}; commit `{(prov.get('git_commit') or 'unknown')[:12]}`.")
    sample = gpu.get("sample") or {}
    if sample:
        lines.append(f"SM clock {sample.get('sm_clock_mhz')} MHz (max "
                     f"{gpu.get('max_sm_clock_mhz')}), {sample.get('temperature_c')} °C, "
                     f"throttle reasons: {', '.join(sample.get('throttle_reasons') or []) or 'none'}.")
    c = d.get("ceilings")
    if c:
        lines.append(f"Ceilings measured in the same run: bf16 matmul {c['matmul_tflops']:.0f} "
                     f"TFLOP/s, device copy {c['copy_gbps']:.0f} GB/s (read + write).")
    for note in (d.get("note"), (d.get("merged_from") or {}).get("note")):
        if note:
            lines.append(f"Note: {note}")
    o = d["options"]
    lines += [f"H = {o['H']}, D = {o['D']}, {o['dtype']}; median of `triton.testing.do_bench` "
              f"runs with the L2 flushed, warm-up and autotuning excluded.", ""]
    if png:
        lines += [f"![tokens/s]({png})", ""]
    down = [p for p in d["providers"] if not p["available"]]
    if down:
        lines += ["Not run: " + "; ".join(f"`{p['name']}` ({p['reason']})" for p in down) + ".",
                  ""]
    baselines = [p["name"] for p in d["providers"] if p["baseline"]]
    for mode in o["modes"]:
        rows = [r for r in d["rows"] if r["mode"] == mode
                and r["provider"] not in {p["name"] for p in down}]
        if not rows:
            continue
        lines += [f"### {MODE_TITLES.get(mode, mode)}", ""]
        body = []
        for r in rows:
            if r["status"] != "ok":
                body.append([r["provider"], _shape(r), r["status"], "", "", "", "", "",
                             (r.get("reason") or "")[:80]])
                continue
            body.append([r["provider"], _shape(r), _f(r["ms"], ".3f"),
                         _f(r["tokens_per_s"], ".3g"), _f(r["tflops"], ".1f"),
                         _f(r["gbps"], ".0f"), _f(r["pct_roofline"], ".1f"),
                         _f(r["peak_mem_mb"], ".0f"), ""])
        lines += _table(["provider", "B x context" if mode == "decode" else "B x T", "ms",
                         "tokens/s", "TFLOP/s", "GB/s", "% roofline", "peak MiB", "note"], body)
        ours = [r for r in rows if r["provider"] not in baselines and r["status"] == "ok"]
        cols = [b for b in baselines if any(b in r["speedup"] for r in ours)]
        if ours and cols:
            lines += [f"Speed ratio, {MODE_TITLES.get(mode, mode).lower()} (× faster than the "
                      "baseline):", ""]
            lines += _table(["provider", "shape"] + cols,
                            [[r["provider"], _shape(r)] + [_f(r["speedup"].get(b), ".2f")
                                                          for b in cols] for r in ours])
    return lines


def render_profile(d: dict) -> list[str]:
    s = d["shape"]
    lines = [f"### Profile: B={s['B']} T={s['T']} H={s['H']} K=V={s['D']} {s['dtype']}, "
             f"chunk {d['chunk_size']} ({d['config_source']} configs), {d['device']}", ""]
    lines += _table(["phase", "stage", "calls", "ms", "share %", "GB/s", "TFLOP/s"],
                    [[st["phase"], st["stage"], str(st["calls"]), _f(st["ms"], ".4f"),
                      _f(st["share"], ".1f"), _f(st["gbps"], ".0f"), _f(st["tflops"], ".1f")]
                     for st in d["stages"]])
    if d.get("fwd_ms") is not None:
        lines += [f"Forward end to end: {d['fwd_ms']:.4f} ms.", ""]
    if d.get("backward_reason"):
        lines += [f"Backward not profiled: {d['backward_reason']}", ""]
    return lines


def render_correctness_timing(d: dict, title: str) -> list[str]:
    """``scripts/device_fwd_check.py`` / ``device_bwd_check.py``: errors vs fp64 and timings."""
    lines = [f"### {title}: {d['device']}, {d['date'][:10]}", "",
             f"torch {d['torch']}, triton {d['triton']}, CUDA {d['cuda']}, fla-core {d.get('fla')}.",
             ""]
    errs = d.get("correctness") or d.get("gradients") or []
    if errs:
        rows = []
        for r in errs:
            for impl in ("ours", "fla"):
                e = r.get(impl) or (r.get("vs_fp64") if r.get("impl") == impl else None)
                if e:
                    rows.append([impl, r.get("shape", ""), str(r.get("h0", "")),
                                 ", ".join(f"{k} {v:.2e}" for k, v in e.items()
                                           if not k.endswith("vs_fp32"))])
        lines += ["Relative RMS error against the fp64 recurrence on the same bf16 inputs:", ""]
        lines += _table(["impl", "shape", "h0", "errors"], rows)
    timing = d.get("timing") or []
    if timing:
        cols = [k for k in timing[0] if k.endswith(("_ms", "_MiB")) or k.startswith("speedup")]
        lines += _table(["B x T"] + cols, [[f"{r['B']}x{r['T']}"] + [_f(r.get(c), ".3f")
                                                                  for c in cols] for r in timing])
    return lines


def render_decode(d: dict) -> list[str]:
    """``scripts/decode_device.py``: one decode step, ours beside FLA, and torch.compile."""
    lines = [f"### Decode step (T = 1): {d['gpu']}", "",
             f"{d['shape']}; measured copy bandwidth {d['copy_gbps']:.0f} GB/s; CUDA-graph time "
             "of one step; bandwidth counts the state read + write.", ""]
    lines += _table(["B", "ours ms", "ours GB/s", "ours % copy", "FLA ms", "FLA % copy",
                     "x FLA", "o rel RMS"],
                    [[str(r["B"]), _f(r["ours"]["graph_ms"], ".4f"), _f(r["ours"]["gbps"], ".0f"),
                      _f(r["ours"]["pct_copy"], ".1f"), _f((r.get("fla") or {}).get("graph_ms"), ".4f"),
                      _f((r.get("fla") or {}).get("pct_copy"), ".1f"),
                      _f(r.get("speedup_vs_fla"), ".2f"), _f(r["ours"]["o_rel_rms"], ".1e")]
                     for r in d["batches"]])
    c = d.get("compile") or {}
    if c:
        lines += ["torch.compile(fullgraph=True) of the layer: inference "
                  f"{c.get('fullgraph_inference')}, training step {c.get('fullgraph_training')}; "
                  f"prefill + decode vs one forward rel RMS {_f(c.get('prefill_decode_rel_rms'), '.1e')}.",
                  ""]
    return lines


def render_variants(rows: list) -> list[str]:
    """``scripts/device_variants.py``: fwd+bwd with one kernel's config changed at a time."""
    lines = ["### One-kernel config variants (fwd+bwd, spec defaults elsewhere)", ""]
    return lines + _table(["B x T", "variant", "ms", "x default", "max grad diff"],
                          [[f"{r['B']}x{r['T']}", r["variant"].replace("|", "/"),
                            _f(r.get("ms"), ".3f"), _f(r.get("speedup"), ".2f"),
                            _f(r.get("max_grad_rel_diff"), ".1e")] for r in rows])


def render_kernel_report(rows: list) -> list[str]:
    """``scripts/device_kernel_report.py``: registers, spills, shared memory per kernel."""
    lines = ["### Compiler resource report (spec defaults)", ""]
    return lines + _table(["kernel", "registers", "spills", "shared B", "warps", "stages"],
                          [[r["kernel"], str(r["n_regs"]), str(r["n_spills"]), str(r["shared"]),
                            str(r["num_warps"]), str(r["num_stages"])] for r in rows])


def _render_file(d, png: str | None) -> list[str]:
    """Pick the renderer from the file's content."""
    if isinstance(d, list):
        if d and "n_regs" in d[0]:
            return render_kernel_report(d)
        if d and "variant" in d[0]:
            return render_variants(d)
        return []
    if "stages" in d:
        return render_profile(d)
    if "options" in d and "rows" in d:
        return render_bench(d, png)
    if "gradients" in d:
        return render_correctness_timing(d, "Backward check")
    if "correctness" in d:
        return render_correctness_timing(d, "Forward check")
    if "batches" in d:
        return render_decode(d)
    return []


def render(results: Path, out: Path) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python bench/render_results.py` from the JSON files in "
             "`bench/results/` (written on the device by `lab/device/device_run.sh`); do not edit by "
             "hand. Metrics and the roofline are defined in [bench_model.md](bench_model.md).", ""]
    files = sorted(results.glob("*.json"))
    if not files:
        lines += ["No results committed yet.", ""]
    rel = Path("..") / results.resolve().relative_to(REPO) if results.resolve().is_relative_to(
        REPO) else results.resolve()
    for f in files:
        png = f.with_suffix(".png")
        section = _render_file(json.loads(f.read_text()), str(rel / png.name) if png.is_file()
                               else None)
        if section:
            lines += section + [f"Source: `bench/results/{f.name}`.", ""]
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = ap.parse_args(argv)
    render(args.results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
