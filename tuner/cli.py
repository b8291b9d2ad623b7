"""The ``gdn2`` command line: parse arguments, call one library function, render with rich.

No logic lives here (STYLE 20-21): every command calls a library function that returns a
dataclass; ``--json`` prints it as JSON; library errors become one line and exit code 1.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from gdn2_kernels import _env

_env.enable_interpreter_without_gpu(warn=False)  # commands say so themselves

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tune, verify, benchmark and profile the GDN-2 Triton kernels.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Tune, verify, benchmark and profile the GDN-2 Triton kernels."""


def _to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        out = {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for prop in ("ok",):
            if hasattr(type(obj), prop) and isinstance(getattr(type(obj), prop), property):
                out[prop] = getattr(obj, prop)
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def print_json(obj) -> None:
    typer.echo(json.dumps(_to_jsonable(obj), indent=2, default=str))


def _interpreter_note(interpreter: bool) -> None:
    if interpreter:
        console.print("[yellow]No CUDA GPU: kernels run through Triton's interpreter on the CPU "
                      "(small shapes; timings are not GPU timings).[/yellow]")


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------

def _render_verify(report) -> None:
    _interpreter_note(report.interpreter)
    table = Table(title=f"chunk_gdn2 vs fp64 recurrence on {report.device}")
    for col in ("case", "tensor", "rel RMS", "max rel", "tolerance", "ok"):
        table.add_column(col)
    for res in report.results:
        if res.error:
            table.add_row(res.case.label(), "-", "-", "-", "-", f"[red]{res.error}[/red]")
        for e in res.errors:
            mark = "[green]ok[/green]" if e.ok else "[red]FAIL[/red]"
            table.add_row(res.case.label(), e.name, f"{e.rel_rms:.2e}", f"{e.max_rel_err:.2e}",
                          f"{e.tolerance:.0e}", mark)
    console.print(table)
    console.print("[green]all checks passed[/green]" if report.ok else "[red]some checks failed[/red]")


@app.command()
def verify(
    backward: bool = typer.Option(False, "--backward/--forward-only",
                                  help="also check every gradient"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Run chunk_gdn2 with this GPU's configs against the fp64 reference; exit 1 on failure."""
    from tuner.verify import verify as run_verify

    report = run_verify(backward=backward)
    print_json(report) if as_json else _render_verify(report)
    if not report.ok:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------
# bench, profile (library: bench/)
# ------------------------------------------------------------------------------------------------

def _render_bench(report) -> None:
    from bench import report as render

    for line in render.unavailable_lines(report):
        console.print(f"[yellow]unavailable[/yellow] {line}")
    console.print(render.ceilings_line(report))
    for table in render.tables(report):
        console.print(table)
    for line in render.failure_lines(report):
        console.print(f"[yellow]not timed[/yellow] {line}")


@app.command()
def bench(
    mode: list[str] = typer.Option(["fwd", "fwdbwd"], "--mode", "-m",
                                   help="fwd, fwdbwd, decode (repeat for several)"),
    shapes: str = typer.Option("8x2048,4x4096,2x8192,1x16384", help="BxT list, one token budget"),
    heads: int = typer.Option(16, help="H"),
    dim: int = typer.Option(128, help="head dim D (K = V = D)"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
    decode_batches: str = typer.Option("1,8,32,128", help="batch sizes of the decode sweep"),
    decode_context: int = typer.Option(4096, help="attention KV-cache length in decode"),
    provider: list[str] = typer.Option(None, "--provider", "-p",
                                       help="only these providers (repeat); default all"),
    rep_ms: int = typer.Option(200, help="timing budget per row (ms) for do_bench"),
    mamba_src: str = typer.Option(None, help="folder holding mamba_ssm/ (Triton SSD sources)"),
    save: str = typer.Option(None, help="also write the JSON report to this file"),
    plot: str = typer.Option(None, help="write tokens/s plots to this PNG (needs matplotlib)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Time chunk_gdn2 against FLA, SDPA (flash, cuDNN) and Mamba-2 on the same inputs."""
    from bench import report as render
    from bench.runner import BenchOptions, parse_ints, parse_shapes, run_bench

    opts = BenchOptions(modes=tuple(mode), shapes=parse_shapes(shapes), H=heads, D=dim,
                        dtype=dtype, decode_batches=parse_ints(decode_batches, "--decode-batches"),
                        decode_context=decode_context, providers=tuple(provider) or None,
                        rep_ms=rep_ms, mamba_src=mamba_src)
    report = run_bench(opts, progress=lambda msg: err_console.print(f"[dim]{msg}[/dim]"))
    if save:
        render.save_json(report, save)
    if plot:
        render.plot(report, plot)
    typer.echo(render.to_json(report)) if as_json else _render_bench(report)


@app.command()
def profile(
    shape: str = typer.Option("2x8192", help="BxT"),
    heads: int = typer.Option(16, help="H"),
    dim: int = typer.Option(128, help="head dim D (K = V = D)"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
    backward: bool = typer.Option(True, "--backward/--forward-only",
                                  help="also profile the backward (when it exists)"),
    reps: int = typer.Option(20, help="passes; each stage's median is reported"),
    ncu: str = typer.Option(None, help="run Nsight Compute on this stage (e.g. intra_fwd)"),
    ncu_out: str = typer.Option("ncu", help="folder for the Nsight Compute report"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Per-stage time, share, GB/s and TFLOP/s of our forward and backward."""
    from bench import report as render
    from bench.model import Shape
    from bench.profile import profile as run_profile
    from bench.runner import parse_shapes

    (b, t), = parse_shapes(shape)
    report = run_profile(Shape(b, t, heads, dim, dtype), backward=backward, reps=reps,
                         ncu_stage=ncu, ncu_out=ncu_out)
    if as_json:
        print_json(report)
        return
    console.print(render.profile_table(report))
    for line in render.profile_lines(report):
        console.print(line)


def main() -> None:
    try:
        app()
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
