"""Build ``docs/results.md`` (the product's measurements) and ``docs/experiments.md`` (the lab's)
from the committed ``bench/results/*.json``; numbers are never typed.

    python bench/render_results.py [--results bench/results] [--out docs/results.md]
                                   [--experiments docs/experiments.md]

A file is rendered by the schema it declares (its ``schema`` field), newest file first:

- ``gdn2.bench/1``: a ``gdn2 bench --save`` report: its provenance, the measured ceilings, one
  table per mode and the speed ratios of ours against each baseline; a PNG with the same stem is
  shown above it. ``gdn2.stages/1``: a ``gdn2 stages --json`` report, its stage table and the
  configs as they launched. Both go to ``docs/results.md``.
- ``gdn2.lab/1``: a lab experiment (``lab/*.py``), with its ``experiment`` name; it goes to
  ``docs/experiments.md``.

Files written before the schema field are read as version 0 of the layout that wrote them
(:data:`LEGACY`, one rule per layout); anything else is listed as not rendered.
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
    clock = "`triton.testing.do_bench`" if "schema" not in d else "`gdn2_kernels.timing`"
    lines += [f"H = {o['H']}, D = {o['D']}, {o['dtype']}; median of {clock} runs with the L2 "
              "flushed, warm-up and autotuning excluded.", ""]
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


def render_stages(d: dict, png: str | None = None) -> list[str]:
    s = d["shape"]
    lines = [f"### Stages: B={s['B']} T={s['T']} H={s['H']} K=V={s['D']} {s['dtype']}, "
             f"chunk {d['chunk_size']} ({d['config_source']} configs), {d['device']}", ""]
    lines += _table(["phase", "stage", "calls", "ms", "share %", "GB/s", "TFLOP/s"],
                    [[st["phase"], st["stage"], str(st["calls"]), _f(st["ms"], ".4f"),
                      _f(st["share"], ".1f"), _f(st["gbps"], ".0f"), _f(st["tflops"], ".1f")]
                     for st in d["stages"]])
    if d.get("fwd_ms") is not None:
        lines += [f"Forward end to end: {d['fwd_ms']:.4f} ms.", ""]
    if d.get("backward_reason"):
        lines += [f"Backward not profiled: {d['backward_reason']}", ""]
    if d.get("launch_changes"):
        lines += ["Launched: " + "; ".join(d["launch_changes"]) + ".", ""]
    return lines


def _lab_header(d: dict) -> tuple[str, str, str]:
    """``(device, date, software line)`` of a lab file: from its ``provenance`` (``gdn2.lab/1``)
    or from the top-level fields the scripts wrote before."""
    prov = d.get("provenance")
    if prov:
        sw = prov.get("software") or {}
        return ((prov.get("gpu") or {}).get("name") or "unknown GPU", prov.get("date", ""),
                f"torch {sw.get('torch')}, triton {sw.get('triton')}, CUDA {sw.get('cuda')}, "
                f"fla-core {sw.get('fla_core')}")
    return (d.get("device") or d.get("gpu") or "unknown GPU", d.get("date", ""),
            f"torch {d.get('torch')}, triton {d.get('triton')}, CUDA {d.get('cuda')}, "
            f"fla-core {d.get('fla')}")


def render_correctness_timing(d: dict, title: str) -> list[str]:
    """``lab/device_fwd_check.py`` / ``device_bwd_check.py``: errors vs fp64 and timings."""
    device, date, software = _lab_header(d)
    lines = [f"### {title}: {device}, {date[:10]}", "", software + ".", ""]
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
    """``lab/decode_device.py``: one decode step, ours beside FLA, and torch.compile."""
    lines = [f"### Decode step (T = 1): {_lab_header(d)[0]}", "",
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
    """``lab/device_variants.py``: fwd+bwd with one kernel's config changed at a time."""
    lines = ["### One-kernel config variants (fwd+bwd, spec defaults elsewhere)", ""]
    return lines + _table(["B x T", "variant", "ms", "x default", "max grad diff"],
                          [[f"{r['B']}x{r['T']}", r["variant"].replace("|", "/"),
                            _f(r.get("ms"), ".3f"), _f(r.get("speedup"), ".2f"),
                            _f(r.get("max_grad_rel_diff"), ".1e")] for r in rows])


def render_kernel_report(rows: list) -> list[str]:
    """``lab/device_kernel_report.py``: registers, spills, shared memory per kernel."""
    lines = ["### Compiler resource report (spec defaults)", ""]
    return lines + _table(["kernel", "registers", "spills", "shared B", "warps", "stages"],
                          [[r["kernel"], str(r["n_regs"]), str(r["n_spills"]), str(r["shared"]),
                            str(r["num_warps"]), str(r["num_stages"])] for r in rows])


def render_cp_summary(d: dict) -> list[str]:
    """``lab/device_cp_summary.py``: the span summary's cost beside a forward of the same span,
    and context parallelism's accuracy at emulated ranks."""
    device, date, software = _lab_header(d)
    lines = [f"### Span summaries (context parallelism): {device}, {date[:10]}", "",
             software + ".", ""]
    timing = [r for r in d.get("timing") or [] if "forward_ms" in r]
    if timing:
        lines += ["One sequence, H = 16, K = V = 128, bf16, median ms. `summary` is the whole "
                  "`chunk_gdn2_summary` call (intra-chunk forward included); `pass` is what a "
                  "rank adds to its own forward in `chunk_gdn2_cp` (H; H and M), and G what it "
                  "adds to its backward.", ""]
        lines += _table(
            ["T", "forward", "summary H, M", "summary H", "pass H", "pass H, M",
             "pass H, M / forward", "fwd+bwd", "pass G", "pass G / fwd+bwd"],
            [[str(r["T"]), _f(r["forward_ms"], ".3f"), _f(r["summary_H_M_ms"], ".3f"),
              _f(r["summary_H_ms"], ".3f"), _f(r["cp_pass_H_ms"], ".3f"),
              _f(r["cp_pass_H_M_ms"], ".3f"), _f(r["cp_pass_H_M_ms"] / r["forward_ms"], ".2f"),
              _f(r["forward_backward_ms"], ".3f"), _f(r["cp_pass_G_ms"], ".3f"),
              _f(r["cp_pass_G_ms"] / r["forward_backward_ms"], ".2f")] for r in timing])
    acc = [r for r in d.get("accuracy") or [] if "vs_single" in r]
    if acc:
        lines += ["Emulated ranks against the single-device op and the fp64 recurrence: largest "
                  "relative RMS error over o, the final states and every gradient.", ""]
        lines += _table(
            ["ranks", "layout", "dtype", "decay", "T", "H", "cu_seqlens", "vs single",
             "vs fp64", "single vs fp64", "within tolerance"],
            [[str(r["world"]), r["layout"], r["dtype"], r.get("decay", "normal"), str(r["T"]),
              str(r["H"]), ",".join(map(str, r["cu_seqlens"])),
              _f(max(r["vs_single"].values()), ".1e"), _f(max(r["vs_fp64"].values()), ".1e"),
              _f(max(r["single_vs_fp64"].values()), ".1e"), str(r["within_tolerance"])]
             for r in acc])
    return lines


def _lab(d) -> list[str]:
    """A lab experiment, by its ``experiment`` name (or, before the schema, its layout)."""
    rows = d.get("rows") if isinstance(d, dict) and d.get("schema") else d
    name = d.get("experiment") if isinstance(d, dict) else None
    if name == "kernel_report" or (isinstance(rows, list) and rows and "n_regs" in rows[0]):
        return render_kernel_report(rows)
    if name == "variants" or (isinstance(rows, list) and rows and "variant" in rows[0]):
        return render_variants(rows)
    if not isinstance(d, dict):
        return []
    if name == "bwd_check" or "gradients" in d:
        return render_correctness_timing(d, "Backward check")
    if name == "fwd_check" or "correctness" in d:
        return render_correctness_timing(d, "Forward check")
    if name == "cp_summary":
        return render_cp_summary(d)
    if name == "decode" or "batches" in d:
        return render_decode(d)
    return []


# Files written before the schema field: version 0 of the layout that wrote them, one rule each.
LEGACY = (
    ("gdn2.bench/0", lambda d: isinstance(d, dict) and {"options", "rows", "providers"} <= set(d)),
    ("gdn2.stages/0",
     lambda d: isinstance(d, dict) and {"stages", "chunk_size", "shape"} <= set(d)),
    ("gdn2.lab/0", lambda d: bool(_lab(d))),
)
RENDERERS = {"gdn2.bench": ("product", render_bench), "gdn2.stages": ("product", render_stages),
             "gdn2.lab": ("lab", lambda d, png: _lab(d))}


def schema_of(d) -> str | None:
    """The schema a results file declares, or the legacy layout it has, or None."""
    if isinstance(d, dict) and isinstance(d.get("schema"), str):
        return d["schema"]
    return next((name for name, matches in LEGACY if matches(d)), None)


def render(results: Path, out: Path, experiments: Path | None = None) -> str:
    """Write ``out`` (product results) and ``experiments`` (lab results, default beside ``out``);
    returns the text of ``out``."""
    experiments = experiments or out.with_name("experiments.md")
    product = ["# Benchmark results", "",
               "Generated by `python bench/render_results.py` from the `gdn2 bench` and `gdn2 "
               "stages` reports in `bench/results/` (written on the device by "
               "`lab/device/device_run.sh`), newest first; do not edit by hand. Metrics and the "
               "roofline are defined in [bench_model.md](bench_model.md); development "
               "experiments are on their own page, [experiments.md](experiments.md).", ""]
    lab = ["# Lab experiments", "",
           "Generated by `python bench/render_results.py` from the lab's files in "
           "`bench/results/` (written on the device by the one-off scripts in `lab/`), newest "
           "first; do not edit by hand. The product's measurements are in "
           "[results.md](results.md).", ""]
    files = sorted(results.glob("*.json"), key=lambda f: f.name, reverse=True)
    rel = Path("..") / results.resolve().relative_to(REPO) if results.resolve().is_relative_to(
        REPO) else results.resolve()
    skipped = []
    for f in files:
        d = json.loads(f.read_text())
        schema = schema_of(d)
        family = (schema or "").split("/")[0]
        if family not in RENDERERS:
            skipped.append(f.name)
            continue
        page, renderer = RENDERERS[family]
        png = f.with_suffix(".png")
        section = renderer(d, str(rel / png.name) if png.is_file() else None)
        if section:
            (product if page == "product" else lab).extend(
                section + [f"Source: `bench/results/{f.name}` ({schema}).", ""])
        else:
            skipped.append(f.name)
    if len(product) == 3:
        product += ["No results committed yet.", ""]
    if skipped:
        lab += ["Not rendered (no known schema): " + ", ".join(f"`{n}`" for n in skipped) + ".",
                ""]
    text = "\n".join(product).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    experiments.parent.mkdir(parents=True, exist_ok=True)
    experiments.write_text("\n".join(lab).rstrip() + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    ap.add_argument("--experiments", type=Path, default=None)
    args = ap.parse_args(argv)
    render(args.results, args.out, args.experiments)
    print(f"wrote {args.out} and {args.experiments or args.out.with_name('experiments.md')}")


if __name__ == "__main__":
    main()
