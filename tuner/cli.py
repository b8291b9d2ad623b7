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


def main() -> None:
    try:
        app()
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
