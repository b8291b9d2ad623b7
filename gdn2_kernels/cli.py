"""The ``gdn2`` command line: parse arguments, call one library function, render with rich.

No logic lives here (STYLE 20-21): every command calls a library function that returns a
dataclass; ``--json`` prints it as JSON; library errors become one line and exit code 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gdn2_kernels.tuner.strategies import options_help

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tune, verify and benchmark the GDN-2 Triton kernels.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Tune, verify and benchmark the GDN-2 Triton kernels."""


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


_INTERPRETER_NOTE = ("[yellow]No CUDA GPU: kernels run through Triton's interpreter on the CPU "
                     "(small shapes; timings are not GPU timings).[/yellow]")


def _interpreter_note(interpreter: bool) -> None:
    if interpreter:
        console.print(_INTERPRETER_NOTE)


def _announce_interpreter(as_json: bool, extra: str = "") -> None:
    """Before a command runs kernels: say that they run in the interpreter (stderr with --json,
    so stdout stays JSON)."""
    from gdn2_kernels import _device

    if _device.interpreter_active():
        (err_console if as_json else console).print(
            _INTERPRETER_NOTE + (f" [yellow]{extra}[/yellow]" if extra else ""))


@contextlib.contextmanager
def _usage_errors():
    """An option the library refuses (``OptionError``) -> a usage error, exit code 2."""
    from gdn2_kernels.options import OptionError

    try:
        yield
    except OptionError as exc:
        raise typer.BadParameter(exc.detail, param_hint=f"'{exc.option}'") from None


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------

def _render_verify(report) -> None:
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
    from gdn2_kernels.tuner.verify import verify as run_verify

    _announce_interpreter(as_json)
    report = run_verify(backward=backward)
    print_json(report) if as_json else _render_verify(report)
    if not report.ok:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------
# bench, stages (library: gdn2_kernels/bench/)
# ------------------------------------------------------------------------------------------------

def _render_bench(report) -> None:
    from gdn2_kernels.bench import report as render

    for note in report.notes:
        console.print(f"[yellow]note[/yellow] {escape(note)}")
    for line in render.unavailable_lines(report):
        console.print(f"[yellow]unavailable[/yellow] {escape(line)}")
    console.print(render.ceilings_line(report))
    for table in render.tables(report):
        console.print(table)
    for line in render.failure_lines(report):
        console.print(f"[yellow]not timed[/yellow] {escape(line)}")


@app.command()
def bench(
    mode: list[str] = typer.Option(["fwd", "fwdbwd"], "--mode", "-m",
                                   help="fwd, fwdbwd, decode (repeat for several)"),
    shapes: str = typer.Option("8x2048,4x4096,2x8192,1x16384", help="BxT list, one token budget"),
    long: bool = typer.Option(False, "--long", help="also 1x65536, for the providers whose time "
                                                   "is linear in T (ours, cudnn-kda)"),
    heads: int = typer.Option(16, help="H"),
    dim: int = typer.Option(128, help="head dim D (K = V = D)"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
    decode_batches: str = typer.Option("1,8,32,128", help="batch sizes of the decode sweep"),
    decode_context: int = typer.Option(4096, help="attention KV-cache length in decode"),
    provider: list[str] = typer.Option(None, "--provider", "-p",
                                       help="only these providers (repeat); default all"),
    rep_ms: int = typer.Option(200, help="timing budget per row (ms): runs of the clock the "
                                          "tuner uses (gdn2_kernels.timing)"),
    mamba_src: str = typer.Option(None, help="folder holding mamba_ssm/ (Triton SSD sources)"),
    save: str = typer.Option(None, help="also write the JSON report to this file (rewritten "
                                        "after every row, so an interrupted run keeps its rows)"),
    resume: bool = typer.Option(False, help="keep the rows already in the --save file and "
                                            "measure only the missing ones"),
    plot: str = typer.Option(None, help="write tokens/s plots to this PNG (needs matplotlib)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Time chunk_gdn2 against FLA, cuDNN (KDA, attention), SDPA flash and Mamba-2 on the same
    inputs."""
    from gdn2_kernels.bench import report as render
    from gdn2_kernels.bench.runner import (LONG_SHAPES, BenchOptions, check_options,
                                           rows_from_json, run_bench)
    from gdn2_kernels.options import parse_ints, parse_shapes

    with _usage_errors():
        opts = BenchOptions(modes=tuple(mode), shapes=parse_shapes(shapes),
                            long_shapes=LONG_SHAPES if long else (), H=heads, D=dim,
                            dtype=dtype, decode_batches=parse_ints(decode_batches,
                                                                   "--decode-batches"),
                            decode_context=decode_context,
                            providers=tuple(provider or ()) or None, rep_ms=rep_ms,
                            mamba_src=mamba_src)
        check_options(opts)
    kept = []
    if resume:
        if not save:
            raise typer.BadParameter("--resume needs --save FILE (the report to continue)")
        if os.path.exists(save):
            kept = rows_from_json(save, opts)
            err_console.print(f"resuming {save}: {len(kept)} rows kept")
    report = run_bench(opts, progress=lambda msg: err_console.print(f"[dim]{msg}[/dim]"),
                       checkpoint=(lambda part: render.save_json(part, save)) if save else None,
                       resume=kept)
    if save:
        render.save_json(report, save)
    if plot and report.timed:
        render.plot(report, plot)
    typer.echo(render.to_json(report)) if as_json else _render_bench(report)
    if not report.timed:
        err_console.print("[red]error:[/red] no row was timed (every provider asked for was "
                          "unavailable or failed; see above)")
        raise typer.Exit(1)


@app.command()
def stages(
    shape: str = typer.Option(None, help="BxT [GPU 2x8192, CPU 1x64]"),
    heads: int = typer.Option(None, help="H [GPU 16, CPU 1]"),
    dim: int = typer.Option(None, help="head dim D (K = V = D) [GPU 128, CPU 32]"),
    dtype: str = typer.Option(None, help="bfloat16, float16 or float32 [GPU bfloat16, CPU float32]"),
    backward: bool = typer.Option(True, "--backward/--forward-only",
                                  help="also time the backward's stages"),
    reps: int = typer.Option(None, help="passes; each stage's median is reported [GPU 20, CPU 2]"),
    ncu: str = typer.Option(None, help="run Nsight Compute on this stage (e.g. intra_fwd)"),
    ncu_out: str = typer.Option("ncu", help="folder for the Nsight Compute report"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Per-stage time, share, GB/s and TFLOP/s of our forward and backward, and the configs as
    they launch."""
    from gdn2_kernels import _device
    from gdn2_kernels.bench import report as render
    from gdn2_kernels.bench.stages import breakdown, problem_from_options

    with _usage_errors():
        problem, reps = problem_from_options(shape, heads, dim, dtype, reps,
                                             _device.interpreter_active())
    _announce_interpreter(as_json, f"Timing the stages of {problem.label()} H{problem.H} "
                                   f"D{problem.D} {problem.dtype}, {reps} passes.")
    report = breakdown(problem, backward=backward, reps=reps, ncu_stage=ncu, ncu_out=ncu_out)
    if as_json:
        print_json(report)
        return
    console.print(render.stages_table(report))
    for line in render.stages_lines(report):
        console.print(line)


# The command's old name: a "profile" is a shipped config file (profiles/).
app.command("profile", deprecated=True, help="The old name of `gdn2 stages`.")(stages)


# ------------------------------------------------------------------------------------------------
# info, tune, cache (library: gdn2_kernels/tuner/)
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _library_errors():
    """Typed library errors -> one red line and exit code 1 (also under typer's CliRunner)."""
    from gdn2_kernels.config_files import CacheError
    from gdn2_kernels.tuner.tune import TuneError

    try:
        with _usage_errors():  # an option found bad late is still a usage error
            yield
    except (TuneError, CacheError, FileNotFoundError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        err_console.print(f"[red]error:[/red] {escape(str(msg))}")
        raise typer.Exit(1) from None


def _render_info(report) -> None:
    g = report.gpu
    console.print(f"[bold]GPU[/bold]: {g.note}")
    for ident, sample in zip(g.devices, g.samples):
        console.print(f"  [{ident.index}] {ident.name}  uuid={ident.uuid}  "
                      f"cc={ident.compute_capability}  mem={ident.memory_total_mb} MiB  "
                      f"driver={ident.driver}")
        console.print(f"      SM {sample.sm_clock_mhz}/{ident.max_sm_clock_mhz} MHz  "
                      f"mem {sample.mem_clock_mhz}/{ident.max_mem_clock_mhz} MHz  "
                      f"{sample.temperature_c} C  {sample.power_w} W / {ident.power_limit_w} W  "
                      f"throttle: {', '.join(sample.throttle_reasons) or 'none'}")
    _interpreter_note(report.interpreter)
    console.print("[bold]software[/bold]: " + "  ".join(f"{k} {v}" for k, v in report.software.items()))
    table = Table(title=f"config sources for {report.device} (highest precedence first)")
    for col in ("source", "path", "state"):
        table.add_column(col)
    for s in report.sources:
        state = ("[green]in use if it has the key[/green] " if s.usable else "[dim]unused[/dim] ")
        table.add_row(s.name, escape(s.path or "-"), state + escape(s.note))
    console.print(table)
    console.print(f"configs for {report.key} come from: "
                  f"[bold]{escape(report.resolved_source)}[/bold]")
    table = Table(title=f"registered kernels (space for {report.key} on {report.arch})")
    for col in ("kernel", "dir", "workload", "valid/total", "pruned by rule"):
        table.add_column(col)
    for k in report.kernels:
        pruned = ", ".join(f"{r}: {n}" for r, n in k.pruned_by_rule.items()) or "-"
        table.add_row(k.name, k.direction, k.workload, f"{k.space_valid}/{k.space_total}", pruned)
    console.print(table)
    for k in report.kernels:
        params = "  ".join(f"{n}∈{tuple(p['values'])}" for n, p in k.params.items())
        resolved = ",".join(f"{n}={v}" for n, v in (k.resolved or {}).items()) or "-"
        console.print(f"[bold]{k.name}[/bold]: {params}\n  resolved: {resolved}")
        if k.launched is not None and k.launched != k.resolved:
            at = report.shape
            console.print(f"  launched at {at['B']}x{at['T']} H{at['H']}: "
                          + ",".join(f"{n}={v}" for n, v in k.launched.items()))
    if report.shape is not None:
        at = report.shape
        console.print(f"launch time at {at['B']}x{at['T']} H{at['H']}: "
                      + ("; ".join(report.launch_changes) or "the configs as resolved"))
    console.print("strategies: " + ", ".join(report.strategies))


@app.command()
def info(
    shape: str = typer.Option(None, help="BxT: also show the configs as they launch at this "
                                         "shape (launch-time rules of the serial passes)"),
    heads: int = typer.Option(16, help="H, with --shape"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """GPU identity and health (NVML), software, kernels and their spaces, config sources."""
    from gdn2_kernels.options import OptionError, integer, parse_shapes
    from gdn2_kernels.tuner.info import collect

    with _library_errors():
        at = None
        if shape is not None:
            shapes = parse_shapes(shape, "--shape")
            if len(shapes) != 1:
                raise OptionError("--shape", f"give one BxT (e.g. 1x16384), got {shape!r}")
            at = shapes[0]
            integer(heads, "--heads")
        report = collect(shape=at, heads=heads)
    print_json(report) if as_json else _render_info(report)


def _render_plan(plan) -> None:
    console.print(f"problem {plan.problem.label()} key {plan.key} on {plan.device} ({plan.arch}), "
                  f"devices {plan.devices}; strategy {plan.strategy} {plan.strategy_options}; "
                  f"budget {plan.max_minutes} min, {plan.max_configs or 'no'} config limit")
    table = Table(title="search space (pruned configs are never run)")
    for col in ("search", "workload", "total", "valid", "pruned: rule (count) reason"):
        table.add_column(col)
    for s in plan.searches:
        pruned = "\n".join(f"{r} ({n}): {s.pruned_reasons[r]}" for r, n in s.pruned_by_rule.items())
        table.add_row(s.label(), s.workload, str(s.total), str(s.valid), pruned or "-")
    console.print(table)
    for kernel, reason in plan.skipped:
        console.print(f"[yellow]skipped {kernel}[/yellow]: {reason}")
    console.print(f"trial log: {plan.log_path}")


def _best_table(bests) -> Table:
    table = Table(title="best verified configs so far")
    for col in ("search", "config", "median ms", "IQR ms", "effort"):
        table.add_column(col)
    for name, t in bests.items():
        table.add_row(name, t.label(), f"{t.median_ms:.4g}", f"{t.iqr_ms:.2g}", str(t.effort))
    return table


def _render_tune(result) -> None:
    from gdn2_kernels.tuner.tune import pipeline_score

    plan = result.plan
    table = Table(title=f"tune of {plan.problem.label()} on {plan.device}")
    for col in ("search", "trials", "statuses", "best config", "median ms", "IQR ms"):
        table.add_column(col)
    for s in result.searches:
        b = s.best
        table.add_row(s.plan.label(), str(s.trials),
                      ", ".join(f"{k} {v}" for k, v in sorted(s.by_status.items())),
                      b.label() if b else "[red]none verified[/red]",
                      f"{b.median_ms:.4g}" if b else "-", f"{b.iqr_ms:.2g}" if b else "-")
    console.print(table)
    table = Table(title="whole pipeline per chunk size (" + (
        "forward+backward" if plan.backward_available else "forward only") + ")")
    long = plan.long_problem
    cols = ["BT", "median ms", "IQR ms"]
    if long is not None:
        cols += [f"median ms, B=1 T={long.T}", "score (geometric mean)"]
    for col in cols + ["status"]:
        table.add_column(col)
    long_by_bt = {t.chunk_size: t for t in result.long_pipelines}

    def ms(t):
        return f"{t.median_ms:.4g}" if t is not None and t.median_ms else "-"

    def row(label, t, lt, score, mark=""):
        cells = [label, ms(t), f"{t.iqr_ms:.2g}" if t.iqr_ms is not None else "-"]
        if long is not None:
            cells += [ms(lt), f"{score:.4g}" if score else "-"]
        status = t.status if lt is None or lt.status == t.status else f"{t.status} / {lt.status}"
        table.add_row(*cells, status + mark)

    for t in result.pipelines:
        mark = " [green]<- chosen[/green]" if t.chunk_size == result.chosen_chunk_size else ""
        row(str(t.chunk_size), t, long_by_bt.get(t.chunk_size), result.scores.get(t.chunk_size),
            mark)
    if result.default is not None:
        d, ld = result.default, result.long_default
        row(f"defaults (BT={d.chunk_size})", d, ld, pipeline_score(d, ld, long is not None))
    console.print(table)
    for kernel, reason in plan.skipped:
        console.print(f"[yellow]skipped {kernel}[/yellow]: {reason}")
    if result.speedup:
        console.print(f"tuned pipeline vs spec defaults: [bold]{result.speedup:.2f}x[/bold]"
                      + (" (interpreter timings)" if plan.interpreter else ""))
    console.print(f"{result.trials_run} trials run, {result.trials_resumed} taken from the log, "
                  f"{result.worker_restarts} worker restarts, {result.seconds:.0f} s; "
                  f"log {plan.log_path}")
    console.print(("[yellow]" if plan.interpreter else "") + result.note
                  + ("[/yellow]" if plan.interpreter else ""))
    for path in result.written:
        console.print(f"wrote {path}")


def _tune_options(batch, seqlen, heads, head_k, head_v, dtype, kernel, chunk_size, forward_only,
                  strategy, option, max_minutes, max_configs, devices, log, output, no_cache,
                  fresh, timeout, long_check=True):
    """The TuneOptions of one dtype, checked (OptionError before any work starts)."""
    from gdn2_kernels.gpu import gpu_available
    from gdn2_kernels.options import OptionError, one_of
    from gdn2_kernels.tuner.strategies import STRATEGIES, parse_options
    from gdn2_kernels.tuner.tune import CPU_PROBLEM, GPU_PROBLEM, TuneOptions, check_options

    base = GPU_PROBLEM if gpu_available() else CPU_PROBLEM
    given = {"B": batch, "T": seqlen, "H": heads, "K": head_k, "V": head_v, "dtype": dtype}
    problem = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    one_of(strategy, sorted(STRATEGIES), "--strategy")
    try:
        strategy_options = parse_options(strategy, list(option))
    except ValueError as exc:
        raise OptionError("-o/--option", str(exc)) from None
    opts = TuneOptions(problem=problem, kernels=tuple(kernel or ()) or None,
                       chunk_sizes=tuple(chunk_size or ()) or None, backward=not forward_only,
                       strategy=strategy, strategy_options=strategy_options,
                       max_minutes=max_minutes, max_configs=max_configs, devices=devices,
                       log_path=log, output=output, write_cache=not no_cache, resume=not fresh,
                       timeout_s=timeout, long_check=long_check)
    check_options(opts)
    return opts


@app.command()
def tune(
    batch: int = typer.Option(None, "--batch", "-B", help="B of the timing problem [GPU 4, CPU 1]"),
    seqlen: int = typer.Option(None, "--seqlen", "-T", help="T of the timing problem [GPU 4096, CPU 64]"),
    heads: int = typer.Option(None, "--heads", "-H", help="heads [GPU 16, CPU 1]"),
    head_k: int = typer.Option(None, "--k", "-K", help="key head dim [GPU 128, CPU 32]"),
    head_v: int = typer.Option(None, "--v", "-V", help="value head dim [GPU 128, CPU 32]"),
    dtype: list[str] = typer.Option(None, "--dtype",
                                    help="input dtype, repeat for several [GPU bfloat16, CPU float32]"),
    kernel: list[str] = typer.Option(None, "--kernel", "-k", help="only these kernels (repeat)"),
    chunk_size: list[int] = typer.Option(None, "--chunk-size", "-c",
                                         help="chunk sizes BT to try (repeat) [GPU all, CPU 32, 64]"),
    forward_only: bool = typer.Option(False, "--forward-only", help="skip the backward kernels"),
    long_check: bool = typer.Option(True, "--long-check/--no-long-check",
                                    help="also time the final pipelines on one sequence of B*T "
                                         "tokens and choose the chunk size by the geometric mean "
                                         "of both medians (skipped when B is 1)"),
    strategy: str = typer.Option("halving", help="exhaustive, random or halving (see --option)"),
    option: list[str] = typer.Option(None, "--option", "-o",
                                     help="strategy option name=value (repeat): "
                                          + options_help()),
    max_minutes: float = typer.Option(None, help="time budget [GPU 9, CPU 1.5]"),
    max_configs: int = typer.Option(None, help="distinct configs to try, split over the searches"),
    devices: str = typer.Option("auto", help="'auto' (current GPU), 'all' (shard over every "
                                             "visible GPU), or indices like 0,1"),
    log: str = typer.Option(None, help="trial log (JSONL) [cache dir/logs/<GPU>-<problem>.jsonl]"),
    output: str = typer.Option(None, help="also write the profile JSON here (GPU only)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not write the user cache"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore (set aside) an existing trial log"),
    timeout: float = typer.Option(180.0, help="seconds before a hung candidate is killed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the space and pruning, run nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Search, verify and time kernel configs for this GPU; write the best to the user cache."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gdn2_kernels.tuner.tune import make_plan, tune as run_tune

    with _usage_errors():  # every dtype's options, before the first tune starts
        all_opts = [_tune_options(batch, seqlen, heads, head_k, head_v, dt, kernel, chunk_size,
                                  forward_only, strategy, option or [], max_minutes, max_configs,
                                  devices, log, output, no_cache, fresh, timeout, long_check)
                    for dt in (dtype or [None])]
    _announce_interpreter(as_json, "Nothing is written to the cache: interpreter timings say "
                                   "nothing about a GPU.")
    results = []
    for opts in all_opts:
        with _library_errors():
            if dry_run:
                plan = make_plan(opts)
                print_json(plan) if as_json else _render_plan(plan)
                continue
            out = err_console if as_json else console
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=out)
            task = bar.add_task("tuning", total=None)
            with Live(Group(bar, _best_table({})), console=out, refresh_per_second=4,
                      transient=as_json) as live:
                def progress(ev) -> None:
                    t = ev.trial
                    desc = f"{ev.phase} {ev.search}" + (f": {t.label()} {t.status}" if t else "")
                    bar.update(task, completed=ev.done, total=max(ev.expected, ev.done),
                               description=desc[:90])
                    live.update(Group(bar, _best_table(ev.bests)))

                result = run_tune(opts, progress)
            if not out.is_terminal:  # rich ends a live display with a newline on terminals only
                out.line()
        results.append(result)
        if not as_json:
            _render_tune(result)
    if as_json and not dry_run:
        print_json(results[0] if len(results) == 1 else results)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------
# export, cache import (library: gdn2_kernels/tuner/export.py)
# ------------------------------------------------------------------------------------------------

def _render_export(report) -> None:
    table = Table(title=escape(f"{report.format} export of {report.source} ({report.gpu}) to "
                               f"{report.out}"))
    for col in ("kernel", "key", "status", "file", "detail"):
        table.add_column(col)
    for it in report.items:
        mark = "[green]written[/green]" if it.status == "written" else "[yellow]skipped[/yellow]"
        table.add_row(it.kernel, it.key, mark, escape(it.target or "-"), escape(it.reason))
    console.print(table)
    for note in report.notes:
        console.print(escape(note))
    console.print(f"{len(report.files)} file(s) written" if report.files
                  else "[red]nothing written[/red] (no verified entries to export)")


@app.command()
def export(
    fmt: str = typer.Option(..., "--format", "-f", help="portable, fla or vllm"),
    out: str = typer.Option(..., "--out", "-o", help="output folder"),
    source: str = typer.Option(None, "--from", help="cache-schema file (default: this GPU's "
                                                      "cache, else its shipped profile)"),
    heads: list[int] = typer.Option(None, "--heads", help="fla: head counts H for exact autotune "
                                                          "keys (repeat) [16]"),
    tokens: int = typer.Option(None, "--tokens", help="vllm: token bucket of these configs "
                                                      "[B*T of the tune problem]"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Write this GPU's verified configs for other software (FLA, vLLM-style) or machines."""
    from gdn2_kernels.tuner.export import export as run_export

    with _library_errors():
        report = run_export(fmt, out, source, tuple(heads or ()) or None, tokens)
    print_json(report) if as_json else _render_export(report)
    if not report.ok:
        raise typer.Exit(1)


cache_app = typer.Typer(no_args_is_help=True, help="The user cache of tuned configs.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """List the cache files, their GPU, keys, and whether they can be used here."""
    from gdn2_kernels.tuner.cache import list_caches, paths

    files = list_caches()
    if as_json:
        print_json(files)
        return
    table = Table(title=f"user cache {paths().cache_dir}")
    for col in ("file", "GPU", "entries", "keys", "created", "usable here"):
        table.add_column(col)
    for f in files:
        keys = "; ".join(f"K{k['K']} V{k['V']} {k['dtype']}" for k in f.keys)
        state = ("[green]yes[/green]" if f.usable_here
                 else f"[red]no, {'rejected' if f.rejected else 'not for here'}[/red]: "
                      + escape(str(f.problem).removeprefix("rejected: ")))
        table.add_row(escape(f.path), escape(f.gpu or "-"), str(f.entries), keys,
                      escape(f.created or "-"), state)
    console.print(table)


@cache_app.command("show")
def cache_show(
    target: str = typer.Argument(None, help="a cache file path or GPU name [this GPU]"),
    as_json: bool = typer.Option(False, "--json", help="print the file as JSON"),
) -> None:
    """Show the entries of one cache file (validated)."""
    from gdn2_kernels.tuner.cache import show

    with _library_errors():
        cache = show(target)
    if as_json:
        typer.echo(json.dumps(cache.as_dict(), indent=2))
        return
    console.print(escape(f"{cache.path}: GPU {cache.gpu.get('name')}, created {cache.created}, "
                         + ", ".join(f"{k} {v}" for k, v in cache.software.items())))
    table = Table()
    for col in ("kernel", "key", "config", "median ms", "IQR ms", "max rel err (worst tensor)"):
        table.add_column(col)
    for e in cache.entries:
        worst = max(((n, v.get("max_rel_err", 0.0)) for n, v in e.verified.items()),
                    key=lambda x: x[1], default=None)
        table.add_row(e.kernel, f"K{e.key['K']} V{e.key['V']} {e.key['dtype']}",
                      ",".join(f"{k}={v}" for k, v in e.config.items()),
                      f"{e.median_ms:.4g}" if e.median_ms is not None else "-",
                      f"{e.iqr_ms:.2g}" if e.iqr_ms is not None else "-",
                      f"{worst[1]:.1e} ({worst[0]})" if worst else "-")
    console.print(table)


@cache_app.command("clear")
def cache_clear(
    gpu: str = typer.Option(None, help="the GPU whose file to delete [this GPU]; 'all' for every file"),
    as_json: bool = typer.Option(False, "--json", help="print the removed paths as JSON"),
) -> None:
    """Delete cached configs (the shipped profiles are not touched)."""
    from gdn2_kernels.tuner.cache import clear

    removed = clear(gpu)
    if as_json:
        print_json({"removed": removed})
        return
    console.print("\n".join(f"removed {p}" for p in removed) or "nothing to remove")


@cache_app.command("import")
def cache_import(
    file: str = typer.Argument(..., help="a portable export (gdn2 export --format portable)"),
    merge: bool = typer.Option(False, "--merge", help="per key keep the better pipeline (verified, "
                                                      "then lower median) instead of replacing"),
    force: bool = typer.Option(False, "--force", help="keep entries from another GPU model, Triton "
                                                      "major or newer schema as unverified hints"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Import tuned configs into this GPU's user cache; then run `gdn2 verify`."""
    from gdn2_kernels.tuner.export import import_file

    with _library_errors():
        report = import_file(file, merge=merge, force=force)
    if as_json:
        print_json(report)
        return
    table = Table(title=escape(f"import of {report.source} ({report.source_gpu}) into "
                               f"{report.target}"))
    for col in ("key", "kernels", "status", "why"):
        table.add_column(col)
    for it in report.items:
        color = {"imported": "green", "hint": "yellow"}.get(it.status, "dim")
        table.add_row(it.key, ", ".join(it.kernels), f"[{color}]{it.status}[/{color}]",
                      escape(it.reason))
    console.print(table)
    console.print(f"next: {report.next_step}")


@cache_app.command("path")
def cache_path(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Where the cache, this GPU's file, its shipped profile and $GDN2_CONFIG_FILE are."""
    from gdn2_kernels.tuner.cache import paths

    p = paths()
    if as_json:
        print_json(p)
        return
    console.print(f"cache folder:     {p.cache_dir}\nthis GPU's file:  {p.this_gpu_file}\n"
                  f"shipped profile:  {p.shipped_profile}\nGDN2_CONFIG_FILE: {p.config_file or '-'}")


def main() -> None:
    try:
        app()
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
